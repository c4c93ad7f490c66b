"""Parallel tiled VAE engine: tile plans, blending, device lists and decode lanes.

Importable and testable without ComfyUI: this package never imports ``comfy``.
"""

__version__ = "0.1.0"
