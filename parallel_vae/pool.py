"""Persistent decode workers, one process per device: start, load, run jobs, recover, shut down.

The pool lives in the parent (ComfyUI's process) and is driven by the thread that runs the node:
every wait is a short ``multiprocessing.connection.wait`` on the workers' sockets, between which
the caller's ``poll`` runs (ComfyUI's interrupt check), so nothing waits forever and a dead worker
is seen at once (its socket reaches end of file). No signal handlers are installed anywhere.
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch

from . import shm
from .engine import Decoded
from .errors import DecodeError, ModelMismatch
from .plan import CAUSAL, Plan
from .schedule import Group, TileQueue, largest_first, lane_groups
from .worker import MAX_CACHED_VAES

log = logging.getLogger("parallel_vae")

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = float(os.environ.get("PARALLEL_VAE_START_TIMEOUT", "180"))
WAIT_S = 0.05  # how often the caller's poll (interrupt check) runs while workers decode
SLOTS = 2  # result slots per worker: it can write one while the parent blends the other
STOP_GRACE_S = (2.0, 3.0)  # quit -> SIGTERM -> SIGKILL
LOOKAHEAD_STEPS = 2  # frame order: how many frames a worker may run ahead of the slowest group


@dataclass(frozen=True)
class WorkerSpec:
    """One worker: its name in progress text (cuda:1, cpu[0]), the torch device it sees, its env."""

    name: str
    device: str  # as the worker sees it: "cpu" or "cuda:0" (CUDA_VISIBLE_DEVICES pins the GPU)
    threads: int = 1
    env: tuple[tuple[str, str], ...] = ()
    setup: tuple = ()  # (module, "attr.path", value) set in the worker before anything else


@dataclass
class ModelSource:
    """How to give workers a model: ``weights()`` is called only when some worker lacks it.

    ``recipe(spec)`` returns {"factory": "module:callable", "weights_arg": name, "kwargs": {...},
    "module_attr": attr or None, "dtype_attr": attr or None, "family": decoder family,
    "latent_channels": n (for the stepper's check), "pixel_dtype": dtype of decoded pixels,
    "expect": identity.signature of the model (checked after the build)}.
    """

    fingerprint: str
    weights: Callable[[], Mapping[str, torch.Tensor]]
    recipe: Callable[[WorkerSpec], dict]


@dataclass
class PoolStats:
    weights_bytes: int = 0  # bytes of weights copied into shared memory for workers
    loads: int = 0  # models built in workers
    restarts: int = 0
    requeued: int = 0
    held: int = 0  # result slots kept back from a worker running ahead (frame order)
    events: list = field(default_factory=list)  # (time, text) of faults, for tests and logs


class _Handle:
    """The parent's view of one worker process."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.proc: Optional[subprocess.Popen] = None
        self.conn: Optional[Connection] = None
        self.death_w: Optional[int] = None
        self.state = "new"  # new -> starting -> up -> dead
        self.started_at = 0.0
        self.pid = 0
        self.models: "collections.OrderedDict[str, None]" = collections.OrderedDict()
        self.loading: Optional[str] = None
        self.tasks: list[tuple[int, int]] = []  # (job id, group key) sent and not yet done/failed
        self.job_id: Optional[int] = None
        self.arena = None
        self.slot_bytes = 0
        self.stderr = collections.deque(maxlen=40)
        self.cause = ""

    @property
    def name(self) -> str:
        return self.spec.name

    def task_over(self, job_id: int, index: int) -> None:
        """The worker answered ("done" or "failed") for this task: it is no longer in flight."""
        self.tasks = [t for t in self.tasks if t != (job_id, index)]

    def send(self, *msg) -> bool:
        if self.conn is None:
            return False
        try:
            self.conn.send(msg)
            return True
        except (OSError, ValueError):  # it died; the wait loop will see the end of file
            return False


def _read_stderr(pipe, sink: collections.deque, name: str) -> None:
    for raw in iter(pipe.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip()
        sink.append(line)
        log.debug("parallel_vae worker %s: %s", name, line)
    pipe.close()


def _stop(handles: list, shared: dict) -> None:
    """Stop worker processes: quit message and death pipe closed, then SIGTERM, then SIGKILL."""
    weights = shared.pop("weights", None)
    if weights is not None:
        shm.release(weights[1])
    live = [h for h in handles if h.proc is not None and h.proc.poll() is None]
    for h in live:
        h.send("quit")
        if h.death_w is not None:
            try:
                os.close(h.death_w)
            except OSError:
                pass
            h.death_w = None
    for grace, sig in zip(STOP_GRACE_S, (signal.SIGTERM, signal.SIGKILL)):
        deadline = time.monotonic() + grace
        for h in live:
            try:
                h.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        live = [h for h in live if h.proc.poll() is None]
        for h in live:
            try:
                h.proc.send_signal(sig)
            except ProcessLookupError:
                pass
    for h in live:
        h.proc.wait(5)
    for h in handles:
        if h.conn is not None:
            h.conn.close()
            h.conn = None
        shm.release(h.arena)
        h.arena = None
        h.state = "dead"


class WorkerPool:
    """Workers for ``specs``, started on first use and kept until ``shutdown``."""

    _job_ids = itertools.count(1)

    def __init__(self, specs: Sequence[WorkerSpec], python_path: Sequence[str] = (), imports: Sequence[str] = (),
                 max_restarts: Optional[int] = None):
        if not specs:
            raise ValueError("a pool needs at least one worker")
        self.specs = list(specs)
        # The caller's paths first: the pack root also holds the ComfyUI glue package "nodes",
        # which must not shadow ComfyUI's own nodes module in a worker.
        self.python_path = [*python_path, PACKAGE_ROOT]
        self.imports = list(imports)
        self.max_restarts = max_restarts if max_restarts is not None else 2 * len(specs) + 2
        self.handles = [_Handle(s) for s in self.specs]
        self.stats = PoolStats()
        self._lock = threading.Lock()
        self._shared: dict = {}  # "weights": (fingerprint, block, manifest) while some worker still loads
        self._finalizer = weakref.finalize(self, _stop, self.handles, self._shared)

    # -- processes -----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def pids(self) -> dict[str, int]:
        return {h.name: h.pid for h in self.handles if h.state == "up"}

    def _env(self, spec: WorkerSpec) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(self.python_path + [p for p in [env.get("PYTHONPATH")] if p])
        env["PYTHONSAFEPATH"] = "1"  # no cwd on sys.path (Python 3.11+)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(spec.threads)
        env.update(dict(spec.env))
        return env

    def _spawn(self, h: _Handle) -> None:
        parent_sock, child_sock = socket.socketpair()
        death_r, death_w = os.pipe()
        cmd = [sys.executable, "-m", "parallel_vae.worker", "--conn", str(child_sock.fileno()),
               "--death", str(death_r), "--name", h.name]
        try:
            h.proc = subprocess.Popen(cmd, env=self._env(h.spec), pass_fds=(child_sock.fileno(), death_r),
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, cwd=PACKAGE_ROOT, close_fds=True)
        finally:
            child_sock.close()
            os.close(death_r)
        h.conn = Connection(parent_sock.detach())
        h.death_w = death_w
        h.state, h.started_at, h.pid, h.cause = "starting", time.monotonic(), h.proc.pid, ""
        h.models.clear()
        h.loading, h.tasks, h.job_id = None, [], None
        h.stderr.clear()
        threading.Thread(target=_read_stderr, args=(h.proc.stderr, h.stderr, h.name), daemon=True,
                         name=f"pvae-stderr-{h.name}").start()
        config = {"name": h.name, "device": h.spec.device, "threads": h.spec.threads,
                  "setup": list(h.spec.setup), "imports": self.imports}
        h.send("init", config)

    def _died(self, h: _Handle, cause: str = "") -> None:
        if h.state == "dead":
            h.cause = cause or h.cause
            return
        code = h.proc.poll() if h.proc is not None else None
        if code is None and h.proc is not None:
            try:
                code = h.proc.wait(1.0)
            except subprocess.TimeoutExpired:
                h.proc.kill()
                code = h.proc.wait(5)
        if not cause:
            cause = (f"killed by signal {-code}" if code is not None and code < 0
                     else f"exited with code {code}")
            tail = [line for line in h.stderr if line.strip()][-3:]
            if tail:
                cause += ": " + " | ".join(tail)
        h.cause = cause
        h.state = "dead"
        if h.conn is not None:
            h.conn.close()
            h.conn = None
        if h.death_w is not None:
            os.close(h.death_w)
            h.death_w = None
        shm.release(h.arena)
        h.arena = None
        self.stats.events.append((time.time(), f"{h.name} (pid {h.pid}) died: {cause}"))
        log.warning("parallel_vae: worker %s (pid %d) died: %s", h.name, h.pid, cause)

    def _receive(self, timeout: float) -> list[tuple[_Handle, Optional[tuple]]]:
        """Messages from workers, and (handle, None) once for each worker that died."""
        out = []
        for h in self.handles:
            if h.state == "starting" and time.monotonic() - h.started_at > START_TIMEOUT_S:
                h.proc.kill()
                self._died(h, f"did not start within {START_TIMEOUT_S:.0f} s")
                out.append((h, None))
        by_conn = {h.conn: h for h in self.handles if h.state in ("starting", "up")}
        if not by_conn:
            time.sleep(timeout)
            return out
        for conn in wait(list(by_conn), timeout):
            h = by_conn[conn]
            try:
                while h.state != "dead" and h.conn.poll(0):
                    msg = h.conn.recv()
                    if msg[0] == "init_failed":
                        self._died(h, f"could not start: {msg[1]}")
                        out.append((h, None))
                    else:
                        out.append((h, msg))
            except (EOFError, OSError):
                self._died(h)
                out.append((h, None))
        return out

    def _on_common(self, h: _Handle, msg: tuple) -> bool:
        """Messages that mean the same in every phase; True when handled."""
        kind = msg[0]
        if kind == "up":
            h.state = "up"
            log.info("parallel_vae: worker %s up (pid %d, %.1f s)", h.name, h.pid, time.monotonic() - h.started_at)
        elif kind == "loaded":
            h.loading = None
            h.models[msg[1]] = None
            h.models.move_to_end(msg[1])
            while len(h.models) > MAX_CACHED_VAES:  # mirrors the worker's own bound
                h.models.popitem(last=False)
            if msg[2] > 0:
                self.stats.loads += 1
        elif kind == "load_failed":
            h.loading = None
            if len(msg) > 3 and msg[3] == "mismatch":
                raise ModelMismatch(f"the worker {h.name} could not rebuild ComfyUI's model: {msg[2]}")
            raise DecodeError(f"{h.name} could not build the VAE: {msg[2]}")
        else:
            return False
        return True

    def _ensure_started(self) -> None:
        for h in self.handles:
            if h.state in ("new", "dead"):
                self._spawn(h)

    def _want_model(self, source: ModelSource) -> None:
        """Send the model to every worker that is up and lacks it (weights packed once)."""
        need = [h for h in self.handles if h.state == "up" and source.fingerprint not in h.models
                and h.loading is None]
        if not need:
            return
        weights = self._shared.get("weights")
        if weights is None or weights[0] != source.fingerprint:
            self._drop_weights()
            block, manifest = shm.pack(source.weights(), "w")
            weights = self._shared["weights"] = (source.fingerprint, block, manifest)
            self.stats.weights_bytes += block.size
        _, block, manifest = weights
        for h in need:
            h.loading = source.fingerprint
            h.send("load", source.fingerprint, source.recipe(h.spec), block.name, block.size, manifest)

    def _drop_weights(self) -> None:
        weights = self._shared.pop("weights", None)
        if weights is not None:
            shm.release(weights[1])

    def _weights_done(self, fingerprint: str) -> None:
        """Unlink the weights block once no live worker still needs it (mappings stay valid)."""
        if "weights" not in self._shared:
            return
        if all(h.state == "dead" or fingerprint in h.models for h in self.handles):
            self._drop_weights()

    def _raise_if_none_can_start(self) -> None:
        if all(h.state == "dead" for h in self.handles):
            causes = "; ".join(f"{h.name}: {h.cause}" for h in self.handles)
            raise DecodeError(f"no decode worker could run ({causes})")

    def warm(self, source: ModelSource, poll: Callable[[], None] = lambda: None) -> dict[str, int]:
        """Start every worker and load ``source`` in it; returns {name: pid} of ready workers."""
        with self._lock:
            self._ensure_started()
            try:
                while True:
                    poll()
                    self._want_model(source)
                    pending = [h for h in self.handles if h.state == "starting" or h.loading]
                    if not pending:
                        break
                    for h, msg in self._receive(WAIT_S):
                        if msg is not None and not self._on_common(h, msg):
                            self._on_stray(h, msg)
            finally:
                self._weights_done(source.fingerprint)
            self._raise_if_none_can_start()
            return {h.name: h.pid for h in self.handles if h.state == "up"}

    def _on_stray(self, h: _Handle, msg: tuple) -> None:
        """Late messages of a finished or cancelled job: free slots, mark the worker idle."""
        kind = msg[0]
        if kind == "result":
            h.send("free", msg[4])
        elif kind in ("done", "failed"):
            h.task_over(msg[1], msg[2])

    def wait_ready(self, source: ModelSource, timeout: float = START_TIMEOUT_S) -> dict[str, int]:
        """Restart any dead worker and wait until all hold ``source`` (tests: pool back to full size)."""
        deadline = time.monotonic() + timeout

        def poll():
            if time.monotonic() > deadline:
                raise DecodeError("workers did not become ready in time")
        return self.warm(source, poll)

    # -- jobs ----------------------------------------------------------------------------------
    def run(self, plan: Plan, latent: torch.Tensor, source: ModelSource,
            poll: Callable[[], None] = lambda: None, order: str = "tile") -> Iterator[Decoded]:
        """Decode every tile of ``plan`` on the workers; yields each (tile, step) once.

        The caller blends each result before advancing the iterator (the pixels are a view of a
        slot that is freed then). ``poll`` runs at least every WAIT_S seconds; an exception from
        it (ComfyUI's interrupt) cancels the job in the workers and propagates. ``order="frame"``
        decodes causal video frame by frame (schedule.lane_groups), for streams.
        """
        with self._lock:
            yield from _Job(self, plan, latent, source, poll, order).run()

    def shutdown(self) -> None:
        with self._lock:
            self._finalizer()


def wire_plan(plan: Plan) -> dict:
    """What a worker needs of a plan, as builtins: the pack's classes live under a path-shaped
    module name inside ComfyUI, which a worker cannot unpickle."""
    return {"causal": plan.kind == CAUSAL, "step_frames": tuple(plan.step_frames),
            "tiles": [(t.batch, tuple(t.lat_start), tuple(t.lat_size)) for t in plan.tiles]}


def _slot_bytes(plan: Plan) -> int:
    channels = plan.out_shape[1]
    if plan.kind == CAUSAL:
        frames = max(f1 - f0 for f0, f1 in plan.step_frames)
        per = max(_prod(t.out_size[1:]) for t in plan.tiles) * frames
    else:
        per = max(_prod(t.out_size) for t in plan.tiles)
    return 4 * channels * per


def _prod(xs) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


def _oom_error(group: Group, where: str) -> DecodeError:
    names = ", ".join(str(t.index) for t in group.tiles)
    return DecodeError(f"tile{'s' if len(group.tiles) > 1 else ''} {names} ran out of memory on every device "
                       f"that tried ({where}); use a smaller tile_size")


class _Job:
    """One decode on the pool: the pull loop, fault handling and cleanup."""

    def __init__(self, pool: WorkerPool, plan: Plan, latent: torch.Tensor, source: ModelSource, poll,
                 order: str = "tile"):
        self.pool, self.plan, self.source, self.poll = pool, plan, source, poll
        self.id = next(WorkerPool._job_ids)
        self.latent = latent.detach().to("cpu").contiguous()
        # Frame order for causal video: one group of tiles per worker, decoded frame by frame there;
        # a worker that runs ahead of the others is held back (its slots are freed later).
        self.throttle = order == "frame" and plan.kind == CAUSAL
        groups = (lane_groups(plan, len(pool.handles)) if self.throttle
                  else [Group((t,)) for t in largest_first(plan)])
        self.groups = {g.index: g for g in groups}
        self.queue = TileQueue(groups)
        self.steps_done: collections.Counter = collections.Counter()  # tile -> steps delivered
        self.held: list[tuple[_Handle, int]] = []  # (worker, slot) whose free waits for the others
        self.delivered: set[tuple[int, int]] = set()
        self.done_tiles: set[int] = set()
        self.oom: collections.Counter = collections.Counter()
        self.slot_bytes = _slot_bytes(plan)
        self.restarts = 0
        self.block = None
        self.wire = wire_plan(plan)

    def run(self) -> Iterator[Decoded]:
        pool = self.pool
        self.block, manifest = shm.pack({"z": self.latent}, "z")
        _, dtype, shape, _ = manifest[0]
        self.latent_msg = (self.block.name, self.block.size, dtype, shape)
        finished = False
        try:
            pool._ensure_started()
            while len(self.done_tiles) < len(self.plan.tiles):
                self.poll()
                pool._want_model(self.source)
                self._assign()
                for h, msg in pool._receive(WAIT_S):
                    if msg is None:
                        self._lost(h)
                        continue
                    if pool._on_common(h, msg):
                        if msg[0] == "loaded":
                            pool._weights_done(self.source.fingerprint)
                        continue
                    result = self._on_message(h, msg)
                    if result is not None:
                        try:
                            yield result
                        finally:  # also when the consumer stops (interrupt): the worker needs it back
                            self._free(h, msg[4])
                self._review_held()
                self._check_progress_possible()
            finished = True
        finally:
            for h, slot in self.held:
                h.send("free", slot)
            self.held = []
            if not finished:
                for h in pool.handles:
                    if any(j == self.id for j, _ in h.tasks):
                        h.send("cancel", self.id)
            shm.release(self.block)
            pool._weights_done(self.source.fingerprint)

    def _assign(self) -> None:
        for h in self.pool.handles:
            if h.state != "up" or self.source.fingerprint not in h.models or len(h.tasks) >= 2:
                continue
            if h.tasks and (h.tasks[0][0] != self.id or self.plan.kind == CAUSAL):
                continue  # prefetch only behind a tile of this job, never behind a causal lane
            if h.arena is None or h.slot_bytes < self.slot_bytes:
                if h.tasks:
                    continue  # resize only while it holds no slot
                shm.release(h.arena)
                h.arena = shm.create(self.slot_bytes * SLOTS, "slots")
                h.slot_bytes = self.slot_bytes
                h.send("arena", h.arena.name, h.arena.size, h.slot_bytes, SLOTS)
            group = self.queue.take(h.name)
            if group is None:
                continue
            if h.job_id != self.id:
                h.send("job", self.id, self.source.fingerprint, self.wire, self.latent_msg)
                h.job_id = self.id
            h.tasks.append((self.id, group.index))
            h.send("task", self.id, group.index, tuple(t.index for t in group.tiles))

    def _progress_of(self, h: _Handle) -> Optional[int]:
        """Frames delivered by the group a worker is decoding for this job (None: none)."""
        if not h.tasks or h.tasks[0][0] != self.id or h.state != "up":
            return None
        return min(self.steps_done[t.index] for t in self.groups[h.tasks[0][1]].tiles)

    def _ahead(self, h: _Handle) -> bool:
        """Frame order: is this worker more than LOOKAHEAD_STEPS frames ahead of a group that
        another live worker is decoding? (Groups nobody decodes yet cannot catch up by waiting.)"""
        if not self.throttle:
            return False
        mine = self._progress_of(h)
        others = [p for o in self.pool.handles if o is not h for p in [self._progress_of(o)] if p is not None]
        return mine is not None and bool(others) and mine - min(others) > LOOKAHEAD_STEPS

    def _free(self, h: _Handle, slot: int) -> None:
        if self._ahead(h):
            self.held.append((h, slot))  # the worker waits for this slot: back-pressure
            self.pool.stats.held += 1
        else:
            h.send("free", slot)

    def _review_held(self) -> None:
        keep = []
        for h, slot in self.held:
            if h.state == "dead":
                continue  # its slots died with it
            if self._ahead(h):
                keep.append((h, slot))
            else:
                h.send("free", slot)
        self.held = keep

    def _on_message(self, h: _Handle, msg: tuple) -> Optional[Decoded]:
        kind = msg[0]
        if kind == "result":
            _, job_id, index, step, slot, shape = msg
            if job_id != self.id or (index, step) in self.delivered:
                h.send("free", slot)  # late, or a step re-decoded after a requeue
                return None
            self.delivered.add((index, step))
            self.steps_done[index] = max(self.steps_done[index], step + 1)
            pixels = shm.view(h.arena.buf, torch.float32, shape, slot * h.slot_bytes)
            return Decoded(h.name, self.plan.tiles[index], step, pixels, h.pid, borrowed=True)
        if kind == "done":
            _, job_id, key = msg
            h.task_over(job_id, key)
            if job_id == self.id:
                for t in self.groups[key].tiles:
                    if not all((t.index, s) in self.delivered for s in range(self.plan.steps)):
                        raise DecodeError(f"{h.name} finished tile {t.index} without every step")
                    self.done_tiles.add(t.index)
            return None
        if kind == "failed":
            _, job_id, key, why, text = msg
            h.task_over(job_id, key)
            if job_id != self.id or why == "cancelled":
                return None
            group = self.groups[key]
            if why == "oom":
                self._out_of_memory(h, group, text)
                return None
            names = ", ".join(str(t.index) for t in group.tiles)
            raise DecodeError(f"{h.name} failed on tile{'s' if len(group.tiles) > 1 else ''} {names}: {text}")
        self.pool._on_stray(h, msg)
        return None

    def _out_of_memory(self, h: _Handle, group: Group, text: str) -> None:
        """Retry the tiles on another device; with none left, once more where it failed."""
        self.oom[(group.index, h.name)] += 1
        others = [o for o in self.pool.handles if o is not h and o.state != "dead"
                  and o.name not in self.queue.excluded[group.index]]
        if not others and self.oom[(group.index, h.name)] >= 2:
            raise _oom_error(group, f"{h.name}: {text}")
        where = "on another device" if others else "once more after freeing the cache"
        log.warning("parallel_vae: %s ran out of memory on tile %d; retrying %s", h.name, group.index, where)
        self.pool.stats.events.append((time.time(), f"{h.name} out of memory on tile {group.index}"))
        self.pool.stats.requeued += 1
        if not self.queue.requeue(group, h.name, exclude=bool(others)):
            raise _oom_error(group, f"{h.name}: {text}")

    def _lost(self, h: _Handle) -> None:
        """A worker died: requeue its tiles of this job (a causal lane restarts from its first frame)."""
        mine = [key for job_id, key in h.tasks if job_id == self.id]
        h.tasks = []
        self.held = [(o, slot) for o, slot in self.held if o is not h]
        for key in mine:
            self.pool.stats.requeued += 1
            if not self.queue.requeue(self.groups[key]):
                raise DecodeError(f"tile {key} was lost {self.queue.max_attempts} times; the last "
                                  f"worker, {h.name}, {h.cause}")
        if "could not start" in h.cause or "did not start" in h.cause:
            return  # restarting would fail the same way
        if self.restarts < self.pool.max_restarts:
            self.restarts += 1
            self.pool.stats.restarts += 1
            log.warning("parallel_vae: restarting the worker for %s", h.name)
            self.pool._spawn(h)

    def _check_progress_possible(self) -> None:
        pool = self.pool
        pool._raise_if_none_can_start()
        live = [h.name for h in pool.handles if h.state != "dead"]
        stuck = self.queue.unrunnable(live)
        if stuck and not any(h.tasks for h in pool.handles if h.state == "up"):
            raise _oom_error(stuck[0], ", ".join(live))
