"""Parse the node's ``devices`` string into the devices that decode (each the lane of one backend).

Accepted (case-insensitive, comma-separated where it makes sense):
  auto          every visible CUDA device; the CPU when there is none
  cpu           one CPU lane using all of torch's threads
  cpu:N         N CPU worker processes sharing the cores (1 <= N <= max(4, 2 x cores))
  cuda          every visible CUDA device
  cuda:I[,...]  the listed CUDA devices, each at most once ("cuda:0,cuda:2")
Items may be mixed ("cuda:0,cpu"). A device that is not visible is an error listing the visible ones.
  ray           one lane per GPU of the Ray cluster ComfyUI attaches to (RAY_ADDRESS, or a local head)
  ray:cpu:N     N CPU lanes on every node of that cluster
A Ray item stands alone; the cluster is reached when the node runs (nodes/ray_pool.py), not here.

One device named as ``cpu`` or a single CUDA device decodes in ComfyUI's own process (no copy of
the VAE, ComfyUI's memory management); ``cpu:N`` (even ``cpu:1``) and two or more devices decode
on persistent worker processes, one per device (``uses_workers``). nodes/backends.py makes the
choice, once per prompt.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from .errors import InputError

SYNTAX = "use auto, cpu, cpu:N, cuda, a list such as cuda:0,cuda:1, ray, or ray:cpu:N"
RAY_CPU_MAX = 64  # CPU lanes per node


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" | "cuda" | "ray" (the lanes of a Ray cluster, found when the node runs)
    index: int  # CUDA ordinal, the CPU worker's number, or a Ray value's CPU lanes per node (0: GPUs)
    cpu_share: int = 1  # CPU workers sharing the cores (the same for every device of one cpu:N)
    pooled: bool = False  # named as cpu:N: worker processes, even N=1 (so cpu:1 is not cpu)

    @property
    def torch_device(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    @property
    def name(self) -> str:
        """The lane's name in progress text: cuda:1, cpu, or cpu[0] of cpu:2."""
        if self.kind == "cuda":
            return f"cuda:{self.index}"
        if self.kind == "ray":
            return f"ray:cpu:{self.index}" if self.index else "ray"
        return "cpu" if self.cpu_share == 1 else f"cpu[{self.index}]"


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
    if any(item == "ray" or item.startswith("ray:") for item in items):
        return [_ray(items, spec)]
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
            limit = cpu_worker_limit(cpu_cores)
            if not 1 <= n <= limit:
                raise InputError("devices", f"{item!r} asks for {n} CPU workers; this machine has {cpu_cores} "
                                            f"cores, so use cpu:1..cpu:{limit} (workers beyond the cores "
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


def _ray(items: list[str], spec: str) -> Device:
    """``ray`` (GPU lanes, index 0) or ``ray:cpu:N`` (index N): the whole value, alone."""
    if len(items) > 1:
        raise InputError("devices", f"{spec!r}: a Ray item stands alone (the cluster already holds this "
                                    f"machine's devices when it is a node)")
    item = items[0]
    if item == "ray":
        return Device("ray", 0, pooled=True)
    if not item.startswith("ray:cpu:"):
        raise InputError("devices", f"{item!r} is not a Ray device; use ray (every GPU of the cluster) or "
                                    f"ray:cpu:N (N CPU lanes per node)")
    n = _number(item[len("ray:cpu:"):], item, spec)
    if not 1 <= n <= RAY_CPU_MAX:
        raise InputError("devices", f"{item!r} asks for {n} CPU lanes per node; use ray:cpu:1..ray:cpu:{RAY_CPU_MAX}")
    return Device("ray", n, pooled=True)


def uses_ray(devices: list[Device]) -> bool:
    return any(d.kind == "ray" for d in devices)


def cpu_worker_limit(cpu_cores: int) -> int:
    """More CPU workers than cores only share the cores (one torch thread each); twice is plenty."""
    return max(4, 2 * cpu_cores)


def uses_workers(devices: list[Device]) -> bool:
    return len(devices) > 1 or any(d.pooled for d in devices)


def _number(text: str, item: str, spec: str) -> int:
    if not text.isdigit():
        raise InputError("devices", f"{item!r} in {spec!r} needs a whole number after the colon; {SYNTAX}")
    return int(text)
