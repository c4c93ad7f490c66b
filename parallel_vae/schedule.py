"""Which unit of work runs when.

A unit is (tile, step): a whole tile for image and generic video plans (step 0), one latent
frame of one spatial tile for causal video. One in-process lane walks the plan tile by tile, and
a causal tile through all of its frames before the next tile starts: only one causal cache is
alive at a time (the device-memory profile of ComfyUI's own tiled decode), and every segment
still receives its tiles in plan order, so nothing waits in the reorder buffer. The price is that
each causal step's blending buffer stays open until the last tile has reached it.
"""
from __future__ import annotations

from typing import Iterator

from .plan import Plan, Tile


def in_process_order(plan: Plan) -> Iterator[tuple[Tile, int]]:
    for tile in plan.tiles:
        for step in range(plan.steps):
            yield tile, step
