"""Parallel VAE: a VAE that ComfyUI's own nodes use (VAE Decode, VAE Encode, WanImageToVideo,
VAE Encode (for Inpainting), ...), following core's Select VAE Device: a shallow copy of the VAE
whose ``encode``, ``decode``, ``encode_tiled`` and ``decode_tiled`` run through the pack on the
node's devices. Everything else is the VAE's own, and the input VAE is unchanged.

``encode`` and ``decode`` run in the node's mode and tile size (exact: VAE Encode's and VAE
Decode's result); the ``*_tiled`` calls keep their caller's tile sizes in tiled mode, so VAE
Decode (Tiled) fed a Parallel VAE gives what it gives with the plain one.
"""
from __future__ import annotations

import copy

from ..parallel_vae import blend, engine
from ..parallel_vae import devices as device_lists
from ..parallel_vae.errors import InputError
from ..parallel_vae.plan import TEMPORAL_MAX, TILE_AUTO, TILE_MAX
from . import vae_info
from ._api import io
from .encode import encode as run_encode
from .encode_job import EncodeJob
from .job import MODES, DecodeJob, check_mode
from .model import BASE  # the plain VAE a Parallel VAE wraps (a wrapper of a wrapper wraps the plain one)
from .progress import NodeProgress



def _decode(vae, latent, tile_size, overlap, temporal_size, temporal_overlap, devices, mode):
    """VAE.decode's result (``[B, H, W, C]``, video ``[B, T, H, W, C]``) through the pack."""
    job = DecodeJob.prepare({"samples": latent}, vae, tile_size, overlap, temporal_size, temporal_overlap,
                            devices, None, mode)
    run = job.start(NodeProgress.poll)
    storage, out = blend.allocate_output(run.plan)
    engine.decode(run.plan, job.tensor, run.units, out, finish=job.finisher(run.progress), on_unit=run.progress.unit)
    run.progress.finish()
    return storage


def wrap(vae, devices: str, mode: str, tile_size: int):
    """The Parallel VAE of ``vae``."""
    base = getattr(vae, BASE, vae)
    wrapped = copy.copy(base)
    setattr(wrapped, BASE, base)
    spec = vae_info.describe(base)
    spatial, temporal = spec.spatial_compression, spec.temporal_compression

    def encode(pixels):
        return run_encode(EncodeJob.prepare(pixels, base, tile_size, 64, 64, 8, devices, None, mode))

    def decode(samples, vae_options=None):
        return _decode(base, samples, tile_size, 64, 64, 8, devices, mode)

    def encode_tiled(pixels, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        job = EncodeJob.prepare(pixels, base, tile_x or 512, 64 if overlap is None else overlap,
                                tile_t or TEMPORAL_MAX, overlap_t or 8, devices, None, "tiled")
        return run_encode(job)

    def decode_tiled(samples, tile_x=None, tile_y=None, overlap=None, tile_t=None, overlap_t=None):
        # the caller's latent units back to VAE Decode (Tiled)'s pixels, which the pack converts again
        ts, ot = (64, 8) if temporal is None else ((tile_t or TEMPORAL_MAX // temporal) * temporal,
                                                   max(4, (overlap_t or 1) * temporal))
        return _decode(base, samples, (tile_x or 64) * spatial, (16 if overlap is None else overlap) * spatial,
                       ts, ot, devices, "tiled")

    wrapped.encode, wrapped.decode = encode, decode
    wrapped.encode_tiled, wrapped.decode_tiled = encode_tiled, decode_tiled
    return wrapped


TOOLTIPS = {
    "vae": "The VAE to run in parallel. It is not changed: other nodes fed the same VAE decode as before.",
    "devices": "Where the VAE's encodes and decodes run: auto, cpu, cpu:N, cuda, a list such as cuda:0,cuda:1, "
               "ray or ray:cpu:N (as on Parallel Tiled VAE Decode).",
    "mode": "For the untiled calls (VAE Decode, VAE Encode and the nodes that encode inside, such as "
            "WanImageToVideo): exact gives the untiled result in row bands; tiled gives VAE Decode (Tiled)'s "
            "and VAE Encode (Tiled)'s with tile_size; auto is exact where the VAE supports it. Tiled calls "
            "(VAE Decode (Tiled)) keep their own tile sizes.",
    "tile_size": "Tile (or exact band) size in pixels for the untiled calls; 0 = auto, from free memory.",
}


class ParallelVAE(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ParallelVAE", display_name="Parallel VAE", category="advanced/multigpu",
            description="A VAE whose encodes and decodes run on the devices you name, in row bands or tiles, for "
                        "every node that uses it (VAE Decode, VAE Encode, WanImageToVideo, inpainting nodes).",
            inputs=[io.Vae.Input("vae", tooltip=TOOLTIPS["vae"]),
                    io.String.Input("devices", default="auto", tooltip=TOOLTIPS["devices"]),
                    io.Combo.Input("mode", options=list(MODES), default="auto", tooltip=TOOLTIPS["mode"]),
                    io.Int.Input("tile_size", default=TILE_AUTO, min=TILE_AUTO, max=TILE_MAX, step=64,
                                 tooltip=TOOLTIPS["tile_size"])],
            outputs=[io.Vae.Output(tooltip="The same VAE, encoding and decoding through the pack.")])

    @classmethod
    def validate_inputs(cls, devices=None, mode=None, tile_size=None):
        try:
            if devices is not None:
                device_lists.parse(devices)
            check_mode(mode)
            if tile_size is not None and tile_size != TILE_AUTO and tile_size < 64:
                raise InputError("tile_size", f"{tile_size} px is below 64 px (or 0: auto)")
        except InputError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, vae, devices, mode, tile_size) -> io.NodeOutput:
        device_lists.parse(devices)
        return io.NodeOutput(wrap(vae, devices, check_mode(mode), tile_size))


__all__ = ["BASE", "ParallelVAE", "wrap"]
