#!/usr/bin/env python3
"""Replays request streams through eviction policies of a given byte capacity and prints each
policy's request hit ratio (after a warm-up third), its misses against plain LRU's, and the
bytes it writes to disk per request (every miss that is stored is written once).

Policies: plain LRU; the segmented LRU sidecache used until issue 26 (probation/protected,
80% protected); S3-FIFO (Yang et al., SOSP '23: a small FIFO of 10% of the bytes, a main FIFO
with a 2-bit frequency and reinsertion, a ghost of keys recently let go from the small FIFO);
SIEVE (Zhang et al., NSDI '24); W-TinyLFU (Einziger et al.: a 1% LRU window, a segmented main
LRU, admission by a count-min sketch with periodic halving); sidecache's from issue 26, the
segmented LRU with TinyLFU's admission at the door (no window); sidecache's now, that
admission weighed by size (requests per byte against the victims the fill would displace); and
the same over lazily promoted segments (a hit only marks its entry, as CLOCK: no list is
reordered on the hit path).

Workloads:
- churn: the churn scenario of run.py (objects.lua with DIST=zipf: P(k) ~ 1/k over 30,000
  objects of loadtool's mixed sizes, 1-48 KiB).
- cdn: a CDN-like shape, since public traces cannot be fetched here: Zipf alpha 0.8 over a
  population that renews itself (every request has a 1.5% chance of naming an object never seen
  before, which later requests may name again), sizes heavy-tailed (log-normal, median 12 KiB,
  capped at 4 MiB). One-hit wonders are a third of the objects, as in the published CDN traces.

    python3 benches/load/lru_sim.py                      # both workloads, their default budgets
    python3 benches/load/lru_sim.py --workload churn 239 350   # capacities in MiB
"""
import argparse
import math
import random
from collections import OrderedDict, deque

RECORD = 400  # bytes of metadata stored beside each body, about


# ---------------------------------------------------------------------------------------------
# Workloads: generators of (key, size).

def churn(requests, seed=1):
    objects = 30000
    rng = random.Random(seed)
    for _ in range(requests):
        i = int(objects ** rng.random()) - 1
        yield i, 1024 * (1 + (i * 7919) % 48) + RECORD


def cdn(requests, seed=1, population=200_000, alpha=0.8, new_share=0.015):
    rng = random.Random(seed)
    # Zipf by inverse CDF over ranks 1..population (continuous approximation).
    a1 = 1.0 - alpha
    hi = population ** a1
    sizes = {}
    next_new = population
    for _ in range(requests):
        if rng.random() < new_share:
            key = next_new
            next_new += 1
        else:
            u = rng.random()
            rank = int((1 + u * (hi - 1)) ** (1 / a1))
            key = rank
        size = sizes.get(key)
        if size is None:
            size = min(int(rng.lognormvariate(math.log(12 << 10), 1.2)), 4 << 20) + RECORD
            sizes[key] = size
        yield key, size


WORKLOADS = {"churn": (churn, [239]), "cdn": (cdn, [256, 512])}


# ---------------------------------------------------------------------------------------------
# Policies: each has get(key) -> bool (a hit, and its bookkeeping) and put(key, size) (a miss
# stored, or False when the policy declines to store it); they evict to stay within capacity
# bytes. The replay counts the bytes each policy writes to disk.

class Lru:
    name = "LRU"

    def __init__(self, capacity):
        self.cap, self.used, self.q = capacity, 0, OrderedDict()

    def get(self, k):
        if k in self.q:
            self.q.move_to_end(k)
            return True
        return False

    def put(self, k, size):
        self.q[k] = size
        self.used += size
        while self.used > self.cap:
            _, v = self.q.popitem(last=False)
            self.used -= v


class SegmentedLru:
    name = "segmented LRU"

    def __init__(self, capacity, protected_share=0.8):
        self.cap, self.share = capacity, protected_share
        self.probation, self.protected = OrderedDict(), OrderedDict()
        self.used = self.protected_bytes = 0

    def get(self, k):
        if k in self.protected:
            self.protected.move_to_end(k)
            return True
        if k in self.probation:
            v = self.protected[k] = self.probation.pop(k)
            self.protected_bytes += v
            while self.protected_bytes > self.used * self.share and len(self.protected) > 1:
                kk, vv = self.protected.popitem(last=False)
                self.protected_bytes -= vv
                self.probation[kk] = vv
            return True
        return False

    def put(self, k, size):
        self.probation[k] = size
        self.used += size
        while self.used > self.cap:
            if self.probation:
                _, v = self.probation.popitem(last=False)
            else:
                _, v = self.protected.popitem(last=False)
                self.protected_bytes -= v
            self.used -= v


