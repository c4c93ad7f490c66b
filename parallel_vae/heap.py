"""How glibc's allocator treats a process's large CPU buffers: kept while a worker works
(``keep``), large ones reused from the heap during a worker's SD exact decode (``reusing_blocks``),
and given back at every band's turn while exact bands run in threads (``bands_running``).

glibc gives each thread that allocates its own arena, and an arena keeps what it frees (below its
adaptive mmap threshold, which grows to 32 MiB as big blocks are freed) for its own thread's next
allocations. Exact bands run one at a time but each in a thread of its own, so every band
thread's arena keeps its own high-water mark: the process holds the sum over bands of each band's
peak, not the peak of their sum (one-frame 768x768 Wan decode in ComfyUI's process: 3 bands hold
about 300-540 MiB more, 12 bands 1.9 GiB more). While several bands run in threads, blocks under
32 MiB come from the arenas, reused within a band's turn, and each time a band hands over to the
next (``turn_over``, from threads.Channel.ask) ``malloc_trim`` gives every arena's free pages back.
An earlier rule, every block of 1 MiB or more mapped afresh and unmapped when freed, held the same
peak at a fresh page fault for each block within the turn too: 6.8 million faults against 5.5-5.8
million for that decode, and 10-15% of its time (docs/BENCHMARKS.md). Afterwards the process's
previous setting returns (for a process glibc had left adaptive: the values adaptation reaches,
32 MiB and 64 MiB). Elsewhere than glibc (Windows, macOS, where large blocks are mapped anyway)
this is a no-op; device memory is torch's to pool.
"""
from __future__ import annotations

import ctypes
import os
import threading
from contextlib import contextmanager

KEEP_HEAP_ENV = "PARALLEL_VAE_KEEP_HEAP"
TUNABLES_ENV = "GLIBC_TUNABLES"
HUGE_PAGES = "glibc.malloc.hugetlb"  # 1: malloc asks for transparent huge pages (glibc 2.35+)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters
MMAP_MAX_DEFAULT = 65536  # glibc's own M_MMAP_MAX
KEPT = (32 << 20, 1 << 30)  # (mmap, trim) of a worker's kept heap: the largest fixed mmap threshold
# (mmap, trim) while bands run in threads: blocks under 32 MiB from the heap, what a band frees
# given back as its turn ends (malloc_trim returns free pages inside an arena but not a thread
# arena's top, which goes back as it passes the trim threshold)
BANDS = (32 << 20, 8 << 20)
ADAPTED = (32 << 20, 64 << 20)  # (mmap, trim) where glibc's adaptation ends


def _glibc():
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


class Heap:
    """One process's allocator settings (``HEAP``)."""

    def __init__(self):
        self.libc = _glibc()
        self.kept = False
        self._lock = threading.Lock()
        self._bands = 0  # band runs under way in this process
        self._reusing = 0  # jobs under way that reuse large blocks (``reusing_blocks``)

    def _set(self, mmap: int, trim: int) -> bool:
        return bool(self.libc.mallopt(M_MMAP_THRESHOLD, mmap) and self.libc.mallopt(M_TRIM_THRESHOLD, trim))

    def keep(self) -> None:
        """A worker process keeps what it frees while it works and gives it back when idle
        (``give_back``). glibc returns the top of its heap to the kernel whenever more than 32 MiB
        of it are free, and a decode crosses that mark several times per tile: every regrowth is
        fresh zeroed pages, about 25,000 page faults (100 MiB) per 128-pixel SD tile on the CPU.
        Keeping them made a 2-thread CPU worker about 7% faster (docs/BENCHMARKS.md). Set once,
        before the process allocates much. ``PARALLEL_VAE_KEEP_HEAP=0`` leaves glibc's defaults
        (benchmarks compare the two)."""
        if os.environ.get(KEEP_HEAP_ENV, "1") == "0" or self.libc is None:
            return
        with self._lock:  # fixed thresholds also stop glibc adapting them: the mmap one at its largest
            self.kept = self._set(*KEPT)

    def give_back(self) -> None:
        if self.libc is not None:
            self.libc.malloc_trim(0)

    @contextmanager
    def reusing_blocks(self, wanted: bool = True):
        """In a worker (a kept heap), large blocks come from the heap while this runs, not each from
        a fresh mapping: glibc maps every block of 32 MiB or more afresh and unmaps it when freed,
        and a 1024-wide SD decode band's last-level tensors are 256 MiB each, faulted in and zeroed
        again at every layer (7 s of system time in a 41 s worker half at one thread). Freed blocks
        stay for the next layer's and go back to the kernel when the worker is idle
        (``give_back``). Only where it was measured to pay: SD exact decode, 15% faster at a lower
        peak; the encoder's shapes fragment the heap instead (+370 MiB, slower)."""
        if not wanted or not self.kept or self.libc is None:
            yield
            return
        with self._while("_reusing", lambda: self.libc.mallopt(M_MMAP_MAX, 0),
                         lambda: self.libc.mallopt(M_MMAP_MAX, MMAP_MAX_DEFAULT)):
            yield

    @contextmanager
    def bands_running(self, cpu: bool = True):
        """While several exact bands run in threads of this process on the CPU, their buffers come
        from the heap within a band's turn and go back to the kernel as it ends (``turn_over``)."""
        if not cpu or self.libc is None:
            yield
            return
        try:
            with self._while("_bands", lambda: self._set(*BANDS),
                             lambda: self._set(*(KEPT if self.kept else ADAPTED))):
                yield
        finally:
            self.give_back()

    def turn_over(self) -> None:
        """A band hands over to the next (its thread waits): what its arena holds free goes back,
        so the next band, whose thread has another arena, finds the pages with the kernel, not
        kept for a thread that is waiting (0.1-0.2 s in all over a 768x768 Wan frame's decode)."""
        if self._bands:
            self.give_back()

    @contextmanager
    def _while(self, count: str, first, last):
        """Counts the runs under way in attribute ``count``: ``first()`` as the first starts,
        ``last()`` as the last ends (jobs and band runs may overlap in one process)."""
        with self._lock:
            if getattr(self, count) == 0:
                first()
            setattr(self, count, getattr(self, count) + 1)
        try:
            yield
        finally:
            with self._lock:
                setattr(self, count, getattr(self, count) - 1)
                if getattr(self, count) == 0:
                    last()


def worker_tunables(environ) -> str | None:
    """``GLIBC_TUNABLES`` for a worker process started from ``environ``: transparent huge pages for
    what malloc maps (``glibc.malloc.hugetlb=1``), so a fresh 76 MiB activation faults in 38 huge
    pages, not 19,000 small ones (a two-worker CPU decode of a 768x768 Wan frame: 7-8% faster at
    the same peak RSS, docs/BENCHMARKS.md). Tunables are read at a process's start: ComfyUI's own
    process cannot be given them. A tunable the user set stays as set; ``PARALLEL_VAE_KEEP_HEAP=0``
    leaves glibc's defaults; glibc before 2.35 and other C libraries ignore it; with THP off
    (``never``) it changes nothing."""
    current = environ.get(TUNABLES_ENV) or ""
    if environ.get(KEEP_HEAP_ENV, "1") == "0" or HUGE_PAGES in current:
        return current or None
    return ":".join(t for t in (current, f"{HUGE_PAGES}=1") if t)


HEAP = Heap()

__all__ = ["HEAP", "Heap", "KEEP_HEAP_ENV", "worker_tunables"]
