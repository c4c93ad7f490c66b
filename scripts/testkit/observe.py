"""Watching the pack's decodes from outside (tests and benchmarks): every unit the node reports to
ComfyUI's progress (NodeProgress.unit), in arrival order, with the lane and process that decoded
it. Installed on the node's progress reporter for as long as the context lasts; nothing of it
ships with the pack."""
from __future__ import annotations

import contextlib
import time
from typing import Optional


class Decodes:
    """``last``: the latest decode's units as an engine.Report; ``first_unit_at``: when its first
    unit reached the node (time.monotonic())."""

    def __init__(self, report_class):
        self.report_class = report_class
        self.last = None
        self.first_unit_at: Optional[float] = None

    def started(self):
        self.last, self.first_unit_at = self.report_class(), None
        return self.last

    def unit(self, report, decoded) -> None:
        if self.first_unit_at is None and report is self.last:
            self.first_unit_at = time.monotonic()
        report.units.append((decoded.tile.index, decoded.step, decoded.by, decoded.pid))


@contextlib.contextmanager
def decodes(pack):
    """``with decodes(pack) as seen: ...``: ``seen.last`` after each decode (``pack``: the pack as
    ComfyUI imported it, testkit.comfy_env.load_pack)."""
    progress = pack.nodes.progress.NodeProgress
    seen = Decodes(pack.parallel_vae.engine.Report)
    init, unit = progress.__init__, progress.unit

    def started(self, *args, **kwargs):
        self._observed = seen.started()
        init(self, *args, **kwargs)

    def counted(self, decoded):
        seen.unit(self._observed, decoded)
        unit(self, decoded)

    progress.__init__, progress.unit = started, counted
    try:
        yield seen
    finally:
        progress.__init__, progress.unit = init, unit
