#!/usr/bin/env python3
"""Replays the churn scenario's request stream (objects.lua with DIST=zipf: P(k) ~ 1/k over
30,000 objects of loadtool's mixed sizes) through a plain LRU and a segmented LRU of a given
capacity, and prints the request hit ratio after a warm-up third. It answers what hit ratio an
eviction order can reach at a given disk use, so that caches measured at different disk use can
be compared.

    python3 benches/load/lru_sim.py 239 350 464     # capacities in MiB
"""
import random
import sys
from collections import OrderedDict

OBJECTS = 30000
RECORD = 400  # bytes of metadata stored beside each body, about


def size(i):
    return 1024 * (1 + (i * 7919) % 48) + RECORD


def run(capacity, segmented, requests=1_500_000, protected_share=0.8):
    rng = random.Random(1)
    probation, protected = OrderedDict(), OrderedDict()
    used = protected_bytes = hits = counted = 0
    for t in range(requests):
        i = int(OBJECTS ** rng.random()) - 1
        measured = t > requests // 3
        counted += measured
        if i in protected:
            protected.move_to_end(i)
            hits += measured
            continue
        if i in probation:
            hits += measured
            if not segmented:
                probation.move_to_end(i)
                continue
            protected[i] = probation.pop(i)
            protected_bytes += protected[i]
            while protected_bytes > used * protected_share and len(protected) > 1:
                k, v = protected.popitem(last=False)
                protected_bytes -= v
                probation[k] = v
            continue
        probation[i] = size(i)
        used += probation[i]
        while used > capacity:
            if probation:
                _, v = probation.popitem(last=False)
            else:
                _, v = protected.popitem(last=False)
                protected_bytes -= v
            used -= v
    return hits / counted


if __name__ == "__main__":
    for mib in [int(a) for a in sys.argv[1:]] or [239]:
        print(f"{mib} MiB: LRU {run(mib << 20, False) * 100:.1f}%, "
              f"segmented LRU {run(mib << 20, True) * 100:.1f}%")
