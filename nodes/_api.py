"""The V3 node API, pinned to a numbered version (``latest`` moves between ComfyUI releases)."""
try:
    from comfy_api.v0_0_2 import ComfyExtension, io
except ImportError:  # a ComfyUI older or newer than the pinned surface
    from comfy_api.latest import ComfyExtension, io


def latent_node(node_id: str, display_name: str, description: str, inputs: list, outputs: list,
                category: str = "latent", **more) -> "io.Schema":
    """The schema of one of the pack's nodes, in ComfyUI's latent category unless told."""
    return io.Schema(node_id=node_id, display_name=display_name, category=category, description=description,
                     inputs=inputs, outputs=outputs, **more)


__all__ = ["ComfyExtension", "io", "latent_node"]
