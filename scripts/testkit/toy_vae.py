"""A small image decoder for engine-level pool tests that run without ComfyUI.

Workers import ``build`` by name (``testkit.toy_vae:build``), the way the ComfyUI nodes name
ComfyUI's VAE loader. ``decode`` is a 3x3 convolution (so tiles see their neighbours), then a
pixel shuffle to 8x; ``delay`` makes each decode take at least that long, for timing tests.
"""
from __future__ import annotations

import time

import torch
from torch import nn

FACTOR = 8
CHANNELS = 4


class ToyDecoder(nn.Module):
    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.conv = nn.Conv2d(CHANNELS, 3 * FACTOR * FACTOR, 3, padding=1)
        self.delay = delay

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay)
        return torch.pixel_shuffle(self.conv(z), FACTOR)


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": torch.randn(3 * FACTOR * FACTOR, CHANNELS, 3, 3, generator=g) * 0.2,
            "conv.bias": torch.randn(3 * FACTOR * FACTOR, generator=g) * 0.1}


def build(sd, delay: float = 0.0) -> ToyDecoder:
    model = ToyDecoder(delay)
    model.load_state_dict(sd)
    return model.eval()
