#!/usr/bin/env python3
"""Groups a `perf script` of sidecache (recorded with `perf record -g`) by where its CPU went.

    perf script -i perf.data -F period,ip,sym,dso | python3 benches/load/profile_groups.py [--top 20]

Prints, as markdown: the top symbols by self time, and the self time grouped by job. A sample
is put in the first group that matches, in the order of GROUPS: user-space samples by their
leaf symbol (release builds have no frame pointers, so their user-space call chains are not to
be trusted), kernel samples by the system call their (reliable) kernel stack runs under. Kernel
time spent in files and inodes is also split by that system call. Used by profile_fill.sh.
"""
import argparse
import collections
import re
import sys

KERNEL_DSO = "[kernel.kallsyms]"

# (group, test on (leaf symbol, leaf is kernel, kernel stack symbols)), first match wins.
FS_CALLS = re.compile(r"__x64_sys_(openat2?|open|creat|linkat|link|unlinkat|unlink|renameat2?|rename|fallocate|"
                      r"ftruncate|truncate|mkdirat|mkdir|newfstatat|newfstat|statx|fsync|fdatasync|getdents64|"
                      r"pwrite64|pread64|copy_file_range)$")
FS_FRAMES = re.compile(r"^(ext4_|__ext4_|ext4fs_|jbd2_|vfs_|path_|do_sys_open|do_filp_open|do_linkat|do_unlinkat|"
                       r"filename_|d_alloc|d_lookup|__d_lookup|lookup_|iput|evict|find_inode_bit|recently_deleted|"
                       r"filemap_|generic_perform_write|iomap_|__filemap|truncate_inode|do_truncate|fsnotify)")
NET_FRAMES = re.compile(r"^(tcp_|__tcp_|inet_|sock_|__sock_|sk_|__sk_|ip_|__ip_|ipv4_|net_rx|__netif|netif_|"
                        r"__dev_queue|dev_hard_start|loopback_|skb_|__skb|__sys_sendto|__sys_recvfrom|"
                        r"__sys_sendmsg|__sys_recvmsg|unix_)")
SCHED_FRAMES = re.compile(r"^(futex_|__futex|do_futex|__x64_sys_futex|schedule|__schedule|try_to_wake_up|"
                          r"ep_poll|do_epoll_wait|__x64_sys_epoll|ep_|eventfd|__wake_up|wake_up_|sched_|"
                          r"finish_task_switch|pick_next|enqueue_|dequeue_|update_curr|__x64_sys_sched_yield|"
                          r"hrtimer_|do_nanosleep)")
MM_FRAMES = re.compile(r"^(exc_page_fault|do_user_addr_fault|handle_mm_fault|__handle_mm_fault|do_anonymous_page|"
                       r"__x64_sys_munmap|__x64_sys_mmap|__x64_sys_madvise|__x64_sys_brk|__vm_munmap|do_mmap|"
                       r"clear_page|zap_|unmap_|tlb_|flush_tlb|__x64_sys_mprotect)")

GROUPS = [
    ("blake3 (hashing)", lambda s, k, st: not k and "blake3" in s),
    ("memcpy/memmove/memset (user)", lambda s, k, st: not k and re.search(r"mem(cpy|move|set)|__memcpy|__memmove", s)),
    ("allocator (glibc malloc/free)", lambda s, k, st: not k and re.search(
        r"^(malloc|free|cfree|realloc|calloc|_int_malloc|_int_free|_int_realloc|malloc_consolidate|"
        r"__libc_malloc|__libc_free|__libc_realloc|__libc_calloc|tcache_|unlink_chunk|alloc_perturb|"
        r"__rust_alloc|__rust_dealloc|__rust_realloc|__rdl_|arena_get|sysmalloc|systrim|__default_morecore)", s)),
    ("hyper / http1 (parse, encode, body)", lambda s, k, st: not k and re.search(r"hyper|httparse|\bhttp::|h2::", s)),
    ("tokio (scheduler, blocking pool, I/O driver)", lambda s, k, st: not k and re.search(
        r"tokio|mio::|parking_lot|std::thread|std::sys::.*(futex|thread)|crossbeam", s)),
    ("quick_cache (tiers, records)", lambda s, k, st: not k and "quick_cache" in s),
    ("sidecache's own code", lambda s, k, st: not k and "sidecache" in s),
    ("other user space (libc, std, deps)", lambda s, k, st: not k),
    # Before files: a socket's read and write pass through vfs_read/vfs_write too, and softirq work
    # done on the way out of any system call is the network's.
    ("kernel: loopback TCP (send, receive, softirq)", lambda s, k, st: any(NET_FRAMES.match(f) for f in st)),
    ("kernel: files and inodes (open/link/unlink/fallocate/write, ext4)",
     lambda s, k, st: any(FS_CALLS.match(f) or FS_FRAMES.match(f) for f in st)),
    ("kernel: scheduling, futex, epoll (wake-ups)", lambda s, k, st: any(SCHED_FRAMES.match(f) for f in st)),
    ("kernel: memory (faults, mmap/munmap)", lambda s, k, st: any(MM_FRAMES.match(f) for f in st)),
    ("kernel: other", lambda s, k, st: True),
]
FS_GROUP = next(name for name, _ in GROUPS if name.startswith("kernel: files"))


