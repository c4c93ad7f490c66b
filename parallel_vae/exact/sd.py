"""Exact banded decode for ComfyUI's 2-D ``Decoder`` (SD1.x/2.x, SDXL, SD3, Flux and other
16-channel variants), walked module by module without importing ComfyUI.

The prefix (``post_quant_conv``, ``conv_in``, the mid block with its global attention) runs on the
whole latent. A band then walks the up path on its rows plus halo. After each conv that spreads
rows, the rows the zero padding spoilt at an interior edge are cropped ("valid" convolution at
interior edges, ordinary padding at the image's own borders), and a ResnetBlock's skip is cropped
to match, so the tensor shrinks as its halo stops being valid. At every GroupNorm the band yields
the moments of its own rows and waits for the global statistics (``stats.combine``).
"""
from __future__ import annotations

from typing import Generator

import torch
import torch.nn.functional as F

from . import stats
from .geometry import Window, conv_spread, halo_rows, receptive_rows

Request = tuple  # ("gn", index, name, eps, Moments): what a band yields at each GroupNorm


class _Own:
    """A band's own latent rows and how many GroupNorms it has passed (one per generator)."""

    __slots__ = ("a", "e", "k")

    def __init__(self, a: int, e: int):
        self.a, self.e, self.k = a, e, 0


def _resblocks(decoder):
    for level in reversed(range(decoder.num_resolutions)):
        up = decoder.up[level]
        for block in up.block:
            yield block
        if level != 0:
            yield up.upsample


class SdExact:
    """Bands of one SD-family ``first_stage_model``; ``sync`` says bands exchange GroupNorm moments."""

    sync = "groupnorm"
    causal = False

    def __init__(self, model, dtype: torch.dtype, device):
        self.model = model
        self.decoder = model.decoder
        self.dtype = dtype
        self.device = torch.device(device)
        self.px_per_row = 2 ** (self.decoder.num_resolutions - 1)
        self.halo = halo_rows(self.rf_rows(self.decoder))

    @staticmethod
    def rf_rows(decoder) -> float:
        return receptive_rows([*_resblocks(decoder), decoder.norm_out, decoder.conv_out])

    @staticmethod
    def refusal(model) -> str | None:
        """Why this model has no exact executor (None: it has one)."""
        dec = getattr(model, "decoder", None)
        if dec is None or type(dec).__name__ != "Decoder":
            return "its decoder is not ComfyUI's 2-D Decoder"
        if getattr(dec, "carried", False) or getattr(model, "bn", None) is not None:
            return "its decoder is a 3-D or patched variant"
        if getattr(dec, "temb_ch", 0):
            return "its decoder takes a timestep embedding"
        for level in dec.up:
            if len(level.attn):
                return "its up path has attention layers"
            for block in level.block:
                if getattr(block, "use_conv_shortcut", False) and block.in_channels != block.out_channels:
                    return "its up path has 3x3 shortcut convs"
        up = getattr(dec.up[-1], "upsample", None)
        if up is not None and (not getattr(up, "with_conv", True) or getattr(up, "scale_factor", 2.0) not in (2, 2.0)):
            return "its upsampling is not a nearest x2 followed by a conv"
        return None

    # -- prefix ----------------------------------------------------------------------------------
    def prefix(self, z: torch.Tensor) -> torch.Tensor:
        """conv_in and the mid block on the whole latent ``[1, C, H, W]``."""
        dec = self.decoder
        z = z.to(self.device, self.dtype)
        pqc = getattr(self.model, "post_quant_conv", None)
        if pqc is not None:
            z = pqc(z)
        h = dec.conv_in(z)
        h = dec.mid.block_1(h, None)
        h = dec.mid.attn_1(h)
        return dec.mid.block_2(h, None)

    # -- one band --------------------------------------------------------------------------------
    def band(self, mid: torch.Tensor, a: int, e: int) -> Generator[Request, tuple, torch.Tensor]:
        """Own rows ``[a, e)``: yields ("gn", k, name, eps, Moments) at each GroupNorm and is sent back
        (mean, rstd); returns the band's pixels ``[1, C, px*(e-a), W*px]`` on the device."""
        height = mid.shape[-2]
        g0, g1 = max(0, a - self.halo), min(height, e + self.halo)
        x = mid[:, :, g0:g1].contiguous()
        own = _Own(a, e)
        win = Window(g0, g1, height)
        scale = 1
        for layer in _resblocks(self.decoder):
            if not hasattr(layer, "norm1"):  # an Upsample
                x = F.interpolate(x, scale_factor=2.0, mode="nearest")
                scale *= 2
                win = win.scaled(2)
                x, win = self._conv(layer.conv, x, win)
            else:
                x, win = yield from self._resblock(own, layer, x, win, scale)
        x = yield from self._norm(own, self.decoder.norm_out, x, win, scale, "norm_out", inplace=True)
        x = F.silu(x, inplace=True)
        x, win = self._conv(self.decoder.conv_out, x, win)
        if getattr(self.decoder, "tanh_out", False):
            x = torch.tanh(x)
        own0, own1 = a * scale, e * scale
        if own0 < win.g0 or own1 > win.g1:
            raise RuntimeError(f"exact band [{a}, {e}) lost its own rows: halo {self.halo} is too small")
        return x[:, :, own0 - win.g0:own1 - win.g0]

    def _conv(self, conv, x, win: Window):
        x = conv(x)
        spread = conv_spread(conv)
        top = spread if win.top_inside else 0
        bottom = spread if win.bottom_inside else 0
        if top or bottom:
            # contiguous again: on a cropped view, elementwise kernels take their scalar tail path
            # on other elements than in a whole tensor (SiLU's exp differs there in the last bit),
            # and the output would depend on the band count
            x = x[:, :, top:x.shape[-2] - bottom].contiguous()
        return x, win.shrink(spread)

    def _norm(self, own: "_Own", norm, x, win: Window, scale: int, name: str, inplace: bool = False):
        r0, r1 = own.a * scale - win.g0, own.e * scale - win.g0
        if r0 < 0 or r1 > x.shape[-2]:
            raise RuntimeError(f"exact band [{own.a}, {own.e}) lost its own rows before {name}")
        k = own.k
        own.k += 1
        mean, rstd = yield ("gn", k, name, norm.eps, stats.moments(x, norm.num_groups, r0, r1))
        return stats.normalize(x, norm, mean, rstd, inplace=inplace)

    def _resblock(self, own: "_Own", block, x, win: Window, scale: int):
        h = yield from self._norm(own, block.norm1, x, win, scale, "norm1")
        h = F.silu(h, inplace=True)
        h, hwin = self._conv(block.conv1, h, win)
        h = yield from self._norm(own, block.norm2, h, hwin, scale, "norm2", inplace=True)
        h = F.silu(h, inplace=True)
        h, hwin = self._conv(block.conv2, h, hwin)
        if block.in_channels != block.out_channels:
            x = block.nin_shortcut(x)
        x = x[:, :, hwin.g0 - win.g0:hwin.g1 - win.g0]
        return h.add_(x), hwin
