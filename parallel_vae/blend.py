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
from .plan import CAUSAL, VIDEO, Plan, Tile


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
    __slots__ = ("tiles", "position", "next", "pending", "acc", "div", "origin", "size", "own", "lo")

    def __init__(self, tiles, origin, size):
        self.tiles = tiles
        self.position = {t.index: i for i, t in enumerate(tiles)}
        self.next = 0
        self.pending: dict[int, torch.Tensor] = {}
        self.acc = self.div = None
        self.origin = origin
        self.size = size
        self.own: Optional[torch.Tensor] = None  # the segment's output when the blender has no canvas
        self.lo = 0  # rolling: the first frame not yet released


class Blender:
    """Blends tiles of ``plan`` into ``out`` (``[B, C, *axes]``, e.g. allocate_output's view).

    ``finish(segment, region)`` is called once per finished segment with the view of ``out`` it
    covers, in the order segments finish; it may post-process the region in place.

    With ``out=None`` there is no canvas for the whole output (streaming): each segment gets a
    tensor of its own, handed over by ``take(segment)`` once finished, so memory follows the
    segments in flight instead of the length of the video. A non-causal video item is not one
    segment but a run of them ("rolling"): its tiles come in time order (ComfyUI's grid is
    time-major), so once the next tile starts at frame s, every frame before s has had all its tiles
    and leaves the accumulator, divided as ComfyUI divides it (the same elementwise arithmetic).
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
        self._taken: dict[Segment, torch.Tensor] = {}  # finished own-storage segments
        self.done: list[Segment] = []
        self.rolling = out is None and plan.kind == VIDEO and plan.passes == 1
        if self.rolling and any(b.out_start[0] < a.out_start[0] for item in range(plan.batch)
                                for a, b in zip(plan.tiles_of(item), plan.tiles_of(item)[1:])):
            raise ValueError("a rolling blend needs the tiles of each item in time order")

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
            if self.rolling and not t.whole:
                upto = seg.tiles[seg.next].out_start[0] if seg.next < len(seg.tiles) else seg.size[0]
                if upto > seg.lo:
                    finished.append(self._release(seg, t.batch, upto))
                if seg.next == len(seg.tiles):
                    self._finished.add((t.batch, step))
                    del self._segments[(t.batch, step)]
            elif seg.next == len(seg.tiles):
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
        if self.rolling and not tile.whole:
            self._accumulate(seg, start, fit, size, tile, pixels)
            return
        last_of_pass = (seg.next + 1 == len(seg.tiles)
                        or seg.tiles[seg.next + 1].pass_index != tile.pass_index)
        if tile.whole:
            result = pixels
        else:
            if seg.acc is None:
                seg.acc = torch.zeros((1, self.plan.out_shape[1]) + seg.size, device=self.device)
                seg.div = torch.zeros((1, 1) + seg.size, device=self.device)
            self._add_masked(seg, start, fit, size, tile, pixels)
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

    def _accumulate(self, seg: _SegmentState, start, fit, size, tile: Tile, pixels: torch.Tensor) -> None:
        """A rolling item's tile into the accumulator, which holds frames [seg.lo, the tile's end)."""
        end = start[0] + fit[0]
        have = seg.lo if seg.acc is None else seg.lo + seg.acc.shape[2]
        if end > have:  # frames this tile is the first to reach
            more = (end - have,) + seg.size[1:]
            acc = torch.zeros((1, self.plan.out_shape[1]) + more, device=self.device)
            div = torch.zeros((1, 1) + more, device=self.device)
            seg.acc = acc if seg.acc is None else torch.cat([seg.acc, acc], 2)
            seg.div = div if seg.div is None else torch.cat([seg.div, div], 2)
        self._add_masked(seg, (start[0] - seg.lo,) + tuple(start[1:]), fit, size, tile, pixels)

    def _add_masked(self, seg: _SegmentState, start, fit, size, tile: Tile, pixels: torch.Tensor) -> None:
        """``out += pixels*mask``, ``div += mask`` at ``start`` of the segment's accumulator."""
        mask = _cut(feather_mask(size, tile.feather), fit).to(self.device)
        acc, div = seg.acc, seg.div
        for d, (p, n) in enumerate(zip(start, fit)):
            acc = acc.narrow(d + 2, p, n)
            div = div.narrow(d + 2, p, n)
        acc.add_(pixels * mask)
        div.add_(mask)

    def _release(self, seg: _SegmentState, batch: int, upto: int) -> Segment:
        """Frames [seg.lo, upto) of a rolling item, finished: divided, handed over, dropped."""
        n = upto - seg.lo
        region = seg.acc.narrow(2, 0, n) / seg.div.narrow(2, 0, n)
        rest = seg.acc.shape[2] - n
        seg.acc = seg.acc.narrow(2, n, rest).clone() if rest else None  # clones: let the released part go
        seg.div = seg.div.narrow(2, n, rest).clone() if rest else None
        segment = Segment(batch, 0, (seg.lo, upto))
        seg.lo = upto
        if self.finish is not None:
            self.finish(segment, region)
        self._taken[segment] = region
        self.done.append(segment)
        return segment

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
            self._taken[segment] = region
        self.done.append(segment)
        return segment

    def take(self, segment: Segment) -> torch.Tensor:
        """A finished segment's pixels ``[1, C, *size]`` when there is no canvas (handed over once)."""
        return self._taken.pop(segment)

    @property
    def complete(self) -> bool:
        return len(self._finished) == self.plan.batch * self.plan.steps
