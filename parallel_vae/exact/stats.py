"""GroupNorm statistics across bands: each band's own rows, combined in float64.

A band sums only the rows it owns (never its halo: halo rows belong to a neighbour, and the outer
ones are spoilt by zero padding). The sums are float64: float32 sums of squares cancel
catastrophically when a group's mean is large against its spread. Combining in a fixed band order
and handing every band the same float64 mean and rstd makes the output independent of how the
rows were split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Moments:
    """Count, sum and sum of squares per (batch, group) of one band's own rows, float64 on the CPU."""

    count: int  # elements per (batch, group)
    total: torch.Tensor  # [B, G] float64
    squares: torch.Tensor  # [B, G] float64

    def as_wire(self) -> tuple:
        return self.count, self.total.numpy().tobytes(), self.squares.numpy().tobytes(), tuple(self.total.shape)

    @classmethod
    def from_wire(cls, wire: tuple) -> "Moments":
        count, total, squares, shape = wire
        return cls(int(count), torch.frombuffer(bytearray(total), dtype=torch.float64).reshape(shape),
                   torch.frombuffer(bytearray(squares), dtype=torch.float64).reshape(shape))


CHUNK_BYTES = 64 << 20  # the float64 copy of own rows is made this many bytes at a time


def moments(x: torch.Tensor, groups: int, r0: int, r1: int) -> Moments:
    """Moments of rows ``[r0, r1)`` (local indices) of ``x`` ``[B, C, H, W]`` (or ``[B, C, T, H, W]``),
    a few groups at a time so the float64 copy stays small."""
    b, c = x.shape[:2]
    own = x.narrow(-2, r0, r1 - r0).unflatten(1, (groups, c // groups))
    dims = tuple(range(2, own.dim()))
    per_group = own[0, 0].numel()
    step = max(1, CHUNK_BYTES // max(1, 8 * b * per_group))
    total = torch.empty((b, groups), dtype=torch.float64)
    squares = torch.empty((b, groups), dtype=torch.float64)
    for g in range(0, groups, step):
        part = own[:, g:g + step].to(torch.float64)
        total[:, g:g + step] = part.sum(dims).cpu()
        squares[:, g:g + step] = part.square_().sum(dims).cpu()
    return Moments(per_group, total, squares)


def combine(parts: Sequence[Moments], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (mean, rstd) per (batch, group), float64, from every band's moments in band order."""
    count = sum(p.count for p in parts)
    total = parts[0].total.clone()
    squares = parts[0].squares.clone()
    for p in parts[1:]:
        total += p.total
        squares += p.squares
    mean = total / count
    var = (squares / count - mean * mean).clamp_min(0.0)
    return mean, torch.rsqrt(var + eps)


def normalize(x: torch.Tensor, norm, mean: torch.Tensor, rstd: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``norm`` (a GroupNorm) applied to ``x`` with the given global statistics, as torch's kernel
    does it: ``x * scale + shift`` per (batch, channel), scale and shift from float64."""
    b, c = x.shape[:2]
    groups = norm.num_groups
    weight = norm.weight.detach().to("cpu", torch.float64) if norm.weight is not None else torch.ones(c, dtype=torch.float64)
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
