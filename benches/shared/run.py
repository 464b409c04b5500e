#!/usr/bin/env python3
"""The shared-tier benchmark (issue 19): a cold fleet of three sidecache instances in front of one
app, each asked for the same assets; how many requests reach the app, and the wall time, with
and without the shared tier.

    python3 benches/shared/run.py [--objects 2000] [--concurrency 32]

Needs the release builds (`cargo build --release --bin sidecache --example loadtool`) and
moto's S3 server (`python3 -m pip install 'moto[server]'`, as .ci/run installs it). Everything
listens on 127.0.0.1, on ports the kernel picks. Two orders, each without and with the tier:

- staggered: the first instance takes its traffic alone (a canary, or the first pod of a
  rollout), then the other two together, once the first one's uploads have drained;
- simultaneous: all three at once (the whole fleet replaced in one step).

Every phase is bounded (the fetches by their count, the waits by a time limit). Prints a
markdown table for BENCHMARKS.md.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SIDECACHE = os.path.join(ROOT, "target", "release", "sidecache")
LOADTOOL = os.path.join(ROOT, "target", "release", "examples", "loadtool")
S3_SERVER = os.path.join(ROOT, "tests", "it", "support", "s3_server.py")
BUCKET = "sidecache-bench"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, what, limit=120.0):
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.05)
    sys.exit(f"timed out waiting for {what}")


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def metric(admin, name):
    text = get(f"http://{admin}/metrics")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if not line.startswith("#") and line.split("{")[0].split(" ")[0] == name
    )


class Fleet:
    """Three sidecars with fresh cache directories, with or without the shared tier."""

    def __init__(self, origin, s3_port, prefix, tmp):
        self.procs, self.addrs, self.admins = [], [], []
        env = dict(os.environ)
        if s3_port is not None:
            env.update(
                AWS_ENDPOINT_URL=f"http://127.0.0.1:{s3_port}",
                AWS_REGION="us-east-1",
                AWS_ACCESS_KEY_ID="bench",
                AWS_SECRET_ACCESS_KEY="bench",
                AWS_ALLOW_HTTP="true",
                SIDECACHE_SHARED_TIER=f"s3://{BUCKET}/{prefix}",
            )
        for i in range(3):
            port, admin = free_port(), free_port()
            args = [
                SIDECACHE, "serve", "--listen", f"127.0.0.1:{port}",
                "--admin-listen", f"127.0.0.1:{admin}", "--upstream", f"http://127.0.0.1:{origin}",
                "--cache-dir", os.path.join(tmp, f"{prefix}-{i}"), "--max-size", "1GiB",
            ]
            env_i = dict(env, SIDECACHE_ACCESS_LOG="false", SIDECACHE_MIN_FREE="0", SIDECACHE_WORKERS="1")
            self.procs.append(subprocess.Popen(args, env=env_i, stdout=subprocess.DEVNULL))
            self.addrs.append(f"127.0.0.1:{port}")
            self.admins.append(f"127.0.0.1:{admin}")
        for admin in self.admins:
            wait_until(lambda: get(f"http://{admin}/readyz") is not None, "a sidecar")

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=30)


def fetch(addr, count, concurrency):
    out = subprocess.run(
        [LOADTOOL, "fetch", addr, "s", str(count), str(concurrency)],
        capture_output=True, text=True, timeout=600, check=True,
        env=dict(os.environ, LOADTOOL_HOST="app.example"),
    )
    result = json.loads(out.stdout)
    if result.get("errors"):
        sys.exit(f"fetch from {addr} had errors: {result}")
    return result


def fetch_all(addrs, count, concurrency):
    threads = [threading.Thread(target=fetch, args=(a, count, concurrency)) for a in addrs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run(order, tier, origin, s3_port, args, tmp):
    prefix = f"{order}-{'tier' if tier else 'none'}"
    fleet = Fleet(origin, s3_port if tier else None, prefix, tmp)
    try:
        before = int(get(f"http://127.0.0.1:{origin}/__stats"))
        started = time.monotonic()
        if order == "staggered":
            fetch(fleet.addrs[0], args.objects, args.concurrency)
            first = time.monotonic() - started
            if tier:
                # The first instance's uploads drain (or are dropped) before the others start.
                def drained():
                    done = metric(fleet.admins[0], "sidecache_shared_tier_uploads_total")
                    dropped = metric(fleet.admins[0], "sidecache_shared_tier_upload_drops_total")
                    return done + dropped >= args.objects
                wait_until(drained, "the uploads", limit=300)
            fetch_all(fleet.addrs[1:], args.objects, args.concurrency)
        else:
            first = None
            fetch_all(fleet.addrs, args.objects, args.concurrency)
        wall = time.monotonic() - started
        app = int(get(f"http://127.0.0.1:{origin}/__stats")) - before
        lookups = {}
        for a in fleet.admins:
            for line in get(f"http://{a}/metrics").splitlines():
                if line.startswith('sidecache_shared_tier_lookups_total{result="'):
                    result = line.split('"')[1]
                    lookups[result] = lookups.get(result, 0) + int(float(line.rsplit(" ", 1)[1]))
        drops = sum(metric(a, "sidecache_shared_tier_upload_drops_total") for a in fleet.admins) if tier else 0
        uploads = sum(metric(a, "sidecache_shared_tier_uploads_total") for a in fleet.admins) if tier else 0
        return dict(order=order, tier=tier, app=app, wall=wall, first=first, lookups=lookups,
                    shared=lookups.get("hit", 0), drops=drops, uploads=uploads)
    finally:
        fleet.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--objects", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    for binary in (SIDECACHE, LOADTOOL):
        if not os.path.exists(binary):
            sys.exit(f"missing {binary}: cargo build --release --bin sidecache --example loadtool")
    tmp = tempfile.mkdtemp(prefix="sidecache-shared-bench-")
    origin = free_port()
    procs = [subprocess.Popen([LOADTOOL, "origin", str(origin)])]
    s3 = subprocess.Popen(
        [sys.executable, S3_SERVER, BUCKET],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    procs.append(s3)
    try:
        line = s3.stdout.readline().strip()
        if not line.isdigit():
            sys.exit("moto's S3 server did not start: python3 -m pip install 'moto[server]'")
        s3_port = int(line)
        wait_until(lambda: get(f"http://127.0.0.1:{origin}/__stats") is not None, "the origin")
        rows = []
        for order in ("staggered", "simultaneous"):
            for tier in (False, True):
                rows.append(run(order, tier, origin, s3_port, args, tmp))
                print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        subprocess.run(["rm", "-rf", tmp], check=False)
    n = args.objects
    print(f"| order | shared tier | requests reaching the app ({n} assets x 3 instances) "
          f"| bucket reads by result | uploads (dropped) | wall time |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        first = f" (first instance {r['first']:.2f} s)" if r["first"] is not None else ""
        reads = ", ".join(f"{k} {v}" for k, v in sorted(r["lookups"].items())) or "-"
        up = f"{int(r['uploads'])} ({int(r['drops'])})" if r["tier"] else "-"
        print(f"| {r['order']} | {'on' if r['tier'] else 'off'} | {r['app']} | {reads} "
              f"| {up} | {r['wall']:.2f} s{first} |")


if __name__ == "__main__":
    main()
