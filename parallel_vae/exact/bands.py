"""Exact bands of one batch item, decoded in the calling thread (in ComfyUI's process, or in a
worker for the bands the parent gave it).

Every executor's bands exchange what crosses their edges (statistics, conv edge rows, attention
keys), so they run in lock-step (every band's state is alive at each exchange point): ``answer``
answers each sync point, here from these bands alone (they are the whole item) or in a worker
through the parent, which holds every worker's bands. Wan's decode bands give their frames after
each decoder call (each band's causal cache of its own rows alive, together the size of one
whole-frame cache).

Out of memory on a band: every band is split in two and the item decoded again, skipping what was
already delivered; the output does not depend on the band count, so this changes nothing but the
memory. Bands in lock-step with other workers cannot rewind alone: there the error goes back to
the parent, which decodes the item again with every band split (``work.split``).
"""
from __future__ import annotations

import gc
from typing import Callable, Iterator, Optional, Sequence

import torch

from ..errors import DecodeError
from ..heap import HEAP
from . import lockstep
from .geometry import Band, split_rows

Unit = tuple  # (band's tile index, step, pixels on the device)


def run(ex, work, latent: torch.Tensor, tiles: Sequence[int], answer: Optional[Callable] = None,
        poll: Optional[Callable[[], None]] = None,
        empty_cache: Callable[[], None] = lambda: None) -> Iterator[Unit]:
    """(band, step, pixels) of the bands ``tiles`` (of one batch item) of ``work`` (units.Work)."""
    batch = work.boxes[tiles[0]][0]
    if any(work.boxes[t][0] != batch for t in tiles):
        raise ValueError("an exact group's bands must belong to one batch item")
    z = latent.narrow(0, batch, 1)
    r = getattr(ex, "in_rows", 1)  # encoding: the boxes are pixel rows, the bands latent rows
    bands = [Band(t, a // r, -(-e // r)) for t, a, e in map(work.band, tiles)]
    # several bands in threads of their own (Wan's decode): their buffers must not stay in per-thread arenas
    cpu = ex.device.type == "cpu"
    with HEAP.bands_running(getattr(ex, "gives_back_turns", False) and cpu and len(bands) > 1), \
            HEAP.reusing_blocks(getattr(ex, "reuse_blocks", False) and cpu):
        if answer is not None:
            yield from attempt(ex, z, bands, work.split, poll, answer)
        else:
            yield from item_results(ex, z, bands, poll, empty_cache)


def sub_bands(band: Band, split: int) -> list[tuple[int, int]]:
    return [(band.a + p, band.a + q) for p, q in split_rows(band.e - band.a, split)]


def item_results(ex, z: torch.Tensor, bands: Sequence[Band], poll=None,
                 empty_cache: Callable[[], None] = lambda: None) -> Iterator[Unit]:
    """Each (band, step) of ``bands`` once; out of memory splits every band in two and decodes
    the item again, skipping what was delivered."""
    delivered: set = set()
    split = 1
    while True:
        try:
            for index, step, pixels in attempt(ex, z, bands, split, poll):
                if (index, step) not in delivered:
                    delivered.add((index, step))
                    yield index, step, pixels
            return
        except torch.OutOfMemoryError as e:
            if split >= min(b.rows for b in bands):
                raise DecodeError(f"exact mode ran out of memory even with bands of one latent row: {e}; "
                                  f"use mode=tiled with a smaller tile_size") from e
            split *= 2
            gc.collect()
            empty_cache()


def attempt(ex, z, bands: Sequence[Band], split: int = 1, poll=None,
            answer: Optional[Callable] = None) -> Iterator[Unit]:
    """(band, step, pixels) of ``bands`` of one batch item ``z``, each band cut into ``split``
    sub-bands (concatenated again); ``answer`` answers the bands' sync points (GroupNorm
    statistics, conv edge rows, attention keys); by default these bands are the whole item."""
    return _lockstep_item(ex, z, bands, split, poll, answer or lockstep.answers)


def _lockstep_item(ex, z, bands: Sequence[Band], split: int, poll, answer) -> Iterator[Unit]:
    mid = ex.prefix(z)
    pieces = [(band.index, sub_bands(band, split)) for band in bands]
    gens = [ex.band(mid, p, q) for _, subs in pieces for p, q in subs]
    del mid  # each band holds its own rows of it
    driven = lockstep.drive(gens, between=poll, answer=answer)
    step = 0
    while True:  # bands that give frames on the way (Wan): each decoder call's, band by band
        try:
            outputs = next(driven)
        except StopIteration as end:
            results = end.value
            break
        given = iter(outputs)
        for index, subs in pieces:
            parts = [next(given) for _ in subs]  # each sub-band's frames of this call
            for j in range(len(parts[0])):
                yield index, step + j, _joined([p[j] for p in parts])
        step += len(outputs[0])
        del outputs, given, parts
    if step:
        return
    done = iter(results)
    for index, subs in pieces:
        yield index, 0, _joined([next(done) for _ in subs])


def _joined(parts: list) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, -2)
