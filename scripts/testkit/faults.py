"""Faults on purpose, for the test suite: loaded into each worker by PARALLEL_VAE_WORKER_HOOKS
(parallel_vae/worker.py calls ``on_init`` and ``before_task``), so nothing of it ships to users.

PARALLEL_VAE_TEST_FAULT says which fault:
  start                               every worker fails its start
  oom:<tile or *>:<worker>            that worker runs out of memory on that tile (not on a retry of
                                      an exact item whose bands were split)
  hang:<tile or *>:<worker>:<marker>  that worker hangs (alive and silent) on that tile, once: it
                                      creates the marker file, and hangs only while it is absent
  wait:<tile>:<marker>                whichever worker gets that tile waits until the marker file
                                      exists (the test creates it on an event: a slow device on cue)
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

FAULT_ENV = "PARALLEL_VAE_TEST_FAULT"
HOOKS_ENV = "PARALLEL_VAE_WORKER_HOOKS"  # parallel_vae.worker.HOOKS_ENV


def enable(monkeypatch, fault: str) -> None:
    """Make workers started from now on (by this process) fail as ``fault`` says."""
    monkeypatch.setenv(HOOKS_ENV, str(Path(__file__).resolve()))
    monkeypatch.setenv(FAULT_ENV, fault)


@contextlib.contextmanager
def injected(monkeypatch, fault: str, backends):
    """Fresh workers that fail as ``fault`` says for the block; then the workers go and the next
    ones start clean (``backends``: the pack's nodes.backends)."""
    backends.shutdown()
    enable(monkeypatch, fault)
    try:
        yield
    finally:
        backends.shutdown()
        monkeypatch.delenv(FAULT_ENV)


def _fault() -> str:
    return os.environ.get(FAULT_ENV, "")


def on_init(worker) -> None:
    if _fault() == "start":
        raise RuntimeError(f"{FAULT_ENV}=start: this worker fails on start, as asked")


def before_task(worker, work, tiles) -> None:
    import torch

    fault = _fault()
    if fault.startswith("hang:"):
        _, t, who, marker = fault.split(":", 3)
        if (t == "*" or int(t) in tiles) and who == worker.name and not os.path.exists(marker):
            open(marker, "w").close()
            while True:
                time.sleep(1.0)
    if fault.startswith("wait:"):
        _, t, marker = fault.split(":", 2)
        if int(t) in tiles:
            while not os.path.exists(marker):
                time.sleep(0.02)
    if fault.startswith("oom:") and work.split == 1:  # a split retry is let through
        _, t, who = fault.split(":", 2)
        if (t == "*" or int(t) in tiles) and who == worker.name:
            raise torch.OutOfMemoryError(f"{FAULT_ENV}: simulated out of memory on tile {t}")
