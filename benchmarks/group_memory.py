"""The memory ComfyUI and its workers hold together, sampled every 0.1 s while a benchmark runs.

The sum of each process's peak RSS counts a page as often as processes map it: the result slots
(in ComfyUI and the worker that fills them), the one block of weights every worker maps, and the
libraries torch loads (about 500 MiB of RSS per process that imports it). Two ways to count
them once, both sampled from /proc/PID/status (a spike shorter than 0.1 s can escape; smaps_rollup
would be exact per page but costs 8-22 ms a read on a busy 2-core machine):
- ``shared="shmem"``: each process's anonymous and file pages, plus the shared memory (RssShmem)
  of the process that holds most, once (libraries still counted per process);
- ``shared="all"``: each process's anonymous pages, plus the file pages and the shared memory of
  the process that holds most of each, once: every process maps the same torch libraries (the
  file pages) and the workers the same block of weights (the shared memory).
"""
from __future__ import annotations

import threading
from typing import Callable, Iterable


def status_mib(pid, keys: tuple[str, ...]) -> dict:
    """Fields ``keys`` of /proc/``pid``/status ("self" allowed), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        return {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in f if ":" in line)
                if k in keys}


def held_mib(pids: Iterable, shared: str = "shmem") -> float:
    """What the processes ``pids`` ("self" allowed) hold together now, in MiB (see the module)."""
    parts = [status_mib(p, ("RssAnon", "RssFile", "RssShmem")) for p in pids]
    if shared == "all":
        return sum(s["RssAnon"] for s in parts) + max(s["RssFile"] for s in parts) + max(s["RssShmem"] for s in parts)
    return sum(s["RssAnon"] + s["RssFile"] for s in parts) + max(s["RssShmem"] for s in parts)


class TotalMemory:
    """The peak of ``held_mib`` over process ``pid`` and ``others()`` (its workers, found anew at
    each sample), sampled every 0.1 s from a thread until ``stop()``."""

    def __init__(self, pid, others: Callable[[], Iterable] = lambda: (), shared: str = "shmem"):
        self.pid, self.others, self.shared, self.peak_mib = pid, others, shared, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_mib = max(self.peak_mib, held_mib([self.pid, *self.others()], self.shared))
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
            self._stop.wait(0.1)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mib
