"""Finding the pack's worker processes the way an operator would (by command line, in /proc), and
acting on a worker at the moment it is busy."""
from __future__ import annotations

import os
import threading
import time


def _commands():
    """(pid, command line) of every process this user can read."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                yield int(entry), f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(next(line for line in f if line.startswith("PPid:")).split()[1])
    except (OSError, StopIteration):
        return -1


def workers_of(pid: int) -> list[int]:
    """Worker processes whose parent is ``pid`` (found the way an operator would, by command line)."""
    return sorted(p for p, cmd in _commands() if "parallel_vae.worker" in cmd and _parent(p) == pid)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def when_busy(pool, lane: str, action, settle: float = 0.0, timeout: float = 60.0):
    """A started thread that runs ``action(handle)`` once the pool's lane ``lane`` holds a task
    (``settle`` seconds later: inside a lock-step by then); join it after the decode."""
    def watch():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h = next(h for h in pool.handles if h.name == lane)
            if h.tasks:
                time.sleep(settle)
                action(h)
                return
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def ray_actors(class_name: str = "ParallelVAEWorker") -> list[int]:
    """Processes of Ray actors of ``class_name`` on this machine, by the title Ray gives them
    (``ray::ParallelVAEWorker...``, what ``ps`` shows an operator)."""
    return sorted(p for p, cmd in _commands() if cmd.startswith(f"ray::{class_name}") and alive(p))
