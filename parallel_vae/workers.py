"""The parent's view of its workers, whatever carries their records: what each one is doing, what
it says it holds, and what must happen when one dies.

``Workers`` keeps one ``Handle`` per ``WorkerSpec``. A handle is one life of a worker: starting a
worker again makes a new handle, so nothing of an earlier life (records a job read and did not
handle, tasks it held) can reach the next. The life itself runs behind a ``Channel`` made by a
``Transport``: local processes (processes.py) or Ray actors (ray_workers.py), which differ only in
how they start, stop, carry records and carry the blocks records name.

The worker owns its state: the VAEs it holds are what its last Loaded, LoadFailed or Idle said;
the parent only remembers what it sent and has not heard back about (a Load in flight, tasks).
Which work goes where is jobs.py's business.
"""
from __future__ import annotations

import enum
import logging
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch

from . import protocol as msgs
from . import shm
from .errors import DecodeError, ModelMismatch
from .watchdog import Watchdog

log = logging.getLogger("parallel_vae")

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds the package parallel_vae
START_TIMEOUT_S = float(os.environ.get("PARALLEL_VAE_START_TIMEOUT", "180"))


@dataclass(frozen=True)
class WorkerSpec:
    """One worker: its lane's name (cuda:1, cpu[0]), the torch device it sees, its environment."""

    name: str
    device: str  # as the worker sees it: "cpu" or "cuda:0" (CUDA_VISIBLE_DEVICES pins the GPU)
    threads: int = 1
    env: tuple[tuple[str, str], ...] = ()
    setup: tuple = ()  # (module, "attr.path", value) set in the worker before anything else


@dataclass
class ModelSource:
    """How to give workers a model: ``weights()`` is called only when some worker lacks it.

    ``recipe(spec)`` returns {"factory": "module:callable", "weights_arg": name, "kwargs": {...},
    "module_attr": attr or None, "dtype_attr": attr or None, "family": families key,
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
    gated: int = 0  # times an idle worker got no tile: the next is too far ahead in time (frame order)
    events: list = field(default_factory=list)  # (time, text) of faults, for logs and the route


class WorkerState(enum.Enum):
    NEW = "new"  # never started
    STARTING = "starting"  # started, no Up yet
    UP = "up"
    DEAD = "dead"


class Death(enum.Enum):
    """Why a worker is dead: whether starting it again can help."""

    CRASHED = "crashed"  # exited or was killed while up, or sent nonsense
    START_FAILED = "could not start"  # its Init failed (bad device, broken setup), or its machine is gone
    START_TIMEOUT = "did not start"
    STOPPED = "stopped"  # shut down

    @property
    def restartable(self) -> bool:
        return self is Death.CRASHED  # a start that failed would fail the same way again


@dataclass
class Lost:
    """A channel's worker is gone: how, and why in words."""

    death: Death
    cause: str


class Channel:
    """One worker life's transport (a process, an actor): made by ``Transport.spawn``."""

    pid: int = 0

    def send(self, record: msgs.Record) -> None:
        """Send ``record`` (and the blocks it names); silently nothing when the worker is gone
        (the transport reports the loss); an error when the blocks cannot be carried."""
        raise NotImplementedError

    def kill(self) -> None:
        """End the worker at once (it hangs, or sends nonsense)."""
        raise NotImplementedError

    def end(self) -> str:
        """Make sure the worker is gone and let go of it; how it ended, in words."""
        raise NotImplementedError

    def row(self) -> dict:
        """What the route shows of it beyond the handle (its memory, its machine)."""
        return {}


class Transport:
    """How workers of one pool live: start, carry records, stop."""

    def spawn(self, spec: WorkerSpec) -> Channel:
        raise NotImplementedError

    def receive(self, channels: Sequence[Channel], timeout: float
                ) -> list[tuple[Channel, list[msgs.Record], Optional[Lost]]]:
        """Records from ``channels`` within ``timeout`` (in order per channel), and a Lost where
        one's worker is gone (after its last records)."""
        raise NotImplementedError

    def stop(self, channels: Sequence[Channel]) -> None:
        """End these workers: politely first where the transport can."""
        raise NotImplementedError


