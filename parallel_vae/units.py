"""Units of work as a lane computes them: the one routine that turns a group of tiles (or exact
bands) into pixels (decoding) or latents (encoding), shared by the in-process backend and the
worker process.

A unit is (tile, step): a whole tile for image and generic video plans (step 0), one latent frame
of one spatial tile for causal video. A group is decoded frame by frame across its tiles, each
causal tile keeping its own cache; exact bands go to the family's band executor (exact/task.py).

``Work`` is what a lane needs of a plan, in plain data (it crosses to worker processes, which
cannot unpickle the pack's classes under ComfyUI's path-shaped module name). Nothing here
imports the blender, the scheduler or the pool.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Iterator, Optional, Sequence

import torch

from .errors import DecodeError
from .plan import CAUSAL, Plan, Tile


@dataclass
class Decoded:
    """The pixels of one unit, and which lane (and process) decoded it."""

    by: str  # the lane's name
    tile: Tile
    step: int
    pixels: Optional[torch.Tensor]
    pid: int
    borrowed: bool = False  # a view of a worker's slot, reused once the iterator advances


@dataclass(frozen=True)
class Work:
    """What decoding needs of a plan: the tiles' latent boxes (batch, start, size), whether tiles
    step through latent frames, and for exact plans how many ways each band is cut (the parent
    raises it after an out-of-memory error in lock-step)."""

    causal: bool
    exact: bool
    step_frames: tuple
    boxes: tuple
    split: int = 1
    encode: bool = False  # pixels in, latent out (the boxes are in pixels)

    @classmethod
    def of(cls, plan: Plan) -> "Work":
        return cls(plan.kind == CAUSAL, plan.exact, tuple(plan.step_frames),
                   tuple((t.batch, tuple(t.in_start), tuple(t.in_size)) for t in plan.tiles),
                   encode=plan.direction == "encode")

    def split_in(self, split: int) -> "Work":
        return replace(self, split=split)

    def wire(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_wire(cls, wire: dict) -> "Work":
        return cls(**wire)

    def box(self, latent: torch.Tensor, tile: int) -> torch.Tensor:
        """The latent of tile ``tile``: ``[1, C, *size]`` (a view)."""
        batch, start, size = self.boxes[tile]
        return box_of(latent, batch, start, size)

    def band(self, tile: int) -> tuple[int, int, int]:
        """(tile, a, e): the latent rows of an exact band."""
        _, start, size = self.boxes[tile]
        axis = len(start) - 2  # rows: (H, W) or (T, H, W)
        return tile, start[axis], start[axis] + size[axis]


def box_of(latent: torch.Tensor, batch: int, start, size) -> torch.Tensor:
    box = latent.narrow(0, batch, 1)
    for d, (p, n) in enumerate(zip(start, size)):
        box = box.narrow(d + 2, p, n)
    return box


def run(work: Work, latent: torch.Tensor, tiles: Sequence[int], decoder, executor=None,
        answer: Optional[Callable] = None, poll: Optional[Callable[[], None]] = None,
        empty_cache: Callable[[], None] = lambda: None) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(tile, step, output) of the group ``tiles``, as ``decoder.output`` gives it: pixels, or a
    latent where ``work.encode`` (``latent`` is then the VAE's input pixels).

    Exact groups are bands of one batch item, run by ``executor``: ``answer`` carries their sync
    points to the bands of other workers (None: these bands are the whole item), ``poll`` runs
    between sync points.
    """
    if work.exact:
        from .exact import bands

        if executor is None:
            raise DecodeError("this lane has no exact executor for the VAE")
        for t, step, pixels in bands.run(executor, work, latent, tiles, answer, poll, empty_cache):
            yield t, step, decoder.output(pixels)
        return
    if work.encode or not work.causal:
        code = decoder.encode if work.encode else decoder.decode
        for t in tiles:
            yield t, 0, code(work.box(latent, t))
        return
    steps = len(work.step_frames)
    streams = [decoder.steps(work.box(latent, t), work.step_frames) for t in tiles]
    for step in range(steps):
        for i, t in enumerate(tiles):
            pixels = next(streams[i], None)
            if pixels is None:
                raise DecodeError(f"the VAE stopped after {step} of {steps} latent frames on tile {t}")
            if step == steps - 1:
                streams[i] = None  # frees the tile's causal cache before its last pixels go on
            yield t, step, pixels


__all__ = ["Decoded", "Work", "box_of", "run"]
