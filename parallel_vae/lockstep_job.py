"""Exact mode on the workers: each batch item's bands decoded in lock-step (SD-family and Wan).

One item at a time, its bands are cut into one contiguous group per live worker (as the plan
shared rows out by lane speed and memory, exact/shares.py; evenly once a worker is lost). Each
worker reports its busy time (less its waits on the others), which sets its lane's speed for the
next plans (``Speeds``). At every
GroupNorm each worker sends the row moments of its bands (GroupStats); once every group has
reported, the parent combines them in row order (float64) and sends every worker the same
statistics (SharedStats). Before every conv that reads across band edges each worker sends the
outer edge rows of its group (GroupRows) and gets its neighbours' back (SharedRows). Each band's
rows come back as an ordinary Result (Wan's: one per latent frame, as each decoder call ends):
no blending.

A lock-step cannot lose a member: when a worker dies, falls silent for LOCKSTEP_TIMEOUT_S, or runs
out of memory, the attempt is cancelled everywhere and the item decoded again (with a fresh job id,
so late records of the old attempt are dropped) on the workers that are left, with every band split
in two after an out-of-memory error. The output does not depend on how the bands are grouped or
split, so a retry gives the same pixels.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import protocol as msgs
from . import shm
from .errors import DecodeError
from .exact import stats
from .exact.geometry import bands_of, split_rows
from .exact.lockstep import neighbours, rows_from_wire, rows_to_wire
from .jobs import SLOTS, Job, next_job_id, slot_bytes
from .rates import Speeds, model_key
from .plan import Plan
from .units import Decoded, Work
from .workers import Death, Handle, ModelSource, Workers, WorkerState

log = logging.getLogger("parallel_vae")

LOCKSTEP_TIMEOUT_S = float(os.environ.get("PARALLEL_VAE_LOCKSTEP_TIMEOUT", "600"))
MAX_ATTEMPTS = 6  # per item: lost workers and out-of-memory retries together


@dataclass(frozen=True)
class Part:
    """One worker's group of an attempt: the bands it decodes (contiguous, top to bottom)."""

    worker: Handle
    bands: tuple[int, ...]


