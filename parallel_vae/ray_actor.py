"""A pool worker inside a Ray actor: the same ``worker.Worker`` and the same records, carried by
actor calls instead of a socket, with the bulk data (weights, latent, result slots) carried by
Ray's object store instead of shared memory.

The parent (ray_workers.py) calls ``post(wires, names, *arrays)``: records in order, plus the
blocks they name (the arrays arrive resolved from the object store, once per machine). The worker
runs its ordinary loop in a thread and ``take(timeout)`` returns what it sent, each Result with
its slot's pixels. The class name holds ``ParallelVAE``: ``ps`` shows ``ray::ParallelVAEWorker``.
The parent wraps the class with ``ray.remote``; this module needs nothing of Ray.
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
        payload = None
        if isinstance(record, msgs.Result):
            import math

            start = record.slot * self.slot_bytes
            payload = bytes(self.arena.buf[start:start + 4 * math.prod(record.shape)])  # float32 slots
        self.conn.send(record.wire(), payload)


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

    def take(self, timeout: float) -> list:
        return self.conn.take(timeout)

    def quit(self) -> None:
        self.conn.close()

    def _serve(self) -> None:
        try:
            live(self.worker)
        except EOFError:  # quit
            pass


__all__ = ["HostedWorker", "ParallelVAEWorker", "QueueConn"]
