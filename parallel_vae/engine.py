"""plan -> schedule -> lane -> blend: the decode loop, independent of ComfyUI."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional

import torch

from . import schedule
from .blend import Blender, Segment
from .errors import DecodeError
from .plan import CAUSAL, Plan, Tile


def latent_box(latent: torch.Tensor, tile: Tile) -> torch.Tensor:
    """The latent a tile decodes: ``[1, C, *tile.lat_size]`` (a view)."""
    box = latent.narrow(0, tile.batch, 1)
    for d, (p, n) in enumerate(zip(tile.lat_start, tile.lat_size)):
        box = box.narrow(d + 2, p, n)
    return box


class LocalLane:
    """Decodes in the calling thread on one device, with one decoder adapter."""

    def __init__(self, decoder, name: str):
        self.decoder = decoder
        self.name = name

    def run(self, plan: Plan, latent: torch.Tensor,
            order: Iterable[tuple[Tile, int]]) -> Iterator[tuple[Tile, int, torch.Tensor]]:
        streams: dict[int, Iterator[torch.Tensor]] = {}  # causal tiles in progress, by tile index
        for tile, step in order:
            if plan.kind != CAUSAL:
                yield tile, step, self.decoder.decode(latent_box(latent, tile))
                continue
            if step == 0:
                streams[tile.index] = self.decoder.steps(latent_box(latent, tile), plan.step_frames)
            try:
                pixels = next(streams[tile.index])
            except StopIteration:
                raise DecodeError(f"the VAE stopped after {step} of {plan.steps} latent frames "
                                  f"on tile {tile.index}") from None
            if step == plan.steps - 1:
                del streams[tile.index]  # frees the tile's causal cache
            yield tile, step, pixels


def decode(plan: Plan, latent: torch.Tensor, lane: LocalLane, out: torch.Tensor,
           finish: Optional[Callable[[Segment, torch.Tensor], None]] = None,
           on_unit: Optional[Callable[[str, Tile, int], None]] = None) -> Blender:
    """Decode every unit of ``plan`` on ``lane`` and blend into ``out`` (``[B, C, *axes]``).

    ``finish`` post-processes each finished segment in place; ``on_unit`` runs after each unit
    (progress, and the place where an interrupt may raise).
    """
    if tuple(latent.shape) != plan.latent_shape:
        raise ValueError(f"latent shape {tuple(latent.shape)} does not match the plan's {plan.latent_shape}")
    blender = Blender(plan, out, finish)
    with torch.inference_mode():
        for tile, step, pixels in lane.run(plan, latent, schedule.in_process_order(plan)):
            blender.add(tile.index, step, pixels)
            del pixels
            if on_unit is not None:
                on_unit(lane.name, tile, step)
    if not blender.complete:
        raise DecodeError("decoding ended before every tile was blended")
    return blender
