"""The worker processes and what each holds: start, health, models, result slots, shutdown.

``Workers`` is the parent's view of one process per ``WorkerSpec``. It starts them as
``python -m parallel_vae.worker`` (never by re-running ComfyUI), ships models to them through one
shared-memory block, reads their messages and answers those that mean the same whatever job runs
(up, loaded, load failed), and stops them. Which work goes where is jobs.py's business. Every
wait is a short ``multiprocessing.connection.wait`` on the workers' sockets, so a dead worker is
seen at once (its socket reaches end of file); no signal handlers are installed anywhere.
"""
from __future__ import annotations

import collections
import enum
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
from typing import Callable, Mapping, Optional, Sequence

import torch

from . import protocol as msgs
from . import shm
from .errors import DecodeError, ModelMismatch
from .watchdog import Watchdog

log = logging.getLogger("parallel_vae")

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = float(os.environ.get("PARALLEL_VAE_START_TIMEOUT", "180"))
STOP_GRACE_S = (2.0, 3.0)  # quit -> SIGTERM -> SIGKILL


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


class WorkerState(enum.Enum):
    NEW = "new"
    STARTING = "starting"  # spawned, no Up yet
    UP = "up"
    DEAD = "dead"


class Death(enum.Enum):
    """Why a worker is dead: whether starting it again can help."""

    CRASHED = "crashed"  # exited or was killed while up, or sent nonsense
    START_FAILED = "could not start"  # its Init failed (bad device, broken setup)
    START_TIMEOUT = "did not start"
    STOPPED = "stopped"  # shut down

    @property
    def restartable(self) -> bool:
        return self is Death.CRASHED  # a start that failed would fail the same way again


class Handle:
    """The parent's view of one worker process."""

    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.proc: Optional[subprocess.Popen] = None
        self.conn: Optional[Connection] = None
        self.death_w: Optional[int] = None
        self.state = WorkerState.NEW
        self.death: Optional[Death] = None
        self.cause = ""  # for messages: "could not start: ...", "killed by signal 9"
        self.started_at = 0.0
        self.pid = 0
        self.models: "collections.OrderedDict[str, None]" = collections.OrderedDict()
        self.loading: Optional[str] = None
        self.tasks: list[tuple[int, int]] = []  # (job id, group key) sent and not yet done/failed
        self.job_id: Optional[int] = None  # the job whose JobData it holds
        self.arena = None
        self.slot_bytes = 0
        self.stderr = collections.deque(maxlen=40)
        self.held = 0  # bytes it holds on its device when idle (its last Idle record)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def live(self) -> bool:
        return self.state in (WorkerState.STARTING, WorkerState.UP)

    def kill(self) -> None:
        """End the worker at once (it hangs, or sends nonsense); ``Workers.died`` follows."""
        if self.proc is not None:
            self.proc.kill()

    def task_over(self, job_id: int, key: int) -> None:
        """The worker answered (Done or Failed) for this task: it is no longer in flight."""
        self.tasks = [t for t in self.tasks if t != (job_id, key)]

    def send(self, record: msgs.Record) -> bool:
        if self.conn is None:
            return False
        try:
            msgs.send(self.conn, record)
            return True
        except (OSError, ValueError):  # it died; the wait loop will see the end of file
            return False


