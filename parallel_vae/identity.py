"""What makes two builds of a VAE the same model, in plain data (duck-typed: no ComfyUI import).

A worker (or a lane on another device) rebuilds the VAE from its weights with ComfyUI's loader.
Some VAEs take part of their architecture from the file's metadata rather than from the weights
(LTXV's config, taef2's channel count), so a rebuild without it gives another model, and a
non-strict load of the weights into it would decode garbage silently. Comparing signatures after
the rebuild turns that into an error.
"""
from __future__ import annotations

import hashlib

from .errors import ModelMismatch

FIELDS = ("model", "latent_channels", "latent_dim", "output_channels", "upscale_ratio",
          "upscale_index_formula", "layout")


def _plain(value):
    """Numbers, tuples of numbers, and a VAE's per-axis lambdas as their values at 1..6."""
    if callable(value):
        return tuple(value(n) for n in range(1, 7))
    if isinstance(value, (tuple, list)):
        return tuple(_plain(v) for v in value)
    return value


def signature(vae) -> dict:
    """The model class, latent and pixel geometry, and the parameter layout of a ComfyUI VAE."""
    model = vae.first_stage_model
    layout = hashlib.blake2b(digest_size=12)
    for key, t in sorted(model.state_dict().items()):
        layout.update(f"{key}:{tuple(t.shape)};".encode())
    return {
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "latent_channels": _plain(getattr(vae, "latent_channels", None)),
        "latent_dim": _plain(getattr(vae, "latent_dim", None)),
        "output_channels": _plain(getattr(vae, "output_channels", None)),
        "upscale_ratio": _plain(getattr(vae, "upscale_ratio", None)),
        "upscale_index_formula": _plain(getattr(vae, "upscale_index_formula", None)),
        "layout": layout.hexdigest(),
    }


def differences(expected: dict, got: dict) -> list[str]:
    return [f"{k} {got.get(k)!r} instead of {expected.get(k)!r}" if k != "layout" else
            "its parameters have another layout (names or shapes)"
            for k in FIELDS if k in expected and expected.get(k) != got.get(k)]


def rebuild(factory, expect: dict | None, **kwargs):
    """``factory(**kwargs)`` (ComfyUI's loader), checked against the parent's ``expect``ed signature:
    ModelMismatch when the weights do not fit what the loader made of them, or it made another model."""
    if not expect:
        return factory(**kwargs)
    try:
        built = factory(**kwargs)
    except Exception as e:  # e.g. a size mismatch: the weights do not fit the default architecture
        lines = str(e).strip().splitlines()
        detail = f"{lines[0]} {lines[1].strip()}" if len(lines) > 1 else (lines[0] if lines else "")
        raise ModelMismatch(f"ComfyUI's loader could not rebuild it from its weights ({type(e).__name__}: "
                            f"{detail[:300]})") from e
    mismatch = differences(expect, signature(built))
    if mismatch:
        raise ModelMismatch("it came out as another model: " + "; ".join(mismatch))
    return built
