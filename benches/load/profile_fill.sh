#!/usr/bin/env bash
# A profile of sidecache's fills: the cold-fill scenario of run.py (new objects of 1 to 48 KiB,
# mean 24.5 KiB, fetched once each by 64 clients through a sidecache with its default settings),
# recorded with `perf record -g` on the sidecache process only, then grouped by job.
#
#     sudo benches/load/profile_fill.sh            # or: ROUNDS=5 OUT=/tmp/x benches/load/profile_fill.sh
#     SIDECACHE=/tmp/old-sidecache benches/load/profile_fill.sh    # an earlier build, not rebuilt
#
# Steps: builds the release binary and loadtool; starts the origin and sidecache on 127.0.0.1
# (free ports) with a new cache directory under $OUT (so on the same filesystem as run.py's,
# /tmp by default); fills $WARMUP objects to warm connections and pools; fills $ROUNDS x $COUNT
# new objects without perf to measure CPU per fill (user + system time of the sidecache process
# from /proc, divided by the fills); fills as many again under `perf record --call-graph $CALL_GRAPH -F $FREQ -p PID`;
# prints the top symbols by self time and the self time grouped by job (profile_groups.py), and
# the system calls per fill, counted by `strace -f -c` over one more round (SYSCALLS=0: not).
# Leaves perf.data, the reports and the logs in $OUT (the cache directory is removed at exit).
# Take "before" and "after" profiles on the same machine, one after the other: inode work
# depends on the filesystem's recent history (inodes deleted just before make inode allocation
# slower).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-$(mktemp -d /tmp/sidecache-profile-fill.XXXXXX)}
COUNT=${COUNT:-2000}
ROUNDS=${ROUNDS:-5}
WARMUP=${WARMUP:-4000}
CONCURRENCY=${CONCURRENCY:-64}
FREQ=${FREQ:-2999}
# How perf unwinds: fp (frame pointers, the default: cheap, but Rust frames without them are
# cut short) or dwarf (whole call chains, to find who calls a symbol; record a few seconds).
CALL_GRAPH=${CALL_GRAPH:-fp}
# SIDECACHE=/path/to/an/earlier/build profiles that binary instead (nothing is built then).
# shellcheck source=profile_start.sh
. "$ROOT/benches/load/profile_start.sh"

fill() { # PREFIX COUNT: COUNT new objects, fails on any error
    local result
    result=$("$LOADTOOL" fetch "127.0.0.1:$PORT" "$1" "$2" "$CONCURRENCY")
    echo "$result" >>"$OUT/fills.jsonl"
    python3 -c 'import json, sys; r = json.loads(sys.argv[1]); sys.exit(r["errors"] != 0)' "$result" \
        || { echo "fill $1 had errors: $result" >&2; exit 1; }
}

fill warm- "$WARMUP"

CLK=$(getconf CLK_TCK)
before=$(cpu_ticks $PID)
started=$(date +%s.%N)
for r in $(seq "$ROUNDS"); do fill "plain$r-" "$COUNT"; done
elapsed=$(echo "$(date +%s.%N) - $started" | bc)
plain_us=$(echo "($(cpu_ticks $PID) - $before) * 1000000 / $CLK / ($ROUNDS * $COUNT)" | bc)

export -f fill
export LOADTOOL PORT CONCURRENCY OUT
before=$(cpu_ticks $PID)
perf record --call-graph "$CALL_GRAPH" -F "$FREQ" -p "$PID" -o "$OUT/perf.data" -- \
    bash -c 'for r in $(seq '"$ROUNDS"'); do fill "perf$r-" '"$COUNT"'; done' 2>"$OUT/perf-record.log"
perf_us=$(echo "($(cpu_ticks $PID) - $before) * 1000000 / $CLK / ($ROUNDS * $COUNT)" | bc)

# System calls per fill: one more round under `strace -c` (slow, but only the counts are used).
if [ "${SYSCALLS:-1}" = 1 ] && command -v strace >/dev/null; then
    strace -f -c -p "$PID" -o "$OUT/syscalls.txt" 2>"$OUT/strace.log" &
    STRACE_PID=$!
    for _ in $(seq 600); do # until it has attached, at most 60 s
        [ "$(awk '/^TracerPid/ { print $2 }' "/proc/$PID/status")" != 0 ] && break
        sleep 0.1
    done
    fill "strace-" "$COUNT"
    kill -INT "$STRACE_PID"
    wait "$STRACE_PID" || true
fi

perf_reports 20

{
    echo "# sidecache fill profile"
    echo
    echo "binary $SIDECACHE, tree at $(git -C "$ROOT" describe --always --dirty), $(uname -r), $(nproc) CPUs, $(perf --version)"
    echo "cache dir on: $(df -T "$OUT" | awk 'NR == 2 { print $1, $2 }')"
    echo "$ROUNDS x $COUNT fills, $CONCURRENCY clients, after $WARMUP warm-up fills"
    echo
    echo "- CPU per fill without perf: $plain_us µs ($ROUNDS x $COUNT fills in ${elapsed} s)"
    echo "- CPU per fill under perf: $perf_us µs"
    echo "- recorded with: perf record --call-graph $CALL_GRAPH -F $FREQ -p <sidecache pid> -- <the fills>"
    echo
    cat "$OUT/groups.md"
    if [ -s "$OUT/syscalls.txt" ]; then
        echo
        echo "System calls per fill (strace -f -c, one round of $COUNT fills):"
        echo
        echo "| calls per fill | system call |"
        echo "|---:|---|"
        awk -v n="$COUNT" '$NF != "total" && $4 ~ /^[0-9]+$/ { printf "| %.2f | %s |\n", $4 / n, $NF }' \
            "$OUT/syscalls.txt" | sort -t'|' -k2 -rn | head -20
        awk -v n="$COUNT" '$NF == "total" { printf "\nIn all: %.1f system calls per fill.\n", $4 / n }' "$OUT/syscalls.txt"
    fi
} | tee "$OUT/summary.md"
echo
echo "perf.data, report-flat.txt and summary.md are in $OUT"
