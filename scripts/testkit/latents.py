"""Latent files in ComfyUI's own .latent format (what SaveLatent writes and LoadLatent reads)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def random_latent(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def save_latent(latent: torch.Tensor, path: Path) -> Path:
    import safetensors.torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # latent_format_version_0 tells LoadLatent not to rescale by 1/0.18215.
    safetensors.torch.save_file({"latent_tensor": latent.contiguous(), "latent_format_version_0": torch.tensor([])},
                                str(path))
    return path


def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)
