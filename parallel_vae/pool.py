"""Persistent decode workers, one per lane: the pool's public face.

The pool lives in the parent (ComfyUI's process) and is driven by the thread that runs the node:
``warm`` starts the workers and loads a model in them, ``run`` decodes a plan on them and yields
each unit as it arrives, ``shutdown`` stops them (so does garbage collection, and each worker also
exits when its parent dies). One job runs at a time. The parts behind it:

  workers.py       the parent's view of the workers: what each does and holds, deaths, models, slots
  processes.py     workers as local processes (a Transport); ray_workers.py: as Ray actors
  jobs.py          one job: what to hand out, result slots, back-pressure, retries, cancel
  lockstep_job.py  exact mode's GroupNorm bands in lock-step across workers, and lane speeds
  protocol.py      the messages between parent and worker, as named records
  worker.py        the worker itself
"""
from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import Callable, Iterator, Optional, Sequence

import torch

from .errors import DecodeError
from .jobs import WAIT_S, TileJob
from .lockstep_job import LockstepJob
from .rates import Speeds
from .plan import Plan
from .units import Decoded
from .workers import START_TIMEOUT_S, Handle, ModelSource, PoolStats, Transport, Workers, WorkerSpec, WorkerState

__all__ = ["WorkerPool", "idle_limits"]

log = logging.getLogger("parallel_vae")

IDLE_DROP_ENV = "PARALLEL_VAE_IDLE_DROP_S"  # idle workers forget their VAEs after this (0: never)
IDLE_EXIT_ENV = "PARALLEL_VAE_IDLE_EXIT_S"  # ... and exit after this (0: never)
TIDY_EVERY_S = 5.0


def idle_limits() -> tuple[float, float]:
    """(seconds idle before workers drop their VAEs, seconds before they exit), from the environment."""
    return (float(os.environ.get(IDLE_DROP_ENV) or 300), float(os.environ.get(IDLE_EXIT_ENV) or 1800))


def _tidy_loop(pool_ref, stop: threading.Event) -> None:
    """The pool's janitor: applies the idle limits without keeping the pool alive."""
    while not stop.wait(TIDY_EVERY_S):
        pool = pool_ref()
        if pool is None:
            return
        try:
            pool.tidy()
        except Exception:  # a worker's late failure report: the next job sees the state anyway
            log.exception("parallel_vae: tidying the idle workers failed")
        del pool


class WorkerPool:
    """Workers for ``specs`` over ``transport``, started on first use and kept until ``shutdown``."""

    def __init__(self, specs: Sequence[WorkerSpec], transport: Transport, imports: Sequence[str] = (),
                 max_restarts: Optional[int] = None):
        self.workers = Workers(specs, transport, imports, max_restarts)
        self.transport = transport
        self.specs: list[WorkerSpec] = self.workers.specs
        self.names = [s.name for s in self.specs]
        self.handles: list[Handle] = self.workers.handles  # the current life of each worker (updated in place)
        self.stats: PoolStats = self.workers.stats
        self.speeds = Speeds()  # per lane, in exact bands (lockstep_job.py)
        self._lock = threading.Lock()  # one job (or warm-up) at a time
        self.idle_drop_s, self.idle_exit_s = idle_limits()
        self.last_used = time.monotonic()
        self._stop_tidy = threading.Event()
        weakref.finalize(self, self._stop_tidy.set)
        threading.Thread(target=_tidy_loop, args=(weakref.ref(self), self._stop_tidy), daemon=True,
                         name="pvae-pool-tidy").start()

    def pids(self) -> dict[str, int]:
        return self.workers.pids()

    def start(self) -> list[Handle]:
        """Start every worker that is not running (not waiting for them); their handles."""
        with self._lock:
            self.workers.ensure_started()
            return list(self.workers.handles)

    def warm(self, source: ModelSource, poll: Callable[[], None] = lambda: None) -> dict[str, int]:
        """Start every worker and load ``source`` in it; returns {name: pid} of ready workers."""
        workers = self.workers
        with self._lock:
            workers.ensure_started()
            try:
                while True:
                    poll()
                    workers.want_model(source)
                    if not any(h.state is WorkerState.STARTING or h.asked for h in workers.handles):
                        break
                    for h, record in workers.receive(WAIT_S):
                        if record is not None and not workers.on_common(h, record):
                            workers.on_stray(h, record)
            finally:
                workers.weights_done(source.fingerprint)
                self.last_used = time.monotonic()
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
        decodes causal video frame by frame (schedule.frame_groups), for streams. Exact plans run
        in lock-step (lockstep_job.py): their bands exchange rows and statistics (Wan's give each
        decoder call's frames as they go).
        """
        with self._lock:
            if plan.exact:
                job = LockstepJob(self.workers, plan, latent, source, poll, self.speeds)
            else:
                job = TileJob(self.workers, plan, latent, source, poll, order)
            try:
                yield from job.run()
            finally:
                self.last_used = time.monotonic()

    # -- memory: idle limits, ComfyUI's "free", the workers route -----------------------------------
    def tidy(self) -> None:
        """Idle past ``idle_drop_s``: workers forget their VAEs; past ``idle_exit_s``: they exit.
        Never while a job runs (the lock is only tried)."""
        if not self._lock.acquire(blocking=False):
            return
        try:
            self.workers.drain()
            idle = time.monotonic() - self.last_used
            live = any(h.live for h in self.handles)
            if self.idle_exit_s and idle >= self.idle_exit_s and live:
                log.info("parallel_vae: workers idle for %.0f s; stopping them", idle)
                self.workers.stop_all()
            elif self.idle_drop_s and idle >= self.idle_drop_s and any(h.models for h in self.handles):
                log.info("parallel_vae: workers idle for %.0f s; they drop their VAEs", idle)
                self.workers.drop_models()
        finally:
            self._lock.release()

    def release(self) -> int:
        """Stop every worker once the running job (if any) ends; the next job starts them again.
        Returns how many were running."""
        with self._lock:
            running = sum(h.live for h in self.handles)
            self.workers.stop_all()
            return running

    def report(self) -> dict:
        """The workers as the /parallel_vae/workers route shows them."""
        busy = not self._lock.acquire(blocking=False)
        if not busy:
            try:
                self.workers.drain()
            finally:
                self._lock.release()
        return {"busy": busy, "idle_s": None if busy else round(time.monotonic() - self.last_used, 1),
                "idle_drop_s": self.idle_drop_s, "idle_exit_s": self.idle_exit_s, "workers": self.workers.report()}

    def shutdown(self) -> None:
        self._stop_tidy.set()
        with self._lock:
            self.workers.stop()
