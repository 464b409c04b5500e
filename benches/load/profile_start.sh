# Sourced by profile_fill.sh and profile_hits.sh (not run on its own): builds the release binary
# and loadtool unless SIDECACHE names a binary; lets perf see kernel frames; starts loadtool's
# origin and a sidecache with its defaults on free 127.0.0.1 ports, with a new cache directory
# under $OUT; stops both and removes the cache directory at exit.
#
# Expects ROOT and OUT. Sets HERE, LOADTOOL, SIDECACHE, ORIGIN_PORT, PORT, ADMIN, ORIGIN_PID,
# PID, and the functions free_port, cpu_ticks (user + system ticks of a process), wait_for (a
# URL, until it answers 200, at most 60 s) and perf_reports (the reports of $OUT/perf.data).

HERE="$ROOT/benches/load"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
LOADTOOL="$TARGET_DIR/release/examples/loadtool"
mkdir -p "$OUT"

if [ -z "${SIDECACHE:-}" ]; then
    SIDECACHE="$TARGET_DIR/release/sidecache"
    (cd "$ROOT" && cargo build --release --quiet --bin sidecache --example loadtool)
fi
if [ "$(cat /proc/sys/kernel/perf_event_paranoid)" -gt -1 ]; then
    sysctl -q kernel.perf_event_paranoid=-1 || echo "perf_event_paranoid > -1: kernel frames may be missing" >&2
fi

# Writes $OUT/report-flat.txt (symbols by self time) and $OUT/groups.md (self time by job, the
# top $1 symbols) from $OUT/perf.data.
perf_reports() {
    perf report -i "$OUT/perf.data" --no-children --sort symbol --stdio -g none --percent-limit 0.3 \
        >"$OUT/report-flat.txt" 2>/dev/null
    perf script -i "$OUT/perf.data" -F period,ip,sym,dso 2>/dev/null \
        | python3 "$HERE/profile_groups.py" --top "$1" >"$OUT/groups.md"
}
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
wait_for() {
    for _ in $(seq 600); do
        if curl -fs -o /dev/null "$1"; then return 0; fi
        sleep 0.1
    done
    echo "timed out waiting for $1" >&2
    exit 1
}

ORIGIN_PORT=$(free_port)
PORT=$(free_port)
ADMIN=$(free_port)
"$LOADTOOL" origin "$ORIGIN_PORT" >"$OUT/origin.log" 2>&1 &
ORIGIN_PID=$!
SIDECACHE_ACCESS_LOG=false SIDECACHE_MIN_FREE=0 "$SIDECACHE" serve \
    --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$ADMIN" \
    --upstream "http://127.0.0.1:$ORIGIN_PORT" --cache-dir "$OUT/cache" --max-size 4GB \
    >"$OUT/sidecache.log" 2>&1 &
PID=$!
trap 'kill $PID $ORIGIN_PID 2>/dev/null; wait $PID $ORIGIN_PID 2>/dev/null || true; rm -rf "$OUT/cache"' EXIT
wait_for "http://127.0.0.1:$ORIGIN_PORT/__stats"
wait_for "http://127.0.0.1:$ADMIN/readyz"
