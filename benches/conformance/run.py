#!/usr/bin/env python3
"""Run the public HTTP cache test suite (github.com/http-tests/cache-tests, published on npm as
`http-cache-tests`) against a sidecache binary, and optionally against a baseline binary too.

    python3 benches/conformance/run.py --binary target/debug/sidecache \
        [--baseline before=/path/to/older/sidecache] [--out results.json] [--id TEST_ID]

What it does, for each binary, with nothing shared between the two runs:

1. installs the suite from npm (`http-cache-tests@SUITE_VERSION`) into a cache directory, once
   (`--suite-cache`, default ~/.cache/sidecache/cache-tests-SUITE_VERSION); `--suite-dir` runs a
   checkout of the suite's repository instead (its `npm install` is done if node_modules is
   missing), which is newer than the npm release: see docs/conformance.md;
2. starts the suite's origin server on a free loopback port (a preloaded module makes its
   `listen(port)` bind 127.0.0.1 only);
3. starts `BINARY serve --upstream http://127.0.0.1:ORIGIN --listen 127.0.0.1:P
   --admin-listen 127.0.0.1:P2 --cache-dir <fresh temp dir>` with SIDECACHE_ACCESS_LOG=false,
   and waits (bounded) for GET /readyz on the admin port to answer 200;
4. runs the suite's command-line client against the sidecar and keeps its raw results JSON;
5. stops everything it started (also on errors and on SIGTERM/SIGINT).

Then it prints, per binary: required tests passed/total, optimal tests passed/total, the
informational "check" tests' yes/no counts, and every failing required and optimal test with the
suite's message. With --baseline it also prints the tests whose result differs between the
baseline and this binary.

Counting follows the suite's own `determineTestResult` (lib/results.mjs, lib/display.mjs in the
npm release): a test without `kind` is required; a test counts as passed only if it returned true
and every test in its `depends_on` passed too (otherwise it is a dependency failure, as on
cache-tests.fyi). Tests marked `browser_only` are not run by the client and are not counted.

With --id the client runs that one test in its verbose mode (request and response dumps), whose
output is passed through; no counts are printed then.

Python 3 standard library only; needs `node` and `npm` on PATH.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

SUITE_PACKAGE = "http-cache-tests"
SUITE_VERSION = "0.4.5"  # the newest release on npm when this was written

READY_LIMIT = 60.0  # seconds to wait for the origin server and for /readyz
CLIENT_LIMIT = 900.0  # seconds for one whole client run (the suite takes about a minute)
NPM_LIMIT = 600.0  # seconds for an npm install

# Preloaded into the suite's origin server: its `server.listen(port)` would bind every interface.
LOOPBACK_PRELOAD = """\
const net = require('net')
const listen = net.Server.prototype.listen
net.Server.prototype.listen = function (...args) {
  if ((typeof args[0] === 'number' || typeof args[0] === 'string') &&
      (args.length < 2 || typeof args[1] !== 'string')) {
    args.splice(1, 0, '127.0.0.1')
  }
  return listen.apply(this, args)
}
"""

# Prints the metadata of every test the client would run: the modules it imports from tests/.
ENUMERATE = """\
import { pathToFileURL } from 'url'
const out = []
for (const file of process.argv.slice(1)) {
  const mod = (await import(pathToFileURL(file).href)).default
  for (const suite of (Array.isArray(mod) ? mod : [mod])) {
    for (const t of suite.tests) {
      out.push({ id: t.id, kind: t.kind || 'required', depends_on: t.depends_on || [],
                 browser_only: t.browser_only === true, suite: suite.id, name: t.name })
    }
  }
}
console.log(JSON.stringify(out))
"""

PASS_TYPES = ("pass", "yes")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, what, limit, procs=()):
    """Polls `check` until it is true, for at most `limit` seconds; fails early when one of
    `procs` has exited."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        for name, p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {limit:.0f}s waiting for {what}")


