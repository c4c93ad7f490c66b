"""Exact banded decode for Wan 2.1 (also the Qwen-Image VAE) and Wan 2.2, calling ComfyUI's own
modules without importing ComfyUI.

A band owns latent rows ``[a, e)`` and runs the whole decoder on them, decoder call by decoder
call (a latent frame, or a pair where the decoder takes pairs), with a causal cache of its own
rows: ``conv2``, ``conv1``, the ``middle`` blocks, the ``upsamples`` and the ``head``. It runs in a
thread of its own (threads.py) so that ComfyUI's modules keep their call structure and caches,
which differ between ComfyUI versions; hooks on the modules (wan_rows.py) exchange what crosses a
band's edge: conv edge rows (with their cached frames) and the middle attention's keys and
values. Wan's norms work per pixel, so nothing else does. Every row is computed once, on one lane,
and every conv sees the inputs the untiled decode gives it: the output does not depend on the
band count. After each decoder call a band hands its frames to the driver (``threads.Output``).
"""
from __future__ import annotations

import sys
from typing import Generator

import torch

from ..models.wan import count_modules, unpatchify
from . import threads, wan_rows
from .geometry import named, upsample_factor


class WanExact:
    """Bands of one Wan ``first_stage_model``'s decoder: they exchange conv edge rows and attention
    keys (no statistics: Wan's norms work per pixel)."""

    # bands in threads of their own (threads.py), whose arenas would each keep a band's peak: what
    # a band frees goes back as its turn ends while they run on the CPU (heap.Heap.bands_running)
    gives_back_turns = True

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
        factor = 1
        for m in dec.upsamples.modules():  # DupUp3D shortcuts are not nn.Upsample, so not counted
            factor *= upsample_factor(m) or 1
        self.px_per_row = factor * patch_size


    @staticmethod
    def refusal(model) -> str | None:
        dec = getattr(model, "decoder", None)
        if dec is None or not all(hasattr(dec, a) for a in ("conv1", "middle", "upsamples", "head")) \
                or not hasattr(model, "conv2"):
            return "its decoder is not ComfyUI's Wan decoder"
        if any(named(m, "AttentionBlock") for m in dec.upsamples.modules()):
            return "its up path has attention layers"
        return wan_rows.refusal(dec)

    def prefix(self, z: torch.Tensor) -> torch.Tensor:
        """Nothing runs on the whole latent: ``z`` on the device, in the model's dtype."""
        return z.to(self.device, self.dtype)

    def calls(self, frames: int) -> list[tuple[int, int]]:
        """(first latent frame, frames) of each decoder call, as ComfyUI's decode makes them."""
        out, i = [], 0
        while i < frames:
            n = min(2, frames - i) if self.pairs and i > 0 else 1
            out.append((i, n))
            i += n
        return out

    # -- one band ----------------------------------------------------------------------------------
    def band(self, z: torch.Tensor, a: int, e: int) -> Generator:
        """Own rows ``[a, e)`` of the latent ``z`` ``[1, C, T, H, W]`` (on the device): yields a
        Request at each exchange point (lockstep.py) and a ``threads.Output`` with the band's
        pixels ``[1, C, frames, px*(e-a), W*px]`` of each latent frame after each decoder call."""
        channel = threads.Channel(a, e, z.shape[-2])
        own = z[:, :, :, a:e].clone(memory_format=torch.contiguous_format)

        def body():
            with wan_rows.exchanging(self.decoder):
                self._decode(own, channel)

        return (yield from threads.run(channel, body, self.device))

    def _decode(self, z: torch.Tensor, channel: threads.Channel) -> None:
        dec = self.decoder
        x = self.model.conv2(z)
        calls = self.calls(x.shape[2])
        # one call: no causal cache, as ComfyUI's pairs decoder does (it would hold every conv's input)
        cache: list | None = None if self.pairs and len(calls) == 1 else [None] * self.slots
        for i, n in calls:
            idx = [0]
            h = cached_conv(dec.conv1, x[:, :, i:i + n], cache, idx, self.cache_t)
            for layer in dec.middle:
                h = layer(h, cache, idx) if named(layer, "ResidualBlock") else layer(h)
            channel.emit(self._up(h, cache, idx, n, i == 0))

    def _up(self, x: torch.Tensor, cache: list, idx: list, frames: int, first: bool) -> list[torch.Tensor]:
        """The up path and head of one decoder call: the pixels of each of its latent frames."""
        dec = self.decoder
        if self.pairs:
            chunks: list = []
            dec.run_up(0, [x], cache, idx, chunks)
            x = torch.cat(chunks, 2)
        else:
            extra = (first,) if self.first_chunk else ()
            for layer in dec.upsamples:
                x = layer(x, cache, idx, *extra)
            for layer in dec.head:
                x = cached_conv(layer, x, cache, idx, self.cache_t) if named(layer, "CausalConv3d") else layer(x)
        if self.patch_size > 1:
            x = unpatchify(x, self.patch_size)
        if first:  # the first latent frame decodes to one frame, each later one to the rest evenly
            return [x[:, :, :1]] + (list(x[:, :, 1:].chunk(frames - 1, 2)) if frames > 1 else [])
        return list(x.chunk(frames, 2))


def cached_conv(conv, x, cache: list | None, idx: list, cache_t: int, top_up: bool = True):
    """A causal conv with the cache handling of ComfyUI's Wan modules: the last ``cache_t`` frames,
    topped up (where the module does) with the previous call's last frame when a call brings one
    (no cache: the conv alone)."""
    if cache is None:
        return conv(x)
    i = idx[0]
    cache_x = x[:, :, -cache_t:].clone()
    if top_up and cache_x.shape[2] < 2 and cache[i] is not None:
        cache_x = torch.cat([cache[i][:, :, -1:].to(cache_x.device), cache_x], dim=2)
    x = conv(x, cache[i])
    cache[i] = cache_x
    idx[0] += 1
    return x
