"""Run bands that exchange GroupNorm statistics and conv edge rows in lock-step.

Every band is a generator (sd.SdExact.band) that yields a request at each sync point: a
``StatsRequest`` (the moments of its rows), answered with the global (mean, rstd), or a
``RowsRequest`` (its edge rows), answered with (the band above's bottom rows, the band below's top
rows), or a ``GatherRequest`` (its rows of a tensor every band reads whole), answered with the
whole. A band may also yield a ``threads.Output`` (what it gives on the way: a decoder call's
frames), which ``drive`` collects from every band; ``drive`` drives bands in one thread;
``answers`` answers bands that are a whole batch item.
In a worker whose bands are part of an item, ``report`` makes the record for the parent (which
holds every worker's part) and ``answers_from`` turns the parent's reply into each band's answer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator, Optional, Sequence, Union

import torch

from .. import protocol as msgs
from ..errors import DecodeError
from . import stats
from .threads import Output


@dataclass(frozen=True)
class StatsRequest:
    """A band reached GroupNorm ``k`` (named ``name``): its rows' moments."""

    k: int
    name: str
    eps: float
    moments: stats.Moments


@dataclass(frozen=True)
class RowsRequest:
    """A band reached the conv at sync point ``k``: the rows its neighbours' convs read."""

    k: int
    name: str
    top: torch.Tensor
    bottom: torch.Tensor


@dataclass(frozen=True)
class GatherRequest:
    """A band reached a layer that reads every row (global attention): its own rows of ``part``;
    answered with the whole item's, bands in order (concatenated along the rows)."""

    k: int
    name: str
    part: torch.Tensor


Request = Union[StatsRequest, RowsRequest, GatherRequest]


def check_same(requests: Sequence[Request]) -> None:
    keys = {(type(r).__name__, r.k, r.name) for r in requests}
    if len(keys) != 1:
        raise DecodeError(f"exact mode: bands fell out of step at {sorted(keys)}")


def neighbours(tops: Sequence, bottoms: Sequence, above=None, below=None) -> list:
    """(rows above, rows below) for each of contiguous bands (or groups of bands) whose edge rows
    are ``tops`` and ``bottoms``; ``above`` and ``below`` are what lies beyond the first and the
    last (None at the image's edge)."""
    n = len(tops)
    return [(bottoms[i - 1] if i else above, tops[i + 1] if i + 1 < n else below) for i in range(n)]


def rows_to_wire(rows: torch.Tensor) -> tuple:
    """Edge rows as plain data: (bytes, shape, dtype name); any dtype, any device."""
    raw = rows.detach().contiguous().cpu()
    return raw.view(torch.uint8).numpy().tobytes(), tuple(raw.shape), str(raw.dtype).removeprefix("torch.")


def rows_from_wire(wire: Optional[tuple], device) -> Optional[torch.Tensor]:
    if wire is None:
        return None
    data, shape, dtype = wire
    if not data:  # no rows (a band whose neighbour reads none of it); frombuffer refuses empty buffers
        return torch.empty(shape, dtype=getattr(torch, dtype), device=device)
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(getattr(torch, dtype))
    return flat.reshape(shape).to(device)


def answers(requests: Sequence[Request]) -> list:
    """Each band's answer, for bands that are the whole item, in band order."""
    check_same(requests)
    if isinstance(requests[0], RowsRequest):
        return neighbours([r.top for r in requests], [r.bottom for r in requests])
    if isinstance(requests[0], GatherRequest):
        whole = torch.cat([r.part for r in requests], -2)
        return [whole] * len(requests)
    shared = stats.combine([r.moments for r in requests], requests[0].eps)
    return [shared] * len(requests)


def report(job_id: int, key: int, requests: Sequence[Request]) -> msgs.Record:
    """What a worker's group of bands sends the parent at a sync point: the moments of each band,
    or the top rows of its first band and the bottom rows of its last."""
    check_same(requests)
    first, last = requests[0], requests[-1]
    if isinstance(first, RowsRequest):
        return msgs.GroupRows(job_id, key, first.k, first.name, rows_to_wire(first.top), rows_to_wire(last.bottom))
    if isinstance(first, GatherRequest):
        return msgs.GroupPart(job_id, key, first.k, first.name, rows_to_wire(torch.cat([r.part for r in requests], -2)))
    return msgs.GroupStats(job_id, key, first.k, first.name, first.eps, [r.moments.as_wire() for r in requests])


def answers_from(requests: Sequence[Request], shared: msgs.Record) -> list:
    """Each band's answer from the parent's SharedRows (its neighbours' rows) or SharedStats."""
    if isinstance(shared, msgs.SharedWhole):
        return [rows_from_wire(shared.whole, requests[0].part.device)] * len(requests)
    if isinstance(shared, msgs.SharedRows):
        device = requests[0].top.device
        return neighbours([r.top for r in requests], [r.bottom for r in requests],
                          rows_from_wire(shared.above, device), rows_from_wire(shared.below, device))
    mean = torch.frombuffer(bytearray(shared.mean), dtype=torch.float64).reshape(shared.shape)
    rstd = torch.frombuffer(bytearray(shared.rstd), dtype=torch.float64).reshape(shared.shape)
    return [(mean, rstd)] * len(requests)


def drive(bands: Sequence[Generator], between: Optional[Callable[[], None]] = None,
          answer: Callable[[Sequence[Request]], list] = answers) -> Generator[list, None, list]:
    """Drive ``bands`` to the end: yields every band's output on the way (``threads.Output``, e.g.
    the frames of one decoder call), in band order, each time they all gave one; returns what each
    band returned (SD's: its pixels). ``between`` runs after each sync point (interrupt checks);
    ``answer`` turns the bands' requests into one answer per band (in a worker: a round trip to the
    parent, which also has the other workers' bands). Closing it (an error, an interrupt) closes
    every band."""
    requests: list = [None] * len(bands)
    results: list = [None] * len(bands)
    try:
        for i, g in enumerate(bands):
            requests[i] = _advance(g, None, results, i)
        while any(r is not None for r in requests):
            if any(r is None for r in requests):
                raise DecodeError("exact mode: a band finished before the others")
            if isinstance(requests[0], Output):
                if not all(isinstance(r, Output) for r in requests):
                    raise DecodeError("exact mode: bands fell out of step at an output")
                replies = [None] * len(bands)
                out, requests = [r.value for r in requests], [None] * len(bands)
                yield out
                del out
            else:
                replies = answer(requests)
                requests = [None] * len(bands)  # drop the edge rows before the bands go on
            for i, g in enumerate(bands):
                requests[i] = _advance(g, replies[i], results, i)
                replies[i] = None
            if between is not None:
                between()
        return results
    finally:
        for g in bands:
            g.close()


def _advance(gen: Generator, value, results: list, i: int):
    try:
        return gen.send(value)
    except StopIteration as stop:
        results[i] = stop.value
        return None