def tcp_open(port):
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def http_ok(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except urllib.error.HTTPError:
        return False


def tail(path, lines=30):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


class Processes:
    """Everything started, each in its own process group, stopped in reverse order."""

    def __init__(self):
        self.procs = []

    def start(self, name, argv, **kw):
        p = subprocess.Popen(argv, start_new_session=True, stdin=subprocess.DEVNULL, **kw)
        self.procs.append((name, p))
        return p

    def stop_all(self):
        while self.procs:
            name, p = self.procs.pop()
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    log(f"{name} ignored SIGTERM; killing it")
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    p.wait(timeout=15)


# --- the suite ----------------------------------------------------------------------------------


class Suite:
    def __init__(self, root, label):
        self.root = root
        self.label = label
        if os.path.exists(os.path.join(root, "test-engine", "cli.mjs")):  # the repository today
            self.cli = os.path.join(root, "test-engine", "cli.mjs")
            self.server = os.path.join(root, "test-engine", "server", "server.mjs")
        elif os.path.exists(os.path.join(root, "cli.mjs")):  # the npm release's layout
            self.cli = os.path.join(root, "cli.mjs")
            self.server = os.path.join(root, "server", "server.mjs")
        else:
            raise RuntimeError(f"{root} holds no cache-tests client (cli.mjs)")
        # The test modules the client imports (the npm release adds surrogate-control.mjs).
        with open(self.cli) as f:
            src = f.read()
        cli_dir = os.path.dirname(self.cli)
        self.modules = [
            os.path.normpath(os.path.join(cli_dir, m))
            for m in re.findall(r"""from\s+['"](\.{1,2}/tests/[\w.-]+\.mjs)['"]""", src)
        ]
        if not self.modules:
            raise RuntimeError(f"found no test modules imported by {self.cli}")
        self._tests = None

    def tests(self):
        """id -> metadata of every test the client runs (browser-only tests left out)."""
        if self._tests is None:
            out = subprocess.run(
                ["node", "--no-warnings", "--input-type=module", "-e", ENUMERATE, *self.modules],
                cwd=self.root, capture_output=True, text=True, timeout=60, check=True,
            ).stdout
            self._tests = {t["id"]: t for t in json.loads(out) if not t["browser_only"]}
        return self._tests


def npm_install(argv, cwd):
    log(f"$ {' '.join(argv)}")
    subprocess.run(argv, cwd=cwd, check=True, timeout=NPM_LIMIT, stdout=sys.stderr)


def ensure_suite(args):
    if args.suite_dir:
        root = os.path.abspath(args.suite_dir)
        with open(os.path.join(root, "package.json")) as f:
            pkg = json.load(f)
        if pkg.get("dependencies") and not os.path.isdir(os.path.join(root, "node_modules")):
            npm_install(["npm", "install", "--omit=dev", "--no-audit", "--no-fund"], root)
        try:  # the checkout's package.json version is not bumped between releases
            rev = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            rev = ""
        at = f" at commit {rev}" if rev else ""
        return Suite(root, f"checkout {root}{at} (package.json says {pkg.get('version')})")
    cache = os.path.abspath(os.path.expanduser(args.suite_cache))
    root = os.path.join(cache, "node_modules", SUITE_PACKAGE)
    try:
        with open(os.path.join(root, "package.json")) as f:
            installed = json.load(f).get("version")
    except OSError:
        installed = None
    if installed != SUITE_VERSION:
        os.makedirs(cache, exist_ok=True)
        npm_install(
            ["npm", "install", "--prefix", cache, "--no-audit", "--no-fund", "--no-save",
             f"{SUITE_PACKAGE}@{SUITE_VERSION}"],
            cache,
        )
    return Suite(root, f"{SUITE_PACKAGE} {SUITE_VERSION} from npm (an older copy of the tests "
                       "than the suite's repository: see docs/conformance.md, --suite-dir)")


# --- one run ------------------------------------------------------------------------------------


def parse_results(stdout):
    """The client prints the results object as JSON (possibly after other lines)."""
    try:
        return json.loads(stdout)
    except ValueError:
        pass
    m = re.search(r"^\{", stdout, re.M)
    if m is None:
        raise RuntimeError("the client printed no results JSON")
    return json.JSONDecoder().raw_decode(stdout[m.start():])[0]


def run_suite(binary, suite, name, test_id=None):
    """Fresh origin server, fresh sidecar with a fresh cache dir, one client run. Returns the raw
    results dict (None with --id, whose output is passed through)."""
    procs = Processes()
    tmp = tempfile.mkdtemp(prefix="cache-tests-" + re.sub(r"[^\w.-]", "-", name) + "-")
    try:
        preload = os.path.join(tmp, "loopback.cjs")
        with open(preload, "w") as f:
            f.write(LOOPBACK_PRELOAD)
        origin_port = free_port()
        origin_log = os.path.join(tmp, "origin.log")
        env = dict(os.environ, npm_config_protocol="http", npm_config_port=str(origin_port),
                   npm_config_pidfile=os.path.join(tmp, "origin.pid"))
        with open(origin_log, "wb") as out:
            origin = procs.start("origin server", ["node", "--require", preload, suite.server],
                                 cwd=suite.root, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: tcp_open(origin_port), "the origin server", READY_LIMIT,
                       [("origin server", origin)])
        except RuntimeError:
            log(tail(origin_log))
            raise

        port = free_port()
        admin = free_port()
        while admin == port:
            admin = free_port()
        cache_dir = os.path.join(tmp, "cache")
        side_log = os.path.join(tmp, "sidecache.log")
        env = dict(os.environ, SIDECACHE_ACCESS_LOG="false")
        argv = [binary, "serve", "--upstream", f"http://127.0.0.1:{origin_port}",
                "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
                "--cache-dir", cache_dir, "--grace-period", "1s"]
        with open(side_log, "wb") as out:
            side = procs.start("sidecache", argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: http_ok(f"http://127.0.0.1:{admin}/readyz"), "sidecache /readyz",
                       READY_LIMIT, [("sidecache", side), ("origin server", origin)])
        except RuntimeError:
            log(tail(side_log))
            raise
        log(f"[{name}] origin 127.0.0.1:{origin_port}, sidecache 127.0.0.1:{port} "
            f"(admin {admin}); running the client")

        # The client reads npm_config_X || npm_package_config_X, and treats an id other than
        # "" (undefined included) as "run one test": both are set.
        base = f"http://127.0.0.1:{port}"
        env = dict(os.environ, npm_config_base=base, npm_package_config_base=base,
                   npm_config_id=test_id or "", npm_package_config_id=test_id or "")
        started = time.monotonic()
        if test_id:
            subprocess.run(["node", "--no-warnings", suite.cli], cwd=suite.root, env=env,
                           timeout=CLIENT_LIMIT, check=True, stdin=subprocess.DEVNULL)
            return None
        done = subprocess.run(["node", "--no-warnings", suite.cli], cwd=suite.root, env=env,
                              timeout=CLIENT_LIMIT, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            log(done.stderr[-4000:])
            raise RuntimeError(f"the client exited with {done.returncode}")
        results = parse_results(done.stdout)
        for dead in [n for n, p in procs.procs if p.poll() is not None]:
            log(f"warning: {dead} exited during the run")
            log(tail(side_log if dead == "sidecache" else origin_log))
        log(f"[{name}] {len(results)} results in {time.monotonic() - started:.0f}s")
        return results
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


# --- counting -----------------------------------------------------------------------------------


def status(tests, results, test_id, seen=()):
    """The suite's determineTestResult, dependencies honoured."""
    result = results.get(test_id)
    if result is None:
        return "untested"
    test = tests[test_id]
    for dep in test["depends_on"]:
        if dep in seen:
            continue
        if dep not in tests or status(tests, results, dep, seen + (test_id,)) not in PASS_TYPES:
            return "dependency_fail"
    if isinstance(result, list) and result and result[0] == "Setup":
        return "retry" if len(result) > 1 and result[1] == "retry" else "setup_fail"
    if isinstance(result, list) and result and result[0] == "AbortError":
        return "harness_fail"
    kind = test["kind"]
    if kind == "required":
        return "pass" if result is True else "fail"
    if kind == "optimal":
        return "pass" if result is True else "optional_fail"
    if kind == "check":
        return "yes" if result is True else "no"
    raise RuntimeError(f"unknown test kind {kind!r} for {test_id}")


def message(results, test_id, tests=None):
    result = results.get(test_id)
    if result is None:
        return "(not run)"
    if result is True:
        if tests is not None:
            failed = [d for d in tests[test_id]["depends_on"]
                      if status(tests, results, d) not in PASS_TYPES]
            if failed:
                return "passed itself; depends on " + ", ".join(failed)
        return ""
    if isinstance(result, list):
        return " ".join(str(x) for x in result[1:]) or str(result[0])
    return str(result)


def summarise(tests, runs):
    """Per test: its status in each run. Per kind: passes in each run, and the tests that did not
    pass in at least one run."""
    statuses = {tid: [status(tests, r, tid) for r in runs] for tid in tests}
    summary = {"statuses": statuses}
    for kind in ("required", "optimal", "check"):
        ids = sorted(t for t in tests if tests[t]["kind"] == kind)
        summary[kind] = {
            "total": len(ids),
            "passed": [sum(1 for t in ids if statuses[t][i] in PASS_TYPES)
                       for i in range(len(runs))],
            "failing": [t for t in ids if any(st not in PASS_TYPES for st in statuses[t])],
        }
    return summary


def first_message(tests, runs, test_id):
    for r in runs:
        if status(tests, r, test_id) not in PASS_TYPES:
            return message(r, test_id, tests)
    return message(runs[0], test_id, tests)


def describe(statuses):
    """`fail`, or `fail in 2 of 3 runs, else pass` when the runs disagree."""
    distinct = sorted(set(statuses), key=statuses.index)
    if len(distinct) == 1:
        return distinct[0]
    return ", ".join(f"{st} in {statuses.count(st)} of {len(statuses)} runs" for st in distinct)


def print_summary(label, binary, tests, runs):
    s = summarise(tests, runs)
    print(f"== {label}: {binary}")
    for kind in ("required", "optimal"):
        passed = s[kind]["passed"]
        each = f" (runs: {', '.join(map(str, passed))})" if len(set(passed)) > 1 else ""
        print(f"   {kind + ':':9} {passed[0]}/{s[kind]['total']} passed{each}")
    yes = s["check"]["passed"][0]
    print(f"   check:    {yes} yes, {s['check']['total'] - yes} no (informational)")
    if len(runs) > 1:
        varied = [t for t, sts in s["statuses"].items() if len(set(sts)) > 1]
        print(f"   results that varied between its {len(runs)} runs: "
              f"{', '.join(sorted(varied)) or 'none'}")
    unknown = sorted(set().union(*runs) - set(tests))
    if unknown:
        print(f"   results for tests the suite's modules do not list: {', '.join(unknown)}")
    for kind in ("required", "optimal"):
        failing = s[kind]["failing"]
        print(f"   failing {kind} ({len(failing)}):")
        for t in failing:
            print(f"     {t} [{describe(s['statuses'][t])}] {first_message(tests, runs, t)}")
    print()
    return s


def print_diff(base_name, base_runs, base, this_runs, this, tests):
    changed = [t for t in sorted(tests)
               if set(base["statuses"][t]) != set(this["statuses"][t])]
    stable = [t for t in changed
              if len(set(base["statuses"][t])) == 1 and len(set(this["statuses"][t])) == 1]
    print(f"== changed between {base_name} and this binary: {len(changed)} "
          f"({len(stable)} the same in every run of each binary)")
    for t in changed:
        mark = "" if t in stable else "  (varies between runs)"
        print(f"   {t} ({tests[t]['kind']}): {describe(base['statuses'][t])} -> "
              f"{describe(this['statuses'][t])}{mark}")
        print(f"     {base_name}: {first_message(tests, base_runs, t) or 'passed'}")
        print(f"     this: {first_message(tests, this_runs, t) or 'passed'}")
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--binary", required=True, help="the sidecache binary to test")
    ap.add_argument("--baseline", metavar="NAME=PATH",
                    help="also run this binary and print what changed")
    ap.add_argument("--out", help="where to save this binary's raw results JSON (the "
                    "baseline's goes beside it as OUT-stem.NAME.json)")
    ap.add_argument("--id", help="run one test, verbosely")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="run the suite N times per binary (fresh origin and cache each time) "
                    "to tell changes from timing noise; runs after the first are saved as "
                    "OUT-stem[.NAME].runI.json")
    ap.add_argument("--suite-cache",
                    default=os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache",
                                         "sidecache", f"cache-tests-{SUITE_VERSION}"),
                    help="where the npm package is installed (default: %(default)s)")
    ap.add_argument("--suite-dir", help="run a checkout of the suite's repository instead of "
                    "the npm release")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error("--repeat takes a positive count")

    runs = [("this", os.path.abspath(args.binary))]
    if args.baseline:
        name, sep, path = args.baseline.partition("=")
        if not sep or not name or not path or name == "this" or not re.fullmatch(r"[\w.-]+", name):
            ap.error("--baseline takes NAME=PATH, NAME made of letters, digits, '.', '-', '_'")
        runs.insert(0, (name, os.path.abspath(path)))
    for _, path in runs:
        if not os.access(path, os.X_OK):
            ap.error(f"{path} is not an executable file")

    # SIGTERM ends the run like Ctrl-C: the `finally` blocks stop what was started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    suite = ensure_suite(args)
    log(f"suite: {suite.label}")
    if args.id:
        if args.id not in suite.tests():
            sys.exit(f"no test {args.id!r} in {suite.label}")
        for name, path in runs:
            print(f"== {name}: {path}", flush=True)
            run_suite(path, suite, name, args.id)
        return

    tests = suite.tests()
    out = args.out or os.path.join(os.path.abspath(os.path.expanduser(args.suite_cache)),
                                   "results.json")
    stem = out[:-5] if out.endswith(".json") else out
    collected = {name: [] for name, _ in runs}
    # Interleaved (baseline, this, baseline, this, ...) so that a busy spell of the machine
    # does not land on one binary only.
    for i in range(1, args.repeat + 1):
        for name, path in runs:
            results = run_suite(path, suite, name if args.repeat == 1 else f"{name} run {i}")
            dest = stem if name == "this" else f"{stem}.{name}"
            dest += ".json" if i == 1 else f".run{i}.json"
            os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
            with open(dest, "w") as f:
                json.dump(results, f, indent=2, sort_keys=True)
                f.write("\n")
            log(f"raw results saved to {dest}")
            collected[name].append(results)

    print(f"suite: {suite.label}; {len(tests)} tests run by its client; "
          f"{args.repeat} run(s) per binary\n")
    printed = {name: print_summary(name, path, tests, collected[name]) for name, path in runs}
    if args.baseline:
        base_name = runs[0][0]
        print_diff(base_name, collected[base_name], printed[base_name],
                   collected["this"], printed["this"], tests)


if __name__ == "__main__":
    main()
