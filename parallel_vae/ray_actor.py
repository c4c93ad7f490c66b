"""A pool worker inside a Ray actor: the same ``worker.Worker`` and the same records, carried by
actor calls instead of a socket, with the bulk data (weights, latent, result slots) carried by
Ray's object store instead of shared memory.

The parent (ray_workers.py) calls ``post(seq, wires, names, *arrays)``: records in order, plus the
blocks they name (the arrays arrive resolved from the object store, once per machine). The worker
runs its ordinary loop in a thread and ``take(timeout)`` returns what it sent, each Result with
its slot's pixels (in the decoder's dtype), and the node the actor runs on. The class name holds
``ParallelVAE``: ``ps`` shows ``ray::ParallelVAEWorker``. The parent wraps the class with
``ray.remote``; the module imports Ray only in the actor.
"""
from __future__ import annotations

import collections
import os
import threading
import time
from typing import Optional

from . import protocol as msgs
from .worker import Worker, live


class QueueConn:
    """The worker's end of the pipe: ``send``/``recv``/``poll`` as multiprocessing's Connection."""

    def __init__(self):
        self._in: collections.deque = collections.deque()
        self._out: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self.closed = False

    # worker side
    def send(self, wire, payload: Optional[bytes] = None) -> None:
        with self._cv:
            self._out.append((wire, payload))
            self._cv.notify_all()

    def recv(self):
        with self._cv:
            while not self._in:
                if self.closed:
                    raise EOFError
                self._cv.wait()
            return self._in.popleft()

    def poll(self, timeout: float = 0.0) -> bool:
        with self._cv:
            if not self._in and timeout:
                self._cv.wait(timeout)
            return bool(self._in)

    # actor side
    def put(self, wires) -> None:
        with self._cv:
            self._in.extend(wires)
            self._cv.notify_all()

    def take(self, timeout: float) -> list:
        deadline = time.monotonic() + timeout
        with self._cv:
            while not self._out and time.monotonic() < deadline:
                self._cv.wait(max(0.0, deadline - time.monotonic()))
            out = list(self._out)
            self._out.clear()
            return out

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._cv.notify_all()


class Block:
    """A block sent by the parent, or result slots made here: ``buf`` as shm.Attached's."""

    def __init__(self, data: bytearray):
        self.buf = memoryview(data)

    def close(self) -> None:
        try:
            self.buf.release()
        except BufferError:  # tensors still view it; freed with them
            pass


class HostedWorker(Worker):
    """The worker with blocks from the actor's table and results sent with their pixels."""

    def __init__(self, conn: QueueConn):
        super().__init__(conn)
        self.blocks: dict[str, bytearray] = {}

    def attach(self, name: str, nbytes: int):
        data = self.blocks.pop(name, None)
        if data is None:
            raise FileNotFoundError(name)  # a latent of a job that ended before its record came
        return Block(data)

    def set_arena(self, name: str, nbytes: int, slot_bytes: int, slots: int) -> None:
        self.blocks[name] = bytearray(nbytes)  # the slots live here; each Result carries its pixels
        super().set_arena(name, nbytes, slot_bytes, slots)

    def send(self, record: msgs.Record) -> None:
        self.conn.send(record.wire(), self._pixels(record) if isinstance(record, msgs.Result) else None)

    def _pixels(self, record: msgs.Result) -> tuple[str, bytes]:
        """A Result's pixels as (dtype, bytes): in the decoder's dtype where that holds them exactly
        (the float32 slot widened them from it), so a bf16 or fp16 VAE sends half the bytes."""
        import torch

        from . import shm

        pixels = shm.view(self.arena.buf, torch.float32, record.shape, record.slot * self.slot_bytes)
        narrow = self._carrier()
        if narrow is not None:
            cast = pixels.to(narrow)
            if torch.equal(cast.float(), pixels):  # always, unless a family widened on its own
                return str(narrow).removeprefix("torch."), cast.view(torch.uint8).numpy().tobytes()
        return "float32", pixels.numpy().tobytes()

    def _carrier(self):
        """The narrowest dtype the current job's pixels came through: ComfyUI's intermediate
        dtype if narrower than float32, else the decoder's own (None: float32 throughout)."""
        if self.job is None or self.job.fingerprint not in self.cache:
            return None
        decoder = self.cache[self.job.fingerprint].decoder
        for dtype in (decoder.pixel_dtype, decoder.dtype):
            if dtype.is_floating_point and dtype.itemsize < 4:
                return dtype
        return None


class ParallelVAEWorker:
    """The actor: one pool worker on one device of one machine."""

    def __init__(self, python_path: tuple = ()):
        import sys

        for path in python_path:
            if path not in sys.path and os.path.isdir(path):
                sys.path.append(path)
        self.conn = QueueConn()
        self.worker = HostedWorker(self.conn)
        self.thread: Optional[threading.Thread] = None
        self.lock = threading.Lock()
        self.next_seq, self.early = 1, {}
        import ray  # only ever constructed as an actor

        self.node_id = ray.get_runtime_context().get_node_id()

    def post(self, seq: int, wires: list, names: list, *arrays) -> None:
        """Records numbered ``seq`` by the parent, with the blocks they name; applied in order
        (calls to a threaded actor may run out of order)."""
        with self.lock:
            self.early[seq] = (wires, names, arrays)
            while self.next_seq in self.early:
                wires, names, arrays = self.early.pop(self.next_seq)
                self.next_seq += 1
                for name, array in zip(names, arrays):
                    # a private, writable copy: the object store's view is read-only, and the
                    # worker's CPU modules use the weights block as their parameters
                    self.worker.blocks[name] = bytearray(memoryview(array).cast("B"))
                self.conn.put(wires)
            if self.thread is None:
                self.thread = threading.Thread(target=self._serve, daemon=True, name="pvae-worker")
                self.thread.start()

    def take(self, timeout: float) -> tuple[str, list]:
        """What the worker sent since, with the node this actor runs on (recorded with results)."""
        return self.node_id, self.conn.take(timeout)

    def quit(self) -> None:
        self.conn.close()

    def free_memory(self, device: str, cpu_workers_here: int) -> int:
        """Free bytes for this lane, measured on its machine (tile_size auto): CUDA's free memory
        on its GPU, or the available RAM shared by the node's CPU lanes."""
        from .sizing import measured_free

        return measured_free(device, cpu_workers_here)

    def _serve(self) -> None:
        try:
            live(self.worker)
        except EOFError:  # quit
            pass


__all__ = ["HostedWorker", "ParallelVAEWorker", "QueueConn"]