class Handle:
    """One life of one worker, as the parent sees it."""

    def __init__(self, spec: WorkerSpec, index: int):
        self.spec = spec
        self.index = index  # its place among the pool's workers
        self.channel: Optional[Channel] = None
        self.state = WorkerState.NEW
        self.death: Optional[Death] = None
        self.cause = ""  # for messages: "could not start: ...", "killed by signal 9"
        self.started_at = 0.0
        self.pid = 0
        self.models: tuple = ()  # the VAEs it said it holds (its last Loaded, LoadFailed or Idle)
        self.loading: Optional[str] = None  # a Load sent and not answered
        self.dropping = False  # a Drop sent and not answered
        self.tasks: list[tuple[int, int]] = []  # (job id, group key) sent and not yet done/failed
        self.arena = None  # its result slots (a block the parent owns)
        self.slot_bytes = 0
        self.held = 0  # bytes it holds on its device when idle (its last Idle record)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def live(self) -> bool:
        return self.state in (WorkerState.STARTING, WorkerState.UP)

    @property
    def asked(self) -> bool:
        """A Load or a Drop is in flight: what it holds is known again once it answers."""
        return self.loading is not None or self.dropping

    def holds(self, fingerprint: str) -> bool:
        """Up, holding that model, and nothing in flight that could change what it holds."""
        return self.state is WorkerState.UP and not self.asked and fingerprint in self.models

    def kill(self) -> None:
        if self.channel is not None:
            self.channel.kill()

    def task_over(self, job_id: int, key: int) -> None:
        """The worker answered (Done or Failed) for this task: it is no longer in flight."""
        self.tasks = [t for t in self.tasks if t != (job_id, key)]

    def send(self, record: msgs.Record) -> None:
        if self.channel is not None and self.live:
            self.channel.send(record)


def _release(h: Handle) -> None:
    """What a dead or stopped life leaves: its connection and its result slots."""
    shm.release(h.arena)
    h.arena = None


def _stop(transport: Transport, handles: list, weights: dict) -> None:
    """Stop every live worker and unlink the weights blocks (a module function: the finalizer
    must not keep the pool alive)."""
    for block, _ in weights.values():
        shm.release(block)
    weights.clear()
    live = [h for h in handles if h.live and h.channel is not None]
    transport.stop([h.channel for h in live])
    for h in handles:
        if h.channel is not None:
            h.channel.end()
        _release(h)
        if h.state is not WorkerState.DEAD and h.state is not WorkerState.NEW:
            h.death = Death.STOPPED
            h.state = WorkerState.DEAD