class S3Fifo:
    name = "S3-FIFO"

    def __init__(self, capacity, small_share=0.1):
        self.cap = capacity
        self.small_cap = capacity * small_share
        self.small, self.main = OrderedDict(), OrderedDict()  # key -> [size, freq]
        self.small_bytes = self.main_bytes = 0
        self.ghost, self.ghost_q = set(), deque()

    def get(self, k):
        e = self.small.get(k) or self.main.get(k)
        if e is None:
            return False
        e[1] = min(e[1] + 1, 3)
        return True

    def remember(self, k):
        self.ghost.add(k)
        self.ghost_q.append(k)
        while len(self.ghost_q) > max(len(self.main), 1):
            self.ghost.discard(self.ghost_q.popleft())

    def put(self, k, size):
        if k in self.ghost:
            self.ghost.discard(k)
            self.main[k] = [size, 0]
            self.main_bytes += size
        else:
            self.small[k] = [size, 0]
            self.small_bytes += size
        while self.small_bytes + self.main_bytes > self.cap:
            if self.small and (self.small_bytes > self.small_cap or not self.main):
                kk, e = self.small.popitem(last=False)
                self.small_bytes -= e[0]
                if e[1] > 0:
                    e[1] = 0
                    self.main[kk] = e
                    self.main_bytes += e[0]
                else:
                    self.remember(kk)
            else:
                kk, e = self.main.popitem(last=False)
                if e[1] > 0:
                    e[1] -= 1
                    self.main[kk] = e
                else:
                    self.main_bytes -= e[0]


class Sieve:
    name = "SIEVE"

    def __init__(self, capacity):
        self.cap, self.used = capacity, 0
        # key -> [size, visited, newer, older]; head is the newest, tail the oldest.
        self.nodes, self.head, self.tail, self.hand = {}, None, None, None

    def get(self, k):
        e = self.nodes.get(k)
        if e is None:
            return False
        e[1] = True
        return True

    def put(self, k, size):
        self.nodes[k] = [size, False, None, self.head]
        if self.head is not None:
            self.nodes[self.head][2] = k
        self.head = k
        if self.tail is None:
            self.tail = k
        self.used += size
        while self.used > self.cap:
            h = self.hand if self.hand is not None else self.tail
            while self.nodes[h][1]:
                self.nodes[h][1] = False
                h = self.nodes[h][2] if self.nodes[h][2] is not None else self.tail
            size, _, newer, older = self.nodes.pop(h)
            self.hand = newer
            if newer is not None:
                self.nodes[newer][3] = older
            else:
                self.head = older
            if older is not None:
                self.nodes[older][2] = newer
            else:
                self.tail = newer
            self.used -= size


