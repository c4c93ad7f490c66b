"""What the browser sees while a decode runs: JPEG previews of decoded frames through ComfyUI's
preview channel, and ``parallel_vae.*`` events for the tile map (docs/STREAM_PROTOCOL.md).

Everything here is rate-limited: each message is a websocket frame to every open editor.
"""
from __future__ import annotations

import time
from typing import Optional

from ..parallel_vae.plan import Plan
from ..parallel_vae.video import to_uint8

PREVIEW_INTERVAL_S = 0.25  # at most ~4 preview frames per second
EVENT_INTERVAL_S = 0.25
PREVIEW_SIZE = 512  # longest side of a preview, as ComfyUI's own previews


def server():
    try:
        from server import PromptServer
    except ImportError:
        return None
    return getattr(PromptServer, "instance", None)


def _prompt_id() -> Optional[str]:
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    context = get_executing_context()
    return getattr(context, "prompt_id", None)


def send_event(name: str, data: dict) -> None:
    instance = server()
    if instance is not None:
        instance.send_sync(f"parallel_vae.{name}", data, instance.client_id)


def preview_image(frame) -> "object":
    """``[H, W, C]`` float 0..1 -> the PIL image ComfyUI's preview channel takes (8-bit as saved)."""
    from PIL import Image

    return Image.fromarray(to_uint8(frame[None])[0])


class LiveView:
    """Events and previews of one decode on node ``node_id``."""

    def __init__(self, plan: Plan, node_id, done: dict[str, int], sized: str = ""):
        self.plan, self.node_id = plan, node_id
        self.enabled = node_id is not None and server() is not None
        self.prompt_id = _prompt_id()
        self.done = done  # units per lane, counted by the caller (NodeProgress)
        self.per_tile = len(plan.tiles) // plan.batch
        self.changed: dict[int, tuple[str, int]] = {}  # tile (of the first batch item) -> (lane, steps)
        self.steps: dict[int, int] = {}
        self.frames_done = 0
        self.started = time.monotonic()
        self._last_event = 0.0
        self._last_preview = float("-inf")  # the first finished frames are always previewed
        out = plan.out_shape
        if self.enabled:
            send_event("plan", {**self._ids(), "width": out[-1], "height": out[-2], "frames": plan.frames,
                                "tiles": [[*self._rect(t), t.pass_index] for t in plan.tiles_of(0)],
                                "steps": plan.steps, "lanes": list(done), "units": plan.units, "mode": plan.mode,
                                "sized": sized})

    def _ids(self) -> dict:
        return {"node": str(self.node_id), "prompt_id": self.prompt_id}

    @staticmethod
    def _rect(tile) -> tuple[int, int, int, int]:
        return tile.out_start[-1], tile.out_start[-2], tile.out_size[-1], tile.out_size[-2]

    def unit(self, unit) -> None:
        """After the caller counted ``unit`` for its lane: remember its tile, send progress if due."""
        index = unit.tile.index % self.per_tile
        self.steps[index] = self.steps.get(index, 0) + 1
        self.changed[index] = (unit.by, self.steps[index])
        if self.enabled and time.monotonic() - self._last_event >= EVENT_INTERVAL_S:
            self._progress()

    def _progress(self) -> None:
        self._last_event = time.monotonic()
        tiles = [[i, lane, steps] for i, (lane, steps) in sorted(self.changed.items())]
        self.changed.clear()
        send_event("progress", {**self._ids(), "done": dict(self.done), "units": self.plan.units,
                                "tiles": tiles, "frames_done": self.frames_done})

    def frames_ready(self, frames):
        """Decoded frames ``[n, H, W, C]``: counted; returns a preview of the last one when it is
        time for one (ComfyUI's preview tuple), else None."""
        self.frames_done += frames.shape[0]
        now = time.monotonic()
        if not self.enabled or now - self._last_preview < PREVIEW_INTERVAL_S:
            return None
        self._last_preview = now
        return ("JPEG", preview_image(frames[-1]), PREVIEW_SIZE)

    def finish(self) -> None:
        if not self.enabled:
            return
        self._progress()
        send_event("done", {**self._ids(), "seconds": round(time.monotonic() - self.started, 3),
                            "done": dict(self.done), "frames": self.frames_done})
