"""Trust a causal stepper only after it reproduced the module's own ``decode`` once.

Steppers mirror a model's internals, which ComfyUI changes between releases (Wan 2.1's decoder
changed its chunking in 0.18 and stepping it the old way gave wrong pixels). So before a stepper
decodes real tiles, it decodes a tiny random latent next to ``module.decode`` (once per model class
and process, about a second); on any mismatch the whole-tile decoder is used instead, which is
correct on any ComfyUI, only slower to give first frames and heavier on memory.
"""
from __future__ import annotations

import logging
import threading

import torch

log = logging.getLogger("parallel_vae")

# Exactly equal is the expectation; a GPU may pick other kernels for other shapes, so a difference
# far below one 8-bit level (1/255 ~ 0.0078 in the -1..1 output) is still trusted. Broken steppers
# are off by whole units.
TOLERANCE = 1e-3
PROBE_FRAMES = (1, 4)  # a single latent frame, and a pair followed by a single one
PROBE_SIZE = 1  # latent pixels per side: enough for every code path, and cheap for Wan 2.2 (705 M parameters)

_verdicts: dict = {}  # (model class, stepper class, family) -> (trusted, max difference)
_lock = threading.Lock()


def probe_latents(channels: int, dtype, device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return [torch.randn((1, channels, t, PROBE_SIZE, PROBE_SIZE), generator=gen).to(device=device, dtype=dtype)
            for t in PROBE_FRAMES]


def compare(stepper, latents) -> float:
    """The largest absolute difference between ``stepper.steps`` and ``module.decode``."""
    worst = 0.0
    with torch.inference_mode():
        for z in latents:
            expected = stepper.module.decode(z).float()
            got = torch.cat(list(stepper.steps(z)), 2).to(expected.device)
            if got.shape != expected.shape:
                return float("inf")
            worst = max(worst, (got.float() - expected).abs().max().item())
    return worst


def trusted(family: str, stepper, latent_channels: int) -> bool:
    key = (type(stepper.module), type(stepper), family)
    with _lock:
        verdict = _verdicts.get(key)
        if verdict is None:
            try:
                diff = compare(stepper, probe_latents(latent_channels, stepper.dtype, stepper.device))
            except Exception as e:  # a stepper that cannot even run the probe is not trusted either
                log.warning("parallel_vae: the %s stepper failed its check against %s.decode (%s: %s)",
                            family, type(stepper.module).__name__, type(e).__name__, e)
                diff = float("inf")
            verdict = _verdicts[key] = (diff <= TOLERANCE, diff)
            if not verdict[0]:
                log.warning("parallel_vae: decoding %s frame by frame does not match %s.decode on this "
                            "ComfyUI (max difference %.3g); decoding whole tiles instead: the output is "
                            "still right, first frames come later and tiles use more memory. Please "
                            "report your ComfyUI version.", family, type(stepper.module).__name__, diff)
            elif diff > 0:
                log.info("parallel_vae: %s stepper within %.2g of %s.decode", family, diff,
                         type(stepper.module).__name__)
    return verdict[0]


def forget() -> None:
    """Drop every verdict (tests that change a stepper)."""
    with _lock:
        _verdicts.clear()
