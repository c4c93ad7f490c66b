"""Parse the node's ``devices`` string into the lanes that decode.

Accepted (case-insensitive, comma-separated where it makes sense):
  auto          every visible CUDA device; the CPU when there is none
  cpu           one CPU lane using all of torch's threads
  cpu:N         N CPU worker processes sharing the cores (1 <= N <= max(4, 2 x cores))
  cuda          every visible CUDA device
  cuda:I[,...]  the listed CUDA devices, each at most once ("cuda:0,cuda:2")
Items may be mixed ("cuda:0,cpu"). A device that is not visible is an error listing the visible ones.

One device named as ``cpu`` or a single CUDA device decodes in ComfyUI's own process (no copy of
the VAE, ComfyUI's memory management); ``cpu:N`` (even ``cpu:1``) and two or more devices decode
on persistent worker processes, one per device (``uses_workers``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from .errors import InputError

SYNTAX = "use auto, cpu, cpu:N, cuda, or a list such as cuda:0,cuda:1"


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" | "cuda"
    index: int  # CUDA ordinal, or the CPU lane number
    lanes: int = 1  # CPU lanes sharing the cores (the same for every lane of one cpu:N)
    pooled: bool = field(default=False, compare=False)  # named as cpu:N: worker processes, even N=1

    @property
    def torch_device(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    @property
    def name(self) -> str:
        """How progress text names the lane: cuda:1, cpu, or cpu[0] of cpu:2."""
        if self.kind == "cuda":
            return f"cuda:{self.index}"
        return "cpu" if self.lanes == 1 else f"cpu[{self.index}]"


def cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def visible(cuda_devices: int) -> list[str]:
    return ["cpu"] + [f"cuda:{i}" for i in range(cuda_devices)]


def parse(spec: str, cuda_devices: Optional[int] = None, cpu_cores: Optional[int] = None) -> list[Device]:
    """Devices named by ``spec``; raises InputError("devices", ...) when they are not usable."""
    if not isinstance(spec, str):
        raise InputError("devices", f"must be a string, got {type(spec).__name__}; {SYNTAX}")
    if cuda_devices is None:
        cuda_devices = cuda_count()
    if cpu_cores is None:
        cpu_cores = os.cpu_count() or 1
    seen = visible(cuda_devices)
    items = [p.strip().lower() for p in spec.split(",")]
    if items == [""] or items == ["auto"]:
        if cuda_devices:
            return [Device("cuda", i) for i in range(cuda_devices)]
        return [Device("cpu", 0)]
    out: list[Device] = []
    cpu_items = 0
    for item in items:
        if item == "":
            raise InputError("devices", f"{spec!r} has an empty item; {SYNTAX}")
        if item == "auto":
            raise InputError("devices", f"'auto' cannot be combined with other devices in {spec!r}")
        cpu_items += item == "cpu" or item.startswith("cpu:")
        if cpu_items > 1:
            raise InputError("devices", f"{spec!r} names the CPU more than once; use one cpu or cpu:N item")
        if item == "cpu":
            out.append(Device("cpu", 0))
        elif item.startswith("cpu:"):
            n = _number(item[4:], item, spec)
            limit = cpu_lane_limit(cpu_cores)
            if not 1 <= n <= limit:
                raise InputError("devices", f"{item!r} asks for {n} CPU lanes; this machine has {cpu_cores} "
                                            f"cores, so use cpu:1..cpu:{limit} (lanes beyond the cores "
                                            f"share them)")
            out += [Device("cpu", i, n, pooled=True) for i in range(n)]
        elif item == "cuda":
            if not cuda_devices:
                raise InputError("devices", f"'cuda' was asked for but no CUDA device is visible "
                                            f"(visible: {', '.join(seen)})")
            out += [Device("cuda", i) for i in range(cuda_devices)]
        elif item.startswith("cuda:"):
            i = _number(item[5:], item, spec)
            if i >= cuda_devices:
                raise InputError("devices", f"{item} is not visible (visible: {', '.join(seen)})")
            out.append(Device("cuda", i))
        else:
            raise InputError("devices", f"{item!r} is not a device; {SYNTAX}")
    names = [d.name for d in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError("devices", f"{spec!r} names {', '.join(dupes)} more than once")
    return out


def cpu_lane_limit(cpu_cores: int) -> int:
    """More lanes than cores only share the cores (one torch thread each); twice is plenty."""
    return max(4, 2 * cpu_cores)


def uses_workers(devices: list[Device]) -> bool:
    return len(devices) > 1 or any(d.pooled for d in devices)


def _number(text: str, item: str, spec: str) -> int:
    if not text.isdigit():
        raise InputError("devices", f"{item!r} in {spec!r} needs a whole number after the colon; {SYNTAX}")
    return int(text)
