#!/usr/bin/env bash
# A profile of sidecache's hits: run.py's mixed scenario (20,000 objects of 1 to 48 KiB, mean
# 24.5 KiB, stored first, then asked for uniformly by wrk's 64 connections through a sidecache
# with its default settings), recorded with `perf record -g` on the sidecache process only,
# then grouped by job.
#
#     sudo benches/load/profile_hits.sh            # or: SECONDS_EACH=20 OUT=/tmp/x benches/load/profile_hits.sh
#     SIDECACHE=/tmp/old-sidecache benches/load/profile_hits.sh    # an earlier build, not rebuilt
#
# Steps: builds the release binary and loadtool; starts the origin and sidecache on 127.0.0.1
# (free ports) with a new cache directory under $OUT; stores the $OBJECTS objects
# (`loadtool fetch`); warms for 5 s with wrk; measures req/s and CPU per request over
# $SECONDS_EACH s without perf; records as long again under `perf record --call-graph $CALL_GRAPH -F $FREQ -p PID`
# while wrk runs beside it (wrk is not perf's child: perf sets PREFIX=/usr in its child's
# environment); checks that the origin saw no request meanwhile (every request a hit); prints
# the top symbols by self time and the self time grouped by job (profile_groups.py).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-$(mktemp -d /tmp/sidecache-profile-hits.XXXXXX)}
OBJECTS=${OBJECTS:-20000}
SECONDS_EACH=${SECONDS_EACH:-10}
FREQ=${FREQ:-2999}
# How perf unwinds: fp (frame pointers, the default: cheap, but Rust frames without them are
# cut short) or dwarf (whole call chains, to find who calls a symbol; record a few seconds).
CALL_GRAPH=${CALL_GRAPH:-fp}
hits() { # DURATION OUTPUT: wrk over the stored objects
    NAME_PREFIX=m OBJECTS="$OBJECTS" wrk -t2 -c64 -d"$1"s --latency -s "$HERE/objects.lua" \
        "http://127.0.0.1:$PORT/" >"$2"
}
origin_count() { curl -fs "http://127.0.0.1:$ORIGIN_PORT/__stats"; }
# shellcheck source=profile_start.sh
. "$ROOT/benches/load/profile_start.sh"

"$LOADTOOL" fetch "127.0.0.1:$PORT" m "$OBJECTS" 64 >"$OUT/fill.json"
hits 5 /dev/null
stored=$(origin_count)

CLK=$(getconf CLK_TCK)
before=$(cpu_ticks $PID)
hits "$SECONDS_EACH" "$OUT/wrk-plain.txt"
requests=$(awk '/requests in/ { print $1 }' "$OUT/wrk-plain.txt")
plain_us=$(echo "($(cpu_ticks $PID) - $before) * 1000000 / $CLK / $requests" | bc)

hits "$SECONDS_EACH" "$OUT/wrk-perf.txt" &
WRK=$!
perf record --call-graph "$CALL_GRAPH" -F "$FREQ" -p "$PID" -o "$OUT/perf.data" -- sleep "$SECONDS_EACH" 2>"$OUT/perf-record.log"
wait "$WRK"
if [ "$(origin_count)" != "$stored" ]; then
    echo "the origin was asked during the profile: not every request was a hit" >&2
    exit 1
fi

perf_reports 25

{
    echo "# sidecache hit profile"
    echo
    echo "binary $SIDECACHE, tree at $(git -C "$ROOT" describe --always --dirty), $(uname -r), $(nproc) CPUs, $(perf --version)"
    echo "$OBJECTS stored objects asked for uniformly by 64 connections; every request a hit"
    echo
    echo "- without perf: $(awk '/Requests\/sec/ { print $2 }' "$OUT/wrk-plain.txt") req/s, $plain_us µs of CPU per request"
    echo "- under perf: $(awk '/Requests\/sec/ { print $2 }' "$OUT/wrk-perf.txt") req/s"
    echo
    cat "$OUT/groups.md"
} | tee "$OUT/summary.md"
echo
echo "perf.data, report-flat.txt and summary.md are in $OUT"
