"""Exact banded encode for ComfyUI's 2-D ``Encoder`` (SD 1.x/2.x, SDXL, SD3, Flux and other
16-channel variants), walked module by module without importing ComfyUI.

A band owns latent rows ``[a, e)`` and reads the pixel rows ``[a*f, e*f)`` (f: the encoder's total
downscale, so every level's rows stay whole). It walks the whole encoder on its own rows,
exchanging with its neighbours what crosses its edges (row_ops.py): GroupNorm moments, the edge
rows of every 3x3 conv, and before each strided downsample the row below its own (ComfyUI pads
one zero row and column on the bottom and right, then convolves with stride 2: a band's last
output row reads the first row of the band below). The mid block runs in bands too; its global
attention gathers every band's keys and values, and each band attends with its own queries. So
every row is computed once, on one lane, and the latent does not depend on the band count.
"""
from __future__ import annotations

from typing import Generator

import torch
import torch.nn.functional as F

from .geometry import join_rows, row_part
from .lockstep import Request, RowsRequest
from .row_ops import RowOps, Sync, same_rows

_ENGINES = ("AutoencodingEngineLegacy", "AutoencodingEngine")  # ComfyUI's image VAE model classes


def _engine(model) -> str | None:
    names = {c.__name__ for c in type(model).__mro__}
    return next((n for n in _ENGINES if n in names), None)


class SdEncodeExact(RowOps):
    """Bands of one SD-family ``first_stage_model``'s encoder, in lock-step."""

    # VAE Encode's input is IMAGE moved to [B, C, H, W]: channels-last in memory, and so is every
    # activation after it; oneDNN's convs are faster so (about 15% of an SD encode on a CPU)
    fmt = torch.channels_last

    def __init__(self, model, dtype: torch.dtype, device, patch_size: int = 1, first_chunk: bool = False):
        self.model = model
        self.encoder = model.encoder
        self.dtype = dtype
        self.device = torch.device(device)
        self.in_rows = 2 ** (self.encoder.num_resolutions - 1)  # pixel rows per latent row
        self.quant = _engine(model) == "AutoencodingEngineLegacy"

    @staticmethod
    def refusal(model) -> str | None:
        """Why this model has no exact encoder executor (None: it has one)."""
        enc = getattr(model, "encoder", None)
        if enc is None or type(enc).__name__ != "Encoder":
            return "its encoder is not ComfyUI's 2-D Encoder"
        if _engine(model) is None:
            return f"its model ({type(model).__name__}) is not one of ComfyUI's image autoencoders"
        if getattr(enc, "carried", False) or getattr(model, "bn", None) is not None:
            return "its encoder is a 3-D or patched variant"
        if getattr(model, "max_batch_size", None) is not None:
            return "its model encodes in batches of its own"
        if getattr(enc, "temb_ch", 0):
            return "its encoder takes a timestep embedding"
        for i, level in enumerate(enc.down):
            if len(level.attn):
                return "its down path has attention layers"
            for block in level.block:
                if getattr(block, "use_conv_shortcut", False) and block.in_channels != block.out_channels:
                    return "its down path has 3x3 shortcut convs"
            if i != enc.num_resolutions - 1:
                down = level.downsample
                conv = getattr(down, "conv", None)
                if getattr(down, "with_conv", False) and not _stride2(conv):
                    return "its downsampling is not ComfyUI's padded 3x3 stride-2 conv"
        for m in SdEncodeExact._row_layers(enc):
            if hasattr(m, "kernel_size") and not same_rows(m):
                return "its encoder has a conv that is strided or not row-aligned outside the downsampling"
        return None

    @staticmethod
    def _row_layers(enc):
        for level in enc.down:
            for block in level.block:
                yield from block.modules()
        for part in (enc.conv_in, enc.mid, enc.conv_out):
            yield from part.modules()

    def prefix(self, z: torch.Tensor) -> torch.Tensor:
        """Nothing runs on the whole input: the pixels, on the device."""
        return z.to(self.device, self.dtype)

    def band(self, x_all: torch.Tensor, a: int, e: int) -> Generator[Request, object, torch.Tensor]:
        """Latent rows ``[a, e)`` from pixel rows ``[a*f, e*f)`` of ``x_all`` ``[1, C, H, W]``;
        yields a Request at each sync point; returns the band's latent ``[1, C, e-a, w]``."""
        enc, f = self.encoder, self.in_rows
        height = x_all.shape[-2]
        me = Sync(a * f, min(height, e * f), height)
        box = [self.dense(x_all[:, :, me.a:me.e])]
        h = yield from self._conv(me, enc.conv_in, box, "conv_in")
        for i in range(enc.num_resolutions):
            level = enc.down[i]
            for block in level.block:
                box, h = [h], None
                h = yield from self._resblock(me, block, box)
            if i != enc.num_resolutions - 1:
                box, h = [h], None
                h = yield from self._downsample(me, level.downsample, box)
        box, h = [h], None
        h = yield from self._resblock(me, enc.mid.block_1, box)
        h = yield from self._attention(me, enc.mid.attn_1, h)
        box, h = [h], None
        h = yield from self._resblock(me, enc.mid.block_2, box)
        h = yield from self._norm(me, enc.norm_out, h, "norm_out", inplace=True)
        box, h = [F.silu(h, inplace=True)], None
        h = yield from self._conv(me, enc.conv_out, box, "conv_out")
        if self.quant:
            h = self.model.quant_conv(h)
        return self.model.regularization(h)[0]

    def _downsample(self, me: Sync, down, box: list):
        x = box.pop()
        if not getattr(down, "with_conv", False):
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        rows = x.shape[-2]
        below = None
        if not me.alone:
            _, below = yield RowsRequest(me.next(), "downsample", x[:, :, :1].clone(), x[:, :, rows - 1:].clone())
        if below is None:  # the image's bottom: ComfyUI's zero pad
            below = torch.zeros_like(x[:, :, :1])
        joined = join_rows([x, below], self.fmt, zero_cols=1)  # and ComfyUI's zero right column
        del x
        return self.dense(down.conv(joined))


def _stride2(conv) -> bool:
    if conv is None:
        return False
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    return row_part(k) == 3 and row_part(s) == 2 and row_part(p) == 0
