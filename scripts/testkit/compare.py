"""The contract's tolerance and the comparisons the tests make."""
import torch

TOL = 1e-4  # max abs difference in float32 that the correctness contract allows


def latent(shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()
