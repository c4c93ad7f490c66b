"""An exact-mode task inside a worker: the bands it was given, decoded with the family's executor.

GroupNorm families answer their sync points through ``answer`` (a round trip to the parent, which
combines every worker's statistics in row order and passes edge rows between neighbours); an
out-of-memory error goes back to the parent, which decodes the item again with every band split
(the lock-step cannot rewind one band).
Wan bands exchange nothing, so a worker splits its own bands when memory runs out.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from . import local


def band_rows(plan: dict, index: int) -> tuple[int, int, int]:
    """(index, a, e) of a band tile in a wire plan (jobs.wire_plan)."""
    _, start, size = plan["tiles"][index]
    axis = 1 if plan["causal"] else 0
    return index, start[axis], start[axis] + size[axis]


def run(ex, plan: dict, latent: torch.Tensor, tiles: Sequence[int], answer: Callable,
        empty_cache: Callable[[], None] = lambda: None) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(band index, step, pixels on the device) of this task's bands, all of one batch item."""
    batch = plan["tiles"][tiles[0]][0]
    if any(plan["tiles"][t][0] != batch for t in tiles):
        raise ValueError("an exact task's bands must belong to one batch item")
    z = latent.narrow(0, batch, 1)
    bands = [band_rows(plan, t) for t in tiles]
    if ex.sync == "groupnorm":
        return local.attempt(ex, z, bands, int(plan.get("split", 1)), answer=answer)
    return local.item_results(ex, z, bands, order="frame", empty_cache=empty_cache)
