"""ComfyUI's VAE as the backends take it (parallel_vae.backends.Model): rebuilt by workers with
ComfyUI's own loader, and made ready on a device of this process.

Workers build the VAE with ComfyUI's own loader (``comfy.sd.VAE(sd=..., metadata=...)``, what
VAELoader calls) from weights the pool places in shared memory once per VAE, with the file's
metadata where ComfyUI recorded it, and check the result against the parent's model
(identity.signature) before decoding with it. The engine never imports ComfyUI: the recipe
names the loader, and the worker imports it by name. In this process the VAE decodes where it
is, or as a copy rebuilt the same way on another device.
"""
from __future__ import annotations

import hashlib
import logging
import weakref

import torch

import comfy.model_management as mm
import comfy.sd
from ..parallel_vae import families, identity
from ..parallel_vae.backends import Local, Model
from ..parallel_vae.errors import ModelMismatch
from ..parallel_vae.plan import Plan
from ..parallel_vae.spec import VaeSpec
from ..parallel_vae.workers import ModelSource, WorkerSpec
from . import compat

log = logging.getLogger("parallel_vae")

BASE = "_parallel_vae_base"  # on a Parallel VAE (vae_wrapper.py): the plain VAE it wraps
_fingerprints: "weakref.WeakKeyDictionary[object, str]" = weakref.WeakKeyDictionary()
# A VAE rebuilt on another device than its own, per (VAE object, device); freed with the VAE.
_copies: "weakref.WeakKeyDictionary[object, dict[str, comfy.sd.VAE]]" = weakref.WeakKeyDictionary()


def fingerprint(vae) -> str:
    """A content hash of the VAE's weights (class, metadata, keys, dtypes, shapes, bytes), cached per object.

    Two VAE objects with the same weights share workers' copies; changed weights never do.
    """
    vae = getattr(vae, BASE, vae)  # a Parallel VAE is its plain VAE's weights
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


def _dtype_on(vae, device: str) -> torch.dtype:
    """The VAE's own dtype on a device of its own device's type, else ComfyUI's choice there."""
    target = torch.device(device)
    if torch.device(vae.device).type == target.type:
        return vae.vae_dtype
    return mm.vae_dtype(target, vae.working_dtypes)


def _same_device(a, b: torch.device) -> bool:
    a = torch.device(a)
    if a.type != b.type:
        return False
    if a.type == "cuda":
        current = torch.cuda.current_device()
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return True


def _weights(vae) -> dict:
    """The VAE's state dict, plus its non-persistent buffers: ComfyUI detects some VAEs by one
    (Cosmos: decoder.unpatcher3d.wavelets); without it a rebuild is no VAE at all. A load skips them."""
    sd = dict(vae.get_sd())
    for name, buf in vae.first_stage_model.named_buffers(remove_duplicate=False):  # shared ones too
        sd.setdefault(name, buf)
    return {k: v.detach().to("cpu") for k, v in sd.items()}


def rebuild_on(vae, device: torch.device):
    """The same VAE built by ComfyUI on ``device``: its weights from get_sd() and the file's metadata
    through ComfyUI's own loader, checked to be the same model (identity.signature)."""
    per_vae = _copies.setdefault(vae, {})
    key = str(device)
    if key not in per_vae:
        log.info("parallel_vae: building a copy of the VAE on %s", device)
        try:
            copy = identity.rebuild(comfy.sd.VAE, identity.signature(vae), sd=_weights(vae), device=device,
                                    dtype=mm.vae_dtype(device, vae.working_dtypes), **compat.rebuild_kwargs(vae))
        except ModelMismatch as e:
            raise ModelMismatch(f"a copy on {device} could not rebuild ComfyUI's model: {e.what}") from e
        per_vae[key] = copy
    return per_vae[key]


def vae_model(vae, spec: VaeSpec) -> Model:
    """``vae`` for every backend: a worker recipe, and its decoder in this process."""
    pixels = compat.pixel_dtype()
    fp = f"{fingerprint(vae)}-{str(pixels).replace('torch.', '')}"  # the decoder a worker keeps casts to it
    expect = identity.signature(vae)
    extra = compat.rebuild_kwargs(vae)

    def recipe(worker: WorkerSpec) -> dict:
        return {"factory": "comfy.sd:VAE", "weights_arg": "sd",
                "kwargs": {"device": torch.device(worker.device), "dtype": _dtype_on(vae, worker.device), **extra},
                "module_attr": "first_stage_model", "dtype_attr": "vae_dtype", "family": spec.family,
                "latent_channels": spec.latent_channels, "pixel_dtype": pixels, "expect": expect}

    def local(torch_device: str, plan: Plan) -> Local:
        target = torch.device(torch_device)
        here = vae if _same_device(vae.device, target) else rebuild_on(vae, target)
        biggest = max(plan.tiles, key=lambda t: t.volume)
        if plan.direction == "encode":
            needed = here.memory_used_encode((1, spec.out_channels) + biggest.in_size, here.vae_dtype)
        else:
            needed = here.memory_used_decode((1, spec.latent_channels) + biggest.in_size, here.vae_dtype)
        with compat.device_context(here.device):
            mm.load_models_gpu([here.patcher], memory_required=needed, force_full_load=here.disable_offload)
            decoder = families.make_decoder(spec.family, here.first_stage_model, here.vae_dtype, here.device,
                                            pixel_dtype=pixels, latent_channels=spec.latent_channels)
        return Local(decoder,
                     executor=lambda direction: families.exact_executor(spec.family, here.first_stage_model,
                                                                        here.vae_dtype, here.device, direction),
                     context=lambda: compat.device_context(here.device), empty_cache=mm.soft_empty_cache)

    return Model(ModelSource(fp, lambda: _weights(vae), recipe), local)
