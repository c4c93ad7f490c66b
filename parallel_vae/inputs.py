"""Checks of the latent against the VAE, with messages that name the input and what is allowed."""
from __future__ import annotations

import torch

from .errors import InputError
from .spec import VaeSpec


def check_latent(samples, spec: VaeSpec) -> torch.Tensor:
    """Return the latent tensor if ``spec``'s VAE can decode it; raise InputError otherwise."""
    if getattr(samples, "is_nested", False):  # ComfyUI's NestedTensor (audio+video models)
        raise InputError("samples", "nested (multi-part audio+video) latents are not supported on this "
                                    "ComfyUI (ComfyUI 0.32 and later decode their video part); split them "
                                    "before decoding")
    if not isinstance(samples, torch.Tensor):
        raise InputError("samples", f"expected a LATENT tensor, got {type(samples).__name__}")
    want = spec.latent_dim + 2
    if samples.ndim != want:
        shape = "[B, C, H, W] image" if want == 4 else "[B, C, T, H, W] video"
        got = {4: "an image latent [B, C, H, W]", 5: "a video latent [B, C, T, H, W]"}.get(
            samples.ndim, f"a {samples.ndim}-D tensor")
        raise InputError("samples", f"got {got} of shape {list(samples.shape)}, but the {spec.label} "
                                    f"decodes {shape} latents")
    if samples.shape[1] != spec.latent_channels:
        raise InputError("samples", f"has {samples.shape[1]} channels, but the {spec.label} takes "
                                    f"{spec.latent_channels}-channel latents: is this latent from another model?")
    check_values(samples, "samples", "decode", "tensor", "the sampler or an upstream node produced an invalid latent")
    return samples


def check_values(t: torch.Tensor, name: str, verb: str, kind: str, cause: str) -> None:
    """An input tensor with something to ``verb``, of floats, all finite; else InputError naming ``name``."""
    if t.numel() == 0:
        raise InputError(name, f"is empty (shape {list(t.shape)}): nothing to {verb}")
    if not t.is_floating_point():
        raise InputError(name, f"must be a floating-point {kind}, got {t.dtype}")
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise InputError(name, f"contains {bad} NaN or inf value{'s' if bad != 1 else ''}; {cause}")
