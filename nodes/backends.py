"""ComfyUI's side of the backends: which backend a ``devices`` value names (chosen here, once per
prompt, and nowhere else), the worker processes and Ray lanes kept between prompts, and what
ComfyUI's "free" and the /parallel_vae/workers route reach.

- one device (``cpu``, or a single GPU): ComfyUI's own process (parallel_vae.backends.InProcess);
- ``cpu:N`` or several devices: local worker processes, one per device, reused while the device
  list is the same;
- ``ray``, ``ray:cpu:N``: actors on the Ray cluster (one cluster lookup per prompt), reused while
  the cluster's lanes are the same.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Optional

import torch

import comfy.model_management as mm
from ..parallel_vae import devices as device_lists
from ..parallel_vae.backends import Backend, InProcess, LocalWorkers, RayLanes, WorkerLanes
from ..parallel_vae.devices import Device
from ..parallel_vae.pool import WorkerPool
from ..parallel_vae.processes import Processes
from ..parallel_vae.ray_workers import RayActors
from ..parallel_vae.workers import WorkerSpec
from . import compat, ray_lanes

log = logging.getLogger("parallel_vae")

THREADS_ENV = "PARALLEL_VAE_CPU_THREADS"  # torch threads per CPU worker (default: cores / CPU workers)
IMPORTS = ["comfy.sd"]  # what a worker imports before its first record (ComfyUI's loader)

_local: Optional[LocalWorkers] = None
_ray: Optional[RayLanes] = None
_ray_key = None
_lock = threading.Lock()


def backend_for(devices: list[Device]) -> Backend:
    """The backend for these devices (``devices.parse``'s list)."""
    if device_lists.uses_ray(devices):
        return _ray_lanes(devices[0])
    if device_lists.uses_workers(devices):
        return _local_workers(devices)
    return _in_process(devices[0])


def _in_process(device: Device) -> InProcess:
    return InProcess(device, free=lambda torch_device: int(mm.get_free_memory(torch.device(torch_device))))


def in_process_for(devices: list[Device]) -> InProcess:
    """ComfyUI's own process, for a job the gate keeps off these devices' workers: on the CPU for
    CPU workers, else on ComfyUI's device where it is one of those named (the first named if not)."""
    own = mm.get_torch_device()
    if all(d.kind == "cpu" for d in devices) or device_lists.uses_ray(devices):
        on_gpu = device_lists.uses_ray(devices) and own.type == "cuda"
        return _in_process(Device("cuda", own.index or 0) if on_gpu else Device("cpu", 0))
    cudas = [d for d in devices if d.kind == "cuda"]
    mine = next((d for d in cudas if own.type == "cuda" and d.index == (own.index or 0)), cudas[0])
    return _in_process(Device("cuda", mine.index))


def _cuda_ordinals() -> list[str]:
    """Physical ids behind this process's cuda:0, cuda:1, ... (respects CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(i) for i in range(torch.cuda.device_count())]
    return [v.strip() for v in visible.split(",") if v.strip()]


def worker_specs(devices: list[Device]) -> list[WorkerSpec]:
    """One local worker per device: a GPU pinned by CUDA_VISIBLE_DEVICES, or a CPU worker with its
    share of the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cpu_workers = sum(d.kind == "cpu" for d in devices)
    cpu_threads = int(os.environ.get(THREADS_ENV) or 0) or max(1, cores // max(1, cpu_workers))
    specs = []
    for d in devices:
        if d.kind == "cuda":
            ordinals = _cuda_ordinals()
            physical = ordinals[d.index] if d.index < len(ordinals) else str(d.index)
            specs.append(WorkerSpec(d.name, "cuda:0", threads=1, env=(("CUDA_VISIBLE_DEVICES", physical),)))
        else:
            specs.append(WorkerSpec(d.name, "cpu", threads=cpu_threads, env=compat.CPU_WORKER_ENV,
                                    setup=compat.CPU_WORKER_SETUP))
    return specs


def _local_workers(devices: list[Device]) -> LocalWorkers:
    global _local
    specs = worker_specs(devices)
    with _lock:
        if _local is not None and _local.pool.specs != specs:
            log.info("parallel_vae: devices changed; stopping workers for %s", ", ".join(_local.lanes))
            _local.shutdown()
            _local = None
        if _local is None:
            _local = LocalWorkers(devices, WorkerPool(specs, Processes([compat.COMFY_ROOT]), IMPORTS))
        return _local


def _ray_lanes(device: Device) -> RayLanes:
    """The actors for this value and this cluster's current machines, reused while they are the
    same (a machine that joined makes new lanes for the next prompt)."""
    global _ray, _ray_key
    ray = ray_lanes.connect()
    specs = ray_lanes.lane_specs(ray, device)
    key = (ray.get_runtime_context().gcs_address, tuple(specs))
    with _lock:
        if _ray is not None and _ray_key != key:
            log.info("parallel_vae: Ray lanes changed; stopping actors for %s", ", ".join(_ray.lanes))
            _ray.shutdown()
            _ray = None
        if _ray is None:
            _ray, _ray_key = RayLanes(WorkerPool(specs, RayActors([compat.COMFY_ROOT]), IMPORTS)), key
        return _ray


def local_pool() -> Optional[WorkerPool]:
    """The local worker processes' pool, once a prompt used them."""
    return _local.pool if _local is not None else None


def ray_pool() -> Optional[WorkerPool]:
    """The Ray lanes' pool, once a prompt used them."""
    return _ray.pool if _ray is not None else None


def _kept() -> list[WorkerLanes]:
    return [b for b in (_local, _ray) if b is not None]


def report() -> dict:
    """The workers for the /parallel_vae/workers route (no pool yet: none), and under "ray" the
    Ray lanes' actors once a prompt used them."""
    out = _local.report() if _local is not None else {"busy": False, "workers": []}
    if _ray is not None:
        out["ray"] = _ray.report()
    return out


def release(why: str) -> int:
    """Stop the workers and actors once the running decode ends, giving back all they hold
    (ComfyUI's "free" and the stop route); the next decode starts them again. Returns how many ran."""
    running = sum(b.release() for b in _kept())
    if running:
        log.info("parallel_vae: stopped %d worker(s) (%s)", running, why)
    return running


def release_soon(why: str) -> None:
    """``release`` in a thread: a decode may be running, and the caller is the server's loop."""
    threading.Thread(target=release, args=(why,), daemon=True, name="pvae-release").start()


def shutdown() -> None:
    """Stop the workers and actors now, and forget them (tests; they also stop when ComfyUI exits)."""
    global _local, _ray, _ray_key
    with _lock:
        for b in _kept():
            b.shutdown()
        _local, _ray, _ray_key = None, None, None
