"""One decode worker process: ``python -m parallel_vae.worker --conn FD --death FD``.

The pool (workers.py) starts one per device. Everything it needs comes over the connection as
the records of protocol.py, which lists them in order; this module imports nothing of the pool.
It owns its state and says what it holds: the VAEs it keeps built come back with every Loaded,
LoadFailed and Idle.

Weights, latents and results never travel through the connection: they sit in shared memory
blocks the parent owns (shm.py). A recipe names a factory (``"module:callable"``) the worker
imports and calls with the weights; the pool never knows what the factory belongs to (the ComfyUI
nodes pass ComfyUI's own VAE loader, so the worker builds exactly what ComfyUI would).

The worker exits when asked, when the connection closes, and within moments when its parent dies
even mid-decode: a thread blocks on the read end of a "death pipe" whose only write end the
parent holds, and the kernel closes it when the parent dies however it died.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import os
import sys
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Optional

from . import protocol as msgs
from .errors import ModelMismatch
from .heap import HEAP

MAX_CACHED_VAES = 2  # VAEs a worker keeps built (the least recently used goes first)
# A Python file whose functions the worker calls at set points: ``on_init(worker)`` after its Init,
# ``before_task(worker, work, tiles)`` before each task. The test suite's faults (a worker that
# fails to start, runs out of memory or hangs) live in such a file; nothing the pack ships uses it.
HOOKS_ENV = "PARALLEL_VAE_WORKER_HOOKS"


def _watch_parent(death_fd: int) -> None:
    try:
        while os.read(death_fd, 1):
            pass
    except OSError:
        pass
    os._exit(0)


def _resolve(ref: str):
    module, _, attr = ref.partition(":")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _apply_setup(setup) -> None:
    """Attribute assignments made before anything else imports a module: [(module, "a.b", value)]."""
    for module, path, value in setup:
        obj = importlib.import_module(module)
        *parents, last = path.split(".")
        for part in parents:
            obj = getattr(obj, part)
        setattr(obj, last, value)


def _load_hooks():
    path = os.environ.get(HOOKS_ENV)
    if not path:
        return None
    spec = importlib.util.spec_from_file_location("parallel_vae_worker_hooks", path)
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    return hooks


def _share_weights(module, weights) -> bool:
    """On the CPU, make the module use the shared block itself instead of its own copy: CPU
    workers then hold one copy of the weights between them (and share it in the CPU caches).
    Only when every key, shape and dtype matches; the weights are never written."""
    own = module.state_dict()
    if own.keys() != weights.keys():
        return False
    if any(own[k].shape != w.shape or own[k].dtype != w.dtype for k, w in weights.items()):
        return False
    module.load_state_dict(weights, assign=True)
    return True


class Cancelled(Exception):
    pass


@dataclass
class Built:
    """A VAE this worker keeps: ComfyUI's object, its decoder, its exact executors once used (per
    direction), and the shared block its CPU weights live in (None: it copied them)."""

    built: Any
    decoder: Any
    family: str
    block: Any = None
    executors: dict = field(default_factory=dict)


@dataclass
class Job:
    """The job whose latent this worker holds (JobData)."""

    id: int
    fingerprint: str
    work: Any  # units.Work
    latent: Any  # a tensor over ``block``
    block: Any


class Worker:
    def __init__(self, conn: Connection):
        self.conn = conn
        self.cache: "OrderedDict[str, Built]" = OrderedDict()  # least recently used first
        self.name = "?"
        self.device = None
        self.arena = None
        self.slot_bytes = 0
        self.free_slots: list[int] = []
        self.job: Optional[Job] = None
        self.cancelled: set[int] = set()  # of the current job or later ones (older ids are dropped)
        self.backlog: list[msgs.Record] = []  # tasks, loads, jobs read while decoding
        self.shared: dict[tuple[int, int], msgs.Record] = {}  # (job, sync point k) -> one of msgs.SHARED
        self.waited = 0.0  # seconds the running task spent waiting on its lock-step partners
        self.rounds = 0  # its lock-step sync points
        self.hooks = _load_hooks()
        self.heap = HEAP
        self.busy = False  # worked since the heap was last given back
        self.threads = 1  # torch threads of this worker's own (Init)

    def attach(self, name: str, nbytes: int):
        """A parent's block by name (weights, latent, result slots): shared memory here; a Ray
        actor (ray_actor.py) maps the blocks it was sent instead."""
        from . import shm

        return shm.Attached(name, nbytes)

    def models(self) -> tuple:
        return tuple(self.cache)

    # -- setup ---------------------------------------------------------------------------------
    def init(self, config: dict) -> None:
        import torch

        self.name = config["name"]
        _apply_setup(config.get("setup", ()))
        for path in config.get("imports", ()):
            importlib.import_module(path)
        self.threads = int(config["threads"])
        torch.set_num_threads(self.threads)
        if self.hooks is not None and hasattr(self.hooks, "on_init"):
            self.hooks.on_init(self)
        self.device = torch.device(config["device"])
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.empty(1, device=self.device)  # fail now, not on the first tile
        elif self.device.type != "cpu":
            raise RuntimeError(f"device {config['device']!r} is not supported by workers")

    def load(self, fingerprint: str, recipe: dict, block_name: str, nbytes: int, manifest) -> float:
        import torch

        from . import families, identity, shm

        start = time.perf_counter()
        if fingerprint in self.cache:
            self.cache.move_to_end(fingerprint)
            return 0.0
        while len(self.cache) >= MAX_CACHED_VAES:
            self.cache.popitem(last=False)
            gc.collect()
            self._empty_cache()
        block = self.attach(block_name, nbytes)
        shared = False
        try:
            weights = shm.unpack(block.buf, manifest)
            built = identity.rebuild(_resolve(recipe["factory"]), recipe.get("expect"),
                                     **{recipe["weights_arg"]: weights}, **recipe.get("kwargs", {}))
            module = getattr(built, recipe["module_attr"]) if recipe.get("module_attr") else built
            dtype = (getattr(built, recipe["dtype_attr"]) if recipe.get("dtype_attr")
                     else next(module.parameters()).dtype)
            if self.device.type == "cpu":
                shared = _share_weights(module, weights)
            del weights
        finally:
            if not shared:
                block.close()  # the factory copied the weights into its own parameters
        module.to(self.device)
        decoder = families.make_decoder(recipe["family"], module, dtype, self.device, output_device=self.device,
                                        pixel_dtype=recipe.get("pixel_dtype", torch.float32),
                                        latent_channels=recipe.get("latent_channels"))
        self.cache[fingerprint] = Built(built, decoder, recipe["family"], block if shared else None)
        return time.perf_counter() - start

    def _empty_cache(self) -> None:
        import torch

        if self.device is not None and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def set_arena(self, name: str, nbytes: int, slot_bytes: int, slots: int) -> None:
        if self.arena is not None:
            self.arena.close()
        self.arena = self.attach(name, nbytes)
        self.slot_bytes = slot_bytes
        self.free_slots = list(range(slots))

    def set_job(self, record: msgs.JobData) -> None:
        from . import shm
        from .units import Work

        self.drop_job()
        self.cancelled = {j for j in self.cancelled if j >= record.job_id}  # job ids only grow
        try:
            block = self.attach(record.latent_block, record.latent_nbytes)
        except FileNotFoundError:  # the job ended (cancelled) before this message was read
            self.cancelled.add(record.job_id)
            return
        latent = shm.view(block.buf, record.latent_dtype, record.in_shape)
        self.job = Job(record.job_id, record.fingerprint, Work.from_wire(record.work), latent, block)

    def drop_job(self) -> None:
        if self.job is not None:
            block = self.job.block
            self.job = None
            block.close()

    # -- decoding ------------------------------------------------------------------------------
    def send(self, record: msgs.Record) -> None:
        msgs.send(self.conn, record)

    def handle(self, record: msgs.Record) -> None:
        """Records read while a tile is decoding: bookkeeping now, the rest later in order."""
        if isinstance(record, msgs.Free):
            self.free_slots.append(record.slot)
        elif isinstance(record, msgs.SHARED):
            self.shared[(record.job_id, record.k)] = record
        elif isinstance(record, msgs.Cancel):
            self.cancelled.add(record.job_id)
        else:  # tasks, loads, jobs: in order, once the current task is over
            self.backlog.append(record)

    def _check_cancel(self, job_id: int) -> None:
        while self.conn.poll(0):
            self.handle(msgs.recv(self.conn))
        if job_id in self.cancelled:
            raise Cancelled

    def _take_slot(self, job_id: int) -> int:
        self._check_cancel(job_id)
        while not self.free_slots:
            self.handle(msgs.recv(self.conn))  # the parent frees a slot once it has blended from it
            if job_id in self.cancelled:
                raise Cancelled
        return self.free_slots.pop()

    def _executor(self, built: Built, direction: str):
        """The exact-mode band executor of a VAE for ``direction``, built on first use."""
        from . import families

        if direction not in built.executors:
            built.executors[direction] = families.exact_executor(built.family, built.decoder.module,
                                                                 built.decoder.dtype, self.device, direction)
        return built.executors[direction]

    def _answer(self, job_id: int, key: int, requests) -> list:
        """The lock-step's round trip: this task's part out, the item's statistics or the
        neighbouring groups' edge rows back (exact/lockstep.py); one answer per band."""
        from .exact import lockstep

        self.send(lockstep.report(job_id, key, requests))
        since = time.monotonic()
        k = requests[0].k
        while (job_id, k) not in self.shared:
            self.handle(msgs.recv(self.conn))
            if job_id in self.cancelled:
                raise Cancelled
        self.waited += time.monotonic() - since
        self.rounds += 1
        return lockstep.answers_from(requests, self.shared.pop((job_id, k)))

    def run_task(self, job_id: int, key: int, tiles, threads: int = 0) -> None:
        import torch

        if threads and threads != self.threads:  # cores lent by idle CPU workers, for this task
            torch.set_num_threads(threads)
            try:
                return self._run_task(job_id, key, tiles)
            finally:
                torch.set_num_threads(self.threads)
        return self._run_task(job_id, key, tiles)

    def _run_task(self, job_id: int, key: int, tiles) -> None:
        import torch

        from . import shm, units

        job = self.job
        if job is None or job.id != job_id:  # its job ended before the job message arrived
            self.send(msgs.Failed(job_id, key, msgs.Failure.CANCELLED, "its job is gone"))
            return
        self.shared = {k: v for k, v in self.shared.items() if k[0] == job_id}  # drop a cancelled job's
        decoded = None
        started, self.waited, self.rounds = time.monotonic(), 0.0, 0
        try:
            self._check_cancel(job_id)  # a queued task of a cancelled job never starts
            built = self.cache[job.fingerprint]
            if self.hooks is not None and hasattr(self.hooks, "before_task"):
                self.hooks.before_task(self, job.work, tiles)
            executor = self._executor(built, "encode" if job.work.encode else "decode") if job.work.exact else None
            decoded = units.run(job.work, job.latent, tiles, built.decoder, executor,
                                   answer=lambda requests: self._answer(job_id, key, requests),
                                   empty_cache=self._empty_cache)
            for tile_index, step, pixels in decoded:
                slot = self._take_slot(job_id)
                shape = tuple(pixels.shape)
                target = shm.view(self.arena.buf, torch.float32, shape, slot * self.slot_bytes)
                target.copy_(pixels)
                del pixels, target
                self.send(msgs.Result(job_id, tile_index, step, slot, shape))
            self.send(msgs.Done(job_id, key, time.monotonic() - started - self.waited, self.waited, self.rounds))
        except Cancelled:
            self.send(msgs.Failed(job_id, key, msgs.Failure.CANCELLED, "cancelled"))
        except torch.OutOfMemoryError as e:
            decoded = None  # drop the generator (and the causal caches) before emptying the cache
            gc.collect()
            self._empty_cache()
            self.send(msgs.Failed(job_id, key, msgs.Failure.OOM, f"out of memory: {e}".strip()))
        except Exception as e:  # reported to the parent, which names the device and tile
            self.send(msgs.Failed(job_id, key, msgs.Failure.ERROR,
                                  f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"))

    def load_model(self, record: msgs.Load) -> None:
        try:
            seconds = self.load(record.fingerprint, record.recipe, record.block, record.nbytes, record.manifest)
            self.send(msgs.Loaded(record.fingerprint, seconds, self.models()))
        except ModelMismatch as e:
            self.send(msgs.LoadFailed(record.fingerprint, e.what, msgs.LoadFailure.MISMATCH, self.models()))
        except Exception as e:
            self.send(msgs.LoadFailed(record.fingerprint, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}",
                                      msgs.LoadFailure.ERROR, self.models()))

    def idle(self, dropped: bool = False) -> None:
        """Give back what the finished job left: torch's cached device blocks, the freed heap;
        then tell the parent what is still held."""
        self._empty_cache()
        self.heap.give_back()
        self.send(msgs.Idle(self.held(), self.models(), dropped))

    def drop(self) -> None:
        """Forget every VAE (the pool's idle timeout), then give memory back."""
        self.cache.clear()  # as the LRU bound does: the shared weight blocks go with their modules
        self.drop_job()
        gc.collect()
        self.idle(dropped=True)

    def held(self) -> int:
        import torch

        if self.device is not None and self.device.type == "cuda":
            return int(torch.cuda.memory_reserved(self.device))
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def serve(self) -> None:
        """Records in order; a task runs to its end before the next record is taken."""
        run = {msgs.Load: self.load_model,
               msgs.Arena: lambda r: self.set_arena(r.name, r.nbytes, r.slot_bytes, r.slots),
               msgs.JobData: self.set_job,
               msgs.Task: lambda r: self.run_task(r.job_id, r.key, r.tiles, r.threads)}
        while True:
            if self.busy and not self.backlog and not self.conn.poll(0):
                self.idle()  # a job ended: no next task waiting to reuse the memory
                self.busy = False
            record = self.backlog.pop(0) if self.backlog else msgs.recv(self.conn)
            if isinstance(record, msgs.Quit):
                return
            if isinstance(record, msgs.Drop):
                self.drop()
                continue
            action = run.get(type(record))
            if action is not None:
                action(record)
                self.busy = True
            elif isinstance(record, (msgs.Free, msgs.Cancel) + msgs.SHARED):
                self.handle(record)  # statistics and rows can arrive after their task was cancelled
            else:
                raise msgs.ProtocolError(f"a worker does not take {type(record).__name__} records")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parallel_vae.worker")
    parser.add_argument("--conn", type=int, required=True, help="file descriptor of the pool's socket")
    parser.add_argument("--death", type=int, required=True, help="read end of the parent's death pipe")
    parser.add_argument("--name", default="worker", help="the device name, for ps and logs")
    args = parser.parse_args(argv)
    threading.Thread(target=_watch_parent, args=(args.death,), daemon=True, name="parent-watch").start()
    conn = Connection(args.conn)
    worker = Worker(conn)
    worker.heap.keep()
    try:
        return live(worker)
    except (EOFError, ConnectionError, KeyboardInterrupt):
        return 0  # the pool went away


def live(worker: Worker) -> int:
    """A worker's life, whatever carries its records: Init, Up (or InitFailed: 2), then records
    until Quit (0). EOFError when the parent's end closes."""
    import torch

    record = msgs.recv(worker.conn)
    if not isinstance(record, msgs.Init):
        raise msgs.ProtocolError(f"expected init, got {record.kind!r}")
    with torch.inference_mode():
        try:
            worker.init(record.config)
        except BaseException as e:
            worker.send(msgs.InitFailed(f"{type(e).__name__}: {e}"))
            return 2
        worker.send(msgs.Up(os.getpid()))
        worker.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
