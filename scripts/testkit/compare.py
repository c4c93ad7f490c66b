"""The contract's tolerance and the comparisons the tests make."""
import torch

from .latents import random_latent as latent  # noqa: F401  (the tests' seeded latents)

TOL = 1e-4  # max abs difference in float32 that the correctness contract allows


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()
