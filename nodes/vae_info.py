"""Read what the engine needs from a ComfyUI ``comfy.sd.VAE`` into a plain VaeSpec."""
from __future__ import annotations

from ..parallel_vae import families
from ..parallel_vae.errors import InputError
from ..parallel_vae.plan import AxisScale
from ..parallel_vae.sizing import Cost
from ..parallel_vae.spec import VaeSpec
from . import compat


def describe(vae, direction: str = "decode") -> VaeSpec:
    """Raise InputError("vae", ...) for VAEs the pack cannot decode (or encode), else return their spec."""
    verb, core = ("encoded", "VAE Encode") if direction == "encode" else ("decoded", "VAE Decode")
    model = getattr(vae, "first_stage_model", None)
    if model is None:
        raise InputError("vae", "ComfyUI could not initialise this VAE: no known VAE weights were found in "
                                "its file (ComfyUI logged 'No VAE weights detected'). Load a VAE file with "
                                "Load VAE, or a checkpoint that contains a VAE.")
    name = type(model).__name__
    if (vae.latent_dim == 1 or getattr(vae, "extra_1d_channel", None) is not None
            or vae.output_channels not in (3, 4)):
        # MiniMax-H3's audio VAE has 2-D latents [B, C, 2, T] and 2 output channels: not an image
        raise InputError("vae", f"{name} is an audio VAE (latents of {vae.latent_dim} axes, {vae.output_channels} "
                                f"output channels); only image and video VAEs can be {verb} in tiles here. "
                                f"Use {core} (Audio).")
    if compat.tiles_itself(vae):
        raise InputError("vae", f"{name} tiles itself (its model works in its own spatial and temporal chunks), "
                                f"so its tiles cannot be spread over devices or blended here. Use {core} "
                                f"(Tiled), which hands it its tile sizes, or {core}.")
    if vae.latent_dim == 2:
        ratio = vae.upscale_ratio
        if isinstance(ratio, (tuple, list)) or int(ratio) != ratio or ratio < 1:
            raise InputError("vae", f"{name} has an upscale ratio {ratio!r} this node cannot tile")
        family = families.detect(model, 2)
        return VaeSpec(family.key, f"{family.label} ({name})", vae.latent_channels, (AxisScale(int(ratio)),) * 2,
                       vae.output_channels)
    if vae.latent_dim != 3:
        raise InputError("vae", f"{name} has {vae.latent_dim}-D latents; only image (2-D) and video (3-D) "
                                f"VAEs are supported")
    scales = _video_scales(vae, name)
    family = families.detect(model, 3)
    return VaeSpec(family.key, f"{family.label} ({name})", vae.latent_channels, scales, vae.output_channels)


def _video_scales(vae, name: str) -> tuple[AxisScale, ...]:
    """ComfyUI describes video geometry with a lambda for time; check it is the usual k*T-(k-1)."""
    k = vae.temporal_compression_decode()
    up = vae.upscale_ratio
    index = vae.upscale_index_formula
    ok = isinstance(up, (tuple, list)) and len(up) == 3 and k is not None and index is not None
    if ok:
        time_scale = AxisScale(k, k - 1)
        ok = all(round(up[0](n)) == time_scale.size(n) for n in range(0, 12)) and tuple(index) == (k, up[1], up[2])
    if not ok:
        raise InputError("vae", f"{name} maps latent frames to pixels in a way this node cannot tile "
                                f"(upscale_ratio={up!r}, index formula={index!r})")
    return time_scale, AxisScale(int(up[1])), AxisScale(int(up[2]))


def decode_cost(vae, spec: VaeSpec) -> Cost:
    """Bytes to decode one tile (one latent frame of it for video), fitted to ComfyUI's own
    estimate ``memory_used_decode`` at two tile sizes: ``fixed + per_px * tile^2``."""
    scale = spec.scales[-1].factor
    points = []
    for side in (16, 32):  # latent pixels
        shape = (1, spec.latent_channels) + ((1,) if spec.latent_dim == 3 else ()) + (side, side)
        points.append(((side * scale) ** 2, float(vae.memory_used_decode(shape, vae.vae_dtype))))
    return _fit(points)


def _fit(points) -> Cost:
    """The line through two (pixels, bytes) points."""
    (p1, b1), (p2, b2) = points
    per_px = (b2 - b1) / (p2 - p1)
    return Cost(max(0.0, b1 - per_px * p1), per_px)


def encode_cost(vae, spec: VaeSpec) -> Cost:
    """Bytes to encode one tile (one frame of it for video) by its pixels, fitted to ComfyUI's own
    estimate ``memory_used_encode`` at two tile sizes: ``fixed + per_px * tile^2``."""
    points = []
    for side in (128, 256):  # pixels
        shape = (1, spec.out_channels) + ((1,) if spec.latent_dim == 3 else ()) + (side, side)
        points.append((side ** 2, float(vae.memory_used_encode(shape, vae.vae_dtype))))
    return _fit(points)