class LockstepJob(Job):
    def __init__(self, workers: Workers, plan: Plan, latent: torch.Tensor, source: ModelSource,
                 poll: Callable[[], None], speeds: Speeds):
        super().__init__(workers, latent, source, poll, Work.of(plan))
        self.plan = plan
        self.speeds = speeds
        self.slot_bytes = slot_bytes(plan)
        self.item = 0
        self.split = 1
        self.attempts = 0
        self.groups: dict[int, Part] = {}  # by key (its first band)
        self.pending: set[int] = set()  # groups of the running attempt not done yet
        self.reported: dict[int, dict[int, msgs.Record]] = {}  # sync point k -> key -> GroupStats/GroupRows
        self.delivered: set[tuple[int, int]] = set()  # (band, step)
        self.last_heard = time.monotonic()

    def finished(self) -> bool:
        return self.item >= self.plan.batch

    # -- attempts --------------------------------------------------------------------------------
    def assign(self) -> None:
        if self.groups or self.finished():
            return
        handles = self.workers.handles
        if any(h.state is WorkerState.STARTING or h.asked for h in handles):
            return  # a (re)starting or (re)loading worker joins the next attempt
        live = [h for h in handles if self.ready(h) and not h.tasks]
        if not live or any(h.tasks for h in handles if h.state is WorkerState.UP):
            return  # workers still finishing (cancelling) an earlier attempt
        live = [h for h in live if self.workers.ensure_arena(h, self.slot_bytes, SLOTS)]
        bands = bands_of(self.plan, self.item)
        grouping = self.grouping(live, len(bands))
        self.work = self.work.split_in(self.split)
        self.reported = {}
        self.last_heard = time.monotonic()
        for h, (p, q) in grouping:
            indices = tuple(band.index for band in bands[p:q])
            key = indices[0]
            self.groups[key] = Part(h, indices)
            self.pending.add(key)
            self.introduce(h)
            h.tasks.append((self.id, key))
            h.send(msgs.Task(self.id, key, indices, self.threads_for(h, len(grouping))))

    def grouping(self, live: list[Handle], bands: int) -> list[tuple[Handle, tuple[int, int]]]:
        """(worker, bands [p, q) of the item) for each group: as the plan shared the rows out by
        lane, while every lane it names is live; else even over the live workers."""
        by_name = {h.name: h for h in live}
        if self.plan.shares and all(name in by_name for name, _ in self.plan.shares):
            out, p = [], 0
            for name, count in self.plan.shares:
                out.append((by_name[name], (p, p + count)))
                p += count
            return out
        return list(zip(live, split_rows(bands, min(len(live), bands))))

    def abort(self, why: str) -> None:
        """Cancel the running attempt everywhere; the next round starts the item again."""
        self.attempts += 1
        log.warning("parallel_vae: exact decode of item %d restarts (%s)", self.item, why)
        self.workers.stats.events.append((time.time(), f"exact item {self.item} restarts: {why}"))
        if self.attempts > MAX_ATTEMPTS:
            raise DecodeError(f"exact mode gave up on batch item {self.item} after {MAX_ATTEMPTS} attempts "
                              f"(last: {why}); use mode=tiled")
        for part in self.groups.values():
            if part.worker.state is WorkerState.UP:
                part.worker.send(msgs.Cancel(self.id))
        self.groups, self.pending, self.reported = {}, set(), {}
        self.id = next_job_id()  # a fresh id: records of the cancelled attempt are strays now
        self.introduced = set()

    def item_done(self) -> None:
        missing = [band.index for band in bands_of(self.plan, self.item)
                   if any((band.index, step) not in self.delivered for step in range(self.plan.steps))]
        if missing:
            raise DecodeError(f"exact mode: bands {missing} of item {self.item} never arrived")
        self.item += 1
        self.speeds.job_done()
        self.split, self.attempts = 1, 0
        self.groups = {}

    # -- records -----------------------------------------------------------------------------------
    def on_message(self, h: Handle, record: msgs.Record) -> Optional[Decoded]:
        current = getattr(record, "job_id", None) == self.id
        if isinstance(record, (msgs.GroupStats, msgs.GroupRows, msgs.GroupPart)):
            if current:
                self.last_heard = time.monotonic()
                self.reported.setdefault(record.k, {})[record.key] = record
                self._share(record.k)
            return None
        if isinstance(record, msgs.Result):
            if not current or (record.tile, record.step) in self.delivered:
                h.send(msgs.Free(record.slot))
                return None
            self.delivered.add((record.tile, record.step))
            self.last_heard = time.monotonic()
            pixels = shm.view(h.arena.buf, torch.float32, record.shape, record.slot * h.slot_bytes)
            return Decoded(h.name, self.plan.tiles[record.tile], record.step, pixels, h.pid, borrowed=True)
        if isinstance(record, msgs.Done):
            h.task_over(record.job_id, record.key)
            if current:
                self.speeds.rated(h.name, self._positions(record.key), record.busy_s,
                                  model_key(self.source.fingerprint, self.plan.direction))
                self.speeds.synced(record.waited_s, record.rounds)
                self.pending.discard(record.key)
                if not self.pending:
                    self.item_done()
            return None
        if isinstance(record, msgs.Failed):
            h.task_over(record.job_id, record.key)
            if not current or record.why is msgs.Failure.CANCELLED:
                return None
            if record.why is msgs.Failure.OOM:
                rows = min(band.rows for band in bands_of(self.plan, self.item))
                if self.split >= rows:
                    raise DecodeError(f"exact mode ran out of memory on {h.name} even with bands of one latent "
                                      f"row: {record.message}; use mode=tiled with a smaller tile_size")
                self.split *= 2
                self.abort(f"{h.name} ran out of memory; bands split {self.split} ways")
                return None
            raise DecodeError(f"{h.name} failed on exact bands {self.groups[record.key].bands}: {record.message}")
        self.workers.on_stray(h, record)
        return None

    def _positions(self, key: int) -> int:
        """Latent positions (frames x rows x width) of one group's bands."""
        tiles = [self.plan.tiles[i] for i in self.groups[key].bands]
        return sum(math.prod(t.in_size) for t in tiles)

    def _share(self, k: int) -> None:
        got = self.reported[k]
        if len(got) < len(self.groups):
            return
        keys = sorted(self.groups)  # groups are contiguous: band order
        ordered = [got[key] for key in keys]
        if len({(type(r), r.name) for r in ordered}) != 1:
            raise DecodeError(f"exact mode: workers fell out of step at sync point {k} "
                              f"({sorted({r.name for r in ordered})})")
        del self.reported[k]
        if isinstance(ordered[0], msgs.GroupPart):
            whole = torch.cat([rows_from_wire(r.part, "cpu") for r in ordered], -2)
            shared = msgs.SharedWhole(self.id, k, rows_to_wire(whole))
            for key in keys:
                self.groups[key].worker.send(shared)
            return
        if isinstance(ordered[0], msgs.GroupRows):
            beyond = neighbours([r.top for r in ordered], [r.bottom for r in ordered])
            for key, (above, below) in zip(keys, beyond):
                self.groups[key].worker.send(msgs.SharedRows(self.id, k, above, below))
            return
        parts = [stats.Moments.from_wire(m) for r in ordered for m in r.moments]
        mean, rstd = stats.combine(parts, ordered[0].eps)
        shared = msgs.SharedStats(self.id, k, mean.numpy().tobytes(), rstd.numpy().tobytes(), tuple(mean.shape))
        for key in keys:
            self.groups[key].worker.send(shared)

    def on_lost(self, h: Handle) -> None:
        in_attempt = any(part.worker is h for part in self.groups.values())
        h.tasks = []
        if in_attempt:
            self.abort(f"{h.name} {h.cause}")
        self.restart(h)

    def after_round(self) -> None:
        super().after_round()
        if self.groups and time.monotonic() - self.last_heard > LOCKSTEP_TIMEOUT_S:
            waiting = max(self.reported, default=None)
            quiet = [part.worker for key, part in self.groups.items()
                     if key in self.pending and (waiting is None or key not in self.reported[waiting])]
            for h in quiet:
                log.warning("parallel_vae: %s was silent for %.0f s in an exact decode; stopping it",
                            h.name, LOCKSTEP_TIMEOUT_S)
                h.kill()
                self.workers.died(h, Death.CRASHED, f"was silent for {LOCKSTEP_TIMEOUT_S:.0f} s in an exact decode")
                self.on_lost(h)
            if not quiet:
                self.abort(f"no progress for {LOCKSTEP_TIMEOUT_S:.0f} s")
