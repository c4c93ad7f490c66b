"""One job on the workers: what to hand out, where results go, and what to do when things fail.

``Job`` is the loop every kind of job shares: start the workers, ship the model and the latent,
run the caller's ``poll`` (ComfyUI's interrupt check) at least every WAIT_S seconds, route each
worker record to the job, and on any exit cancel what the workers still hold and free the
latent. A kind of job fills in the hooks (``assign``, ``on_message``, ``on_lost``, ...);
``TileJob`` decodes a plan's tiles, each tile independently (tiled mode).
"""
from __future__ import annotations

import collections
import itertools
import logging
import math
import time
from typing import Callable, Iterator, Optional

import torch

from . import protocol as msgs
from . import shm
from .errors import DecodeError
from .plan import CAUSAL, VIDEO, Plan
from .schedule import Group, TileQueue, frame_groups, in_plan_order, largest_first, time_windows
from .units import Decoded, Work
from .workers import Death, Handle, ModelSource, Workers, WorkerState

log = logging.getLogger("parallel_vae")

WAIT_S = 0.05  # how often the caller's poll (interrupt check) runs while workers decode
SLOTS = 2  # result slots per worker: it can write one while the parent blends the other
PREFETCH = 2  # tasks a worker holds: the next one is there when the current one ends
LOOKAHEAD_STEPS = 2  # frame order: how many frames a worker may run ahead of the slowest group

_job_ids = itertools.count(1)


def next_job_id() -> int:
    """A job id never used before in this process (workers drop what they know of older ones)."""
    return next(_job_ids)