def _read_stderr(pipe, sink: collections.deque, name: str) -> None:
    for raw in iter(pipe.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip()
        sink.append(line)
        log.debug("parallel_vae worker %s: %s", name, line)
    pipe.close()


def _rss_mib(pid: int) -> Optional[float]:
    try:
        with open(f"/proc/{pid}/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return round(kib / 1024, 1)
    except (OSError, StopIteration, ValueError):
        return None


def release_weights(shared: dict) -> None:
    """Unlink every weights block the pool still keeps (it stops its workers)."""
    for block, _ in shared.pop("weights", {}).values():
        shm.release(block)


def _stop(handles: list, shared: dict) -> None:
    """Stop worker processes: quit message and death pipe closed, then SIGTERM, then SIGKILL.
    A module function: the finalizer must not keep the pool alive."""
    release_weights(shared)
    live = [h for h in handles if h.proc is not None and h.proc.poll() is None]
    for h in live:
        h.send(msgs.Quit())
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
        stopped(h)


def stopped(h: "Handle") -> None:
    """What a stopped worker leaves: no connection, no result slots, state DEAD (STOPPED unless it
    had died before)."""
    if h.conn is not None:
        h.conn.close()
        h.conn = None
    shm.release(h.arena)
    h.arena = None
    if h.state is not WorkerState.DEAD:
        h.death = Death.STOPPED
    h.state = WorkerState.DEAD


class Workers:
    """One process per spec, started on demand; ``stop`` (or garbage collection) ends them."""

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
        self.handles = [Handle(s) for s in self.specs]
        self.stats = PoolStats()
        self.watchdog = Watchdog()  # per device: unit times and silence, across jobs
        self.rates: dict[str, float] = {}  # per device: latent positions per busy second in exact bands
        self._shared: dict = {}  # "weights": {fingerprint: (block, manifest)} while some worker still needs it
        self._unread: list = []  # records a job received and ended before handling (see unread)
        self.stop = weakref.finalize(self, _stop, self.handles, self._shared)

    def pids(self) -> dict[str, int]:
        return {h.name: h.pid for h in self.handles if h.state is WorkerState.UP}

    def stop_all(self) -> None:
        """Stop every worker now; they start again on the next job (``stop`` is the last call)."""
        _stop(self.handles, self._shared)

    def rated(self, name: str, positions: int, busy_s: float) -> None:
        """A device decoded ``positions`` latent positions of exact bands in ``busy_s`` of work."""
        if busy_s > 0 and positions > 0:
            rate = positions / busy_s
            old = self.rates.get(name)
            self.rates[name] = rate if old is None else 0.5 * (old + rate)

    def speeds(self, names: Sequence[str]) -> list[float]:
        """Relative speeds of ``names`` (1.0 each until measured; an unmeasured one counts as the
        mean of the measured ones)."""
        known = [self.rates[n] for n in names if n in self.rates]
        if not known:
            return [1.0] * len(names)
        mean = sum(known) / len(known)
        return [self.rates.get(n, mean) / mean for n in names]

    def drop_models(self) -> None:
        """Have every idle worker forget its VAEs and give memory back (it stays up)."""
        for h in self.handles:
            if h.state is WorkerState.UP and not h.tasks and h.models and h.loading is None:
                h.send(msgs.Drop())
                h.models.clear()

    def drain(self) -> None:
        """Read what idle workers sent since the last job (Idle records, deaths)."""
        for h, record in self.receive(0):
            if record is not None and not self.on_common(h, record):
                self.on_stray(h, record)

    def report(self) -> list[dict]:
        """One row per worker, for the /parallel_vae/workers route."""
        rows = []
        for h in self.handles:
            rows.append({"device": h.name, "sees": h.spec.device, "pid": h.pid if h.live else None,
                         "state": h.state.value, "cause": h.cause or None, "models": len(h.models),
                         "loading": h.loading is not None,
                         "held_mib": round(h.held / 2**20, 1), "rss_mib": self.rss_mib(h)})
        return rows

    def rss_mib(self, h: Handle) -> Optional[float]:
        """A live worker's resident memory, read from /proc on this machine."""
        return _rss_mib(h.pid) if h.live else None

    # -- starting and losing processes -----------------------------------------------------------
    def _env(self, spec: WorkerSpec) -> dict:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(self.python_path + [p for p in [env.get("PYTHONPATH")] if p])
        env["PYTHONSAFEPATH"] = "1"  # no cwd on sys.path (Python 3.11+)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(spec.threads)
        env.update(dict(spec.env))
        return env

    def spawn(self, h: Handle) -> None:
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
        h.stderr.clear()
        threading.Thread(target=_read_stderr, args=(h.proc.stderr, h.stderr, h.name), daemon=True,
                         name=f"pvae-stderr-{h.name}").start()
        self.starting(h, h.proc.pid)

    def starting(self, h: Handle, pid: int) -> None:
        """A just-started worker (its connection made): fresh bookkeeping, then its Init."""
        h.state, h.started_at, h.pid, h.cause, h.death = WorkerState.STARTING, time.monotonic(), pid, "", None
        h.models.clear()
        h.loading, h.tasks, h.job_id, h.held = None, [], None, 0
        h.send(msgs.Init({"name": h.name, "device": h.spec.device, "threads": h.spec.threads,
                          "setup": list(h.spec.setup), "imports": self.imports}))

    def ensure_started(self) -> None:
        for h in self.handles:
            if h.state in (WorkerState.NEW, WorkerState.DEAD):
                self.spawn(h)

    def died(self, h: Handle, death: Death = Death.CRASHED, cause: str = "") -> None:
        """Mark ``h`` dead (reaping the process) and record why; without a ``cause``, its exit
        status and last lines of stderr make one."""
        if h.state is WorkerState.DEAD:
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
        h.cause, h.death, h.state = cause, death, WorkerState.DEAD
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

    def raise_if_none_can_start(self) -> None:
        if all(h.state is WorkerState.DEAD for h in self.handles):
            causes = "; ".join(f"{h.name}: {h.cause}" for h in self.handles)
            raise DecodeError(f"no decode worker could run ({causes})")

    # -- messages --------------------------------------------------------------------------------
    def receive(self, timeout: float) -> list[tuple[Handle, Optional[msgs.Record]]]:
        """Records from workers, and (handle, None) once for each worker that died; first those a
        job received and did not get to."""
        if self._unread:
            # what a worker sent in an earlier life (it stopped or started again since) means nothing now
            out = [(h, record) for h, record, life in self._unread
                   if h.started_at == life and (h.live or record is None)]
            self._unread = []
            return out + self._receive(0)
        return self._receive(timeout)

    def unread(self, records) -> None:
        """Records a job received and did not handle (it ended on an interrupt or an error): the
        next reader gets them first. Dropped, a Done would leave its task on the worker for good,
        a Loaded its load, and an exact decode would wait on that worker forever."""
        self._unread.extend((h, record, h.started_at) for h, record in records)

    def _receive(self, timeout: float) -> list[tuple[Handle, Optional[msgs.Record]]]:
        """What the workers' pipes hold (within ``timeout``), and deaths."""
        out = []
        for h in self.handles:
            if h.state is WorkerState.STARTING and time.monotonic() - h.started_at > START_TIMEOUT_S:
                h.kill()
                self.died(h, Death.START_TIMEOUT, f"did not start within {START_TIMEOUT_S:.0f} s")
                out.append((h, None))
        by_conn = {h.conn: h for h in self.handles if h.live}
        if not by_conn:
            time.sleep(timeout)
            return out
        for conn in wait(list(by_conn), timeout):
            h = by_conn[conn]
            try:
                while h.state is not WorkerState.DEAD and h.conn.poll(0):
                    record = msgs.recv(h.conn)
                    if isinstance(record, msgs.InitFailed):
                        self.died(h, Death.START_FAILED, f"could not start: {record.message}")
                        out.append((h, None))
                    else:
                        out.append((h, record))
            except msgs.ProtocolError as e:  # a lost record would leave its tile waiting forever
                h.kill()
                self.died(h, Death.CRASHED, f"sent a message the pool cannot read: {e}")
                out.append((h, None))
            except (EOFError, OSError):
                self.died(h)
                out.append((h, None))
        return out

    def on_common(self, h: Handle, record: msgs.Record) -> bool:
        """Records that mean the same whatever job runs; True when handled."""
        if isinstance(record, msgs.Up):
            h.state = WorkerState.UP
            log.info("parallel_vae: worker %s up (pid %d, %.1f s)", h.name, h.pid, time.monotonic() - h.started_at)
        elif isinstance(record, msgs.Loaded):
            h.loading = None
            h.models[record.fingerprint] = None
            h.models.move_to_end(record.fingerprint)
            while len(h.models) > msgs.MAX_CACHED_VAES:  # mirrors the worker's own bound
                h.models.popitem(last=False)
            if record.seconds > 0:
                self.stats.loads += 1
            self.weights_done(record.fingerprint)
        elif isinstance(record, msgs.Idle):
            h.held = record.held
            if record.models == 0:
                h.models.clear()
            log.info("parallel_vae: worker %s idle, holding %.0f MiB on %s with %d VAE(s)", h.name,
                     record.held / 2**20, h.spec.device, record.models)
        elif isinstance(record, msgs.LoadFailed):
            h.loading = None
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
        """Send the model to every worker that is up and lacks it (weights packed once)."""
        need = [h for h in self.handles if h.state is WorkerState.UP and source.fingerprint not in h.models
                and h.loading is None]
        if not need:
            return
        blocks = self._shared.setdefault("weights", {})
        if source.fingerprint not in blocks:
            self._drop_weights(but=source.fingerprint)
            blocks[source.fingerprint] = shm.pack(source.weights(), "w")
            self.stats.weights_bytes += blocks[source.fingerprint][0].size
        block, manifest = blocks[source.fingerprint]
        for h in need:
            # sent first: a send that raises (a Ray put refused) reached no worker, so nothing is marked
            h.send(msgs.Load(source.fingerprint, source.recipe(h.spec), block.name, block.size, manifest))
            # the worker makes room before it builds (Worker.load): forget now what it will drop, or
            # a task for that VAE sent before its Loaded comes back would find it gone
            while len(h.models) >= msgs.MAX_CACHED_VAES:
                h.models.popitem(last=False)
            h.loading = source.fingerprint

    def _drop_weights(self, but: Optional[str] = None) -> None:
        """Unlink the weights blocks of every VAE but ``but`` that no live worker is loading from
        (a Load a small job left running still opens its block by name; mappings stay valid)."""
        blocks = self._shared.get("weights", {})
        loading = {h.loading for h in self.handles if h.live}
        for fingerprint in [f for f in blocks if f != but and f not in loading]:
            shm.release(blocks.pop(fingerprint)[0])

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
