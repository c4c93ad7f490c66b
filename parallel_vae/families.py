"""What the pack knows of each VAE family, once, as data: how to name it, whether it is causal
(decoded frame by frame with its cache, never cut in time), which model classes are it, its causal
stepper, its exact-mode band executor, and its patch size.

Everything that depends on the family reads this table: the spec the nodes build, the decoders
(``make_decoder``), exact mode (``exact_executor``, ``exact_refusal``, ``exact_rounds``). Adding a
family is a row here and, where it needs one, an adapter in models/ or exact/. Model classes are
named by module and class (as ComfyUI defines them), so this package never imports ComfyUI.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .exact import SdExact, Unsupported, WanExact
from .exact.attention import is_attention
from .exact.geometry import conv_spread
from .exact.sd_encode import SdEncodeExact
from .exact.wan_encode import WanEncodeExact
from .models import GenericDecoder, check
from .models.taehv import TaehvStepper
from .models.wan import WanStepper


@dataclass(frozen=True)
class Family:
    key: str
    label: str  # for messages: "Wan 2.1 VAE"
    causal: bool = False
    classes: tuple[str, ...] = ()  # model classes ("module.Class") of this family; image/video: by latent axes
    stepper: Optional[type] = None  # steps(z) frame by frame, checked against decode() (models/check.py)
    exact: Optional[type] = None  # the band executor of exact mode
    exact_label: str = ""  # what exact mode supports, for messages
    exact_encode: Optional[type] = None  # the band executor of exact encoding
    patch_size: int = 1  # pixels per side of one output position where the model does not say (Wan 2.2: 2)
    first_chunk: bool = False  # the decoder flags its first call (Wan 2.2)

    def patch(self, module) -> int:
        return int(getattr(module, "patch_size", self.patch_size)) if self.patch_size > 1 else 1


FAMILIES: dict[str, Family] = {f.key: f for f in (
    Family("image", "image VAE", exact=SdExact, exact_encode=SdEncodeExact,
           exact_label="SD 1.x/2.x, SDXL, SD3, Flux and other image VAEs built on ComfyUI's 2-D Decoder and Encoder"),
    Family("video", "video VAE"),
    Family("wan22", "Wan 2.2 VAE", causal=True, classes=("comfy.ldm.wan.vae2_2.WanVAE",), stepper=WanStepper,
           exact=WanExact, exact_label="Wan 2.2", patch_size=2, first_chunk=True, exact_encode=WanEncodeExact),
    Family("wan21", "Wan 2.1 VAE", causal=True, classes=("comfy.ldm.wan.vae.WanVAE",), stepper=WanStepper,
           exact=WanExact, exact_label="Wan 2.1 (also Qwen-Image)", exact_encode=WanEncodeExact),
    Family("taehv", "TAEHV (tiny video VAE)", causal=True, classes=("comfy.taesd.taehv.TAEHV",),
           stepper=TaehvStepper),
)}

EXACT_SUPPORTED = tuple(f.exact_label for f in FAMILIES.values() if f.exact is not None)  # decoding


def of(key: str) -> Family:
    return FAMILIES[key]


def detect(model, latent_axes: int) -> Family:
    """The family of ``model`` (a ComfyUI VAE's ``first_stage_model``): a causal family by its
    class (or a base class), else image or video by the latent's axes."""
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(model).__mro__}
    for family in FAMILIES.values():
        if names.intersection(family.classes):
            return family
    return FAMILIES["image" if latent_axes == 2 else "video"]


def make_decoder(key: str, module, dtype, device, output_device="cpu", pixel_dtype=torch.float32,
                 latent_channels: int | None = None) -> GenericDecoder:
    """The decoder for family ``key``: its causal stepper where one fits this model and passed its
    check against ``decode``, else whole tiles (correct on any ComfyUI, sliced into steps after)."""
    family = FAMILIES[key]
    stepper = family.stepper
    if stepper is not None and stepper.fits(module):
        made = stepper(module, dtype, device, output_device, pixel_dtype, patch_size=family.patch(module),
                       first_chunk=family.first_chunk)
        if latent_channels and check.trusted(key, made, latent_channels):
            return made
    return GenericDecoder(module, dtype, device, output_device, pixel_dtype)


def _executor_class(family: Family, direction: str) -> Optional[type]:
    return family.exact_encode if direction == "encode" else family.exact


def exact_supported(direction: str = "decode") -> tuple[str, ...]:
    """What exact mode supports in ``direction``, for messages."""
    return tuple(f.exact_label for f in FAMILIES.values() if _executor_class(f, direction) is not None)


def exact_refusal(key: str, model, direction: str = "decode") -> Optional[str]:
    """Why ``model`` cannot run exact mode in ``direction`` (None: it can), without building anything."""
    executor = _executor_class(FAMILIES[key], direction)
    if executor is None:
        return f"exact {direction} has no executor for this family"
    return executor.refusal(model)


def exact_executor(key: str, model, dtype: torch.dtype, device, direction: str = "decode"):
    why = exact_refusal(key, model, direction)
    if why is not None:
        raise Unsupported(why)
    family = FAMILIES[key]
    return _executor_class(family, direction)(model, dtype, device, patch_size=family.patch(model),
                                              first_chunk=family.first_chunk)


def exact_rounds(key: str, model, direction: str = "decode", frames: int = 1) -> int:
    """Lock-step rounds of one batch item: one at each GroupNorm, each conv that reads beyond its
    rows, and each global attention; a causal decoder's at each of its ``frames`` latent frames
    (about one decoder call each)."""
    part = model.decoder if direction == "decode" else model.encoder
    rounds = 0
    for m in part.modules():
        if hasattr(m, "num_groups") or is_attention(m):
            rounds += 1
        elif hasattr(m, "kernel_size") and getattr(m, "weight", None) is not None and conv_spread(m) > 0:
            rounds += 1
    return rounds * (frames if FAMILIES[key].causal else 1)


__all__ = ["EXACT_SUPPORTED", "exact_rounds", "FAMILIES", "Family", "detect", "exact_executor",
           "exact_refusal", "exact_supported", "make_decoder", "of"]
