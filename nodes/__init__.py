"""ComfyUI glue: the only code in the pack that imports ``comfy``."""
from ._api import ComfyExtension, io
from .decode import ParallelVAEDecode
from .save_video import ParallelVAESaveVideo
from .stream import ParallelVAEDecodeStream, ParallelVAEStreamToImages

NODES: list[type[io.ComfyNode]] = [ParallelVAEDecode, ParallelVAEDecodeStream, ParallelVAESaveVideo,
                                   ParallelVAEStreamToImages]


class ParallelVAEExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


__all__ = ["NODES", "ParallelVAEDecode", "ParallelVAEDecodeStream", "ParallelVAEExtension",
           "ParallelVAESaveVideo", "ParallelVAEStreamToImages"]
