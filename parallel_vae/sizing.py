"""tile_size 0 ("auto"): the largest tile each device can hold, from its free memory and an
estimate of the decode's memory per output pixel.

The estimate is linear, ``fixed + per_px * pixels`` bytes for one tile (the ComfyUI side fits it to
ComfyUI's own ``memory_used_decode`` of the VAE). A device may use ``FRACTION`` of its free memory
for one tile; the tile is the largest multiple of ``STEP`` pixels that fits on every device, within
the node's tile_size bounds. ``PARALLEL_VAE_MEMORY_LIMIT`` (MiB, for every device or per device name)
caps free memory: the tests drive the choice with it, and a user can keep headroom for other work.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from .devices import Device
from .plan import TILE_MAX, TILE_MIN

MEMORY_LIMIT_ENV = "PARALLEL_VAE_MEMORY_LIMIT"
FRACTION = 0.6  # of a device's free memory for one tile: the rest is margin for the estimate's error
STEP = 32  # the widget's step


@dataclass(frozen=True)
class Cost:
    """Bytes one tile's decode needs: ``fixed + per_px * output pixels``."""

    fixed: float
    per_px: float

    def bytes(self, tile: int) -> float:
        return self.fixed + self.per_px * tile * tile


@dataclass(frozen=True)
class Choice:
    tile_size: int
    why: str  # for the progress text: "auto 384 px: cpu 5.1 GiB free, ~8.5 KiB/px"


def limit_bytes(name: str = "") -> Optional[int]:
    """The cap on a device's free memory: PARALLEL_VAE_MEMORY_LIMIT is MiB for every device
    ("6000"), or per device name ("cuda:0=4000,cuda:1=20000": headroom on the GPU the diffusion
    model shares); a device not named has no cap."""
    raw = (os.environ.get(MEMORY_LIMIT_ENV) or "").strip()
    if not raw:
        return None
    if "=" not in raw:
        return int(float(raw) * 2**20)
    for item in raw.split(","):
        key, _, value = item.partition("=")
        if key.strip() == name:
            return int(float(value) * 2**20)
    return None


def cpu_available() -> int:
    """MemAvailable (Linux), else psutil's view, else total/2."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // 2


def free_bytes(device: Device, cpu_workers: int = 1, own: Optional[int] = None) -> int:
    """Free memory for the lane on ``device``: CUDA's free memory on that GPU, or the available RAM
    shared by ``cpu_workers``; ``own`` replaces the measurement (ComfyUI's view for its own
    device); the environment's limit caps it."""
    free = own if own is not None else measured_free(device.torch_device, cpu_workers)
    return capped(device.name, free)


def measured_free(torch_device: str, cpu_workers: int = 1) -> int:
    """Free memory for one lane on ``torch_device`` (cpu, cuda:N) of this machine, uncapped: a Ray
    actor measures its own machine with it, and the parent caps it by the lane's name."""
    if torch_device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(torch_device))[0])
    return cpu_available() // max(1, cpu_workers)


def capped(name: str, free: int) -> int:
    """``free`` bytes of the device ``name`` under the environment's limit for it."""
    limit = limit_bytes(name)
    return min(free, limit) if limit is not None else free


def max_pixels(cost: Cost, free: int) -> float:
    """Output pixels one decode on a device with ``free`` bytes may hold (inf: no per-pixel cost)."""
    budget = FRACTION * free - cost.fixed
    if budget <= 0:
        return 0.0
    return budget / cost.per_px if cost.per_px > 0 else math.inf


def largest_tile(cost: Cost, free: int) -> int:
    pixels = max_pixels(cost, free)
    if pixels == math.inf:
        return TILE_MAX
    side = int(math.sqrt(pixels)) // STEP * STEP
    return max(TILE_MIN, min(TILE_MAX, side))


def choose(cost: Cost, frees: Sequence[tuple[str, int]]) -> Choice:
    """The tile for every device: the smallest of each one's largest."""
    sides = [(largest_tile(cost, free), name, free) for name, free in frees]
    tile, name, free = min(sides)
    why = (f"auto {tile} px: {name} has {free / 2**30:.1f} GiB free, about {cost.per_px / 1024:.1f} KiB "
           f"per pixel{' + %.0f MiB' % (cost.fixed / 2**20) if cost.fixed >= 2**20 else ''}")
    if tile == TILE_MIN and FRACTION * free < cost.bytes(TILE_MIN):
        why += f" (even {TILE_MIN} px may not fit)"
    return Choice(tile, why)
