"""Exact banded encode for Wan 2.1 (also the Qwen-Image VAE) and Wan 2.2, calling ComfyUI's own
modules without importing ComfyUI.

A band owns latent rows ``[a, e)`` and reads only its own encoder-input rows (``rows`` per latent
row, so every downsampling level keeps them whole and even). It runs ComfyUI's whole encoder on
them, encoder call by encoder call as ComfyUI's encode takes the frames (the first, then 4; or
pairs with 0.33's deferred time downsampling), with a causal cache of its own rows, in a thread of
its own (threads.py), then the VAE's ``conv1``. Hooks on the modules (wan_rows.py) exchange what
crosses a band's edge: conv edge rows (cached frames included), the row below each stride-2
downsample, and the middle attention's keys and values. Wan's norms work per pixel, so nothing
else does. Every row is computed once, on one lane, and the latent does not depend on the band
count.
"""
from __future__ import annotations

import inspect
from typing import Generator

import torch

from . import threads, wan_rows
from .geometry import named, row_part


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Wan 2.2's input: patch x patch pixels per position as channels ("b c f (h q) (w r) -> b (c r q) f h w")."""
    if patch == 1:
        return x
    b, c, f, h, w = x.shape
    x = x.reshape(b, c, f, h // patch, patch, w // patch, patch)
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * patch * patch, f, h // patch, w // patch)


class WanEncodeExact:
    """Bands of one Wan ``first_stage_model``'s encoder: they exchange conv edge rows, the row below
    each stride-2 downsample and attention keys (no statistics: Wan's norms work per pixel)."""

    # bands in threads too, but the encoder's largest blocks (its input level's) are mapped anyway:
    # giving a band's heap back at each turn cost 8-12% more time for 2.4% less peak RSS on a
    # 768x768 image (mapping smaller blocks afresh, the rule before, 15% for 0.5%; docs/BENCHMARKS.md)
    gives_back_turns = False

    def __init__(self, model, dtype: torch.dtype, device, patch_size: int = 1, first_chunk: bool = False):
        self.model = model
        self.encoder = enc = model.encoder
        self.dtype = dtype
        self.device = torch.device(device)
        self.patch = patch_size
        # ComfyUI 0.33's Wan 2.1 encoder takes frames in pairs and defers lone downsampled frames
        self.pairs = "final" in inspect.signature(type(enc).forward).parameters
        self.slots = 2 * sum(1 for _ in enc.modules()) + 2  # at least one per cached conv, whatever the version
        rows = 1
        for m in enc.downsamples.modules():
            if hasattr(m, "kernel_size") and getattr(m, "weight", None) is not None:
                rows *= int(row_part(m.stride))
        self.rows = rows  # encoder-input rows per latent row
        self.in_rows = rows * patch_size  # pixel rows per latent row (bands.run's unit)

    @staticmethod
    def refusal(model) -> str | None:
        enc = getattr(model, "encoder", None)
        if enc is None or not all(hasattr(enc, a) for a in ("conv1", "downsamples", "middle", "head")) \
                or not hasattr(model, "conv1"):
            return "its encoder is not ComfyUI's Wan encoder"
        if any(named(m, "AttentionBlock") for m in enc.downsamples.modules()):
            return "its down path has attention layers"
        return wan_rows.refusal(enc, "encoder")

    # -- time --------------------------------------------------------------------------------------
    def schedule(self, frames: int) -> list[tuple[int, int, dict]]:
        """(first frame, end, extra arguments) of each encoder call, as ComfyUI's encode makes them."""
        if self.pairs:
            t = 1 + ((frames - 1) // 4) * 4
            calls = 1 + (t - 1) // 2
            return [(0, 1, {})] + [(1 + 2 * (i - 1), 1 + 2 * i, {"final": i == calls - 1}) for i in range(1, calls)]
        calls = 1 + (frames - 1) // 4
        return [(0, 1, {})] + [(1 + 4 * (i - 1), 1 + 4 * i, {}) for i in range(1, calls)]

    def prefix(self, z: torch.Tensor) -> torch.Tensor:
        """The encoder's input: the pixels on the device, patchified for Wan 2.2."""
        return patchify(z.to(self.device, self.dtype), self.patch)

    # -- one band ----------------------------------------------------------------------------------
    def band(self, x_all: torch.Tensor, a: int, e: int) -> Generator:
        """Latent rows ``[a, e)`` of the encoder input ``x_all`` ``[1, C, T, H, W]`` (on the device):
        yields a Request at each exchange point (lockstep.py); returns the band's latent (mu)
        ``[1, C, t, e-a, w]``."""
        height, r = x_all.shape[-2], self.rows
        channel = threads.Channel(a, e, -(-height // r))
        own = x_all[:, :, :, a * r:min(height, e * r)].clone(memory_format=torch.contiguous_format)

        def body():
            with wan_rows.exchanging(self.encoder):
                return self._encode(own)

        return (yield from threads.run(channel, body, self.device))

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        calls = self.schedule(x.shape[2])
        # one call: no causal cache, as ComfyUI's pairs encoder does
        cache: list | None = None if self.pairs and len(calls) == 1 else [None] * self.slots
        outs = []
        for t0, t1, extra in calls:
            out = self.encoder(x[:, :, t0:t1], feat_cache=cache, feat_idx=[0], **extra)
            if out is not None:  # a deferred call (0.33's pairs) gives its frame with the next
                outs.append(out)
        del x
        mu, _ = self.model.conv1(torch.cat(outs, 2)).chunk(2, dim=1)
        return mu
