"""The V3 node API, pinned to a numbered version (``latest`` moves between ComfyUI releases)."""
try:
    from comfy_api.v0_0_2 import ComfyExtension, io
except ImportError:  # a ComfyUI older or newer than the pinned surface
    from comfy_api.latest import ComfyExtension, io

__all__ = ["ComfyExtension", "io"]
