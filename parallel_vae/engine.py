"""plan -> lane(s) -> blend: the decode loop, independent of ComfyUI.

A lane is anything with ``results(plan, latent)`` yielding ``Decoded`` units: ``LocalLane``
decodes in the calling thread, ``PoolLane`` on persistent worker processes (pool.py). Either way
the blender applies tiles in plan order, so the output does not depend on the lane.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterator, Optional

import torch

from . import schedule
from .blend import Blender, Segment
from .errors import DecodeError
from .exact import local as exact_local
from .plan import CAUSAL, Plan, Tile


@dataclass
class Decoded:
    """The pixels of one unit: a tile, or one step of a causal tile."""

    lane: str
    tile: Tile
    step: int
    pixels: torch.Tensor
    pid: int
    borrowed: bool = False  # a view of a worker's slot, reused once the iterator advances


@dataclass
class Report:
    """What happened in one decode: which lane and process decoded each unit, in arrival order."""

    lanes: list[str]
    units: list[tuple[int, int, str, int]] = field(default_factory=list)  # (tile, step, lane, pid)
    first_unit_at: Optional[float] = None  # time.monotonic() when the first unit was blended

    def pids(self) -> set[int]:
        return {pid for *_, pid in self.units}

    def per_lane(self) -> dict[str, int]:
        counts = dict.fromkeys(self.lanes, 0)
        for _, _, lane, _ in self.units:
            counts[lane] = counts.get(lane, 0) + 1
        return counts


def latent_box(latent: torch.Tensor, tile: Tile) -> torch.Tensor:
    """The latent a tile decodes: ``[1, C, *tile.lat_size]`` (a view)."""
    return box_of(latent, tile.batch, tile.lat_start, tile.lat_size)


def box_of(latent: torch.Tensor, batch: int, start, size) -> torch.Tensor:
    box = latent.narrow(0, batch, 1)
    for d, (p, n) in enumerate(zip(start, size)):
        box = box.narrow(d + 2, p, n)
    return box


class LocalLane:
    """Decodes in the calling thread on one device, with one decoder adapter; ``context()`` is
    entered around each decode call (ComfyUI's CUDA device context). Exact plans need the family's
    band executor (``exact``); ``poll`` runs between their GroupNorm steps (interrupt checks)."""

    def __init__(self, decoder, name: str, context: Callable[[], ContextManager] = contextlib.nullcontext,
                 exact=None, poll: Optional[Callable[[], None]] = None,
                 empty_cache: Callable[[], None] = lambda: None):
        self.decoder = decoder
        self.name = name
        self.names = [name]
        self.context = context
        self.exact = exact
        self.poll = poll
        self.empty_cache = empty_cache

    def results(self, plan: Plan, latent: torch.Tensor, order: str = "tile") -> Iterator[Decoded]:
        pid = os.getpid()
        if plan.exact:
            yield from self._exact(plan, latent, order, pid)
            return
        streams: dict[int, Iterator[torch.Tensor]] = {}  # causal tiles in progress, by tile index
        for tile, step in schedule.in_process_order(plan, order):
            if plan.kind != CAUSAL:
                with self.context():
                    pixels = self.decoder.decode(latent_box(latent, tile))
                yield Decoded(self.name, tile, step, pixels, pid)
                continue
            if step == 0:
                streams[tile.index] = self.decoder.steps(latent_box(latent, tile), plan.step_frames)
            try:
                with self.context():
                    pixels = next(streams[tile.index])
            except StopIteration:
                raise DecodeError(f"the VAE stopped after {step} of {plan.steps} latent frames "
                                  f"on tile {tile.index}") from None
            if step == plan.steps - 1:
                del streams[tile.index]  # frees the tile's causal cache
            yield Decoded(self.name, tile, step, pixels, pid)


    def _exact(self, plan: Plan, latent: torch.Tensor, order: str, pid: int) -> Iterator[Decoded]:
        if self.exact is None:
            raise DecodeError("this lane has no exact executor for the VAE")
        units = exact_local.results(self.exact, plan, latent, self.decoder._out, order, self.poll, self.empty_cache)
        while True:
            with self.context():
                unit = next(units, None)
            if unit is None:
                return
            tile, step, pixels = unit
            yield Decoded(self.name, tile, step, pixels, pid)


class PoolLane:
    """Decodes on a WorkerPool's processes; ``poll`` runs while waiting (the interrupt check)."""

    def __init__(self, pool, source, poll: Callable[[], None] = lambda: None):
        self.pool = pool
        self.source = source
        self.poll = poll
        self.names = pool.names

    def results(self, plan: Plan, latent: torch.Tensor, order: str = "tile") -> Iterator[Decoded]:
        return self.pool.run(plan, latent, self.source, self.poll, order=order)


def _blend_all(plan: Plan, latent: torch.Tensor, lane, blender: Blender, report: Report, order: str,
               on_unit: Optional[Callable[[Decoded], None]]) -> Iterator[list[Segment]]:
    """Blend every unit of ``plan`` decoded on ``lane``; yields the segments each unit finished."""
    if tuple(latent.shape) != plan.latent_shape:
        raise ValueError(f"latent shape {tuple(latent.shape)} does not match the plan's {plan.latent_shape}")
    with torch.inference_mode():
        results = lane.results(plan, latent, order)
        try:
            for unit in results:
                finished = blender.add(unit.tile.index, unit.step, unit.pixels, borrowed=unit.borrowed)
                report.units.append((unit.tile.index, unit.step, unit.lane, unit.pid))
                if report.first_unit_at is None:
                    report.first_unit_at = time.monotonic()
                unit.pixels = None
                if on_unit is not None:
                    on_unit(unit)
                if finished:
                    yield finished
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()  # cancels the job in the workers when we stop early
    if not blender.complete:
        raise DecodeError("decoding ended before every tile was blended")


def decode(plan: Plan, latent: torch.Tensor, lane, out: torch.Tensor,
           finish: Optional[Callable[[Segment, torch.Tensor], None]] = None,
           on_unit: Optional[Callable[[Decoded], None]] = None, order: str = "tile") -> Report:
    """Decode every unit of ``plan`` on ``lane`` and blend into ``out`` (``[B, C, *axes]``).

    ``finish`` post-processes each finished segment in place; ``on_unit`` runs after each unit
    (progress, and the place where an interrupt may raise).
    """
    report = Report(list(lane.names))
    for _ in _blend_all(plan, latent, lane, Blender(plan, out, finish), report, order, on_unit):
        pass
    return report


def segments(plan: Plan, latent: torch.Tensor, lane, report: Report,
             finish: Optional[Callable[[Segment, torch.Tensor], None]] = None,
             on_unit: Optional[Callable[[Decoded], None]] = None,
             order: str = "frame") -> Iterator[tuple[Segment, torch.Tensor]]:
    """Decode ``plan`` without a canvas for the whole output: yields each finished segment with
    its own pixels ``[1, C, *size]`` as soon as its last tile is blended (in finishing order)."""
    blender = Blender(plan, None, finish)
    for finished in _blend_all(plan, latent, lane, blender, report, order, on_unit):
        for segment in finished:
            yield segment, blender.take(segment)


def frame_range(plan: Plan, segment: Segment) -> tuple[int, int]:
    """The frames a segment covers in the flattened output (ComfyUI's IMAGE batch index)."""
    if segment.frames is None:
        return segment.batch, segment.batch + 1
    per_batch = plan.frames // plan.batch
    return segment.batch * per_batch + segment.frames[0], segment.batch * per_batch + segment.frames[1]
