#!/usr/bin/env bash
# A real browser through the sidecar: headless Chromium loads a page whose script is served
# from sidecache's brotli variant, and the script runs. Outside CI (Chromium is a large
# install): run it by hand after `apt-get install -y chromium`.
#
#   bash tests/browser/brotli_in_chromium.sh
#
# Passes when the page's DOM shows the script ran, the script's request was answered with
# `Content-Encoding: br` from the cache, and no other encoding was served for it.
set -euo pipefail
cd "$(dirname "$0")/../.."
CHROMIUM=$(command -v chromium || command -v chromium-browser || true)
[ -n "$CHROMIUM" ] || { echo "chromium not found: apt-get install -y chromium" >&2; exit 2; }
cargo build --quiet --bin sidecache
BIN=target/debug/sidecache
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# The app: a page and a fingerprinted script (sidecache keeps fingerprinted names for a year).
mkdir -p "$WORK/site/assets"
SCRIPT=assets/app-3f2a9c81.js
{
  echo 'document.addEventListener("DOMContentLoaded", function () {'
  echo '  document.body.setAttribute("data-ran", "yes");'
  echo '});'
  for i in $(seq 1 400); do echo "function handler$i(e) { return e.detail * $i + \"evt-$i\"; }"; done
} > "$WORK/site/$SCRIPT"
echo "<!doctype html><html><head><script src=\"/$SCRIPT\"></script></head><body>page</body></html>" \
  > "$WORK/site/index.html"
APP=$(free_port)
python3 -m http.server "$APP" --bind 127.0.0.1 --directory "$WORK/site" > "$WORK/app.log" 2>&1 &

PORT=$(free_port); ADMIN=$(free_port)
"$BIN" serve --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$ADMIN" \
  --upstream "http://127.0.0.1:$APP" --cache-dir "$WORK/cache" > "$WORK/sidecache.log" 2>&1 &
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$ADMIN/readyz" > /dev/null && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$ADMIN/readyz" > /dev/null || { cat "$WORK/sidecache.log"; exit 1; }

# Prime it: the prime waits for the variants, so the browser's request is a hit on brotli.
echo "/$SCRIPT" | "$BIN" prime --target "http://127.0.0.1:$ADMIN" --host "127.0.0.1:$PORT" --urls -

DOM=$("$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-dev-shm-usage \
  --dump-dom "http://127.0.0.1:$PORT/index.html" 2> "$WORK/chromium.log")
METRICS=$(curl -s "http://127.0.0.1:$ADMIN/metrics")
br=$(echo "$METRICS" | awk '/^sidecache_served_by_encoding_total\{encoding="br"\}/ {print $2}')
echo "DOM: $DOM"
echo "served from the cache in brotli: ${br:-0}"
echo "$DOM" | grep -q 'data-ran="yes"' || { echo "FAIL: the script did not run"; exit 1; }
[ "${br:-0}" != "0" ] || { echo "FAIL: the script was not served in brotli"; exit 1; }
echo "PASS: Chromium ran a script sent from sidecache's brotli variant"
