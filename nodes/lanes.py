"""Build the in-process decode lane for a device from ComfyUI's VAE."""
from __future__ import annotations

import logging
import weakref

import torch

import comfy.model_management as mm
import comfy.sd
from ..parallel_vae import exact, identity
from ..parallel_vae.devices import Device
from ..parallel_vae.engine import LocalLane
from ..parallel_vae.errors import ModelMismatch
from ..parallel_vae.models import make_decoder
from ..parallel_vae.plan import Plan
from ..parallel_vae.spec import VaeSpec
from . import compat

log = logging.getLogger("parallel_vae")

last_report = None  # engine.Report of the latest decode (which lane and process decoded each tile)

# A VAE rebuilt on another device than its own, per (VAE object, device); freed with the VAE.
_copies: "weakref.WeakKeyDictionary[object, dict[str, comfy.sd.VAE]]" = weakref.WeakKeyDictionary()


def _same_device(a, b: torch.device) -> bool:
    a = torch.device(a)
    if a.type != b.type:
        return False
    if a.type == "cuda":
        current = torch.cuda.current_device()
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return True


def free_memory(device: str) -> int:
    """What ComfyUI counts as free on its own device (it could free more by unloading models)."""
    return int(mm.get_free_memory(torch.device(device)))


def choose(devices: list[Device], vae) -> Device:
    """In-process decoding runs on one device: the VAE's own when it is named, else the first."""
    for d in devices:
        if _same_device(vae.device, torch.device(d.torch_device)):
            return d
    return devices[0]


def rebuild_on(vae, device: torch.device):
    """The same VAE built by ComfyUI on ``device``: its weights from get_sd() and the file's metadata
    through ComfyUI's own loader, checked to be the same model (identity.signature)."""
    per_vae = _copies.setdefault(vae, {})
    key = str(device)
    if key not in per_vae:
        log.info("parallel_vae: building a copy of the VAE on %s", device)
        sd = {k: v.detach().to("cpu") for k, v in vae.get_sd().items()}
        try:
            copy = identity.rebuild(comfy.sd.VAE, identity.signature(vae), sd=sd, device=device,
                                    dtype=mm.vae_dtype(device, vae.working_dtypes), **compat.rebuild_kwargs(vae))
        except ModelMismatch as e:
            raise ModelMismatch(f"a copy on {device} could not rebuild ComfyUI's model: {e.what}") from e
        per_vae[key] = copy
    return per_vae[key]


def local_lane(vae, spec: VaeSpec, device: Device, plan: Plan, poll=None) -> LocalLane:
    target = torch.device(device.torch_device)
    lane_vae = vae if _same_device(vae.device, target) else rebuild_on(vae, target)
    biggest = max(plan.tiles, key=lambda t: t.volume)
    tile_shape = (1, spec.latent_channels) + biggest.lat_size
    with compat.device_context(lane_vae.device):
        mm.load_models_gpu([lane_vae.patcher],
                           memory_required=lane_vae.memory_used_decode(tile_shape, lane_vae.vae_dtype),
                           force_full_load=lane_vae.disable_offload)
        decoder = make_decoder(spec.family, lane_vae.first_stage_model, lane_vae.vae_dtype, lane_vae.device,
                               pixel_dtype=compat.pixel_dtype(), latent_channels=spec.latent_channels)
    executor = None
    if plan.exact:
        executor = exact.executor(spec.family, lane_vae.first_stage_model, lane_vae.vae_dtype, lane_vae.device,
                                  patch_size=int(getattr(lane_vae.first_stage_model, "patch_size", 2)))
    return LocalLane(decoder, device.name, context=lambda: compat.device_context(lane_vae.device),
                     exact=executor, poll=poll, empty_cache=mm.soft_empty_cache)
