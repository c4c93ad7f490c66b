"""Lane speeds set alike for tests that compare lock-step bands bit for bit against bands cut in
ComfyUI's process: exact plans split rows by the lanes' measured speeds, and Wan's bands of other
heights agree to about 2e-6 but not bit for bit (oneDNN picks its conv kernel by the input's
height; SD's do not move). Nothing of it ships with the pack."""
from __future__ import annotations


def even_speeds(pool) -> None:
    """Every lane of ``pool`` measured alike (no pool yet: nothing measured, every lane counts alike)."""
    if pool is None:
        return
    for name in pool.speeds.rates:
        pool.speeds.rates[name] = 1.0


__all__ = ["even_speeds"]
