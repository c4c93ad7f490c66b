"""Run bands that exchange GroupNorm statistics in lock-step, in one thread (one device).

Every band is a generator (sd.SdExact.band) that yields ("gn", k, name, eps, Moments) and waits
for (mean, rstd). The coordinator checks that all bands reached the same GroupNorm, combines
their moments in band order and sends every band the same statistics.
"""
from __future__ import annotations

from typing import Callable, Generator, Optional, Sequence

from ..errors import DecodeError
from . import stats


def check_same(requests: Sequence[tuple]) -> None:
    keys = {(r[1], r[2]) for r in requests}
    if len(keys) != 1:
        raise DecodeError(f"exact mode: bands fell out of step at GroupNorm {sorted(keys)}")


def combined(requests: Sequence[tuple]):
    """(mean, rstd) for the bands' requests, in the order given (band order)."""
    check_same(requests)
    return stats.combine([r[4] for r in requests], requests[0][3])


def run(bands: Sequence[Generator], between: Optional[Callable[[], None]] = None,
        combine: Callable[[Sequence[tuple]], tuple] = combined) -> list:
    """Drive ``bands`` to the end; returns each band's pixels. ``between`` runs after each
    GroupNorm (interrupt checks); ``combine`` turns the bands' requests into the shared
    statistics (in a worker: a round trip to the parent, which also has the other workers' bands)."""
    requests: list = [None] * len(bands)
    results: list = [None] * len(bands)
    for i, g in enumerate(bands):
        requests[i] = _advance(g, None, results, i)
    while any(r is not None for r in requests):
        if any(r is None for r in requests):
            raise DecodeError("exact mode: a band finished before the others")
        answer = combine(requests)
        for i, g in enumerate(bands):
            requests[i] = _advance(g, answer, results, i)
        if between is not None:
            between()
    return results


def _advance(gen: Generator, value, results: list, i: int):
    try:
        return gen.send(value)
    except StopIteration as stop:
        results[i] = stop.value
        return None