class Job:
    """The loop shared by every kind of job; subclasses fill in the hooks below.

    Records a job kind adds to the protocol (``protocol.register``) reach ``on_message`` like
    the built-in ones; records of other jobs, or of this one after it ended, go to
    ``Workers.on_stray``.
    """

    def __init__(self, workers: Workers, latent: torch.Tensor, source: ModelSource,
                 poll: Callable[[], None], work: Work):
        self.workers, self.source, self.poll, self.work = workers, source, poll, work
        self.id = next_job_id()
        self.latent = latent.detach().to("cpu").contiguous()
        self.block = None
        self.introduced: set[Handle] = set()  # worker lives sent this job's JobData (under this id)
        self.restarts = 0

    # -- hooks -----------------------------------------------------------------------------------
    def finished(self) -> bool:
        raise NotImplementedError

    def assign(self) -> None:
        """Hand work to workers that are up, hold the model and have room."""
        raise NotImplementedError

    def on_message(self, h: Handle, record: msgs.Record) -> Optional[Decoded]:
        """A record from ``h``; a Decoded is yielded to the caller, then ``returned`` runs.
        Records this job does not know go to ``self.workers.on_stray``."""
        raise NotImplementedError

    def returned(self, h: Handle, record: msgs.Record) -> None:
        """The caller is done with the Decoded made from ``record`` (also when it stopped early)."""
        h.send(msgs.Free(record.slot))

    def on_lost(self, h: Handle) -> None:
        """``h`` died (its tasks, slots and shared memory are gone); the default restarts it."""
        self.restart(h)

    def after_round(self) -> None:
        """Once per round of messages: checks that need the whole picture."""
        self.workers.raise_if_none_can_start()

    def close(self, finished: bool) -> None:
        """Cleanup on every exit; unfinished, the workers drop what they hold of this job."""
        if not finished:
            for h in self.workers.handles:
                if any(j == self.id for j, _ in h.tasks):
                    h.send(msgs.Cancel(self.id))

    # -- helpers for the hooks ---------------------------------------------------------------------
    def ready(self, h: Handle) -> bool:
        """Up and holding this job's model (as it said)."""
        return h.holds(self.source.fingerprint)

    def introduce(self, h: Handle) -> None:
        """Send this job's work and latent to ``h`` before its first task."""
        if h not in self.introduced:
            h.send(msgs.JobData(self.id, self.source.fingerprint, self.work.wire(), self.block.name, self.block.size,
                                self.latent.dtype, tuple(self.latent.shape)))
            self.introduced.add(h)

    def threads_for(self, h: Handle, units: int) -> int:
        """Torch threads for a CPU task of a job that has fewer units than live CPU workers: the
        idle workers' cores are lent to the busy ones (0: the worker's own threads)."""
        cpu = [x for x in self.workers.handles if x.spec.device == "cpu" and x.live]
        if h.spec.device != "cpu" or units >= len(cpu):
            return 0
        return max(h.spec.threads, sum(x.spec.threads for x in cpu) // max(1, units))

    def restart(self, h: Handle) -> None:
        """Start a dead worker again, unless it could not start or this job restarted enough."""
        if h.death is None or not h.death.restartable:
            return
        if self.restarts < self.workers.max_restarts:
            self.restarts += 1
            self.workers.stats.restarts += 1
            log.warning("parallel_vae: restarting the worker for %s", h.name)
            self.workers.spawn(h.index)

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> Iterator[Decoded]:
        workers = self.workers
        self.block, _ = shm.pack({"z": self.latent}, "z")
        finished = False
        try:
            workers.ensure_started()
            while not self.finished():
                self.poll()
                workers.want_model(self.source)
                self.assign()
                batch = collections.deque(workers.receive(WAIT_S))
                try:
                    while batch:
                        h, record = batch.popleft()
                        if record is None:
                            self.on_lost(h)
                            continue
                        workers.watchdog.heard(h.name, isinstance(record, msgs.Result))
                        if not workers.on_common(h, record):
                            result = self.on_message(h, record)
                            if result is not None:
                                try:
                                    yield result
                                finally:  # also when the consumer stops (interrupt): the worker needs it back
                                    self.returned(h, record)
                finally:
                    workers.unread(batch)  # an interrupt or an error ended the job mid-batch
                self.after_round()
            finished = True
        finally:
            self.close(finished)
            shm.release(self.block)
            workers.weights_done(self.source.fingerprint)


def slot_bytes(plan: Plan) -> int:
    """Bytes of the largest unit's float32 pixels: one result slot."""
    channels = plan.out_shape[1]
    if plan.kind == CAUSAL:
        frames = max(f1 - f0 for f0, f1 in plan.step_frames)
        per = max(math.prod(t.out_size[1:]) for t in plan.tiles) * frames
    else:
        per = max(math.prod(t.out_size) for t in plan.tiles)
    return 4 * channels * per


def _oom_error(group: Group, where: str) -> DecodeError:
    names = ", ".join(str(t.index) for t in group.tiles)
    return DecodeError(f"tile{'s' if len(group.tiles) > 1 else ''} {names} ran out of memory on every device "
                       f"that tried ({where}); use a smaller tile_size")


class TileJob(Job):
    """Tiled mode: groups of tiles pulled by idle workers, largest first; retries and back-pressure."""

    def __init__(self, workers: Workers, plan: Plan, latent: torch.Tensor, source: ModelSource, poll,
                 order: str = "tile"):
        super().__init__(workers, latent, source, poll, Work.of(plan))
        self.plan = plan
        # Frame order for causal video: one group of tiles per worker, decoded frame by frame there;
        # a worker that runs ahead of the others is held back (its slots are freed later).
        self.throttle = order == "frame" and plan.kind == CAUSAL
        # Frame order for non-causal video: tiles in time order, gated to a few windows ahead.
        self.windows = time_windows(plan) if order == "frame" and plan.kind == VIDEO else {}
        self.lead = max(1, len(workers.handles) - 1)  # windows past the earliest undelivered one
        if self.throttle:
            groups = frame_groups(plan, len(workers.handles))
        else:
            groups = in_plan_order(plan) if self.windows else largest_first(plan)
        self.groups = {g.index: g for g in groups}
        self.queue = TileQueue(groups)
        self.steps_done: collections.Counter = collections.Counter()  # tile -> steps delivered
        self.held: list[tuple[Handle, int]] = []  # (worker, slot) whose free waits for the others
        self.delivered: set[tuple[int, int]] = set()
        self.done_tiles: set[int] = set()
        self.oom: collections.Counter = collections.Counter()
        self.slot_bytes = slot_bytes(plan)

    def finished(self) -> bool:
        return len(self.done_tiles) >= len(self.plan.tiles)

    def assign(self) -> None:
        for h in self.workers.handles:
            if not self.ready(h) or len(h.tasks) >= PREFETCH:
                continue
            if h.tasks and (h.tasks[0][0] != self.id or self.plan.kind == CAUSAL):
                continue  # prefetch only behind a tile of this job, never behind a causal group
            if not self.workers.ensure_arena(h, self.slot_bytes, SLOTS):
                continue
            group = self.queue.take(h.name, self._may_start)
            if group is None:
                if self.windows and not h.tasks and self.queue.waiting:
                    self.workers.stats.gated += 1  # idle, held back in time
                continue
            self.introduce(h)
            if not h.tasks:
                self.workers.watchdog.started(h.name)
            h.tasks.append((self.id, group.index))
            h.send(msgs.Task(self.id, group.index, tuple(t.index for t in group.tiles),
                             self.threads_for(h, len(self.groups))))

    # -- back-pressure (frame order) ---------------------------------------------------------------
    def _may_start(self, group: Group) -> bool:
        """Non-causal video in frame order: a tile whose temporal window is more than ``lead``
        windows past the earliest window with a tile not yet delivered waits (its worker idles)."""
        if not self.windows:
            return True
        earliest = min((self.windows[t.index] for t in self.plan.tiles if (t.index, 0) not in self.delivered),
                       default=0)
        return self.windows[group.index] <= earliest + self.lead

    def _progress_of(self, h: Handle) -> Optional[int]:
        """Frames delivered by the group a worker is decoding for this job (None: none)."""
        if not h.tasks or h.tasks[0][0] != self.id or h.state is not WorkerState.UP:
            return None
        return min(self.steps_done[t.index] for t in self.groups[h.tasks[0][1]].tiles)

    def _ahead(self, h: Handle) -> bool:
        """Frame order: is this worker more than LOOKAHEAD_STEPS frames ahead of a group that
        another live worker is decoding? (Groups nobody decodes yet cannot catch up by waiting.)"""
        if not self.throttle:
            return False
        mine = self._progress_of(h)
        others = [p for o in self.workers.handles if o is not h for p in [self._progress_of(o)] if p is not None]
        return mine is not None and bool(others) and mine - min(others) > LOOKAHEAD_STEPS

    def returned(self, h: Handle, record: msgs.Result) -> None:
        if self._ahead(h):
            self.held.append((h, record.slot))  # the worker waits for this slot: back-pressure
            self.workers.stats.held += 1
        else:
            h.send(msgs.Free(record.slot))

    # -- records -------------------------------------------------------------------------------------
    def on_message(self, h: Handle, record: msgs.Record) -> Optional[Decoded]:
        if isinstance(record, msgs.Result):
            if record.job_id != self.id or (record.tile, record.step) in self.delivered:
                h.send(msgs.Free(record.slot))  # late, or a step re-decoded after a requeue
                return None
            self.delivered.add((record.tile, record.step))
            self.steps_done[record.tile] = max(self.steps_done[record.tile], record.step + 1)
            pixels = shm.view(h.arena.buf, torch.float32, record.shape, record.slot * h.slot_bytes)
            return Decoded(h.name, self.plan.tiles[record.tile], record.step, pixels, h.pid, borrowed=True)
        if isinstance(record, msgs.Done):
            h.task_over(record.job_id, record.key)
            if record.job_id == self.id:
                for t in self.groups[record.key].tiles:
                    if not all((t.index, s) in self.delivered for s in range(self.plan.steps)):
                        raise DecodeError(f"{h.name} finished tile {t.index} without every step")
                    self.done_tiles.add(t.index)
            return None
        if isinstance(record, msgs.Failed):
            h.task_over(record.job_id, record.key)
            if record.job_id != self.id or record.why is msgs.Failure.CANCELLED:
                return None
            group = self.groups[record.key]
            if record.why is msgs.Failure.OOM:
                self._out_of_memory(h, group, record.message)
                return None
            names = ", ".join(str(t.index) for t in group.tiles)
            raise DecodeError(f"{h.name} failed on tile{'s' if len(group.tiles) > 1 else ''} {names}: "
                              f"{record.message}")
        self.workers.on_stray(h, record)
        return None

    def _out_of_memory(self, h: Handle, group: Group, text: str) -> None:
        """Retry the tiles on another device; with none left, once more where it failed."""
        self.oom[(group.index, h.name)] += 1
        others = [o for o in self.workers.handles if o is not h and o.state is not WorkerState.DEAD
                  and o.name not in self.queue.excluded[group.index]]
        if not others and self.oom[(group.index, h.name)] >= 2:
            raise _oom_error(group, f"{h.name}: {text}")
        where = "on another device" if others else "once more after freeing the cache"
        log.warning("parallel_vae: %s ran out of memory on tile %d; retrying %s", h.name, group.index, where)
        self.workers.stats.events.append((time.time(), f"{h.name} out of memory on tile {group.index}"))
        self.workers.stats.requeued += 1
        if not self.queue.requeue(group, h.name, exclude=bool(others)):
            raise _oom_error(group, f"{h.name}: {text}")

    def on_lost(self, h: Handle) -> None:
        """Requeue its tiles of this job (a causal group restarts from its first frame)."""
        mine = [key for job_id, key in h.tasks if job_id == self.id]
        h.tasks = []
        self.held = [(o, slot) for o, slot in self.held if o is not h]
        for key in mine:
            self.workers.stats.requeued += 1
            if not self.queue.requeue(self.groups[key]):
                raise DecodeError(f"tile {key} was lost {self.queue.max_attempts} times; the last "
                                  f"worker, {h.name}, {h.cause}")
        super().on_lost(h)

    def after_round(self) -> None:
        keep = []
        for h, slot in self.held:
            if h.state is WorkerState.DEAD:
                continue  # its slots died with it
            if self._ahead(h):
                keep.append((h, slot))
            else:
                h.send(msgs.Free(slot))
        self.held = keep
        self._kill_silent()
        super().after_round()
        live = [h.name for h in self.workers.handles if h.state is not WorkerState.DEAD]
        stuck = self.queue.unrunnable(live)
        if stuck and not any(h.tasks for h in self.workers.handles if h.state is WorkerState.UP):
            raise _oom_error(stuck[0], ", ".join(live))

    def _kill_silent(self) -> None:
        """A busy worker silent past its deadline is stopped and its tiles requeued (a worker held
        back in frame order waits for slots: that silence is ours)."""
        dog = self.workers.watchdog
        for h in self.workers.handles:
            if h.state is not WorkerState.UP or not any(j == self.id for j, _ in h.tasks) \
                    or any(o is h for o, _ in self.held):
                continue
            silent, deadline = dog.silent_s(h.name), dog.deadline(h.name)
            if silent > deadline:
                log.warning("parallel_vae: %s was silent for %.0f s (deadline %.0f s); stopping it",
                            h.name, silent, deadline)
                h.kill()
                self.workers.died(h, Death.CRASHED, f"was silent for {silent:.0f} s (deadline {deadline:.0f} s)")
                self.on_lost(h)

    def close(self, finished: bool) -> None:
        for h, slot in self.held:
            h.send(msgs.Free(slot))
        self.held = []
        super().close(finished)
