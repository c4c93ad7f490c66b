"""Exact mode on one device, in the calling thread: each batch item's bands one after another.

GroupNorm families run their bands in lock-step (every band's state is alive at each GroupNorm);
Wan runs band by band (``order="tile"``: one band's causal cache alive at a time, the prefix's
outputs kept) or frame by frame (``order="frame"``, for streams: every band's cache alive).

Out of memory on a band: every band of the item is split in two and the item decoded again,
skipping what was already delivered; the output does not depend on the band count, so this
changes nothing but the memory.
"""
from __future__ import annotations

import gc
from typing import Callable, Iterator, Optional

import torch

from ..errors import DecodeError
from ..plan import Plan
from . import lockstep
from .geometry import bands_of, split_rows

Unit = tuple  # (tile, step, pixels)


def sub_bands(a: int, e: int, split: int) -> list[tuple[int, int]]:
    return [(a + p, a + q) for p, q in split_rows(e - a, split)]


def results(ex, plan: Plan, latent: torch.Tensor, out: Callable[[torch.Tensor], torch.Tensor],
            order: str = "tile", poll: Optional[Callable[[], None]] = None,
            empty_cache: Callable[[], None] = lambda: None) -> Iterator[Unit]:
    """Every (band tile, step) of ``plan`` once, pixels through ``out`` (cast, to the output device)."""
    for batch in range(plan.batch):
        for index, step, pixels in item_results(ex, latent.narrow(0, batch, 1), bands_of(plan, batch), order,
                                                poll, empty_cache):
            yield plan.tiles[index], step, out(pixels)


def item_results(ex, z: torch.Tensor, bands, order: str = "tile", poll=None,
                 empty_cache: Callable[[], None] = lambda: None) -> Iterator[Unit]:
    """(band index, step, pixels) of one batch item's ``bands``, each once; out of memory splits
    every band in two and decodes the item again, skipping what was delivered."""
    delivered: set = set()
    split = 1
    while True:
        try:
            for index, step, pixels in attempt(ex, z, bands, split, order, poll):
                if (index, step) not in delivered:
                    delivered.add((index, step))
                    yield index, step, pixels
            return
        except torch.OutOfMemoryError as e:
            if split >= min(e_ - a for _, a, e_ in bands):
                raise DecodeError(f"exact mode ran out of memory even with bands of one latent row: {e}; "
                                  f"use mode=tiled with a smaller tile_size") from e
            split *= 2
            gc.collect()
            empty_cache()


def attempt(ex, z, bands, split: int = 1, order: str = "tile", poll=None,
            answer: Callable = lockstep.answers) -> Iterator[Unit]:
    """(band index, step, pixels) of ``bands`` [(index, a, e)] of one batch item ``z``, each band cut
    into ``split`` sub-bands (concatenated again); ``answer`` answers the bands' sync points
    (GroupNorm statistics, conv edge rows)."""
    if ex.sync == "groupnorm":
        return _sd_item(ex, z, bands, split, poll, answer)
    return _wan_item(ex, z, bands, split, order, poll)


def _sd_item(ex, z, bands, split: int, poll, answer) -> Iterator[Unit]:
    mid = ex.prefix(z)
    pieces = [(index, sub_bands(a, e, split)) for index, a, e in bands]
    gens = [ex.band(mid, p, q) for _, subs in pieces for p, q in subs]
    del mid  # each band holds its own rows of it
    done = iter(lockstep.run(gens, between=poll, answer=answer))
    for index, subs in pieces:
        parts = [next(done) for _ in subs]
        yield index, 0, parts[0] if len(parts) == 1 else torch.cat(parts, -2)


def _wan_item(ex, z, bands, split: int, order: str, poll) -> Iterator[Unit]:
    height = z.shape[-2]

    def make(a, e):
        return [ex.band(p, q, height) for p, q in sub_bands(a, e, split)]

    def feed(subs, mid, n, first):
        per = [b.feed(mid, n, first) for b in subs]
        return [per[0][j] if len(per) == 1 else torch.cat([p[j] for p in per], -2) for j in range(n)]

    if order == "frame" or len(bands) == 1:
        states = [(index, make(a, e)) for index, a, e in bands]
        step = 0
        for mid, n, first in ex.chunks(z):
            for index, subs in states:
                for j, pixels in enumerate(feed(subs, mid, n, first)):
                    yield index, step + j, pixels
            step += n
            if poll is not None:
                poll()
        return
    calls = list(ex.chunks(z))  # the prefix once; every band reads it
    for index, a, e in bands:
        subs, step = make(a, e), 0
        for mid, n, first in calls:
            for j, pixels in enumerate(feed(subs, mid, n, first)):
                yield index, step + j, pixels
            step += n
            if poll is not None:
                poll()
