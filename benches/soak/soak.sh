#!/usr/bin/env bash
# Soak test (not in CI): sustained mixed load with budget churn against a release build.
# Reports resident memory and open file descriptors over time, errors, and requests.
#   benches/soak/soak.sh [DURATION_SECONDS=600] [BUDGET=64MiB]
# Needs: wrk (apt-get install wrk), python3. Binds 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/../.."
duration=${1:-600}
budget=${2:-64MiB}
command -v wrk >/dev/null || { echo "install wrk (apt-get install wrk)"; exit 1; }
cargo build --release --quiet
work=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
app_port=$(free_port); public_port=$(free_port); admin_port=$(free_port)
PORT=$app_port python3 benches/soak/origin.py & app=$!
SIDECACHE_ACCESS_LOG=false ./target/release/sidecache serve --listen 127.0.0.1:$public_port \
  --admin-listen 127.0.0.1:$admin_port --upstream http://127.0.0.1:$app_port \
  --cache-dir "$work/cache" --max-size "$budget" --memory-size 8MiB > "$work/sidecache.log" 2>&1 & sc=$!
trap 'kill $app $sc 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin_port/readyz" >/dev/null && break; sleep 0.1; done

sample() { # seconds rss_kib fds cache_bytes
  local rss fds size
  rss=$(awk '/VmRSS/ {print $2}' /proc/$sc/status)
  fds=$(ls /proc/$sc/fd | wc -l)
  size=$(curl -s "http://127.0.0.1:$admin_port/metrics" | awk '/^sidecache_cache_size_bytes/ {print $2}')
  echo "$1 $rss $fds ${size:-0}"
}
echo "# t_seconds rss_kib open_fds cache_bytes" | tee "$work/samples"
start=$(date +%s)
SOAK_OBJECTS=20000 wrk -t2 -c32 -d"${duration}s" --latency -s benches/soak/zipf.lua \
  "http://127.0.0.1:$public_port" > "$work/wrk.txt" 2>&1 & load=$!
while kill -0 $load 2>/dev/null; do
  sample $(( $(date +%s) - start )) | tee -a "$work/samples"
  sleep 30
done
wait $load || true
sample $(( $(date +%s) - start )) | tee -a "$work/samples"
echo; cat "$work/wrk.txt"
echo; curl -s "http://127.0.0.1:$admin_port/metrics" | grep -E '^sidecache_(requests_total|evictions_total|storage_errors_total|fills_aborted_total|upstream_errors_total|cache_objects |cache_size_bytes |corrupt)' || true
first=$(sed -n 2p "$work/samples"); last=$(tail -1 "$work/samples")
mid=$(awk 'NR>1' "$work/samples" | sed -n "$(( $(awk 'NR>1' "$work/samples" | wc -l) / 2 + 1 ))p")
echo
echo "RSS start/middle/end (KiB): $(echo "$first" | cut -d' ' -f2) / $(echo "$mid" | cut -d' ' -f2) / $(echo "$last" | cut -d' ' -f2)"
echo "open fds start/end: $(echo "$first" | cut -d' ' -f3) / $(echo "$last" | cut -d' ' -f3)"
kill -0 $sc && echo "sidecache still running: yes"
