"""GroupNorm statistics across bands: per-row moments, combined in float64 in row order.

A band reports, per (batch, group, row), the mean and the sum of squared deviations (M2) of its
rows, each row's computed the same way whatever band holds it. The coordinator puts every band's
rows back in image order and combines them in float64 (Chan's parallel formula), so the global
mean and rstd, and hence the output, do not depend on how the rows were split.

Precision: each (channel, row) is summed in float32 after subtracting the row's first element,
so a group whose mean is large against its spread does not cancel catastrophically (plain float32
sums of squares give 4e-2 errors at mean/std = 1000); everything after that is float64.
Speed: the row sums run along the contiguous last dim, a few channels at a time through one small
buffer, so no full-size temporary is allocated.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Moments:
    """Per (batch, group, row) of one band: ``count`` elements each, their mean and M2 (float64, CPU)."""

    count: int  # elements per (batch, group, row): channels per group x width
    mean: torch.Tensor  # [B, G, rows] float64
    m2: torch.Tensor  # [B, G, rows] float64: sum of squared deviations from the row's mean

    def as_wire(self) -> tuple:
        return self.count, self.mean.numpy().tobytes(), self.m2.numpy().tobytes(), tuple(self.mean.shape)

    @classmethod
    def from_wire(cls, wire: tuple) -> "Moments":
        count, mean, m2, shape = wire
        return cls(int(count), torch.frombuffer(bytearray(mean), dtype=torch.float64).reshape(shape),
                   torch.frombuffer(bytearray(m2), dtype=torch.float64).reshape(shape))


BUFFER_BYTES = 4 << 20  # the shifted copy is made this many bytes at a time (stays in cache)


def moments(x: torch.Tensor, groups: int) -> Moments:
    """Moments of every row of ``x`` ``[B, C, H, W]``, per group."""
    if x.dim() != 4:
        raise ValueError(f"exact GroupNorm statistics take [B, C, H, W], not {tuple(x.shape)}")
    b, c, h, w = x.shape
    if c > 1 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return _moments_channels_last(x, groups)
    step = max(1, min(c, BUFFER_BYTES // max(1, b * h * w * x.element_size())))
    buf = torch.empty((b, step, h, w), dtype=x.dtype, device=x.device)
    mean_c = torch.empty((b, c, h), dtype=torch.float64)
    m2_c = torch.empty((b, c, h), dtype=torch.float64)
    for c0 in range(0, c, step):
        part = x[:, c0:c0 + step]
        d = buf[:, :part.shape[1]]
        torch.sub(part, part[..., :1], out=d)
        s1 = d.sum(-1).double()
        s2 = d.square_().sum(-1).double()
        mean_c[:, c0:c0 + step] = (part[..., 0].double() + s1 / w).cpu()
        m2_c[:, c0:c0 + step] = (s2 - s1 * s1 / w).clamp_min_(0.0).cpu()
    return _by_group(mean_c, m2_c, groups, w)


def _by_group(mean_c: torch.Tensor, m2_c: torch.Tensor, groups: int, w: int) -> Moments:
    """Per-(batch, channel, row) moments ``[B, C, H]`` combined over each group's channels, float64."""
    c = mean_c.shape[1]
    mean_c = mean_c.unflatten(1, (groups, c // groups))
    m2_c = m2_c.unflatten(1, (groups, c // groups))
    mean = mean_c.mean(2)
    m2 = (m2_c + w * (mean_c - mean.unsqueeze(2)).square()).sum(2)
    return Moments(w * (c // groups), mean, m2)


def _moments_channels_last(x: torch.Tensor, groups: int) -> Moments:
    """``moments`` of a channels-last tensor, read in its own order: a few rows at a time, each
    row's sums over the width taken for every channel at once (contiguous channels)."""
    b, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1)  # [B, H, W, C], contiguous
    step = max(1, min(h, BUFFER_BYTES // max(1, b * w * c * x.element_size())))
    buf = torch.empty((b, step, w, c), dtype=x.dtype, device=x.device)
    mean_c = torch.empty((b, h, c), dtype=torch.float64)
    m2_c = torch.empty((b, h, c), dtype=torch.float64)
    for h0 in range(0, h, step):
        part = rows[:, h0:h0 + step]
        d = buf[:, :part.shape[1]]
        torch.sub(part, part[:, :, :1], out=d)
        s1 = d.sum(2).double()
        s2 = d.square_().sum(2).double()
        mean_c[:, h0:h0 + step] = (part[:, :, 0].double() + s1 / w).cpu()
        m2_c[:, h0:h0 + step] = (s2 - s1 * s1 / w).clamp_min_(0.0).cpu()
    return _by_group(mean_c.transpose(1, 2), m2_c.transpose(1, 2), groups, w)


def combine(parts: Sequence[Moments], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (mean, rstd) per (batch, group), float64, from the bands' moments in band order."""
    count = parts[0].count
    if any(p.count != count for p in parts):
        raise ValueError("exact mode: bands disagree on a GroupNorm's width")
    mean_r = torch.cat([p.mean for p in parts], -1)
    m2_r = torch.cat([p.m2 for p in parts], -1)
    mean = mean_r.mean(-1)
    var = (m2_r + count * (mean_r - mean.unsqueeze(-1)).square()).sum(-1) / (count * mean_r.shape[-1])
    return mean, torch.rsqrt(var + eps)


def normalize(x: torch.Tensor, norm, mean: torch.Tensor, rstd: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``norm`` (a GroupNorm) applied to ``x`` with the given global statistics, as torch's kernel
    does it: ``x * scale + shift`` per (batch, channel), scale and shift from float64."""
    b, c = x.shape[:2]
    groups = norm.num_groups
    ones = torch.ones(c, dtype=torch.float64)
    weight = norm.weight.detach().to("cpu", torch.float64) if norm.weight is not None else ones
    bias = norm.bias.detach().to("cpu", torch.float64) if norm.bias is not None else torch.zeros(c, dtype=torch.float64)
    rstd_c = rstd.repeat_interleave(c // groups, dim=1)  # [B, C]
    mean_c = mean.repeat_interleave(c // groups, dim=1)
    scale = rstd_c * weight
    shift = bias - mean_c * scale
    view = (b, c) + (1,) * (x.dim() - 2)
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    scale = scale.to(x.device, compute).reshape(view)
    shift = shift.to(x.device, compute).reshape(view)
    if x.dtype == compute:  # the same two roundings either way, so every band matches
        return x.mul_(scale).add_(shift) if inplace else x.mul(scale).add_(shift)
    return x.to(compute).mul_(scale).add_(shift).to(x.dtype)
