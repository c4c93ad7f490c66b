"""Parallel Tiled VAE: a ComfyUI custom node pack.

ComfyUI imports this folder as a package. Nothing here imports ComfyUI at module level, so the
repository stays importable by pytest; the nodes load inside ``comfy_entrypoint``.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import ParallelVAEExtension

    return ParallelVAEExtension()
