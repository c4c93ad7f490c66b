"""Per-family decode adapters over the VAE's ``nn.Module`` (duck-typed: no ComfyUI import).

Every adapter decodes a whole tile with ``decode(z)``. Causal video adapters also offer
``steps(z)``: the tile decoded one latent frame at a time with its causal cache carried forward,
yielding each step's frames as soon as they exist (bit-identical to ``decode``).
"""
from __future__ import annotations

from .generic import GenericDecoder
from .taehv import TaehvStepper
from .wan import WanStepper


def make_decoder(family: str, module, dtype, device, output_device="cpu") -> GenericDecoder:
    if family == "wan21" and WanStepper.fits(module):
        return WanStepper(module, dtype, device, output_device)
    if family == "wan22" and WanStepper.fits(module):
        return WanStepper(module, dtype, device, output_device, patch_size=2, first_chunk=True)
    if family == "taehv" and TaehvStepper.fits(module):
        return TaehvStepper(module, dtype, device, output_device)
    # Unknown layouts (e.g. a newer ComfyUI that restructured a model) still decode correctly:
    # whole tiles, sliced into steps afterwards.
    return GenericDecoder(module, dtype, device, output_device)


__all__ = ["GenericDecoder", "TaehvStepper", "WanStepper", "make_decoder"]
