"""units -> blend: the decode loop, independent of ComfyUI and of where the units are decoded.

A backend (backends.py) yields every unit of a plan once as ``units.Decoded``, decoded in this
process or on workers; the blender applies them in plan order whatever order they arrive in, so
the output does not depend on the backend.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from .blend import Blender, Segment
from .errors import DecodeError
from .plan import Plan
from .units import Decoded


@dataclass
class Report:
    """What happened in one decode: which lane and process decoded each unit, in arrival order."""

    units: list[tuple[int, int, str, int]] = field(default_factory=list)  # (tile, step, lane, pid)

    def pids(self) -> set[int]:
        return {pid for *_, pid in self.units}

    def per_lane(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, _, lane, _ in self.units:
            counts[lane] = counts.get(lane, 0) + 1
        return counts


def _blend_all(plan: Plan, latent: torch.Tensor, units: Iterator[Decoded], blender: Blender, report: Report,
               on_unit: Optional[Callable[[Decoded], None]]) -> Iterator[list[Segment]]:
    """Blend every unit of ``plan``; yields the segments each unit finished."""
    if tuple(latent.shape) != plan.in_shape:
        raise ValueError(f"latent shape {tuple(latent.shape)} does not match the plan's {plan.in_shape}")
    with torch.inference_mode():
        try:
            for unit in units:
                finished = blender.add(unit.tile.index, unit.step, unit.pixels, borrowed=unit.borrowed)
                report.units.append((unit.tile.index, unit.step, unit.by, unit.pid))
                unit.pixels = None
                if on_unit is not None:
                    on_unit(unit)
                if finished:
                    yield finished
        finally:
            close = getattr(units, "close", None)
            if close is not None:
                close()  # cancels the job in the workers when we stop early
    if not blender.complete:
        raise DecodeError("decoding ended before every tile was blended")


def decode(plan: Plan, latent: torch.Tensor, units: Iterator[Decoded], out: torch.Tensor,
           finish: Optional[Callable[[Segment, torch.Tensor], None]] = None,
           on_unit: Optional[Callable[[Decoded], None]] = None) -> Report:
    """Blend every unit of ``plan`` (``units``: a backend's results) into ``out`` (``[B, C, *axes]``).

    ``finish`` post-processes each finished segment in place; ``on_unit`` runs after each unit
    (progress, and the place where an interrupt may raise).
    """
    report = Report()
    for _ in _blend_all(plan, latent, units, Blender(plan, out, finish), report, on_unit):
        pass
    return report


def segments(plan: Plan, latent: torch.Tensor, units: Iterator[Decoded], report: Report,
             finish: Optional[Callable[[Segment, torch.Tensor], None]] = None,
             on_unit: Optional[Callable[[Decoded], None]] = None) -> Iterator[tuple[Segment, torch.Tensor]]:
    """Blend ``plan`` without a canvas for the whole output: yields each finished segment with
    its own pixels ``[1, C, *size]`` as soon as its last tile is blended (in finishing order)."""
    blender = Blender(plan, None, finish)
    for finished in _blend_all(plan, latent, units, blender, report, on_unit):
        for segment in finished:
            yield segment, blender.take(segment)


def frame_range(plan: Plan, segment: Segment) -> tuple[int, int]:
    """The frames a segment covers in the flattened output (ComfyUI's IMAGE batch index)."""
    if segment.frames is None:
        return segment.batch, segment.batch + 1
    per_batch = plan.frames // plan.batch
    return segment.batch * per_batch + segment.frames[0], segment.batch * per_batch + segment.frames[1]
