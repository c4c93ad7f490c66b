"""One decode worker process: ``python -m parallel_vae.worker --conn FD --death FD``.

The pool (pool.py) starts one per device. Everything it needs comes over the connection as
plain messages (tuples), in order:

  parent -> worker                                worker -> parent
  ("init", config)                                ("up", pid) | ("init_failed", message)
  ("load", fingerprint, recipe, block, manifest)  ("loaded", fingerprint, seconds)
                                                  | ("load_failed", fp, message, kind)
  ("arena", name, nbytes, slot_bytes, slots)
  ("job", job_id, fingerprint, plan, latent)      (no reply; plan is plain data, see pool.wire_plan)
  ("task", job_id, key, tiles)                    ("result", job_id, tile, step, slot, shape)...,
                                                  then ("done", job_id, key) | ("failed", job_id, key, kind, msg)

A task is a group of tiles (usually one). A causal group is decoded frame by frame across its
tiles, each tile keeping its own causal cache, so a stream gets whole frames early.
  ("free", slot)  ("cancel", job_id)  ("quit",)

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
import os
import sys
import threading
import time
import traceback
from collections import OrderedDict
from multiprocessing.connection import Connection

from .errors import ModelMismatch

MAX_CACHED_VAES = 2  # VAEs a worker keeps built (least recently used goes first)
FAULT_ENV = "PARALLEL_VAE_TEST_FAULT"  # test hook: "start", or "oom:<tile or *>:<worker name>"


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
        self.backlog: list[tuple] = []  # tasks read while waiting for a slot
        self.fault = os.environ.get(FAULT_ENV, "")

    # -- setup ---------------------------------------------------------------------------------
    def init(self, config: dict) -> None:
        import torch

        self.name = config["name"]
        _apply_setup(config.get("setup", ()))
        for path in config.get("imports", ()):
            importlib.import_module(path)
        torch.set_num_threads(int(config["threads"]))
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
            self.cache.popitem(last=False)
            gc.collect()
            self._empty_cache()
        block = shm.Attached(block_name, nbytes)
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
        return time.perf_counter() - start

    def _empty_cache(self) -> None:
        import torch

        if self.device is not None and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def set_arena(self, name: str, nbytes: int, slot_bytes: int, slots: int) -> None:
        from . import shm

        if self.arena is not None:
            self.arena.close()
        self.arena = shm.Attached(name, nbytes)
        self.slot_bytes = slot_bytes
        self.free_slots = list(range(slots))

    def set_job(self, job_id: int, fingerprint: str, plan, latent: tuple) -> None:
        from . import shm

        self.drop_job()
        name, nbytes, dtype, shape = latent
        try:
            block = shm.Attached(name, nbytes)
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
    def handle(self, msg: tuple) -> None:
        """Messages read while a tile is decoding: bookkeeping now, the rest later in order."""
        kind = msg[0]
        if kind == "free":
            self.free_slots.append(msg[1])
        elif kind == "cancel":
            self.cancelled.add(msg[1])
        else:  # tasks, loads, jobs: in order, once the current task is over
            self.backlog.append(msg)

    def _check_cancel(self, job_id: int) -> None:
        while self.conn.poll(0):
            self.handle(self.conn.recv())
        if job_id in self.cancelled:
            raise Cancelled

    def _take_slot(self, job_id: int) -> int:
        self._check_cancel(job_id)
        while not self.free_slots:
            self.handle(self.conn.recv())  # the parent frees a slot once it has blended from it
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

    def run_task(self, job_id: int, key: int, tiles) -> None:
        import torch

        from . import shm

        if self.job is None or self.job[0] != job_id:  # its job ended before the job message arrived
            self.conn.send(("failed", job_id, key, "cancelled", "its job is gone"))
            return
        _, fingerprint, plan, latent, _ = self.job
        units = None
        try:
            self._check_cancel(job_id)  # a queued task of a cancelled job never starts
            decoder = self.cache[fingerprint][1]
            if self.fault.startswith("oom:"):
                _, t, who = self.fault.split(":", 2)
                if (t == "*" or int(t) in tiles) and who == self.name:
                    raise torch.OutOfMemoryError(f"{FAULT_ENV}: simulated out of memory on tile {t}")
            units = self._units(decoder, plan, latent, tiles)
            for tile_index, step, pixels in units:
                slot = self._take_slot(job_id)
                shape = tuple(pixels.shape)
                target = shm.view(self.arena.buf, torch.float32, shape, slot * self.slot_bytes)
                target.copy_(pixels)
                del pixels, target
                self.conn.send(("result", job_id, tile_index, step, slot, shape))
            self.conn.send(("done", job_id, key))
        except Cancelled:
            self.conn.send(("failed", job_id, key, "cancelled", "cancelled"))
        except torch.OutOfMemoryError as e:
            units = None  # drop the generator (and the causal caches) before emptying the cache
            gc.collect()
            self._empty_cache()
            self.conn.send(("failed", job_id, key, "oom", f"out of memory: {e}".strip()))
        except Exception as e:  # reported to the parent, which names the device and tile
            self.conn.send(("failed", job_id, key, "error",
                            f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"))

    def serve(self) -> None:
        while True:
            msg = self.backlog.pop(0) if self.backlog else self.conn.recv()
            kind = msg[0]
            if kind == "quit":
                return
            if kind == "load":
                try:
                    seconds = self.load(*msg[1:])
                    self.conn.send(("loaded", msg[1], seconds))
                except Exception as e:
                    if isinstance(e, ModelMismatch):
                        self.conn.send(("load_failed", msg[1], e.what, "mismatch"))
                    else:
                        self.conn.send(("load_failed", msg[1], f"{type(e).__name__}: {e}\n"
                                                               f"{traceback.format_exc(limit=6)}", "error"))
            elif kind == "arena":
                self.set_arena(*msg[1:])
            elif kind == "job":
                self.set_job(*msg[1:])
            elif kind == "task":
                self.run_task(msg[1], msg[2], msg[3])
            else:
                self.handle(msg)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parallel_vae.worker")
    parser.add_argument("--conn", type=int, required=True, help="file descriptor of the pool's socket")
    parser.add_argument("--death", type=int, required=True, help="read end of the parent's death pipe")
    parser.add_argument("--name", default="worker", help="the device name, for ps and logs")
    args = parser.parse_args(argv)
    threading.Thread(target=_watch_parent, args=(args.death,), daemon=True, name="parent-watch").start()
    conn = Connection(args.conn)
    worker = Worker(conn)
    try:
        msg = conn.recv()
        if msg[0] != "init":
            raise RuntimeError(f"expected init, got {msg[0]!r}")
        import torch

        with torch.inference_mode():
            try:
                worker.init(msg[1])
            except BaseException as e:
                conn.send(("init_failed", f"{type(e).__name__}: {e}"))
                return 2
            conn.send(("up", os.getpid()))
            worker.serve()
    except (EOFError, ConnectionError, KeyboardInterrupt):
        return 0  # the pool went away
    return 0


if __name__ == "__main__":
    sys.exit(main())
