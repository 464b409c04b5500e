#!/usr/bin/env python3
"""What a flood of cache-busting keys for one script costs sidecache in CPU (issue 25, item 3).

    python3 benches/compress_flood.py --binary target/release/sidecache [--requests 40] [--mib 1] [--max-age S]

Starts a loopback origin serving one compressible script of --mib MiB, the sidecar in front of
it (defaults otherwise: compression on), sends --requests GETs for `/app.js?q=N` (each a new
key), waits until the compressor has settled (every key's variants made or skipped, or its
counters still for 15 s; 300 s at most), then prints the sidecar's CPU time (user + system, all threads, from /proc) spent from its
readiness to then, and the compressor's counters. Everything binds 127.0.0.1; everything
started is stopped at the end.
"""

import argparse
import http.server
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_body(mib):
    """A script-like body, compressible as real bundles are (not one repeated line)."""
    rng = random.Random(25)
    words = ["function", "return", "const", "let", "var", "if", "else", "this", "document",
             "window", "querySelector", "addEventListener", "=>", "null", "undefined", "true"]
    out, size = [], 0
    while size < mib << 20:
        line = " ".join(rng.choice(words) for _ in range(12)) + f" // {rng.getrandbits(32):08x}\n"
        out.append(line)
        size += len(line)
    return "".join(out).encode()[: mib << 20]


class Origin(http.server.BaseHTTPRequestHandler):
    body = b""
    cache_control = ""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/javascript")
        self.send_header("Cache-Control", self.cache_control)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


def metrics(admin):
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5).read().decode()
    wanted = {}
    for line in text.splitlines():
        m = re.match(r"(sidecache_(?:compress_input_bytes_total|variants_made_total|variants_reused_total|"
                     r"variants_skipped_total|compress_dropped_total))(\{[^}]*\})? ([0-9.e+]+)", line)
        if m:
            wanted[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return wanted


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", required=True)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--mib", type=int, default=1)
    ap.add_argument("--max-age", type=int, default=31536000,
                    help="the script's lifetime: a long one (the default, a year) gets the best levels")
    args = ap.parse_args()

    Origin.body = script_body(args.mib)
    Origin.cache_control = f"public, max-age={args.max_age}"
    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Origin)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    public, admin = free_port(), free_port()
    cache = tempfile.mkdtemp(prefix="sidecache-flood-")
    env = dict(os.environ, SIDECACHE_ACCESS_LOG="false")
    proc = subprocess.Popen(
        [args.binary, "serve", "--upstream", f"http://127.0.0.1:{origin.server_address[1]}",
         "--listen", f"127.0.0.1:{public}", "--admin-listen", f"127.0.0.1:{admin}", "--cache-dir", cache],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2).status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise SystemExit("the sidecar never became ready")
            time.sleep(0.05)
        cpu0, t0 = cpu_seconds(proc.pid), time.time()
        for n in range(args.requests):
            req = urllib.request.Request(f"http://127.0.0.1:{public}/app.js?q={n}", headers={"Host": "app.example"})
            urllib.request.urlopen(req, timeout=30).read()
        sent = time.time() - t0
        # Settled: every key has its three variants made (or skipped), or the counters have
        # not moved for 15 s (one body at the best levels takes seconds); 300 s at most.
        last, since, deadline = None, time.time(), time.time() + 300
        while time.time() < deadline:
            now = metrics(admin)
            done = sum(v for k, v in now.items()
                       if k.startswith(("sidecache_variants_made_total", "sidecache_variants_skipped_total")))
            if done >= 3 * args.requests:
                last = now
                break
            if now != last:
                last, since = now, time.time()
            elif time.time() - since >= 15:
                break
            time.sleep(0.2)
        cpu = cpu_seconds(proc.pid) - cpu0
        print(f"{args.requests} cache-busting requests for one {args.mib} MiB script: sent in {sent:.2f} s; "
              f"sidecache CPU {cpu:.2f} s in all (user + system, to the compressor settling)")
        for k, v in sorted((last or {}).items()):
            print(f"  {k} {v:g}")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        origin.shutdown()
        shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