class TinyLfu:
    name = "W-TinyLFU"

    def __init__(self, capacity, window_share=0.01, width_per_object=8, sample_per_object=10):
        self.cap = capacity
        self.window_cap = capacity * window_share
        self.window = OrderedDict()
        self.main = SegmentedLru(capacity - self.window_cap)
        self.window_bytes = 0
        est = max(capacity // (16 << 10), 1024)
        self.width = 1 << math.ceil(math.log2(est * width_per_object))
        self.rows = [[0] * self.width for _ in range(4)]
        self.seeds = [0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F]
        self.sample = est * sample_per_object
        self.added = 0

    def idx(self, k, r):
        return (hash((k, self.seeds[r])) & 0xFFFFFFFF) & (self.width - 1)

    def count(self, k):
        self.added += 1
        for r in range(4):
            i = self.idx(k, r)
            if self.rows[r][i] < 15:
                self.rows[r][i] += 1
        if self.added >= self.sample:
            self.added = 0
            for row in self.rows:
                for i in range(len(row)):
                    row[i] >>= 1

    def freq(self, k):
        return min(self.rows[r][self.idx(k, r)] for r in range(4))

    def get(self, k):
        self.count(k)
        if k in self.window:
            self.window.move_to_end(k)
            return True
        return self.main.get(k)

    def put(self, k, size):
        self.window[k] = size
        self.window_bytes += size
        while self.window_bytes > self.window_cap and self.window:
            cand, cs = self.window.popitem(last=False)
            self.window_bytes -= cs
            m = self.main
            if m.used + cs <= m.cap:
                m.put(cand, cs)
                continue
            victim = next(iter(m.probation), None) or next(iter(m.protected), None)
            if victim is None or self.freq(cand) > self.freq(victim):
                m.put(cand, cs)


class AdmittedSegmentedLru(TinyLfu):
    """sidecache's policy since issue 26: the segmented LRU, and TinyLFU's admission at the
    door (a fill that would evict is stored only if its key was asked for at least as often as
    the victim's, by a count-min sketch of all requests): one-off keys stop displacing objects
    asked for again, and a fill refused is never written."""
    name = "SLRU+TinyLFU"
    # sidecache's sketch halves every 40 requests per object it can hold (admit.rs's
    # SAMPLE_PER_WORD), W-TinyLFU's (Caffeine's) every 10.
    sample_per_object = 40

    def __init__(self, capacity):
        super().__init__(capacity, sample_per_object=self.sample_per_object)
        self.main = SegmentedLru(capacity)

    def get(self, k):
        self.count(k)
        return self.main.get(k)

    def put(self, k, size):
        m = self.main
        if m.used + size > m.cap:
            victim = next(iter(m.probation), None) or next(iter(m.protected), None)
            if victim is not None and self.freq(k) < self.freq(victim):
                return False
        m.put(k, size)


class SizedAdmittedSegmentedLru(AdmittedSegmentedLru):
    """sidecache's policy since the admission weighs size: a fill that would evict is stored
    only if its key was asked for at least as often per byte as the victims its size would
    displace (the first 64 in eviction order at most), so a byte of the budget goes to what
    answers the most requests."""
    name = "SLRU+sized"

    def victims(self):
        """(key, size) in the order eviction would take them."""
        for q in (self.main.probation, self.main.protected):
            yield from q.items()

    def put(self, k, size):
        m = self.main
        if m.used + size > m.cap:
            asked = held = n = 0
            for kk, vv in self.victims():
                if held >= size or n >= 64:
                    break
                asked += self.freq(kk)
                held += vv
                n += 1
            if self.freq(k) * held < asked * size:
                return False
        m.put(k, size)


class LazySegmentedLru:
    """The segmented LRU with lazy promotion (as CLOCK, and S3-FIFO's main queue): a hit only
    marks its entry; what was marked is moved when room is made. A probation entry found
    marked at the eviction end goes to protected (unmarked) instead of out; protected past its
    share demotes its least recently promoted, a marked one getting a second turn instead. The
    same segments and shares as `SegmentedLru`; a hit reorders no list."""

    def __init__(self, capacity, protected_share=0.8):
        self.cap, self.share = capacity, protected_share
        self.probation, self.protected = OrderedDict(), OrderedDict()  # key -> [size, marked]
        self.used = self.protected_bytes = 0

    def get(self, k):
        e = self.protected.get(k) or self.probation.get(k)
        if e is None:
            return False
        e[1] = True
        return True

    def _demote(self):
        while self.protected_bytes > self.used * self.share and len(self.protected) > 1:
            kk, ee = self.protected.popitem(last=False)
            if ee[1]:
                ee[1] = False
                self.protected[kk] = ee
                continue
            self.protected_bytes -= ee[0]
            self.probation[kk] = ee

    def next_victim(self):
        """The next entry to evict, after promoting or turning over the marked ones before it."""
        while True:
            if self.probation:
                k, e = next(iter(self.probation.items()))
                if not e[1]:
                    return k
                del self.probation[k]
                e[1] = False
                self.protected[k] = e
                self.protected_bytes += e[0]
                self._demote()
            elif self.protected:
                k, e = next(iter(self.protected.items()))
                if not e[1]:
                    return k
                e[1] = False
                self.protected.move_to_end(k)
            else:
                return None

    def put(self, k, size):
        self.probation[k] = [size, False]
        self.used += size
        while self.used > self.cap:
            victim = self.next_victim()
            if victim is None:
                break
            if victim in self.probation:
                size_out = self.probation.pop(victim)[0]
            else:
                size_out = self.protected.pop(victim)[0]
                self.protected_bytes -= size_out
            self.used -= size_out


class LazySizedAdmittedSegmentedLru(SizedAdmittedSegmentedLru):
    """`SLRU+sized` over the lazily promoted segments: the same admission, against the victims
    in the order eviction would take them (marked entries would be promoted, not evicted)."""
    name = "SLRU+sized+lazy"

    def __init__(self, capacity):
        super().__init__(capacity)
        self.main = LazySegmentedLru(capacity)

    def victims(self):
        """The unmarked entries in order (a marked one would be promoted or turned over)."""
        for q in (self.main.probation, self.main.protected):
            yield from ((k, size) for k, (size, marked) in q.items() if not marked)


POLICIES = [Lru, SegmentedLru, S3Fifo, Sieve, TinyLfu, AdmittedSegmentedLru, SizedAdmittedSegmentedLru,
            LazySizedAdmittedSegmentedLru]


def run(policy, workload, capacity, requests):
    p = policy(capacity)
    hits = counted = written = 0
    for t, (k, size) in enumerate(workload(requests)):
        measured = t > requests // 3
        counted += measured
        if p.get(k):
            hits += measured
            continue
        if size <= capacity // 8 and p.put(k, size) is not False:
            written += size * measured
    return hits / counted, written / counted


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), action="append")
    ap.add_argument("--requests", type=int, default=1_500_000)
    ap.add_argument("--policies", default=",".join(p.name for p in POLICIES), help="comma-separated")
    ap.add_argument("mib", type=int, nargs="*")
    a = ap.parse_args()
    chosen = [p for p in POLICIES if p.name in a.policies.split(",")]
    for name in a.workload or sorted(WORKLOADS):
        workload, budgets = WORKLOADS[name]
        for mib in a.mib or budgets:
            print(f"{name}, {mib} MiB, {a.requests} requests:")
            base = None
            for policy in chosen:
                ratio, wbytes = run(policy, workload, mib << 20, a.requests)
                miss = 1 - ratio
                if base is None:
                    base = miss
                print(f"  {policy.name:14} hit {ratio * 100:5.1f}%  misses {(miss / base - 1) * 100:+6.1f}% vs LRU"
                      f"  written {wbytes / 1024:6.1f} KiB/request", flush=True)


if __name__ == "__main__":
    main()
