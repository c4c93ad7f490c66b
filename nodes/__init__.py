"""ComfyUI glue: the only code in the pack that imports ``comfy``."""
import logging

from . import compat, live, server_hooks
from ._api import ComfyExtension, io
from .decode import ParallelVAEDecode
from .encode import ParallelVAEEncode
from .save_video import ParallelVAESaveVideo
from .stream import ParallelVAEDecodeStream, ParallelVAEStreamToImages
from .vae_wrapper import ParallelVAE

NODES: list[type[io.ComfyNode]] = [ParallelVAEDecode, ParallelVAEEncode, ParallelVAEDecodeStream,
                                   ParallelVAESaveVideo, ParallelVAEStreamToImages, ParallelVAE]


logging.getLogger("parallel_vae").info("parallel_vae: %s", compat.summary())  # for bug reports
server_hooks.install(live.server())


class ParallelVAEExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


__all__ = ["NODES", "ParallelVAE", "ParallelVAEDecode", "ParallelVAEEncode", "ParallelVAEDecodeStream", "ParallelVAEExtension",
           "ParallelVAESaveVideo", "ParallelVAEStreamToImages"]
