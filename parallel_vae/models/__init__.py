"""Per-family decode adapters over the VAE's ``nn.Module`` (duck-typed: no ComfyUI import).

Every adapter decodes a whole tile with ``decode(z)``. Causal video adapters also offer
``steps(z)``: the tile decoded a latent frame at a time with its causal cache carried forward,
yielding each step's frames as soon as they exist (equal to ``decode``; check.py verifies that
once per model class before a stepper is used).
"""
from __future__ import annotations

import torch

from . import check
from .generic import GenericDecoder
from .taehv import TaehvStepper
from .wan import WanStepper


def _stepper(family: str, module, dtype, device, output_device, pixel_dtype):
    if family == "wan21" and WanStepper.fits(module):
        return WanStepper(module, dtype, device, output_device, pixel_dtype)
    if family == "wan22" and WanStepper.fits(module):
        return WanStepper(module, dtype, device, output_device, pixel_dtype,
                          patch_size=int(getattr(module, "patch_size", 2)), first_chunk=True)
    if family == "taehv" and TaehvStepper.fits(module):
        return TaehvStepper(module, dtype, device, output_device, pixel_dtype)
    return None


def make_decoder(family: str, module, dtype, device, output_device="cpu", pixel_dtype=torch.float32,
                 latent_channels: int | None = None) -> GenericDecoder:
    """The decoder for ``family``: a checked causal stepper where one fits, else whole tiles.

    Unknown layouts (a newer ComfyUI that restructured a model) and steppers that fail the check
    still decode correctly: whole tiles, sliced into steps afterwards.
    """
    stepper = _stepper(family, module, dtype, device, output_device, pixel_dtype)
    if stepper is not None and latent_channels and check.trusted(family, stepper, latent_channels):
        return stepper
    return GenericDecoder(module, dtype, device, output_device, pixel_dtype)


__all__ = ["GenericDecoder", "TaehvStepper", "WanStepper", "check", "make_decoder"]
