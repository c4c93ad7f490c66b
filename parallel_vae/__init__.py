"""Parallel tiled VAE engine: tile plans, blending, device lists and the backends that decode.

Importable and testable without ComfyUI: this package never imports ``comfy``.
"""

__version__ = "0.1.0"
