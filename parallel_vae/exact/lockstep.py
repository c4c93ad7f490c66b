"""Run bands that exchange GroupNorm statistics and conv edge rows in lock-step, in one thread.

Every band is a generator (sd.SdExact.band) that yields a request at each sync point:
("gn", k, name, eps, Moments), answered with the global (mean, rstd), or
("rows", k, name, top, bottom), answered with (the band above's bottom rows, the band below's top
rows). The coordinator checks that all bands reached the same sync point and answers each band.
"""
from __future__ import annotations

from typing import Callable, Generator, Optional, Sequence

import torch

from ..errors import DecodeError
from . import stats


def check_same(requests: Sequence[tuple]) -> None:
    keys = {(r[0], r[1], r[2]) for r in requests}
    if len(keys) != 1:
        raise DecodeError(f"exact mode: bands fell out of step at {sorted(keys)}")


def neighbours(tops: Sequence, bottoms: Sequence, above=None, below=None) -> list:
    """(rows above, rows below) for each of contiguous bands (or groups of bands) whose edge rows
    are ``tops`` and ``bottoms``; ``above`` and ``below`` are what lies beyond the first and the
    last (None at the image's edge)."""
    n = len(tops)
    return [(bottoms[i - 1] if i else above, tops[i + 1] if i + 1 < n else below) for i in range(n)]


def band_neighbours(requests: Sequence[tuple], above=None, below=None) -> list:
    """``neighbours`` of the bands' "rows" requests."""
    return neighbours([r[3] for r in requests], [r[4] for r in requests], above, below)


def rows_to_wire(rows: torch.Tensor) -> tuple:
    """Edge rows as plain data: (bytes, shape, dtype name); any dtype, any device."""
    raw = rows.detach().contiguous().cpu()
    return raw.view(torch.uint8).numpy().tobytes(), tuple(raw.shape), str(raw.dtype).removeprefix("torch.")


def rows_from_wire(wire: Optional[tuple], device) -> Optional[torch.Tensor]:
    if wire is None:
        return None
    data, shape, dtype = wire
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(getattr(torch, dtype))
    return flat.reshape(shape).to(device)


def answers(requests: Sequence[tuple]) -> list:
    """Each band's answer, for bands that are the whole item, in band order."""
    check_same(requests)
    if requests[0][0] == "rows":
        return band_neighbours(requests)
    shared = stats.combine([r[4] for r in requests], requests[0][3])
    return [shared] * len(requests)


def run(bands: Sequence[Generator], between: Optional[Callable[[], None]] = None,
        answer: Callable[[Sequence[tuple]], list] = answers) -> list:
    """Drive ``bands`` to the end; returns each band's pixels. ``between`` runs after each sync
    point (interrupt checks); ``answer`` turns the bands' requests into one answer per band (in a
    worker: a round trip to the parent, which also has the other workers' bands)."""
    requests: list = [None] * len(bands)
    results: list = [None] * len(bands)
    for i, g in enumerate(bands):
        requests[i] = _advance(g, None, results, i)
    while any(r is not None for r in requests):
        if any(r is None for r in requests):
            raise DecodeError("exact mode: a band finished before the others")
        replies = answer(requests)
        requests = [None] * len(bands)  # drop the edge rows before the bands go on
        for i, g in enumerate(bands):
            requests[i] = _advance(g, replies[i], results, i)
            replies[i] = None
        if between is not None:
            between()
    return results


def _advance(gen: Generator, value, results: list, i: int):
    try:
        return gen.send(value)
    except StopIteration as stop:
        results[i] = stop.value
        return None
