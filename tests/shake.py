#!/usr/bin/env python3
"""Shakes the test suite: runs the README's test command (`cargo test`) N times, optionally
beside a load, and prints which tests failed and how often.

A suite that passes once proves little on a shared 2-core machine. Run this before resolving
anything that touched concurrency, timing or the disk:

    python3 tests/shake.py --runs 20                 # quiet machine
    python3 tests/shake.py --runs 10 --load release  # beside a release build of the project
    python3 tests/shake.py --runs 5 --load cpu --load disk

Loads (each stops when the runs end, and each is bounded in time by --max-minutes):
  release  `cargo build --release` of this checkout into a scratch target directory, started
           again from clean whenever it finishes (a cold release build is minutes of 2-core CPU)
  cpu      one busy loop per core
  disk     a writer of 64 MiB files with fsync, in a scratch directory, removed after each

The test binaries are built once before the first run (`cargo test --no-run`), so every run
measures the tests, not the build. Exit status: 0 when every run passed, 1 otherwise.
"""

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAILED = re.compile(r"^test (\S+) \.\.\. FAILED$")
RESULT = re.compile(r"^test result: (\w+)\. (\d+) passed; (\d+) failed")


def start_load(kind, scratch, deadline, keep_release=None):
    """Starts one load as a process group; returns the Popen."""
    if kind == "release":
        target = os.path.join(scratch, "release-target")
        keep = f'cp "{target}/release/sidecache" "{keep_release}" 2>/dev/null; ' if keep_release else ""
        # Rebuilt from clean until stopped or the deadline: a steady build-shaped load.
        script = (
            f'while [ "$(date +%s)" -lt {int(deadline)} ]; do '
            f'rm -rf "{target}"; cargo build --release --quiet --target-dir "{target}" >/dev/null 2>&1; '
            f"{keep}done"
        )
    elif kind == "cpu":
        n = os.cpu_count() or 2
        loop = f'while [ "$(date +%s)" -lt {int(deadline)} ]; do :; done'
        script = " & ".join([f"( {loop} )"] * n) + "; wait"
    elif kind == "disk":
        d = os.path.join(scratch, "disk-load")
        os.makedirs(d, exist_ok=True)
        script = (
            f'while [ "$(date +%s)" -lt {int(deadline)} ]; do '
            f'dd if=/dev/zero of="{d}/f" bs=1M count=64 conv=fsync status=none; rm -f "{d}/f"; '
            "done"
        )
    else:
        raise SystemExit(f"unknown load {kind!r}: release, cpu or disk")
    return subprocess.Popen(["bash", "-c", script], cwd=ROOT, start_new_session=True)


def stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10, help="how many full runs (default 10)")
    ap.add_argument("--load", action="append", default=[], help="release, cpu or disk (repeatable)")
    ap.add_argument("--max-minutes", type=float, default=120, help="stop starting runs after this long")
    ap.add_argument("--keep-logs", metavar="DIR", help="keep each run's output in DIR")
    ap.add_argument("--keep-release", metavar="PATH", help="copy each finished release build's binary here")
    ap.add_argument("cargo_args", nargs="*", help="extra arguments for cargo test (after --)")
    args = ap.parse_args()

    started = time.time()
    deadline = started + args.max_minutes * 60
    print("building the test binaries once...", flush=True)
    subprocess.run(["cargo", "test", "--no-run", "--quiet", *args.cargo_args], cwd=ROOT, check=True)

    scratch = tempfile.mkdtemp(prefix="sidecache-shake-")
    loads = [start_load(k, scratch, deadline, args.keep_release) for k in args.load]
    failures = collections.Counter()
    failed_runs, durations = 0, []
    try:
        for run in range(1, args.runs + 1):
            if time.time() > deadline:
                print(f"stopped after {run - 1} runs: --max-minutes reached")
                break
            t0 = time.time()
            proc = subprocess.run(
                ["cargo", "test", *args.cargo_args],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
            took = time.time() - t0
            durations.append(took)
            out = proc.stdout
            failed = [m.group(1) for line in out.splitlines() if (m := FAILED.match(line.strip()))]
            passed = sum(int(m.group(2)) for line in out.splitlines() if (m := RESULT.match(line.strip())))
            if args.keep_logs:
                os.makedirs(args.keep_logs, exist_ok=True)
                with open(os.path.join(args.keep_logs, f"run-{run:02}.log"), "w") as f:
                    f.write(out)
            ok = proc.returncode == 0
            if not ok:
                failed_runs += 1
                failures.update(failed or ["(no test named: the build or the harness failed)"])
            verdict = "ok" if ok else "FAILED " + " ".join(failed)
            print(f"run {run:2}/{args.runs}: {took:5.0f} s, {passed} passed: {verdict}", flush=True)
    finally:
        for p in loads:
            stop(p)
        shutil.rmtree(scratch, ignore_errors=True)

    runs = len(durations)
    load = "+".join(args.load) or "none"
    print(f"\n{runs - failed_runs} of {runs} runs passed (load: {load}; "
          f"{min(durations, default=0):.0f}-{max(durations, default=0):.0f} s a run)")
    for name, n in failures.most_common():
        print(f"  {n:3} x {name}")
    return 0 if failed_runs == 0 and runs > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
