"""Per-family decode adapters over the VAE's ``nn.Module`` (duck-typed: no ComfyUI import).

Every adapter decodes a whole tile with ``decode(z)``. Causal video adapters also offer
``steps(z)``: the tile decoded a latent frame at a time with its causal cache carried forward,
yielding each step's frames as soon as they exist (equal to ``decode``; check.py verifies that
once per model class before a stepper is used). Which family takes which adapter is
families.py's table (``families.make_decoder``).
"""
from __future__ import annotations

from . import check
from .generic import GenericDecoder
from .taehv import TaehvStepper
from .wan import WanStepper

__all__ = ["GenericDecoder", "TaehvStepper", "WanStepper", "check"]
