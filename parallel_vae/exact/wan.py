"""Exact banded decode for Wan 2.1 (also the Qwen-Image VAE) and Wan 2.2, walking ComfyUI's own
modules without importing ComfyUI.

At each decoder call (a latent frame, or a pair where the decoder takes pairs) the prefix
(``conv1`` and the ``middle`` blocks with the global attention) runs on the whole frame with its
own causal cache. Each band then runs ComfyUI's ``upsamples`` and ``head`` on its rows plus halo
with a causal cache of its own, and keeps its own rows (cropped once, at the end). Wan's norms
work per pixel, so bands never exchange anything.
"""
from __future__ import annotations

import sys
from typing import Iterator

import torch

from ..models.wan import count_modules, unpatchify
from .geometry import halo_rows, receptive_rows, upsample_factor


def _named(module, name: str) -> bool:
    return type(module).__name__ == name


class WanExact:
    sync = "none"
    causal = True

    def __init__(self, model, dtype: torch.dtype, device, patch_size: int = 1, first_chunk: bool = False):
        self.model = model
        self.decoder = dec = model.decoder
        self.dtype = dtype
        self.device = torch.device(device)
        self.patch_size = patch_size
        self.first_chunk = first_chunk
        self.pairs = hasattr(dec, "run_up")  # ComfyUI 0.18+: Wan 2.1's decoder takes latent frames in pairs
        self.cache_t = getattr(sys.modules.get(type(dec).__module__), "CACHE_T", 2)
        self.slots = count_modules(dec, "CausalConv3d")
        self.prefix_slots = count_modules(dec.conv1, "CausalConv3d") + count_modules(dec.middle, "CausalConv3d")
        factor = 1
        for m in dec.upsamples.modules():  # DupUp3D shortcuts are not nn.Upsample, so not counted
            factor *= upsample_factor(m) or 1
        self.px_per_row = factor * patch_size
        self.halo = self.halo_of(model)

    @staticmethod
    def rf_rows(decoder) -> float:
        return receptive_rows([decoder.upsamples, decoder.head], skip=("DupUp3D",))

    @classmethod
    def halo_of(cls, model) -> int:
        """Rows a band reads beyond its own on each side: the up path's receptive field."""
        return halo_rows(cls.rf_rows(model.decoder))

    @staticmethod
    def refusal(model) -> str | None:
        dec = getattr(model, "decoder", None)
        if dec is None or not all(hasattr(dec, a) for a in ("conv1", "middle", "upsamples", "head")) \
                or not hasattr(model, "conv2"):
            return "its decoder is not ComfyUI's Wan decoder"
        if any(_named(m, "AttentionBlock") for m in dec.upsamples.modules()):
            return "its up path has attention layers"
        return None

    # -- prefix: per decoder call, on the whole frame --------------------------------------------
    def chunks(self, z: torch.Tensor) -> Iterator[tuple[torch.Tensor, int, bool]]:
        """(mid-block output, latent frames in it, first call?) for each decoder call, in order."""
        dec = self.decoder
        x = self.model.conv2(z.to(self.device, self.dtype))
        cache: list = [None] * self.slots
        frames, i = x.shape[2], 0
        while i < frames:
            n = min(2, frames - i) if self.pairs and i > 0 else 1
            idx = [0]
            h = self._cached(dec.conv1, x[:, :, i:i + n], cache, idx)
            for layer in dec.middle:
                h = layer(h, cache, idx) if _named(layer, "ResidualBlock") else layer(h)
            yield h, n, i == 0
            i += n

    def _cached(self, conv, x, cache: list, idx: list):
        return cached_conv(conv, x, cache, idx, self.cache_t)

    def band(self, a: int, e: int, height: int) -> "WanBand":
        return WanBand(self, a, e, height)


def cached_conv(conv, x, cache: list, idx: list, cache_t: int, top_up: bool = True):
    """A causal conv with the cache handling of ComfyUI's Wan modules: the last ``cache_t`` frames,
    topped up (where the module does) with the previous call's last frame when a call brings one."""
    i = idx[0]
    cache_x = x[:, :, -cache_t:].clone()
    if top_up and cache_x.shape[2] < 2 and cache[i] is not None:
        cache_x = torch.cat([cache[i][:, :, -1:].to(cache_x.device), cache_x], dim=2)
    x = conv(x, cache[i])
    cache[i] = cache_x
    idx[0] += 1
    return x


class WanBand:
    """One band's state across decoder calls: its rows, its causal cache."""

    def __init__(self, ex: WanExact, a: int, e: int, height: int):
        self.ex = ex
        self.a, self.e = a, e
        self.g0, self.g1 = max(0, a - ex.halo), min(height, e + ex.halo)
        self.cache: list = [None] * ex.slots

    def feed(self, mid: torch.Tensor, frames: int, first: bool) -> list[torch.Tensor]:
        """The band's own pixel rows for each latent frame of one decoder call."""
        ex, dec = self.ex, self.ex.decoder
        x = mid[:, :, :, self.g0:self.g1]
        idx = [ex.prefix_slots]
        if ex.pairs:
            chunks: list = []
            dec.run_up(0, [x], self.cache, idx, chunks)
            x = torch.cat(chunks, 2)
        else:
            extra = (first,) if ex.first_chunk else ()
            for layer in dec.upsamples:
                x = layer(x, self.cache, idx, *extra)
            for layer in dec.head:
                x = ex._cached(layer, x, self.cache, idx) if _named(layer, "CausalConv3d") else layer(x)
        if ex.patch_size > 1:
            x = unpatchify(x, ex.patch_size)
        f = ex.px_per_row
        x = x[:, :, :, (self.a - self.g0) * f:(self.e - self.g0) * f]
        if first:  # the first latent frame decodes to one frame, each later one to the rest evenly
            return [x[:, :, :1]] + (list(x[:, :, 1:].chunk(frames - 1, 2)) if frames > 1 else [])
        return list(x.chunk(frames, 2))
