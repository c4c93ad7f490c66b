"""Finding the pack's worker processes the way an operator would: by command line, in /proc."""
from __future__ import annotations

import os


def workers_of(pid: int) -> list[int]:
    """Worker processes whose parent is ``pid`` (found the way an operator would, by command line)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/status") as f:
                ppid = int(next(line for line in f if line.startswith("PPid:")).split()[1])
        except (OSError, StopIteration):
            continue
        if "parallel_vae.worker" in cmd and ppid == pid:
            found.append(int(entry))
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False
