"""Feather masks and accumulation of decoded tiles into a preallocated output.

Tiles are applied in plan order whatever order they arrive in (early arrivals wait in a small
reorder buffer), so the result is bit-identical however many lanes decode and however they race.
The arithmetic mirrors ``comfy.utils.tiled_scale_multidim``: ``out += pixels*mask``,
``div += mask``, ``out/div`` per pass, then the passes summed in order and divided by their count.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .errors import DecodeError
from .plan import CAUSAL, Plan, Tile


@functools.lru_cache(maxsize=512)
def feather_mask(out_size: tuple[int, ...], feather: tuple[int, ...]) -> torch.Tensor:
    """``[1, 1, *out_size]`` weights: a linear ramp (t+1)/f on both ends of each axis.

    Built with the same in-place products as ComfyUI (so short tiles whose two ramps overlap get
    both factors). Cached and shared: callers must not modify it.
    """
    mask = torch.ones((1, 1) + tuple(out_size))
    for d, f in enumerate(feather):
        n = out_size[d]
        if f == 0 or f >= n:
            continue
        for t in range(f):
            a = (t + 1) / f
            mask.narrow(d + 2, t, 1).mul_(a)
            mask.narrow(d + 2, n - 1 - t, 1).mul_(a)
    return mask


def _cut(t: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    for d, n in enumerate(size):
        if t.shape[d + 2] != n:
            t = t.narrow(d + 2, 0, n)
    return t


def allocate_output(plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """(storage, view): channels-last float32 storage ``[B, *axes, C]`` and its ``[B, C, *axes]`` view.

    Writing through the view fills the storage in place, and a video's storage reshapes to
    ComfyUI's IMAGE ``[B*T, H, W, C]`` without a copy.
    """
    if plan.direction == "encode":  # a latent: ComfyUI's own layout, contiguous [B, C, *axes]
        latent = torch.empty(plan.out_shape, dtype=torch.float32)
        return latent, latent
    b, c, *axes = plan.out_shape
    storage = torch.empty((b, *axes, c), dtype=torch.float32)
    return storage, storage.movedim(-1, 1)


@dataclass(frozen=True)
class Segment:
    """A finished part of the output: one batch item, or one decode step of a causal video."""

    batch: int
    step: int
    frames: Optional[tuple[int, int]]  # output frame range for video plans, None for images


class _SegmentState:
    __slots__ = ("tiles", "position", "next", "pending", "acc", "div", "origin", "size", "own")

    def __init__(self, tiles, origin, size):
        self.tiles = tiles
        self.position = {t.index: i for i, t in enumerate(tiles)}
        self.next = 0
        self.pending: dict[int, torch.Tensor] = {}
        self.acc = self.div = None
        self.origin = origin
        self.size = size
        self.own: Optional[torch.Tensor] = None  # the segment's output when the blender has no canvas


class Blender:
    """Blends tiles of ``plan`` into ``out`` (``[B, C, *axes]``, e.g. allocate_output's view).

    ``finish(segment, region)`` is called once per finished segment with the view of ``out`` it
    covers, in the order segments finish; it may post-process the region in place.

    With ``out=None`` there is no canvas for the whole output (streaming): each segment gets a
    tensor of its own, handed over by ``take(segment)`` once finished, so memory follows the
    segments in flight instead of the length of the video.
    """

    def __init__(self, plan: Plan, out: Optional[torch.Tensor],
                 finish: Optional[Callable[[Segment, torch.Tensor], None]] = None):
        if out is not None and tuple(out.shape) != plan.out_shape:
            raise ValueError(f"output shape {tuple(out.shape)} does not match the plan's {plan.out_shape}")
        self.plan = plan
        self.out = out
        self.device = out.device if out is not None else torch.device("cpu")
        self.finish = finish
        self._segments: dict[tuple[int, int], _SegmentState] = {}
        self._finished: set[tuple[int, int]] = set()
        self._taken: dict[tuple[int, int], torch.Tensor] = {}  # finished own-storage segments
        self.done: list[Segment] = []

    def _segment(self, batch: int, step: int) -> _SegmentState:
        key = (batch, step)
        seg = self._segments.get(key)
        if seg is None:
            plan = self.plan
            full = plan.out_shape[2:]
            origin = (0,) * len(full)
            size = tuple(full)
            if plan.kind == CAUSAL:
                f0, f1 = plan.step_frames[step]
                origin = (f0,) + origin[1:]
                size = (f1 - f0,) + size[1:]
            seg = self._segments[key] = _SegmentState(plan.tiles_of(batch), origin, size)
        return seg

    def _region(self, tile: Tile, seg: _SegmentState) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Tile's (start, size) inside its segment."""
        if self.plan.kind == CAUSAL:
            return (0,) + tile.out_start[1:], (seg.size[0],) + tile.out_size[1:]
        return tile.out_start, tile.out_size

    def add(self, tile_index: int, step: int, pixels: torch.Tensor, borrowed: bool = False) -> list[Segment]:
        """Take the decoded pixels of one tile (one step of it for causal plans).

        ``borrowed`` pixels are only valid during the call (a worker's result slot): they are
        copied if they must wait for earlier tiles. Returns the segments this completed, in order.
        """
        tile = self.plan.tiles[tile_index]
        if not 0 <= step < self.plan.steps:
            raise ValueError(f"step {step} is outside the plan's {self.plan.steps} steps")
        if (tile.batch, step) in self._finished:
            raise ValueError(f"tile {tile_index} step {step} was already blended")
        seg = self._segment(tile.batch, step)
        if seg.position[tile_index] < seg.next or tile_index in seg.pending:
            raise ValueError(f"tile {tile_index} step {step} was already blended")
        seg.pending[tile_index] = pixels
        finished = []
        while seg.next < len(seg.tiles) and seg.tiles[seg.next].index in seg.pending:
            t = seg.tiles[seg.next]
            self._apply(seg, t, step, seg.pending.pop(t.index))
            seg.next += 1
            if seg.next == len(seg.tiles):
                finished.append(self._complete(seg, t.batch, step))
        if borrowed and tile_index in seg.pending:
            seg.pending[tile_index] = pixels.clone()
        return finished

    def _apply(self, seg: _SegmentState, tile: Tile, step: int, pixels: torch.Tensor) -> None:
        start, size = self._region(tile, seg)
        expected = (1, self.plan.out_shape[1]) + size
        if tuple(pixels.shape) != expected:
            raise DecodeError(f"the VAE returned pixels of shape {tuple(pixels.shape)} for tile {tile.index}"
                              f"{f' step {step}' if self.plan.kind == CAUSAL else ''}; expected {expected}")
        pixels = pixels.to(dtype=torch.float32, device=self.device)
        fit = tuple(min(n, total - p) for p, n, total in zip(start, size, seg.size))
        if fit != size:  # an encoded tile overhanging the latent canvas: cut, mask and all, as ComfyUI
            pixels = _cut(pixels, fit)
        last_of_pass = (seg.next + 1 == len(seg.tiles)
                        or seg.tiles[seg.next + 1].pass_index != tile.pass_index)
        if tile.whole:
            result = pixels
        else:
            if seg.acc is None:
                seg.acc = torch.zeros((1, self.plan.out_shape[1]) + seg.size, device=self.device)
                seg.div = torch.zeros((1, 1) + seg.size, device=self.device)
            mask = _cut(feather_mask(size, tile.feather), fit).to(self.device)
            acc, div = seg.acc, seg.div
            for d, (p, n) in enumerate(zip(start, fit)):
                acc = acc.narrow(d + 2, p, n)
                div = div.narrow(d + 2, p, n)
            acc.add_(pixels * mask)
            div.add_(mask)
            if not last_of_pass:
                return
            result = seg.acc / seg.div
            seg.acc = seg.div = None
        if last_of_pass:
            region = self._out_region(tile.batch, seg)
            if tile.pass_index == 0:
                region.copy_(result)
            else:
                region.add_(result)

    def _out_region(self, batch: int, seg: _SegmentState) -> torch.Tensor:
        if self.out is None:
            if seg.own is None:
                seg.own = torch.empty((1, self.plan.out_shape[1]) + seg.size, dtype=torch.float32)
            return seg.own
        region = self.out.narrow(0, batch, 1)
        for d, (p, n) in enumerate(zip(seg.origin, seg.size)):
            region = region.narrow(d + 2, p, n)
        return region

    def _complete(self, seg: _SegmentState, batch: int, step: int) -> Segment:
        region = self._out_region(batch, seg)
        if self.plan.passes > 1:
            region.div_(float(self.plan.passes))
        frames = None
        if len(self.plan.out_shape) == 5:
            frames = (seg.origin[0], seg.origin[0] + seg.size[0])
        segment = Segment(batch, step, frames)
        del self._segments[(batch, step)]
        self._finished.add((batch, step))
        if self.finish is not None:
            self.finish(segment, region)
        if self.out is None:
            self._taken[(batch, step)] = region
        self.done.append(segment)
        return segment

    def take(self, segment: Segment) -> torch.Tensor:
        """A finished segment's pixels ``[1, C, *size]`` when there is no canvas (handed over once)."""
        return self._taken.pop((segment.batch, segment.step))

    @property
    def complete(self) -> bool:
        expected = self.plan.batch * self.plan.steps
        return len(self.done) == expected
