"""The mid block's global attention with a bounded score matrix.

ComfyUI's split attention (``normal_attention``, what it runs where SDPA is off, e.g. on CPU)
sizes its query slices by free memory, so wherever memory is plentiful it builds the whole
``positions x positions`` score matrix twice (scores and softmax): 2 GiB at a 128x128 latent,
more than the rest of the exact decode. The same arithmetic on bounded query slices gives the
same result (each query row's scores, softmax and weighted sum do not depend on the other rows),
bit for bit in the tests against ComfyUI's own function, and holds one slice at a time.
Other attention functions (SDPA, xformers) already bound their memory and run as they are.
"""
from __future__ import annotations

import torch

SLICE_BYTES = 64 << 20  # one slice of scores; the softmax holds a second
# BLAS takes other kernels for a few query rows, whose sums differ in the last bit: slices are
# even and about this long at least (ComfyUI's own slices are even too, or the whole matrix)
MIN_SLICE_ROWS = 256


def is_attn_block(module) -> bool:
    """ComfyUI's ``AttnBlock`` (norm, 1x1 q/k/v, proj_out), by its parts."""
    return all(hasattr(module, n) for n in ("norm", "q", "k", "v", "proj_out"))


def is_attention(module) -> bool:
    """A global attention layer bands gather keys and values for: ComfyUI's ``AttnBlock``, or
    Wan's ``AttentionBlock`` (per frame)."""
    return is_attn_block(module) or type(module).__name__ == "AttentionBlock"


def split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slice_bytes: int) -> torch.Tensor:
    """ComfyUI's split attention over ``[B, C, H, W]`` q, k, v with at most ``slice_bytes`` of
    scores alive. ``q`` may hold fewer rows than k and v (an exact band's own queries against the
    whole item's keys): each query's result does not depend on the others."""
    shape = q.shape
    b, c = shape[0], shape[1]
    q = q.reshape(b, c, -1).permute(0, 2, 1)
    k = k.reshape(b, c, -1)
    v = v.reshape(b, c, -1)
    out = torch.zeros((b, c, q.shape[1]), dtype=v.dtype, device=v.device)
    scale = int(q.shape[-1]) ** -0.5
    positions = k.shape[2]
    queries = q.shape[1]
    rows = max(MIN_SLICE_ROWS, slice_bytes // max(1, b * positions * q.element_size()))
    count = -(-queries // rows)
    base, extra = divmod(queries, count)  # even slices: no short remainder
    i = 0
    for n in range(count):
        j = i + base + (1 if n < extra else 0)
        scores = torch.bmm(q[:, i:j], k) * scale
        weights = torch.nn.functional.softmax(scores, dim=2).permute(0, 2, 1)
        del scores
        out[:, :, i:j] = torch.bmm(v, weights)
        del weights
        i = j
    return out.reshape(shape)


# ComfyUI's attention functions that take fewer queries than keys (each reshapes q, k and v by its
# own shape); its split attention does not (its buffer is shaped like k), so split_attention runs
# in its place with the same arithmetic
_TAKES_BAND_QUERIES = ("pytorch_attention", "xformers_attention")


def band_attention(block, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``block``'s attention of a band's queries ``q`` over the whole item's keys and values."""
    return attend_band(getattr(block, "optimized_attention", None), q, k, v)


def attend_band(fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ComfyUI's attention function ``fn`` for a band's queries ``q`` over the whole item's keys
    and values, or the split attention's arithmetic in bounded slices where ``fn`` is that one."""
    if getattr(fn, "__name__", "") in _TAKES_BAND_QUERIES:
        return fn(q, k, v)
    return split_attention(q, k, v, SLICE_BYTES)


__all__ = ["attend_band", "band_attention", "is_attention", "is_attn_block", "split_attention"]
