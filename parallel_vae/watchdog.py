"""Deadlines for workers that are alive but silent: past its deadline a busy worker is killed
and its units requeued, as if it had died.

A device's deadline is FACTOR times the slowest unit measured there recently (a unit is one
result: a tile, a band, a frame step), never below FLOOR_S, which also covers a device's first
unit. PARALLEL_VAE_UNIT_TIMEOUT (seconds) replaces the whole rule.
"""
from __future__ import annotations

import os
import time

UNIT_TIMEOUT_ENV = "PARALLEL_VAE_UNIT_TIMEOUT"
FLOOR_S = 300.0  # a big tile on one CPU thread takes minutes; a hang is forever
FACTOR = 10.0
DECAY = 0.8  # the slowest-unit memory fades, so one huge tile does not set deadlines for good


class Watchdog:
    """Per device name: the last sign of life while busy, and the slowest recent unit."""

    def __init__(self):
        self.unit_s: dict[str, float] = {}
        self.since: dict[str, float] = {}

    def deadline(self, name: str) -> float:
        override = os.environ.get(UNIT_TIMEOUT_ENV)
        if override:
            return float(override)
        return max(FLOOR_S, FACTOR * self.unit_s.get(name, 0.0))

    def started(self, name: str) -> None:
        """An idle worker was given work: its clock starts now."""
        self.since[name] = time.monotonic()

    def heard(self, name: str, unit_done: bool) -> None:
        now = time.monotonic()
        if unit_done and name in self.since:
            self.unit_s[name] = max(now - self.since[name], DECAY * self.unit_s.get(name, 0.0))
        self.since[name] = now

    def silent_s(self, name: str) -> float:
        return time.monotonic() - self.since.get(name, time.monotonic())
