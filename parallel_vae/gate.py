"""How many lanes an exact job uses: sharding only where it pays.

A lock-step job costs its share of the work on the slowest lane plus a round trip at every sync
point (GroupNorm statistics, conv edge rows, the attention's keys and values), and a fixed start
(the latent out, the results back). On a small latent the rounds cost more than the lanes save,
so such a job runs on fewer lanes, or in ComfyUI's own process (no round trips at all). The
model, per batch item:

    in-process:  work / local_rate
    k lanes:     work / (sum of the k fastest lanes' rates) + rounds x round_s + start_s

``work`` is the input positions (bands exchange their edges, so every position is computed once,
whatever k). Rates are positions per second, as measured on
earlier jobs of the same model; before any measurement nothing is known, and every lane is used
(the first job measures them). A lane count is chosen only when it is ``MIN_GAIN`` faster than
fewer lanes, so measurement noise does not flip between choices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

MIN_GAIN = 0.10  # more lanes must be this much faster than fewer
# CPU workers share the cores: n single-threaded workers together do more than one process on
# all of them (threads in one conv scale worse than processes), measured 1.25x at n = 2; the prior
# that links the two sides while only one was measured
CPU_SPLIT_GAIN = 1.25


@dataclass(frozen=True)
class Costs:
    """What is known of a backend's lanes for one model: each lane's rate (latent positions per
    second; missing: not measured), the in-process rate (None: not measured), a round trip, a start."""

    rates: Mapping[str, float]
    local_rate: Optional[float]
    round_s: float
    start_s: float
    cpu_lanes: int = 0  # lanes that are CPU workers sharing this machine's cores


@dataclass(frozen=True)
class Choice:
    """The lanes to use, fastest first (empty: in ComfyUI's own process), and why, for the progress text."""

    lanes: tuple[str, ...]
    why: str
    seconds: Optional[float] = None  # the model's estimate for the choice (None: nothing measured)

    @property
    def in_process(self) -> bool:
        return not self.lanes


def local_prior(costs: Costs, lanes: Sequence[str]) -> Optional[float]:
    """The in-process rate where only the lanes were measured: one GPU lane's (ComfyUI's device is
    one of them), or all the CPU workers' together less their split gain."""
    known = [costs.rates[n] for n in lanes if n in costs.rates]
    if len(known) < len(lanes):
        return None
    return sum(known) / CPU_SPLIT_GAIN if costs.cpu_lanes > 1 else max(known)


def worker_prior(costs: Costs) -> Optional[float]:
    """A lane's rate where only in-process decodes were measured."""
    if costs.local_rate is None:
        return None
    if costs.cpu_lanes > 1:
        return costs.local_rate * CPU_SPLIT_GAIN / costs.cpu_lanes
    return costs.local_rate


def choose(lanes: Sequence[str], costs: Costs, rounds: int, work: float, size: str,
           pinned: bool = False) -> Choice:
    """The lanes for one job of ``work`` positions with ``rounds`` sync points; ``size`` names the
    job in the reason ("256x256")."""
    n = len(lanes)
    if pinned:
        return Choice(tuple(lanes), f"all {n} lanes: pinned")
    rates = {name: costs.rates.get(name) or worker_prior(costs) for name in lanes}
    if n < 2 or any(r is None for r in rates.values()):
        return Choice(tuple(lanes), f"all {n} lanes: their speeds are not measured yet" if n > 1 else "")
    local = costs.local_rate or local_prior(costs, lanes)
    order = sorted(lanes, key=lambda name: -rates[name])
    best_k, best_s = 0, work / local
    for k in range(2, n + 1):
        s = work / sum(rates[name] for name in order[:k]) + rounds * costs.round_s + costs.start_s
        if s < best_s * (1 - MIN_GAIN):
            best_k, best_s = k, s
    if best_k == n:
        return Choice(tuple(order), "", best_s)
    if best_k == 0:
        return Choice((), f"in-process: {size} is too small to gain from {n} lanes", best_s)
    return Choice(tuple(order[:best_k]), f"{best_k} of {n} lanes: {size} is too small to gain from more", best_s)


__all__ = ["Choice", "Costs", "MIN_GAIN", "choose"]
