"""Exact banded encode for Wan 2.1 (also the Qwen-Image VAE) and Wan 2.2, walking ComfyUI's own
modules without importing ComfyUI.

Wan's norms work per pixel, so bands exchange nothing. A band owns latent rows ``[a, e)``: it runs
the encoder's ``conv1`` and ``downsamples`` on its encoder-input rows plus a halo as wide as their
receptive field (worked out from the layers, ``halo_of``), chunk by chunk as ComfyUI's encoder
takes the frames (the first, then 4; or 2 with ComfyUI 0.33's deferred time downsampling), with a
causal cache of its own, and keeps its own rows. The rest of the encoder (``middle`` with its
per-frame attention over the whole frame, ``head``, then ``conv1`` of the VAE) runs once on the
whole frame (``suffix``), grouped in time as the down path gave its frames.
"""
from __future__ import annotations

import inspect
import math
import sys

import torch

from .geometry import conv_spread, is_conv, named
from .wan import cached_conv

SKIP = ("AvgDown3D",)  # Wan 2.2's parallel shortcuts: no spatial reach beyond their own block


def _tops_up(forward, default: bool) -> bool:
    """Whether the encoder's own cached convs (its conv1 and head, which ``WanEncodeExact._cached``
    mirrors) keep the previous call's last frame beside a single new one: Wan 2.2 and 0.3.75's
    Wan 2.1 do, 0.33's Wan 2.1 (frames in pairs) does not. Read from its code where it can be."""
    try:
        return "cache_x.shape[2] < 2" in inspect.getsource(forward)
    except (OSError, TypeError):
        return default


def down_reach(layers) -> tuple[float, int]:
    """(reach in input rows on either side, input rows per output row) of a down path whose
    modules run in order: every conv adds its spread at the scale it reads, strided ones change
    the scale after."""
    scale, reach = 1, 0.0

    def walk(m):
        nonlocal scale, reach
        if type(m).__name__ in SKIP:
            return
        if is_conv(m):
            reach += conv_spread(m) * scale
            stride = m.stride[-2] if isinstance(m.stride, (tuple, list)) else m.stride
            scale *= int(stride)
            return
        for child in m.children():
            walk(child)

    for layer in layers:
        walk(layer)
    return reach, scale


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """Wan 2.2's input: patch x patch pixels per position as channels ("b c f (h q) (w r) -> b (c r q) f h w")."""
    if patch == 1:
        return x
    b, c, f, h, w = x.shape
    x = x.reshape(b, c, f, h // patch, patch, w // patch, patch)
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * patch * patch, f, h // patch, w // patch)


class WanEncodeExact:
    sync = "none"
    causal = True
    encodes = True  # bands give the down path's features; ``suffix`` makes the latent

    def __init__(self, model, dtype: torch.dtype, device, patch_size: int = 1, first_chunk: bool = False):
        self.model = model
        self.encoder = enc = model.encoder
        self.dtype = dtype
        self.device = torch.device(device)
        self.patch = patch_size
        module = sys.modules.get(type(enc).__module__)
        self.cache_t = getattr(module, "CACHE_T", 2)
        # ComfyUI 0.33's Wan 2.1 encoder takes frames in pairs and defers lone downsampled frames
        self.pairs = "final" in inspect.signature(type(enc).forward).parameters
        self.top_up = _tops_up(type(enc).forward, default=not self.pairs)
        self.slots = 2 * sum(1 for _ in enc.modules()) + 2
        _, rows = down_reach([enc.conv1, enc.downsamples])
        self.rows = rows  # encoder-input rows per latent row
        self.in_rows = rows * patch_size  # pixel rows per latent row (bands.run's unit)
        self.halo = self.halo_of(model)

    @staticmethod
    def halo_of(model) -> int:
        """Latent rows a band reads beyond its own on each side: the down path's reach."""
        reach, rows = down_reach([model.encoder.conv1, model.encoder.downsamples])
        return int(math.ceil(reach / rows - 1e-9))

    @staticmethod
    def out_channels(model) -> int:
        """Channels of the down path's features (what bands give)."""
        return int(model.encoder.head[-1].in_channels)

    @staticmethod
    def refusal(model) -> str | None:
        enc = getattr(model, "encoder", None)
        if enc is None or not all(hasattr(enc, a) for a in ("conv1", "downsamples", "middle", "head")) \
                or not hasattr(model, "conv1"):
            return "its encoder is not ComfyUI's Wan encoder"
        if any(named(m, "AttentionBlock") for m in enc.downsamples.modules()):
            return "its down path has attention layers"
        return None

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

    def _cached(self, conv, x, cache: list, idx: list):
        return cached_conv(conv, x, cache, idx, self.cache_t, self.top_up)

    def down(self, x: torch.Tensor, cache: list, extra: dict):
        """conv1 and the downsamples on one call's frames (None: the call's frames were deferred)."""
        idx = [0]
        x = self._cached(self.encoder.conv1, x, cache, idx)
        for layer in self.encoder.downsamples:
            x = layer(x, cache, idx, **extra)
            if x is None:
                return None
        return x

    def band(self, a: int, e: int, height: int) -> "WanEncodeBand":
        """Latent rows [a, e) of an input ``height`` encoder-input rows high."""
        return WanEncodeBand(self, a, e, height)

    # -- the rest, once, on the whole frame --------------------------------------------------------
    def groups(self, frames: int, width: int) -> list[int]:
        """Latent frames each encoder call gives, found by running the down path on a strip one
        latent row high (the deferral is the model's own; only time decides it)."""
        cache = [None] * self.slots
        strip = torch.zeros((1, self.encoder.conv1.in_channels, frames, self.rows, width), dtype=self.dtype,
                            device=self.device)
        sizes = []
        for t0, t1, extra in self.schedule(frames):
            out = self.down(strip[:, :, t0:t1], cache, extra)
            sizes.append(0 if out is None else out.shape[2])
        return sizes

    def suffix(self, feats: torch.Tensor, frames: int) -> torch.Tensor:
        """The latent (mu) from the down path's features ``[1, C, T, h, w]`` of a ``frames``-frame input."""
        enc = self.encoder
        feats = feats.to(self.device, self.dtype)
        cache = [None] * self.slots
        outs, t = [], 0
        extras = [extra for _, _, extra in self.schedule(frames)]
        for n, extra in zip(self.groups(frames, self.rows), extras):
            if n == 0:
                continue
            x, idx = feats[:, :, t:t + n], [0]
            t += n
            for layer in enc.middle:
                x = layer(x, cache, idx, **extra) if named(layer, "ResidualBlock") else layer(x)
            for layer in enc.head:
                x = self._cached(layer, x, cache, idx) if named(layer, "CausalConv3d") else layer(x)
            outs.append(x)
        mu, _ = self.model.conv1(torch.cat(outs, 2)).chunk(2, dim=1)
        return mu


class WanEncodeBand:
    """One band's down path across encoder calls: its rows plus halo, its causal cache."""

    def __init__(self, ex: WanEncodeExact, a: int, e: int, height: int):
        self.ex = ex
        self.a, self.e = a, e
        lat_rows = -(-height // ex.rows)
        self.g0, self.g1 = max(0, a - ex.halo), min(lat_rows, e + ex.halo)
        self.cache: list = [None] * ex.slots

    def feed(self, x: torch.Tensor, extra: dict):
        """The band's own latent rows of the down path's output for one call (None if deferred)."""
        r = self.ex.rows
        out = self.ex.down(x[:, :, :, self.g0 * r:self.g1 * r], self.cache, extra)
        if out is None:
            return None
        return out[:, :, :, self.a - self.g0:self.e - self.g0]
