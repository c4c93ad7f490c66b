"""ComfyUI's side of the worker pool: which workers to start, and how they rebuild ComfyUI's VAE.

Workers build the VAE with ComfyUI's own loader (``comfy.sd.VAE(sd=..., metadata=...)``, what
VAELoader calls) from weights the pool places in shared memory once per VAE, with the file's
metadata where ComfyUI recorded it, and check the result against the parent's model
(identity.signature) before decoding with it. The engine never imports ComfyUI: these recipes
name the loader, and the worker imports it by name.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import weakref

import torch

import comfy.sd
import comfy.model_management as mm
from ..parallel_vae import identity
from ..parallel_vae.devices import Device
from ..parallel_vae.pool import ModelSource, WorkerPool, WorkerSpec
from ..parallel_vae.spec import VaeSpec
from . import compat

log = logging.getLogger("parallel_vae")

COMFY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(comfy.sd.__file__)))

_fingerprints: "weakref.WeakKeyDictionary[object, str]" = weakref.WeakKeyDictionary()
_pool: WorkerPool | None = None
_pool_lock = threading.Lock()


def fingerprint(vae) -> str:
    """A content hash of the VAE's weights (class, metadata, keys, dtypes, shapes, bytes), cached per object.

    Two VAE objects with the same weights share workers' copies; changed weights never do.
    """
    fp = _fingerprints.get(vae)
    if fp is None:
        h = hashlib.blake2b(digest_size=16)
        h.update(type(vae.first_stage_model).__qualname__.encode())
        h.update(repr(sorted((compat.vae_metadata(vae) or {}).items())).encode())  # it can change the model
        for key, t in sorted(vae.get_sd().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        fp = _fingerprints[vae] = h.hexdigest()
    return fp


def _worker_dtype(vae, parent_device: str) -> torch.dtype:
    """The VAE's own dtype where the worker's device type matches it, else ComfyUI's choice there."""
    target = torch.device(parent_device)
    if torch.device(vae.device).type == target.type:
        return vae.vae_dtype
    return mm.vae_dtype(target, vae.working_dtypes)


def model_source(vae, spec: VaeSpec, devices: list[Device]) -> ModelSource:
    parent_device = {d.name: d.torch_device for d in devices}
    pixels = compat.pixel_dtype()
    fp = f"{fingerprint(vae)}-{str(pixels).replace('torch.', '')}"  # the decoder a worker keeps casts to it

    def weights():
        return {k: v.detach().to("cpu") for k, v in vae.get_sd().items()}

    expect = identity.signature(vae)
    extra = compat.rebuild_kwargs(vae)

    def recipe(worker: WorkerSpec) -> dict:
        return {"factory": "comfy.sd:VAE", "weights_arg": "sd",
                "kwargs": {"device": torch.device(worker.device),
                           "dtype": _worker_dtype(vae, parent_device.get(worker.name, worker.device)),
                           **extra},
                "module_attr": "first_stage_model", "dtype_attr": "vae_dtype", "family": spec.family,
                "latent_channels": spec.latent_channels, "pixel_dtype": pixels,
                "expect": expect}

    return ModelSource(fp, weights, recipe)


def _cuda_ordinals() -> list[str]:
    """Physical ids behind this process's cuda:0, cuda:1, ... (respects CUDA_VISIBLE_DEVICES)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(i) for i in range(torch.cuda.device_count())]
    return [v.strip() for v in visible.split(",") if v.strip()]


THREADS_ENV = "PARALLEL_VAE_CPU_THREADS"  # torch threads per CPU worker (default: cores / CPU workers)


def worker_specs(devices: list[Device]) -> list[WorkerSpec]:
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
            specs.append(WorkerSpec(d.name, "cpu", threads=cpu_threads,
                                    env=(("CUDA_VISIBLE_DEVICES", ""),),
                                    setup=(("comfy.cli_args", "args.cpu", True),)))
    return specs


def get_pool(devices: list[Device]) -> WorkerPool:
    """The process-wide pool for these devices: reused while the device list is unchanged."""
    global _pool
    specs = worker_specs(devices)
    with _pool_lock:
        if _pool is not None and _pool.specs != specs:
            log.info("parallel_vae: devices changed; stopping workers for %s", ", ".join(_pool.names))
            _pool.shutdown()
            _pool = None
        if _pool is None:
            _pool = WorkerPool(specs, python_path=[COMFY_ROOT], imports=["comfy.sd"])
        return _pool


def current_pool() -> WorkerPool | None:
    return _pool


def speeds(devices: list[Device]) -> list[float]:
    """Each device's measured speed relative to the others (1.0 each before the pool for these
    devices has run an exact decode)."""
    pool = _pool
    if pool is None or pool.specs != worker_specs(devices):
        return [1.0] * len(devices)
    return pool.speeds([d.name for d in devices])


def report() -> dict:
    """The workers for the /parallel_vae/workers route (no pool yet: none), and under "ray" the
    Ray lanes' actors once a prompt used them."""
    from . import ray_pool  # imported late: no cycle

    pool = _pool
    out = {"busy": False, "workers": []} if pool is None else {"devices": pool.names, **pool.report()}
    lanes = ray_pool.current_pool()
    if lanes is not None:
        out["ray"] = {"devices": lanes.names, **lanes.report()}
    return out


def release(why: str) -> int:
    """Stop the workers once the running decode ends, giving back all they hold (ComfyUI's
    "free" and the stop route); the next decode starts them again. Returns how many ran."""
    from . import ray_pool  # Ray lanes' actors give their memory back too (imported late: no cycle)

    pool = _pool
    running = pool.release() if pool is not None else 0
    running += ray_pool.release()
    if running:
        log.info("parallel_vae: stopped %d worker(s) (%s)", running, why)
    return running


def release_soon(why: str) -> None:
    """``release`` in a thread: a decode may be running, and the caller is the server's loop."""
    threading.Thread(target=release, args=(why,), daemon=True, name="pvae-release").start()


def shutdown_pool() -> None:
    """Stop the workers now (tests; they also stop when ComfyUI exits)."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.shutdown()
            _pool = None
