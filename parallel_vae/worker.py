"""One decode worker process: ``python -m parallel_vae.worker --conn FD --death FD``.

The pool (processes.py) starts one per device. Everything it needs comes over the connection as
the records of protocol.py, which lists them in order; this module imports nothing of the pool.

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
import ctypes
import gc
import importlib
import os
import sys
import threading
import time
import traceback
from collections import OrderedDict
from multiprocessing.connection import Connection

from . import protocol as msgs
from .errors import ModelMismatch
from .protocol import MAX_CACHED_VAES
KEEP_HEAP_ENV = "PARALLEL_VAE_KEEP_HEAP"
# test hook: "start", "oom:<tile or *>:<worker>", "hang:<tile or *>:<worker>:<marker file>"
FAULT_ENV = "PARALLEL_VAE_TEST_FAULT"


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


class Heap:
    """Keeps what a worker frees while it works; gives it back to the system when it goes idle.

    glibc returns the top of its heap to the kernel whenever more than 32 MiB of it are free
    (twice its adaptive mmap threshold), and a decode crosses that mark several times per tile:
    every regrowth is fresh zeroed pages, about 25,000 page faults (100 MiB) per 128-pixel SD tile
    on the CPU. Keeping them made a 2-thread CPU worker about 7% faster (docs/BENCHMARKS.md).
    Blocks over 32 MiB are mapped afresh either way.
    ``PARALLEL_VAE_KEEP_HEAP=0`` leaves glibc's defaults (benchmarks compare the two).
    """

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters

    def __init__(self):
        self.libc = None

    def keep(self) -> None:
        """Set once in the worker process, before it allocates much."""
        if os.environ.get(KEEP_HEAP_ENV, "1") == "0":
            return
        try:
            libc = ctypes.CDLL(None)
        except OSError:
            return
        if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim"):  # glibc; elsewhere a no-op
            # Fixed thresholds also stop glibc adapting them: the mmap one at its largest allowed.
            if libc.mallopt(self.M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(self.M_TRIM_THRESHOLD, 1 << 30):
                self.libc = libc

    def give_back(self) -> None:
        if self.libc is not None:
            self.libc.malloc_trim(0)


class Cancelled(Exception):
    pass


class Worker:
    def __init__(self, conn: Connection):
        self.conn = conn
        self.cache: "OrderedDict[str, tuple]" = OrderedDict()  # fp -> (built, decoder, shared block)
        self.name = "?"
        self.device = None
        self.arena = None
        self.slot_bytes = 0
        self.free_slots: list[int] = []
        self.job = None  # (job_id, fingerprint, plan, latent tensor, attached block)
        self.cancelled: set[int] = set()
        self.backlog: list[msgs.Record] = []  # tasks, loads, jobs read while decoding
        self.shared: dict[tuple[int, int], msgs.Record] = {}  # (job, sync point k) -> SharedStats/SharedRows
        self.waited = 0.0  # seconds the running task spent waiting on its lock-step partners
        self.families: dict[str, str] = {}  # fingerprint -> decoder family (for exact executors)
        self.executors: dict[str, object] = {}  # fingerprint -> exact-mode band executor, built on first use
        self.fault = os.environ.get(FAULT_ENV, "")
        self.heap = Heap()
        self.busy = False  # worked since the heap was last given back
        self.threads = 1  # torch threads of this worker's own (Init)

    def attach(self, name: str, nbytes: int):
        """A parent's block by name (weights, latent, result slots): shared memory here; a Ray
        actor (ray_actor.py) maps the blocks it was sent instead."""
        from . import shm

        return shm.Attached(name, nbytes)

    # -- setup ---------------------------------------------------------------------------------
    def init(self, config: dict) -> None:
        import torch

        self.name = config["name"]
        _apply_setup(config.get("setup", ()))
        for path in config.get("imports", ()):
            importlib.import_module(path)
        self.threads = int(config["threads"])
        torch.set_num_threads(self.threads)
        if self.fault == "start":
            raise RuntimeError(f"{FAULT_ENV}=start: this worker fails on start, as asked")
        self.device = torch.device(config["device"])
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.empty(1, device=self.device)  # fail now, not on the first tile
        elif self.device.type != "cpu":
            raise RuntimeError(f"device {config['device']!r} is not supported by workers")

    def load(self, fingerprint: str, recipe: dict, block_name: str, nbytes: int, manifest) -> float:
        import torch

        from . import identity, shm
        from .models import make_decoder

        start = time.perf_counter()
        if fingerprint in self.cache:
            self.cache.move_to_end(fingerprint)
            return 0.0
        while len(self.cache) >= MAX_CACHED_VAES:
            gone, _ = self.cache.popitem(last=False)
            self.executors.pop(gone, None)
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
        decoder = make_decoder(recipe["family"], module, dtype, self.device, output_device=self.device,
                               pixel_dtype=recipe.get("pixel_dtype", torch.float32),
                               latent_channels=recipe.get("latent_channels"))
        self.cache[fingerprint] = (built, decoder, block if shared else None)
        self.families[fingerprint] = recipe["family"]
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

    def set_job(self, job_id: int, fingerprint: str, plan, latent: tuple) -> None:
        from . import shm

        self.drop_job()
        name, nbytes, dtype, shape = latent
        try:
            block = self.attach(name, nbytes)
        except FileNotFoundError:  # the job ended (cancelled) before this message was read
            self.cancelled.add(job_id)
            return
        self.job = (job_id, fingerprint, plan, shm.view(block.buf, dtype, shape), block)

    def drop_job(self) -> None:
        if self.job is not None:
            block = self.job[4]
            self.job = None
            block.close()

    # -- decoding ------------------------------------------------------------------------------
    def send(self, record: msgs.Record) -> None:
        msgs.send(self.conn, record)

    def handle(self, record: msgs.Record) -> None:
        """Records read while a tile is decoding: bookkeeping now, the rest later in order."""
        if isinstance(record, msgs.Free):
            self.free_slots.append(record.slot)
        elif isinstance(record, (msgs.SharedStats, msgs.SharedRows)):
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

    def _units(self, decoder, plan, latent, tiles):
        """(tile, step, pixels) of a task: tile by tile, or for causal video frame by frame."""
        from .engine import box_of

        def box(t):
            batch, start, size = plan["tiles"][t]
            return box_of(latent, batch, start, size)

        if not plan["causal"]:
            for t in tiles:
                yield t, 0, decoder.decode(box(t))
            return
        streams = [(t, decoder.steps(box(t), plan["step_frames"])) for t in tiles]
        for step in range(len(plan["step_frames"])):
            for t, stream in streams:
                pixels = next(stream, None)
                if pixels is None:
                    raise RuntimeError(f"the VAE stopped after {step} latent frames on tile {t}")
                yield t, step, pixels

    def _exact_units(self, fingerprint: str, job_id: int, key: int, plan, latent, tiles):
        """(band, step, pixels) of an exact-mode task, with the family's band executor."""
        from .exact import executor
        from .exact import task as exact_task

        decoder = self.cache[fingerprint][1]
        ex = self.executors.get(fingerprint)
        if ex is None:
            ex = self.executors[fingerprint] = executor(self.families[fingerprint], decoder.module, decoder.dtype,
                                                        self.device,
                                                        patch_size=int(getattr(decoder.module, "patch_size", 2)))
        answer = lambda requests: self._answer(job_id, key, requests)  # noqa: E731
        for index, step, pixels in exact_task.run(ex, plan, latent, tiles, answer, self._empty_cache):
            yield index, step, decoder._out(pixels)

    def _answer(self, job_id: int, key: int, requests) -> list:
        """The lock-step's round trip: this task's part out (moments, or its outer edge rows), the
        item's statistics or the neighbouring groups' edge rows back; one answer per band."""
        import torch

        from .exact import lockstep

        lockstep.check_same(requests)
        what, k, name = requests[0][:3]
        if what == "rows":
            self.send(msgs.GroupRows(job_id, key, k, name, lockstep.rows_to_wire(requests[0][3]),
                                     lockstep.rows_to_wire(requests[-1][4])))
        else:
            self.send(msgs.GroupStats(job_id, key, k, name, requests[0][3], [r[4].as_wire() for r in requests]))
        since = time.monotonic()
        while (job_id, k) not in self.shared:
            self.handle(msgs.recv(self.conn))
            if job_id in self.cancelled:
                raise Cancelled
        self.waited += time.monotonic() - since
        shared = self.shared.pop((job_id, k))
        if what == "rows":
            device = requests[0][3].device
            return lockstep.band_neighbours(requests, lockstep.rows_from_wire(shared.above, device),
                                       lockstep.rows_from_wire(shared.below, device))
        mean = torch.frombuffer(bytearray(shared.mean), dtype=torch.float64).reshape(shared.shape)
        rstd = torch.frombuffer(bytearray(shared.rstd), dtype=torch.float64).reshape(shared.shape)
        return [(mean, rstd)] * len(requests)

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

        from . import shm

        if self.job is None or self.job[0] != job_id:  # its job ended before the job message arrived
            self.send(msgs.Failed(job_id, key, msgs.Failure.CANCELLED, "its job is gone"))
            return
        _, fingerprint, plan, latent, _ = self.job
        self.shared = {k: v for k, v in self.shared.items() if k[0] == job_id}  # drop a cancelled job's
        units = None
        started, self.waited = time.monotonic(), 0.0
        try:
            self._check_cancel(job_id)  # a queued task of a cancelled job never starts
            decoder = self.cache[fingerprint][1]
            if self.fault.startswith("hang:"):  # alive and silent, once (the marker file): the watchdog's case
                _, t, who, marker = self.fault.split(":", 3)
                if (t == "*" or int(t) in tiles) and who == self.name and not os.path.exists(marker):
                    open(marker, "w").close()
                    while True:
                        time.sleep(1.0)
            if self.fault.startswith("oom:") and plan.get("split", 1) == 1:  # a split retry is let through
                _, t, who = self.fault.split(":", 2)
                if (t == "*" or int(t) in tiles) and who == self.name:
                    raise torch.OutOfMemoryError(f"{FAULT_ENV}: simulated out of memory on tile {t}")
            if plan.get("exact"):
                units = self._exact_units(fingerprint, job_id, key, plan, latent, tiles)
            else:
                units = self._units(decoder, plan, latent, tiles)
            for tile_index, step, pixels in units:
                slot = self._take_slot(job_id)
                shape = tuple(pixels.shape)
                target = shm.view(self.arena.buf, torch.float32, shape, slot * self.slot_bytes)
                target.copy_(pixels)
                del pixels, target
                self.send(msgs.Result(job_id, tile_index, step, slot, shape))
            self.send(msgs.Done(job_id, key, time.monotonic() - started - self.waited))
        except Cancelled:
            self.send(msgs.Failed(job_id, key, msgs.Failure.CANCELLED, "cancelled"))
        except torch.OutOfMemoryError as e:
            units = None  # drop the generator (and the causal caches) before emptying the cache
            gc.collect()
            self._empty_cache()
            self.send(msgs.Failed(job_id, key, msgs.Failure.OOM, f"out of memory: {e}".strip()))
        except Exception as e:  # reported to the parent, which names the device and tile
            self.send(msgs.Failed(job_id, key, msgs.Failure.ERROR,
                                  f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"))

    def load_model(self, record: msgs.Load) -> None:
        try:
            seconds = self.load(record.fingerprint, record.recipe, record.block, record.nbytes, record.manifest)
            self.send(msgs.Loaded(record.fingerprint, seconds))
        except ModelMismatch as e:
            self.send(msgs.LoadFailed(record.fingerprint, e.what, msgs.LoadFailure.MISMATCH))
        except Exception as e:
            self.send(msgs.LoadFailed(record.fingerprint, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}",
                                      msgs.LoadFailure.ERROR))

    def idle(self) -> None:
        """Give back what the finished job left: torch's cached device blocks, the freed heap;
        then tell the parent what is still held."""
        self._empty_cache()
        self.heap.give_back()
        self.send(msgs.Idle(self.held(), len(self.cache)))

    def drop(self) -> None:
        """Forget every VAE (the pool's idle timeout), then give memory back."""
        self.cache.clear()  # as the LRU bound does: the shared weight blocks go with their modules
        self.executors.clear()
        self.drop_job()
        gc.collect()
        self.idle()

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
               msgs.JobData: lambda r: self.set_job(r.job_id, r.fingerprint, r.plan, r.latent),
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
            elif isinstance(record, (msgs.Free, msgs.Cancel, msgs.SharedStats, msgs.SharedRows)):
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
