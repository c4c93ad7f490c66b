"""Finding the pack's worker processes the way an operator would (by command line, in /proc), and
acting on a worker at a point in the pool's work (before it sends the worker a given record)."""
from __future__ import annotations

import os
import signal
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


def before_sending(pool, lane: str, record: str, action, nth: int = 1) -> threading.Event:
    """Run ``action(handle)`` in the pool's own thread just before it sends lane ``lane`` its
    ``nth`` record of type ``record`` ("Task", "SharedRows", ...), then send it. Tied to what the
    pool does, not to a moment: a worker killed there holds work it can never answer for, however
    fast or slow the machine. Patches only that lane's present life; the event says it fired."""
    h = next(h for h in pool.handles if h.name == lane)
    send, seen, fired = h.send, [0], threading.Event()

    def sending(message):
        if type(message).__name__ == record and not fired.is_set():
            seen[0] += 1
            if seen[0] == nth:
                action(h)
                fired.set()
        send(message)

    h.send = sending
    return fired


def sigkill(h, timeout: float = 30.0) -> None:
    """SIGKILL a worker's process and return once it is dead (a zombie or gone)."""
    pid = h.pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            raise TimeoutError(f"pid {pid} still alive {timeout} s after SIGKILL")
        time.sleep(0.01)


def ray_actors(class_name: str = "ParallelVAEWorker") -> list[int]:
    """Processes of Ray actors of ``class_name`` on this machine, by the title Ray gives them
    (``ray::ParallelVAEWorker...``, what ``ps`` shows an operator)."""
    return sorted(p for p, cmd in _commands() if cmd.startswith(f"ray::{class_name}") and alive(p))
