"""Pressing ComfyUI's cancel button at a moment a test chooses by what the decode did (units
reported, lock-step rounds), never by a clock: a quiet machine may finish before any clock runs
out, and CI's is slower."""
from __future__ import annotations

import threading
import time
from typing import Callable, Optional


class Press:
    """A thread that presses cancel once ``ready()`` is true; ``at`` is when it pressed."""

    def __init__(self, ready: Callable[[], bool], timeout: float = 300.0):
        self.at: Optional[float] = None
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(ready, timeout), daemon=True).start()

    def _run(self, ready, timeout: float) -> None:
        import comfy.model_management as mm

        deadline = time.monotonic() + timeout
        while not ready() and not self._done.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._done.is_set() and ready():
            self.at = time.monotonic()
            mm.interrupt_current_processing(True)

    def stop(self) -> None:
        """No press after this; the interrupt flag is cleared, so a missed press cannot reach the
        next test."""
        import comfy.model_management as mm

        self._done.set()
        mm.interrupt_current_processing(False)
