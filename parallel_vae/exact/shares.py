"""Which latent rows each lane decodes in exact mode, and in how many bands.

Bands that run in lock-step (SD family) wait for each other at every GroupNorm, so the job takes
as long as its slowest lane: rows go to lanes in proportion to their measured speed. A lane holds
all its rows' activations at once (its bands are alive together between sync points), so its
free memory caps its rows; what a capped lane cannot take goes to the others. Within a lane, a
band holds at most ``band_rows`` rows (the tile_size bound on one conv's working set). The output
does not depend on any of this (bands exchange what crosses their edges).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from .geometry import MIN_BAND_ROWS, bands_of, split_rows


@dataclass(frozen=True)
class Terms:
    """One lane's terms for rows: relative speed, the most rows its memory holds (None: no
    limit), and the most rows of one band."""

    name: str
    speed: float = 1.0
    max_rows: Optional[int] = None
    band_rows: int = 1 << 30


@dataclass(frozen=True)
class Split:
    """Each lane given rows, by name, with its bands (a, e), top to bottom (lanes given none are
    left out)."""

    owners: tuple[tuple[str, tuple[tuple[int, int], ...]], ...]

    @property
    def spans(self) -> list[tuple[int, int]]:
        return [span for _, bands in self.owners for span in bands]

    @property
    def shares(self) -> tuple[tuple[str, int], ...]:
        """(lane, bands of each item): Plan.shares."""
        return tuple((name, len(bands)) for name, bands in self.owners)


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


def split(height: int, terms: Sequence[Terms]) -> Split:
    """Rows ``[0, height)`` over the lanes of ``terms`` top to bottom in their order. Where there are more lanes
    than the memory bound needs bands, a lane whose share would be under MIN_BAND_ROWS rows
    (bit-identity, see geometry) is left out, slowest first."""
    active = [t for t in terms if t.speed > 0] or list(terms[:1])
    need = -(-height // max(1, min(t.band_rows for t in active)))
    while True:
        speeds = [t.speed for t in active]
        caps = [float(t.max_rows) if t.max_rows is not None else math.inf for t in active]
        share = _fill(height, speeds, caps)
        rows = _whole(height, share)
        small = [i for i, r in enumerate(rows) if r < MIN_BAND_ROWS] if len(active) > need else []
        if len(active) == 1 or not small:
            break
        active.pop(min(small, key=lambda i: (active[i].speed, -i)))
    out, a = [], 0
    for t, n in zip(active, rows):
        if n == 0:
            continue
        count = min(n, -(-n // max(1, t.band_rows)))  # the memory bound wins over MIN_BAND_ROWS
        out.append((t.name, tuple((a + p, a + q) for p, q in split_rows(n, count))))
        a += n
    return Split(tuple(out))


def rows_by_lane(plan) -> dict[str, int]:
    """Input rows of each batch item (latent rows decoding, pixel rows encoding) per lane of an
    exact plan that shared them out."""
    bands, out, i = bands_of(plan, 0), {}, 0
    for name, count in plan.shares:
        out[name] = bands[i + count - 1].e - bands[i].a
        i += count
    return out


def describe(plan) -> str:
    """Rows per lane of an exact plan that shared them out, for the progress text:
    "cpu[0] 640 px rows in 2 bands, cpu[1] 384 px rows"."""
    px = 1 if plan.direction == "encode" else plan.scales[-2].factor
    counts = dict(plan.shares)
    return ", ".join(f"{name} {rows * px} px rows" + (f" in {counts[name]} bands" if counts[name] > 1 else "")
                     for name, rows in rows_by_lane(plan).items())


__all__ = ["Split", "Terms", "describe", "rows_by_lane", "split"]
