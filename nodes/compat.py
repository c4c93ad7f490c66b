"""The one place that knows how ComfyUI versions differ (0.3.75 .. 0.33 and later).

Everything is detected from what the running ComfyUI has (a function, an attribute, an abstract
method) rather than from its version number, except core's handling of nested latents, which has
no other trace. ``summary()`` is logged once when the pack loads, so a bug report shows which
paths a user's ComfyUI takes.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import re

import torch

import comfy.model_management as mm
import comfy.sd


def comfyui_version() -> str:
    try:
        import comfyui_version

        return str(comfyui_version.__version__)
    except Exception:  # a checkout without the generated file
        return "unknown"


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", text)[:3]
    return tuple(int(p) for p in parts) if parts else (0,)


VERSION = comfyui_version()

# The ComfyUI tree this process runs: workers put it first on their path to import its loader.
COMFY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(comfy.sd.__file__)))
# A worker on the CPU: no GPU visible, and ComfyUI told so before it probes devices.
CPU_WORKER_ENV = (("CUDA_VISIBLE_DEVICES", ""),)
CPU_WORKER_SETUP = (("comfy.cli_args", "args.cpu", True),)


def pixel_dtype() -> torch.dtype:
    """The dtype ComfyUI's decode casts each tile's pixels to before blending (0.18+: float16 with
    --fp16-intermediates, else float32; 0.3.75: always float32)."""
    fn = getattr(mm, "intermediate_dtype", None)
    return fn() if fn is not None else torch.float32


def device_context(device):
    """ComfyUI 0.23+ runs its VAE work inside ``cuda_device_context(vae.device)`` (VAEs may live on
    any GPU); a no-op context on older versions and off CUDA."""
    fn = getattr(mm, "cuda_device_context", None)
    return fn(device) if fn is not None else contextlib.nullcontext()


def vae_takes_metadata() -> bool:
    """``comfy.sd.VAE(metadata=...)`` exists (0.9.2+; VAELoader passes the file's metadata)."""
    return "metadata" in inspect.signature(comfy.sd.VAE.__init__).parameters


def vae_metadata(vae) -> dict | None:
    """The file metadata ``vae`` was built with, where ComfyUI recorded it: VAELoader's reload
    recipe ``patcher.cached_patcher_init = (load_vae_patcher, (path, metadata, device))`` (0.23+)."""
    init = getattr(getattr(vae, "patcher", None), "cached_patcher_init", None)
    args = init[1] if isinstance(init, (tuple, list)) and len(init) > 1 else None
    if not isinstance(args, (tuple, list)) or len(args) < 2 or not isinstance(args[0], str):
        return None
    return args[1] if isinstance(args[1], dict) else None


def encode_crop(vae, pixels: torch.Tensor) -> torch.Tensor:
    """IMAGE pixels as this ComfyUI's VAE Encode hands them to the VAE: cropped to whole latent
    positions (``vae_encode_crop_pixels``), extra channels dropped (0.33 in the VAE, 0.3.75 in the
    node: ``pixels[..., :3]``), missing ones padded where the VAE says how (0.33's
    ``pad_channel_value``). Channels still missing are left for the caller to refuse."""
    pixels = vae.vae_encode_crop_pixels(pixels)
    want = vae.output_channels
    if pixels.shape[-1] > want:
        pixels = pixels[..., :want]
    return pixels


def latent_category() -> str:
    """The category of core's VAE Encode and VAE Decode on this ComfyUI ("latent"; 0.33:
    "model/latent"): the pack's nodes sit beside them."""
    import nodes

    return getattr(nodes.VAEEncode, "CATEGORY", "latent")


def tiles_itself(vae) -> bool:
    """VAEs whose model does its own tiling (SeedVR2, MiniMax-H3 video; 0.28+)."""
    return bool(getattr(vae, "handles_tiling", False))


# Core's VAE Decode (Tiled) decodes the first part of a nested (audio+video) latent from 0.32.0
# (PR "Fix VAEDecodeTiled crash on NestedTensor latents"); before, it failed on them.
NESTED_FIRST_PART = _version_tuple(VERSION) >= (0, 32, 0)


def progress_throttled() -> bool:
    """ProgressBar sends at most one update per 100 ms / 0.5% (0.9.2+)."""
    import comfy.utils

    return "throttle" in inspect.getsource(comfy.utils.ProgressBar).lower()


def video_input_abstract() -> frozenset[str]:
    """The abstract methods of ComfyUI's VideoInput (0.14 added ``as_trimmed``)."""
    from .video_types import VideoInput

    return frozenset(getattr(VideoInput, "__abstractmethods__", ())) if VideoInput is not None else frozenset()


def wan21_decodes_in_pairs() -> bool:
    """Wan 2.1's decoder returns chunks and caches two latent frames at a time (0.18+)."""
    from comfy.ldm.wan import vae as wan21

    return hasattr(wan21, "count_cache_layers") or hasattr(getattr(wan21, "Decoder3d", None), "run_up")


def summary() -> str:
    def safe(fn):
        try:
            return fn()
        except Exception as e:
            return f"? ({type(e).__name__})"

    parts = [
        f"ComfyUI {VERSION}",
        f"tile pixels in {str(pixel_dtype()).replace('torch.', '')}",
        f"cuda_device_context {'yes' if getattr(mm, 'cuda_device_context', None) else 'no'}",
        f"VAE metadata {'yes' if safe(vae_takes_metadata) is True else 'no'}",
        f"nested latents {'first part' if NESTED_FIRST_PART else 'refused'}",
        f"Wan 2.1 decoder {'in pairs' if safe(wan21_decodes_in_pairs) is True else 'per frame'}",
        f"progress throttled {'yes' if safe(progress_throttled) is True else 'no'}",
        f"VideoInput abstract: {', '.join(sorted(safe(video_input_abstract)))}",
    ]
    return "; ".join(parts)


def rebuild_kwargs(vae) -> dict:
    """Extra arguments for ``comfy.sd.VAE(sd=...)`` so a rebuild is the model VAELoader built: the
    file's metadata (0.9.2+), where ComfyUI kept it (0.23+)."""
    metadata = vae_metadata(vae)
    return {"metadata": metadata} if metadata is not None and vae_takes_metadata() else {}