def samples(lines):
    """Yields (period, [(symbol, dso), ...] leaf first) from `perf script -F period,ip,sym,dso`."""
    period, frames = None, []
    for line in lines:
        if not line.strip():
            if period is not None:
                yield period, frames
            period, frames = None, []
            continue
        header = re.match(r"\s*(\d+)\s*$", line)  # a sample's period, then its frames
        if header:
            if period is not None:
                yield period, frames
            period, frames = int(header.group(1)), []
            continue
        m = re.match(r"\s*[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$", line)
        if m:
            sym = re.sub(r"\+0x[0-9a-f]+$", "", m.group(1))
            frames.append((sym, m.group(2)))
    if period is not None:
        yield period, frames


def short(sym):
    """A Rust symbol without its hash and generic arguments, cut to a readable length."""
    sym = re.sub(r"::h[0-9a-f]{16}$", "", sym)
    while re.search(r"<[^<>]*>", sym) and len(sym) > 90:
        sym = re.sub(r"<[^<>]*>", "", sym, count=1)
    return sym if len(sym) <= 100 else sym[:97] + "..."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    total = 0
    by_sym, by_group, by_call = collections.Counter(), collections.Counter(), collections.Counter()
    for period, frames in samples(sys.stdin):
        if not frames:
            continue
        total += period
        leaf, dso = frames[0]
        kernel = dso == KERNEL_DSO
        stack = [f for f, d in frames if d == KERNEL_DSO]
        by_sym[(short(leaf), "kernel" if kernel else dso.rsplit("/", 1)[-1])] += period
        group = next(name for name, test in GROUPS if test(leaf, kernel, stack))
        by_group[group] += period
        if group == FS_GROUP:
            call = next((f[len("__x64_sys_"):] for f in stack if f.startswith("__x64_sys_")), "no system call")
            if call == "openat":  # where in open: making a new inode (unnamed or named) or the rest
                call += next((f" ({what})" for frame, what in (("ext4_tmpfile", "O_TMPFILE: new unnamed inode"),
                                                               ("ext4_create", "O_CREAT: new named inode"))
                              if frame in stack), " (lookup, file setup, other)")
            by_call[call] += period
    if not total:
        sys.exit("no samples")
    print(f"Top {args.top} symbols by self time ({total} samples' periods):\n")
    print("| self % | symbol | where |\n|---:|---|---|")
    for (sym, where), n in by_sym.most_common(args.top):
        print(f"| {100 * n / total:.1f} | `{sym}` | {where} |")
    print("\nSelf time by job:\n")
    print("| % | job |\n|---:|---|")
    for name, _ in GROUPS:
        if by_group[name]:
            print(f"| {100 * by_group[name] / total:.1f} | {name} |")
    if by_call:
        print("\nKernel file and inode time by system call (% of all):\n")
        print("| % | system call |\n|---:|---|")
        for call, n in by_call.most_common():
            print(f"| {100 * n / total:.1f} | {call} |")


if __name__ == "__main__":
    main()
