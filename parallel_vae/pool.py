"""Persistent decode workers, one process per device: the pool's public face.

The pool lives in the parent (ComfyUI's process) and is driven by the thread that runs the node:
``warm`` starts the workers and loads a model in them, ``run`` decodes a plan on them and yields
each unit as it arrives, ``shutdown`` stops them (so does garbage collection, and each worker also
exits when its parent dies). One job runs at a time. The parts behind it:

  processes.py   the worker processes and what each holds (start, health, models, slots, stop)
  jobs.py        one job: what to hand out, result slots, back-pressure, retries, cancel
  lockstep_job.py  exact mode's GroupNorm bands in lock-step across workers
  protocol.py    the messages between parent and worker, as named records
  worker.py      the worker process itself
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Iterator, Optional, Sequence

import torch

from .engine import Decoded
from .errors import DecodeError
from .jobs import LOOKAHEAD_STEPS, SLOTS, WAIT_S, TileJob, wire_plan
from .lockstep_job import LockstepJob
from .plan import CAUSAL, Plan
from .processes import START_TIMEOUT_S, Handle, ModelSource, PoolStats, Workers, WorkerSpec, WorkerState

__all__ = ["WorkerPool", "WorkerSpec", "ModelSource", "PoolStats", "wire_plan",
           "LOOKAHEAD_STEPS", "SLOTS", "WAIT_S", "START_TIMEOUT_S"]


class WorkerPool:
    """Workers for ``specs``, started on first use and kept until ``shutdown``."""

    def __init__(self, specs: Sequence[WorkerSpec], python_path: Sequence[str] = (), imports: Sequence[str] = (),
                 max_restarts: Optional[int] = None):
        self.workers = Workers(specs, python_path, imports, max_restarts)
        self._lock = threading.Lock()  # one job (or warm-up) at a time

    @property
    def specs(self) -> list[WorkerSpec]:
        return self.workers.specs

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @property
    def handles(self) -> list[Handle]:
        return self.workers.handles

    @property
    def stats(self) -> PoolStats:
        return self.workers.stats

    def pids(self) -> dict[str, int]:
        return self.workers.pids()

    def warm(self, source: ModelSource, poll: Callable[[], None] = lambda: None) -> dict[str, int]:
        """Start every worker and load ``source`` in it; returns {name: pid} of ready workers."""
        workers = self.workers
        with self._lock:
            workers.ensure_started()
            try:
                while True:
                    poll()
                    workers.want_model(source)
                    if not any(h.state is WorkerState.STARTING or h.loading for h in workers.handles):
                        break
                    for h, record in workers.receive(WAIT_S):
                        if record is not None and not workers.on_common(h, record):
                            workers.on_stray(h, record)
            finally:
                workers.weights_done(source.fingerprint)
            workers.raise_if_none_can_start()
            return workers.pids()

    def wait_ready(self, source: ModelSource, timeout: float = START_TIMEOUT_S) -> dict[str, int]:
        """Restart any dead worker and wait until all hold ``source`` (tests: pool back to full size)."""
        deadline = time.monotonic() + timeout

        def poll():
            if time.monotonic() > deadline:
                raise DecodeError("workers did not become ready in time")
        return self.warm(source, poll)

    def run(self, plan: Plan, latent: torch.Tensor, source: ModelSource,
            poll: Callable[[], None] = lambda: None, order: str = "tile") -> Iterator[Decoded]:
        """Decode every tile of ``plan`` on the workers; yields each (tile, step) once.

        The caller blends each result before advancing the iterator (the pixels are a view of a
        slot that is freed then). ``poll`` runs at least every WAIT_S seconds; an exception from
        it (ComfyUI's interrupt) cancels the job in the workers and propagates. ``order="frame"``
        decodes causal video frame by frame (schedule.lane_groups), for streams. Exact plans of
        GroupNorm VAEs run in lock-step (lockstep_job.py); exact Wan bands need nothing from each
        other and are scheduled like causal tiles.
        """
        with self._lock:
            if plan.exact and plan.kind != CAUSAL:
                job = LockstepJob(self.workers, plan, latent, source, poll)
            else:
                job = TileJob(self.workers, plan, latent, source, poll, order)
            yield from job.run()

    def shutdown(self) -> None:
        with self._lock:
            self.workers.stop()
