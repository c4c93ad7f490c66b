"""A band that runs ComfyUI's own modules in a thread of its own, seen by the lock-step driver as
a generator of requests (lockstep.py).

Some decoders (Wan's) keep their causal caches and their call structure inside ComfyUI's modules,
which differ between ComfyUI versions; rather than re-walk them, each band calls the decoder
itself on its own rows, and hooks on the modules (wan_rows.py) stop at each exchange point: the
hook hands its request to the driver's thread and waits for the answer. One band runs at a time
(the driver resumes one, then waits for it to stop again), so the arithmetic is the same as one
thread's, and every message to other processes still goes through the driver's thread.

``Channel.ask`` and ``Channel.emit`` are what the hooks and the band's body call; ``current()``
tells a hook whether it runs in a band (None: an ordinary call, which the hook leaves alone).
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Generator

import torch

from ..heap import HEAP

_local = threading.local()


@dataclass(frozen=True)
class Output:
    """What a band gives between exchange points: here, the pixels of one decoder call's frames.
    The driver collects one from every band, then resumes them."""

    value: object


class Stopped(BaseException):
    """Raised in a band's thread when the driver abandons the band (an error elsewhere, an
    interrupt): the thread unwinds and ends. A BaseException, so module code does not catch it."""


class Channel:
    """One band's place (own rows ``[a, e)`` of ``height``) and its line to the driver."""

    def __init__(self, a: int, e: int, height: int):
        self.a, self.e, self.height, self.k = a, e, height, 0
        self._up: queue.SimpleQueue = queue.SimpleQueue()  # band -> driver
        self._down: queue.SimpleQueue = queue.SimpleQueue()  # driver -> band

    @property
    def alone(self) -> bool:  # the only band: nothing to exchange
        return self.a == 0 and self.e == self.height

    def next(self) -> int:
        self.k += 1
        return self.k - 1

    def ask(self, request):
        """In the band's thread: hand ``request`` to the driver and wait for its answer (what this
        band freed in its turn goes back first: heap.Heap.turn_over)."""
        HEAP.turn_over()
        self._up.put(("yield", request))
        kind, value = self._down.get()
        if kind == "stop":
            raise Stopped()
        return value

    def emit(self, value) -> None:
        self.ask(Output(value))


def current() -> Channel | None:
    return getattr(_local, "channel", None)


def run(channel: Channel, body: Callable[[], object], device: torch.device) -> Generator:
    """``body()`` in a thread of its own as a generator: yields what the thread asks or emits and
    sends it the answers; returns what ``body`` returns, raises what it raises. Closing the
    generator stops the thread (``Stopped`` at its next exchange point) and waits for it."""
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def target():
        _local.channel = channel
        try:
            if device.type == "cuda" and device.index is not None:
                torch.cuda.set_device(device)  # the current device is per thread
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                result = body()
            channel._up.put(("return", result))
        except Stopped:
            channel._up.put(("stopped", None))
        except BaseException as e:  # out of memory, ComfyUI's interrupt, a real error: the driver raises it
            channel._up.put(("raise", e))
        finally:
            _local.channel = None

    thread = threading.Thread(target=target, name=f"parallel_vae band [{channel.a}, {channel.e})", daemon=True)
    thread.start()
    finished = False
    try:
        while True:
            kind, value = channel._up.get()
            if kind == "return":
                finished = True
                return value
            if kind == "raise":
                finished = True
                raise value
            answer = yield value
            channel._down.put(("go", answer))
    finally:
        if not finished:  # abandoned mid-way: the thread waits at an exchange point
            channel._down.put(("stop", None))
            while channel._up.get()[0] not in ("stopped", "raise", "return"):
                channel._down.put(("stop", None))
        thread.join()


__all__ = ["Channel", "Output", "Stopped", "current", "run"]
