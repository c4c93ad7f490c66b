"""What lanes measured on earlier jobs: each lane's speed in exact bands (per model, and across
models for the lanes' relative speeds) and a lock-step round trip; exact rows are shared by the
relative speeds (exact/shares.py), lane counts chosen from the absolute ones (gate.py)."""
from __future__ import annotations

from typing import Optional, Sequence


def model_key(fingerprint: str, direction: str) -> str:
    """What rates are kept by: a model's decode and encode count different positions (latent, pixels)."""
    return f"{fingerprint}:{direction}"


def _mean(old: Optional[float], new: float) -> float:
    return new if old is None else 0.5 * (old + new)


class Speeds:
    """Latent positions per busy second (less waits on lock-step partners) of each lane, averaged
    over the jobs so far: ``rates`` by lane (any model), ``of(model)`` by lane for one model; and
    ``round_s``, a lock-step round's cost (None until measured)."""

    def __init__(self):
        self.rates: dict[str, float] = {}
        self.by_model: dict[str, dict[str, float]] = {}
        self.round_s: Optional[float] = None
        self.last_round_s: Optional[float] = None  # the latest job's alone
        self._job_round: Optional[float] = None

    def rated(self, name: str, positions: int, busy_s: float, model: Optional[str] = None) -> None:
        if busy_s > 0 and positions > 0:
            rate = positions / busy_s
            self.rates[name] = _mean(self.rates.get(name), rate)
            if model is not None:
                mine = self.by_model.setdefault(model, {})
                mine[name] = _mean(mine.get(name), rate)

    def synced(self, waited_s: float, rounds: int) -> None:
        """One lane's waits on its partners over ``rounds`` sync points. The lane that reaches a
        round last waits only the round trip, so the least wait per round of a job's lanes bounds
        the round trip from above (``job_done`` keeps it)."""
        if rounds > 0:
            per = waited_s / rounds
            self._job_round = per if self._job_round is None else min(self._job_round, per)

    def job_done(self) -> None:
        if self._job_round is not None:
            self.round_s = _mean(self.round_s, self._job_round)
            self.last_round_s = self._job_round
        self._job_round = None

    def of(self, model: str) -> dict[str, float]:
        return dict(self.by_model.get(model, {}))

    def relative(self, names: Sequence[str]) -> dict[str, float]:
        """Speeds of ``names`` relative to their mean (1.0 each until measured; one not measured
        counts as the mean of those that were)."""
        known = [self.rates[n] for n in names if n in self.rates]
        if not known:
            return dict.fromkeys(names, 1.0)
        mean = sum(known) / len(known)
        return {n: self.rates.get(n, mean) / mean for n in names}


__all__ = ["Speeds", "model_key"]