class Workers:
    """One worker per spec over ``transport``, started on demand; ``stop`` (or garbage collection)
    ends them."""

    def __init__(self, specs: Sequence[WorkerSpec], transport: Transport, imports: Sequence[str] = (),
                 max_restarts: Optional[int] = None):
        if not specs:
            raise ValueError("a pool needs at least one worker")
        self.specs = list(specs)
        self.transport = transport
        self.imports = list(imports)
        self.max_restarts = max_restarts if max_restarts is not None else 2 * len(specs) + 2
        self.handles = [Handle(s, i) for i, s in enumerate(self.specs)]  # the current life of each
        self.stats = PoolStats()
        self.watchdog = Watchdog()  # per lane: unit times and silence, across jobs
        self._weights: dict = {}  # fingerprint -> (block, manifest) while some worker still needs it
        self._unread: list = []  # (handle, record) a job received and ended before handling
        self.stop = weakref.finalize(self, _stop, transport, self.handles, self._weights)

    def pids(self) -> dict[str, int]:
        return {h.name: h.pid for h in self.handles if h.state is WorkerState.UP}

    def stop_all(self) -> None:
        """Stop every worker now; they start again on the next job (``stop`` is the last call)."""
        _stop(self.transport, self.handles, self._weights)

    def drop_models(self) -> None:
        """Have every idle worker forget its VAEs and give memory back (it stays up, and says
        so with an Idle)."""
        for h in self.handles:
            if h.state is WorkerState.UP and not h.tasks and h.models and not h.asked:
                h.send(msgs.Drop())
                h.dropping = True

    def drain(self) -> None:
        """Read what idle workers sent since the last job (Idle records, deaths)."""
        for h, record in self.receive(0):
            if record is not None and not self.on_common(h, record):
                self.on_stray(h, record)

    def report(self) -> list[dict]:
        """One row per worker, for the /parallel_vae/workers route."""
        return [{"device": h.name, "sees": h.spec.device, "pid": h.pid if h.live else None, "state": h.state.value,
                 "cause": h.cause or None, "models": len(h.models), "loading": h.loading is not None,
                 "held_mib": round(h.held / 2**20, 1),
                 **(h.channel.row() if h.live and h.channel is not None else {"rss_mib": None})}
                for h in self.handles]

    # -- starting and losing workers ---------------------------------------------------------------
    def spawn(self, index: int) -> Handle:
        """A new life for worker ``index`` (its Init sent); the handle it replaces is over."""
        spec = self.specs[index]
        h = Handle(spec, index)
        h.channel = self.transport.spawn(spec)
        h.state, h.started_at, h.pid = WorkerState.STARTING, time.monotonic(), h.channel.pid
        self.handles[index] = h
        h.send(msgs.Init({"name": h.name, "device": spec.device, "threads": spec.threads,
                          "setup": list(spec.setup), "imports": self.imports}))
        return h

    def ensure_started(self) -> None:
        for h in list(self.handles):
            if h.state in (WorkerState.NEW, WorkerState.DEAD):
                self.spawn(h.index)

    def died(self, h: Handle, death: Death = Death.CRASHED, cause: str = "") -> None:
        """Mark ``h`` dead (its worker ended and let go of) and record why; without a ``cause``,
        how it ended makes one."""
        if h.state is WorkerState.DEAD:
            h.cause = cause or h.cause
            return
        ended = h.channel.end() if h.channel is not None else ""
        h.cause, h.death, h.state = cause or ended, death, WorkerState.DEAD
        _release(h)
        self.stats.events.append((time.time(), f"{h.name} (pid {h.pid}) died: {h.cause}"))
        log.warning("parallel_vae: worker %s (pid %d) died: %s", h.name, h.pid, h.cause)

    def raise_if_none_can_start(self) -> None:
        if all(h.state is WorkerState.DEAD for h in self.handles):
            causes = "; ".join(f"{h.name}: {h.cause}" for h in self.handles)
            raise DecodeError(f"no decode worker could run ({causes})")

    # -- messages --------------------------------------------------------------------------------
    def receive(self, timeout: float) -> list[tuple[Handle, Optional[msgs.Record]]]:
        """Records from workers, and (handle, None) once for each worker that died; first those a
        job received and did not get to (less those of a life that is over)."""
        if self._unread:
            out = [(h, record) for h, record in self._unread
                   if self.handles[h.index] is h and (h.live or record is None)]
            self._unread = []
            return out + self._receive(0)
        return self._receive(timeout)

    def unread(self, records) -> None:
        """Records a job received and did not handle (it ended on an interrupt or an error): the
        next reader gets them first. Dropped, a Done would leave its task on the worker for good,
        a Loaded its load, and an exact decode would wait on that worker forever."""
        self._unread.extend(records)

    def _receive(self, timeout: float) -> list[tuple[Handle, Optional[msgs.Record]]]:
        out = []
        for h in self.handles:
            if h.state is WorkerState.STARTING and time.monotonic() - h.started_at > START_TIMEOUT_S:
                h.kill()
                self.died(h, Death.START_TIMEOUT, f"did not start within {START_TIMEOUT_S:.0f} s")
                out.append((h, None))
        by_channel = {id(h.channel): h for h in self.handles if h.live}
        if not by_channel:
            time.sleep(timeout)
            return out
        channels = [h.channel for h in by_channel.values()]
        for channel, records, lost in self.transport.receive(channels, timeout):
            h = by_channel[id(channel)]
            for record in records:
                if h.state is WorkerState.DEAD:
                    break
                if isinstance(record, msgs.InitFailed):
                    self.died(h, Death.START_FAILED, f"could not start: {record.message}")
                    out.append((h, None))
                else:
                    out.append((h, record))
            if lost is not None and h.state is not WorkerState.DEAD:
                self.died(h, lost.death, lost.cause)
                out.append((h, None))
        return out

    def on_common(self, h: Handle, record: msgs.Record) -> bool:
        """Records that mean the same whatever job runs; True when handled."""
        if isinstance(record, msgs.Up):
            h.state, h.pid = WorkerState.UP, record.pid
            log.info("parallel_vae: worker %s up (pid %d, %.1f s)", h.name, h.pid, time.monotonic() - h.started_at)
        elif isinstance(record, msgs.Loaded):
            h.loading, h.models = None, tuple(record.models)
            if record.seconds > 0:
                self.stats.loads += 1
            self.weights_done(record.fingerprint)
        elif isinstance(record, msgs.Idle):
            h.held, h.models = record.held, tuple(record.models)
            h.dropping = h.dropping and not record.dropped
            log.info("parallel_vae: worker %s idle, holding %.0f MiB on %s with %d VAE(s)", h.name,
                     record.held / 2**20, h.spec.device, len(record.models))
        elif isinstance(record, msgs.LoadFailed):
            h.loading, h.models = None, tuple(record.models)
            if record.why is msgs.LoadFailure.MISMATCH:
                raise ModelMismatch(f"the worker {h.name} could not rebuild ComfyUI's model: {record.message}")
            raise DecodeError(f"{h.name} could not build the VAE: {record.message}")
        else:
            return False
        return True

    def on_stray(self, h: Handle, record: msgs.Record) -> None:
        """Late records of a finished or cancelled job: free slots, mark the worker idle."""
        if isinstance(record, msgs.Result):
            h.send(msgs.Free(record.slot))
        elif isinstance(record, (msgs.Done, msgs.Failed)):
            h.task_over(record.job_id, record.key)

    # -- models and result slots ------------------------------------------------------------------
    def want_model(self, source: ModelSource) -> None:
        """Send the model to every worker that is up, says it lacks it, and has no Load or Drop in
        flight (weights packed once)."""
        need = [h for h in self.handles if h.state is WorkerState.UP and not h.asked
                and source.fingerprint not in h.models]
        if not need:
            return
        if source.fingerprint not in self._weights:
            self._drop_weights(but=source.fingerprint)
            self._weights[source.fingerprint] = shm.pack(source.weights(), "w")
            self.stats.weights_bytes += self._weights[source.fingerprint][0].size
        block, manifest = self._weights[source.fingerprint]
        for h in need:
            # sent first: a send that raises (a Ray put refused) reached no worker, so nothing is marked
            h.send(msgs.Load(source.fingerprint, source.recipe(h.spec), block.name, block.size, manifest))
            h.loading = source.fingerprint

    def _drop_weights(self, but: Optional[str] = None) -> None:
        """Unlink the weights blocks of every VAE but ``but`` that no live worker is loading from
        (a Load a small job left running still opens its block by name; mappings stay valid)."""
        loading = {h.loading for h in self.handles if h.live}
        for fingerprint in [f for f in self._weights if f != but and f not in loading]:
            shm.release(self._weights.pop(fingerprint)[0])

    def weights_done(self, fingerprint: str) -> None:
        """A job or a load of ``fingerprint`` ended: keep its block only while a live worker still
        lacks it (one still starting loads it next), and no other VAE's that no worker loads."""
        held = all(h.state is WorkerState.DEAD or fingerprint in h.models for h in self.handles)
        self._drop_weights(but=None if held else fingerprint)

    def ensure_arena(self, h: Handle, slot_bytes: int, slots: int) -> bool:
        """Give ``h`` result slots of at least ``slot_bytes``; False while it still holds a task
        (its slots may be in use, so they are resized later)."""
        if h.arena is not None and h.slot_bytes >= slot_bytes:
            return True
        if h.tasks:
            return False
        shm.release(h.arena)
        h.arena = shm.create(slot_bytes * slots, "slots")
        h.slot_bytes = slot_bytes
        h.send(msgs.Arena(h.arena.name, h.arena.size, h.slot_bytes, slots))
        return True


__all__ = ["Channel", "Death", "Handle", "Lost", "ModelSource", "PACKAGE_ROOT", "PoolStats", "START_TIMEOUT_S",
           "Transport", "WorkerSpec", "WorkerState", "Workers"]
