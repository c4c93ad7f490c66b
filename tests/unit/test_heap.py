"""parallel_vae.heap: while exact bands run in threads, what a band frees stays for its own turn
and goes back to the system as it hands over to the next band; otherwise glibc keeps it in each
band thread's arena, every band's high-water mark resident at once. Run in a child process: the allocator's settings are process-wide."""
import subprocess
import sys
from pathlib import Path

import pytest

from parallel_vae.heap import Heap

REPO = Path(__file__).resolve().parents[2]
BLOCKS, BLOCK = 48, 2 << 20  # under the 32 MiB mmap threshold a worker keeps: heap blocks there

CHILD = f"""
import os, threading
from parallel_vae.heap import HEAP
from parallel_vae.exact.threads import Channel

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def touched(size):
    b = bytearray(size)
    b[::4096] = b"\\x01" * len(range(0, size, 4096))  # a byte in every page: resident
    return b

def left_by_a_band_thread():
    held = {{}}
    channel = Channel(0, 1, 2)  # one of two bands
    def band():
        before = rss()
        blocks, pins = [], []
        for _ in range({BLOCKS}):  # a small block after each: freed blocks stay apart, in the bins
            blocks.append(touched({BLOCK}))
            pins.append(touched(4096))
        del blocks
        held["in turn"] = rss() - before
        channel.ask("edge rows")  # hands over to the next band, as at every exchange point
        held["after"] = rss() - before
        del pins
    t = threading.Thread(target=band)
    t.start()
    assert channel._up.get()[0] == "yield"
    channel._down.put(("answer", None))
    t.join()
    return held["in turn"], held["after"]

import sys
HEAP.keep()  # as a worker does: a freed block stays for the next
with HEAP.bands_running(cpu=sys.argv[1] == "bands"):
    print(*left_by_a_band_thread())
"""


def left(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], cwd=REPO, capture_output=True, text=True, check=True)
    in_turn, after = out.stdout.split()
    return int(in_turn), int(after)


def test_a_band_threads_freed_blocks_stay_for_its_turn_and_leave_when_it_hands_over():
    if Heap().libc is None:
        pytest.skip("glibc only: other allocators map large blocks afresh already")
    total = BLOCKS * BLOCK
    (kept_in_turn, kept), (banded_in_turn, banded) = left("device"), left("bands")
    assert kept_in_turn > total // 2 and kept > total // 2, \
        f"a worker's heap should keep what a thread frees: {kept >> 20} MiB"
    assert banded_in_turn > total // 2, \
        f"within its turn a band's freed blocks should stay for its next ones: {banded_in_turn >> 20} MiB"
    assert banded < total // 4, f"a band's freed blocks should leave as it hands over: {banded >> 20} MiB stayed"


def test_bands_on_a_device_leave_the_allocator_alone():
    heap = Heap()
    with heap.bands_running(cpu=False):
        assert heap._bands == 0
    with heap.bands_running(cpu=True), heap.bands_running(cpu=True):
        assert heap._bands == (2 if heap.libc is not None else 0)
    assert heap._bands == 0


def test_workers_start_with_huge_pages_for_malloc_unless_the_user_said_otherwise():
    from parallel_vae.heap import worker_tunables

    assert worker_tunables({}) == "glibc.malloc.hugetlb=1"
    assert worker_tunables({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == \
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert worker_tunables({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == "glibc.malloc.hugetlb=0"
    assert worker_tunables({"PARALLEL_VAE_KEEP_HEAP": "0"}) is None
    assert worker_tunables({"PARALLEL_VAE_KEEP_HEAP": "0", "GLIBC_TUNABLES": "x=1"}) == "x=1"


REUSE_CHILD = """
import resource, sys
from parallel_vae.heap import HEAP

def faults_of_four_64_mib_blocks():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        block = bytearray(64 << 20)  # written through (zeroed) as a tensor's pages are
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

if sys.argv[1] == "worker":
    HEAP.keep()
with HEAP.reusing_blocks():
    bytearray(64 << 20)  # the first one is faulted in either way
    inside = faults_of_four_64_mib_blocks()
HEAP.give_back()  # as a worker does when idle
after = faults_of_four_64_mib_blocks()
print(inside, after)
"""


def faults(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", REUSE_CHILD, mode], cwd=REPO, capture_output=True, text=True,
                         check=True, env={"PATH": "/usr/bin:/bin"})  # no GLIBC_TUNABLES: 4 KiB pages
    inside, after = map(int, out.stdout.split())
    return inside, after


def test_a_worker_reuses_large_blocks_from_its_heap_while_asked_and_maps_them_afresh_after():
    if Heap().libc is None:
        pytest.skip("glibc only")
    pages = 4 * (64 << 20) // 4096  # four blocks' worth of fresh pages
    inside, after = faults("worker")
    assert inside < pages // 8, f"reused blocks should need no fresh pages: {inside} faults of {pages}"
    assert after > pages // 2, f"after the job (and idle), large blocks are mapped afresh again: {after} faults"
    # ComfyUI's own process (no kept heap) is left alone: every block mapped afresh
    inside, _ = faults("comfyui")
    assert inside > pages // 2, inside
