#!/usr/bin/env python3
"""User and system CPU time per request, and context switches, on run.py's mixed set: sidecache
builds side by side with nginx serving the files directly (and, with --origin, loadtool's origin:
a bare hyper server answering from memory, the floor of a hyper-based server on this machine).

    CARGO_TARGET_DIR=/work/target-rel python3 benches/load/split.py new=target/release/sidecache \\
        old=/tmp/sidecache-old --reps 5 [--origin] [--strace]

Each NAME=BINARY starts a sidecache with run.py's settings (BINARY:VAR=VALUE,... adds
environment). Every target is filled with the 20,000 objects, warmed 3 s, then measured in
interleaved repetitions of wrk (2 threads, 64 connections) over objects.lua; per repetition it
prints req/s, user and system µs per request (from every thread's /proc stat) and voluntary and
involuntary context switches per request; then the medians. --strace counts system calls per
request over 4 s more of each (run.py's strace_counts). --objects N stores and asks for N
objects of the mixed set instead of 20,000: with 1,000 (about 25 MB, every object's records warm
in the CPU's caches) beside the 20,000, what a hit pays for touching cold per-object memory
shows apart from the rest of its path. Needs the release build and loadtool (as run.py
--no-build).
"""
import argparse
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as R  # noqa: E402


def threads_stat(proc):
    """(user s, system s, voluntary, involuntary switches) over every thread of `proc`."""
    user = system = vol = invol = 0
    for pid in proc.pids():
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                user, system = user + int(fields[11]), system + int(fields[12])
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches"):
                            vol += int(line.split()[1])
                        elif line.startswith("nonvoluntary_ctxt_switches"):
                            invol += int(line.split()[1])
            except OSError:
                pass
    return user / R.CLK, system / R.CLK, vol, invol


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("builds", nargs="*", help="NAME=BINARY[:VAR=VALUE,...]")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=int, default=6)
    ap.add_argument("--origin", action="store_true", help="measure loadtool's origin too")
    ap.add_argument("--strace", action="store_true")
    ap.add_argument("--objects", type=int, default=R.MIXED_OBJECTS, help="objects of the mixed set (default 20,000)")
    a = ap.parse_args()
    objects = str(a.objects)

    class Args:
        duration, reps = a.duration, a.reps

    bench = R.Bench(Args())
    subprocess.run([R.LOADTOOL, "gen", os.path.join(bench.work, "docroot"), "mixed", objects],
                   check=True)
    bench.start_origin()
    targets = []
    for spec in a.builds:
        name, binary = spec.split("=", 1)
        env = {}
        if ":" in binary:
            binary, extra = binary.split(":", 1)
            env = dict(kv.split("=", 1) for kv in extra.split(","))
        targets.append(bench.start_sidecache(name, binary=binary, env=env))
    for proc in targets:
        bench.loadtool(proc, "fetch", f"127.0.0.1:{proc.port}", "m", objects, "64")
    targets.append(bench.start_nginx("nginx-direct", R.NGINX_DIRECT))
    if a.origin:
        targets.append(bench.origin)
    env = {"OBJECTS": objects, "NAME_PREFIX": "m"}
    for proc in targets:
        bench.wrk(proc, script="objects.lua", env=env, duration=3)
    rows = {p.name: [] for p in targets}
    try:
        for rep in range(a.reps):
            for proc in targets:
                before = threads_stat(proc)
                r = bench.wrk(proc, script="objects.lua", env=env)
                after = threads_stat(proc)
                n = max(r["requests"], 1)
                d = [(x - y) for x, y in zip(after, before)]
                row = (r["req_s"], d[0] * 1e6 / n, d[1] * 1e6 / n, d[2] / n, d[3] / n)
                rows[proc.name].append(row)
                print(f"  rep {rep + 1} {proc.name:16} {row[0]:8.0f} req/s  user {row[1]:5.1f}  system {row[2]:5.1f}"
                      f" µs/req  switches {row[3]:.3f} voluntary, {row[4]:.3f} involuntary per request", flush=True)
        print("medians: req/s, user µs, system µs, voluntary, involuntary switches per request")
        for name, got in rows.items():
            print(f"  {name:16} " + "  ".join(f"{statistics.median(c):.2f}" for c in zip(*got)))
        if a.strace:
            for proc in targets:
                r = bench.strace_counts(proc, "mixed", lambda p=proc: bench.wrk(
                    p, script="objects.lua", env=env, duration=4))
                print(f"  {proc.name}: {r['syscalls_per_req']:.1f} system calls per request: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in list(r["per_req"].items())[:10]))
    finally:
        for proc in bench.procs:
            proc.stop()


if __name__ == "__main__":
    main()
