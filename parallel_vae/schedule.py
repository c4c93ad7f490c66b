"""Which unit of work runs when.

A unit is (tile, step): a whole tile for image and generic video plans (step 0), one latent
frame of one spatial tile for causal video. One in-process lane walks causal plans step-major
(every tile's step s before any tile's step s+1), so frames finish in order and each step's
blending buffer stays one step long; the price is one causal cache per spatial tile alive at once.
"""
from __future__ import annotations

from typing import Iterator

from .plan import CAUSAL, Plan, Tile


def in_process_order(plan: Plan) -> Iterator[tuple[Tile, int]]:
    if plan.kind != CAUSAL:
        for tile in plan.tiles:
            yield tile, 0
        return
    for batch in range(plan.batch):
        tiles = plan.tiles_of(batch)
        for step in range(plan.steps):
            for tile in tiles:
                yield tile, step
