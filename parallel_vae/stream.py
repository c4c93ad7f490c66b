"""Frame batches of one decode, in frame order, with back-pressure.

A producer thread runs the decode (engine.segments) and puts finished frame batches into a small
queue; the consumer (a video writer, a node) takes them. The queue holds at most ``in_flight``
batches, so a consumer slower than the decode stops the decode instead of letting frames pile up:
memory follows the batches in flight, not the length of the video. Closing the stream early (an
interrupt, an error in the consumer) stops the producer at its next unit of work, which cancels
the job in the workers.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from .errors import DecodeError

WAIT_S = 0.05  # how often the consumer's poll (ComfyUI's interrupt check) runs while it waits
JOIN_S = 120.0  # the producer stops within one unit of work; this only guards against a hung device


class StreamClosed(Exception):
    """Raised inside the producer when the consumer closed the stream."""


@dataclass
class FrameBatch:
    start: int  # index of the first frame in the whole output (ComfyUI's IMAGE batch index)
    frames: torch.Tensor  # [n, H, W, C] float32, ComfyUI's IMAGE layout
    total: int  # frames in the whole output


# (check) -> (start frame, frames [n, H, W, C]) in any order; ``check`` raises StreamClosed
SegmentSource = Callable[[Callable[[], None]], Iterator[tuple[int, torch.Tensor]]]


class FrameStream:
    """Iterate once: ``with FrameStream(...) as s: for batch in s: ...``.

    ``poll`` runs in the consumer every WAIT_S s while it waits (an exception from it closes the
    stream and propagates). ``run_in`` wraps the producer thread's body (the ComfyUI nodes pass a
    copied ``contextvars`` context so progress lands on the right node).
    """

    def __init__(self, source: SegmentSource, total: int, frames_per_batch: int, in_flight: int = 2,
                 poll: Callable[[], None] = lambda: None,
                 run_in: Callable[..., None] = lambda fn: fn()):
        if frames_per_batch < 1:
            raise ValueError("frames_per_batch must be at least 1")
        self.source, self.total, self.frames_per_batch = source, total, frames_per_batch
        self.poll, self.run_in = poll, run_in
        self._queue: "queue.Queue[tuple[str, object]]" = queue.Queue(maxsize=max(1, in_flight))
        self._closed = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._ended = False

    # -- producer ------------------------------------------------------------------------------
    def check(self) -> None:
        if self._closed.is_set():
            raise StreamClosed

    def _put(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=WAIT_S)
                return True
            except queue.Full:
                continue
        return False

    def _batches(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Segments reordered into frame order and cut into batches of frames_per_batch."""
        pending: dict[int, torch.Tensor] = {}
        next_start = 0  # first frame not yet put into a batch
        parts: list[torch.Tensor] = []
        held = 0
        for start, frames in self.source(self.check):
            pending[start] = frames
            while next_start in pending:
                part = pending.pop(next_start)
                next_start += part.shape[0]
                parts.append(part)
                held += part.shape[0]
                while held >= self.frames_per_batch:
                    joined = parts[0] if len(parts) == 1 else torch.cat(parts)
                    first = next_start - held
                    yield first, joined[:self.frames_per_batch]
                    rest = joined[self.frames_per_batch:]
                    held = rest.shape[0]
                    parts = [rest.clone()] if held else []  # do not pin the whole joined tensor
        if held:
            yield next_start - held, parts[0] if len(parts) == 1 else torch.cat(parts)
        if pending or next_start != self.total:
            raise DecodeError(f"the stream ended after {next_start} of {self.total} frames")

    def _produce(self) -> None:
        try:
            with torch.inference_mode():
                for start, frames in self._batches():
                    if not self._put(("batch", FrameBatch(start, frames, self.total))):
                        return
            self._put(("end", None))
        except StreamClosed:
            pass
        except BaseException as e:  # handed to the consumer, which raises it in its own thread
            self._put(("error", e))

    # -- consumer ------------------------------------------------------------------------------
    def __enter__(self) -> "FrameStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> "FrameStream":
        if self._thread is None:
            if self._closed.is_set():
                raise RuntimeError("this stream was closed")
            self._thread = threading.Thread(target=self.run_in, args=(self._produce,), daemon=True,
                                            name="pvae-stream")
            self._thread.start()
        return self

    def __next__(self) -> FrameBatch:
        if self._ended:
            raise StopIteration
        while True:
            try:
                kind, value = self._queue.get(timeout=WAIT_S)
                break
            except queue.Empty:
                try:
                    self.poll()
                except BaseException:
                    self.close()
                    raise
        if kind == "batch":
            return value
        self._ended = True
        self._join()
        if kind == "error":
            raise value
        raise StopIteration

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join(JOIN_S)
            if self._thread.is_alive():
                raise DecodeError(f"the decode did not stop within {JOIN_S:.0f} s of the stream closing")

    def close(self) -> None:
        """Stop the producer (at its next unit of work) and wait for it; idempotent."""
        self._closed.set()
        while True:  # unblock a producer waiting to put
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._ended = True
        self._join()
