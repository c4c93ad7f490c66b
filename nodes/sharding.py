"""Sharding only where it pays, as the nodes use it: the ``sharding`` input (``every device`` pins
every named device; left out, PARALLEL_VAE_SHARDING, else auto) and the lanes a job runs on
(parallel_vae/gate.py's cost model, fed by what the backend's lanes measured)."""
from __future__ import annotations

import os

from ..parallel_vae import families, gate, plan_encode
from ..parallel_vae.backends import Backend
from ..parallel_vae.errors import InputError
from .backends import in_process_for

SHARDING = ("auto", "every device")
SHARDING_TOOLTIP = ("auto: an exact job too small to gain from every device runs on fewer, or inside ComfyUI's "
                    "process (the progress text says what was chosen and why), judged from the devices' measured "
                    "speeds and lock-step round trips. every device: always shard over every device named.")
SHARDING_ENV = "PARALLEL_VAE_SHARDING"  # the value for prompts that leave the input out (API prompts)


def check_sharding(sharding) -> bool:
    """Whether the user pinned every named device (sharding "every device"; left out: the
    environment's PARALLEL_VAE_SHARDING, else auto)."""
    if sharding is None:
        sharding = os.environ.get(SHARDING_ENV) or "auto"
    if sharding not in SHARDING:
        raise InputError("sharding", f"{sharding!r} is not one of {', '.join(SHARDING)}")
    return sharding == "every device"


def lanes_for(job, backend: Backend, model: str) -> tuple[Backend, str]:
    """The lanes an exact ``job`` (job.Job) uses on ``backend``: fewer than named, or ComfyUI's
    own process, where the job is too small to gain from them; and why (gate.py's model)."""
    if not job.exact or len(backend.lanes) < 2:
        return backend, ""
    local = in_process_for(job.devices)
    shape, direction = job.tensor.shape, job.direction
    # the plan's input positions (latent decoding, pixels encoding), as the lanes' rates count them
    rows, cols, batch = shape[-2], shape[-1], shape[0]
    frames = shape[2] if len(shape) == 5 else 1
    model_ = job.vae.first_stage_model
    calls = frames  # a causal VAE's rounds come once per latent frame, about (one decoder or encoder call)
    if direction == "encode" and len(shape) == 5:
        calls = plan_encode.down_scales(tuple(job.spec.scales))[0].canvas(frames)
    rounds = families.exact_rounds(job.spec.family, model_, direction, calls)
    work = batch * frames * rows * cols  # every position once, on one lane, whatever the lane count

    px = job.spec.scales[-1].factor if direction == "decode" else 1
    size = f"{shape[-1] * px}x{shape[-2] * px}"
    choice = gate.choose(backend.lanes, backend.costs(model, local.device.name), rounds * batch, work, size,
                         job.pinned)
    if choice.in_process:
        return local, choice.why
    return backend.only(choice.lanes), choice.why


__all__ = ["SHARDING", "SHARDING_ENV", "SHARDING_TOOLTIP", "check_sharding", "lanes_for"]
