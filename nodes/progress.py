"""ComfyUI progress for one decode: the bar advances per unit of work, a text line counts per lane,
every unit is a point where ComfyUI's interrupt button stops the decode, and the browser gets
previews and tile-map events (live.py)."""
from __future__ import annotations

import time

import comfy.model_management
import comfy.utils
from ..parallel_vae.plan import Plan
from .live import LiveView

TEXT_INTERVAL_S = 0.25  # progress text is a websocket message per update: keep it to a few per second


def send_text(text: str, node_id) -> None:
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None and node_id is not None:
        server.send_progress_text(text, node_id)


class NodeProgress:
    def __init__(self, plan: Plan, node_id, lanes: list[str], note: str = "", sized: str = ""):
        self.total = plan.units
        self.node_id = node_id
        self.done = dict.fromkeys(lanes, 0)
        self.note = note
        self.bar = comfy.utils.ProgressBar(self.total, node_id=node_id)
        self.live = LiveView(plan, node_id, self.done, sized)
        self._preview = None  # goes out with the next progress update, not as a message of its own
        self._last_text = 0.0
        self.text()

    def text(self) -> str:
        parts = ", ".join(f"{lane} {n}/{self.total}" for lane, n in self.done.items())
        line = f"{parts}{f' ({self.note})' if self.note else ''}"
        self._last_text = time.monotonic()
        send_text(line, self.node_id)
        return line

    @staticmethod
    def poll() -> None:
        """Raises InterruptProcessingException (and clears the flag) when the user pressed cancel."""
        comfy.model_management.throw_exception_if_processing_interrupted()

    def unit(self, unit) -> None:
        """After each decoded unit (a units.Decoded): count it for the lane that decoded it."""
        self.poll()
        self.done[unit.by] += 1
        preview, self._preview = self._preview, None
        self.bar.update_absolute(self.bar.current + 1, None, preview)
        self.live.unit(unit)
        if time.monotonic() - self._last_text >= TEXT_INTERVAL_S or sum(self.done.values()) == self.total:
            self.text()

    def frames(self, frames) -> None:
        """Finished frames ``[n, H, W, C]`` (post-processed), reported from the blender's finish
        hook: their preview (rate-limited) rides on the progress update of the unit that finished them."""
        preview = self.live.frames_ready(frames)
        if preview is not None:
            self._preview = preview

    def finish(self) -> None:
        self.live.finish()
