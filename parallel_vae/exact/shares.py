"""Which latent rows each device decodes in exact mode, and in how many bands.

Bands that run in lock-step (SD family) wait for each other at every GroupNorm, so the job takes
as long as its slowest device: rows go to devices in proportion to their measured speed. A device
holds all its rows' activations at once (its bands are alive together between sync points), so
its free memory caps its rows; what a capped device cannot take goes to the others. Within a
device, a band holds at most ``band_rows`` rows (the tile_size bound on one conv's working set).
The output does not depend on any of this (bands exchange what crosses their edges).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from .geometry import MIN_BAND_ROWS, bands_of, split_rows


@dataclass(frozen=True)
class LaneShare:
    """One device's terms: relative speed, the most rows its memory holds (None: no limit), and
    the most rows of one band."""

    name: str
    speed: float = 1.0
    max_rows: Optional[int] = None
    band_rows: int = 1 << 30


@dataclass(frozen=True)
class Split:
    """Each lane given rows, with its bands (a, e), top to bottom (lanes given none are left out)."""

    lanes: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]

    @property
    def spans(self) -> list[tuple[int, int]]:
        return [span for _, bands in self.lanes for span in bands]


def _fill(height: int, speeds: Sequence[float], caps: Sequence[float]) -> list[float]:
    """Water-filling: shares proportional to speed, none above its cap; fractional rows. When
    every lane is full, the rows go in proportion to the caps (the OOM path splits bands then)."""
    n = len(speeds)
    share = [0.0] * n
    open_ = set(range(n))
    left = float(height)
    while open_ and left > 1e-9:
        total = sum(speeds[i] for i in open_)
        over = [i for i in open_ if left * speeds[i] / total > caps[i]]
        if not over:
            for i in open_:
                share[i] = left * speeds[i] / total
            return share
        for i in over:
            share[i] = caps[i]
            left -= caps[i]
            open_.discard(i)
    if left > 1e-9:
        cap_total = sum(caps)
        return [height * c / cap_total for c in caps]
    return share


def _whole(height: int, share: Sequence[float]) -> list[int]:
    """Integer rows summing to ``height``: floors, then the largest remainders (ties: top first)."""
    rows = [int(math.floor(s)) for s in share]
    order = sorted(range(len(share)), key=lambda i: (rows[i] - share[i], i))
    for i in order[: height - sum(rows)]:
        rows[i] += 1
    return rows


def split(height: int, lanes: Sequence[LaneShare]) -> Split:
    """Rows ``[0, height)`` over ``lanes`` top to bottom in their order. Where there are more lanes
    than the memory bound needs bands, a lane whose share would be under MIN_BAND_ROWS rows
    (bit-identity, see geometry) is left out, slowest first."""
    active = [lane for lane in lanes if lane.speed > 0] or list(lanes[:1])
    need = -(-height // max(1, min(lane.band_rows for lane in active)))
    while True:
        speeds = [lane.speed for lane in active]
        caps = [float(lane.max_rows) if lane.max_rows is not None else math.inf for lane in active]
        share = _fill(height, speeds, caps)
        rows = _whole(height, share)
        small = [i for i, r in enumerate(rows) if r < MIN_BAND_ROWS] if len(active) > need else []
        if len(active) == 1 or not small:
            break
        active.pop(min(small, key=lambda i: (active[i].speed, -i)))
    out, a = [], 0
    for lane, n in zip(active, rows):
        if n == 0:
            continue
        count = min(n, -(-n // max(1, lane.band_rows)))  # the memory bound wins over MIN_BAND_ROWS
        out.append((lane.name, tuple((a + p, a + q) for p, q in split_rows(n, count))))
        a += n
    return Split(tuple(out))


def describe(plan) -> str:
    """Rows per device of an exact plan that shared them out, for the progress text:
    "cpu[0] 640 px rows in 2 bands, cpu[1] 384 px rows"."""
    bands, parts, i = bands_of(plan, 0), [], 0
    px = plan.scales[-2].factor
    for name, count in plan.lanes:
        own = bands[i:i + count]
        i += count
        rows = (own[-1][2] - own[0][1]) * px
        parts.append(f"{name} {rows} px rows" + (f" in {count} bands" if count > 1 else ""))
    return ", ".join(parts)


__all__ = ["LaneShare", "Split", "describe", "split"]
