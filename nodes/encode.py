"""Parallel Tiled VAE Encode: VAE Encode (Tiled)'s latent (tiled) or VAE Encode's (exact), computed
on the named devices (the node's schema and its queue-time checks; the encode is encode_job.py's)."""
from __future__ import annotations

from ..parallel_vae import blend, engine, families
from ..parallel_vae.plan import TEMPORAL_MAX, TEMPORAL_MIN, TEMPORAL_OVERLAP_MIN, TILE_AUTO, TILE_MAX
from . import compat
from ._api import io, latent_node
from .encode_job import EncodeJob
from .job import MODES, queue_checks
from .sharding import SHARDING, SHARDING_TOOLTIP
from .progress import NodeProgress

CAUSAL_NOTE = ("Causal video VAEs (Wan 2.1, Wan 2.2) ignore it: they are never cut in time (restarting their "
               "causal cache at a temporal tile edge changes the latent); each spatial tile takes every frame.")
EXACT_NOTE = " Not used in exact mode, which has no tile seams to blend."

TOOLTIPS = {
    "pixels": "The image to encode, or a video's frames as one image batch (video VAEs take the batch as frames). "
              "Sizes that are not a multiple of the VAE's downscale are cropped as VAE Encode crops them.",
    "vae": "The VAE to encode with (Load VAE, or the VAE output of a checkpoint loader).",
    "tile_size": "Tile width and height in pixels, as in VAE Encode (Tiled). Smaller tiles need less memory. "
                 "0 = auto: the largest tile every device has memory for. Image VAEs average three tile grids "
                 "(t x t, t/2 x 2t, 2t x t/2) exactly like VAE Encode (Tiled). In exact mode it bounds a band "
                 "instead: a band holds at most tile_size x tile_size pixels.",
    "overlap": "Pixels shared by neighbouring tiles, blended with a linear feather in latent space, as VAE Encode "
               "(Tiled) does. Image VAEs: smaller than tile_size/2 (the narrow grid's tile)." + EXACT_NOTE,
    "temporal_size": "Video VAEs only: frames per temporal tile, as VAE Encode (Tiled). " + CAUSAL_NOTE + EXACT_NOTE,
    "temporal_overlap": "Video VAEs only: frames shared by neighbouring temporal tiles. " + CAUSAL_NOTE + EXACT_NOTE,
    "devices": "Where to encode: auto (every visible GPU, else the CPU), cpu, cpu:N (N CPU worker processes), "
               "cuda, a list such as cuda:0,cuda:1, ray or ray:cpu:N. The same workers as the decode nodes, and "
               "the same copy of the VAE on them.",
    "mode": "exact: the same latent as the untiled VAE Encode (no seams), computed in row bands spread over the "
            "devices; image VAE bands pass each other their edge rows and normalisation statistics. Supported: "
            + "; ".join(families.exact_supported("encode")) + ". "
            "tiled: the same latent as VAE Encode (Tiled), seams included. auto: exact where the VAE supports "
            "it, else tiled.",
}


def encode_inputs() -> list:
    return [
        io.Image.Input("pixels", tooltip=TOOLTIPS["pixels"]),
        io.Vae.Input("vae", tooltip=TOOLTIPS["vae"]),
        io.Int.Input("tile_size", default=512, min=TILE_AUTO, max=TILE_MAX, step=64, tooltip=TOOLTIPS["tile_size"]),
        io.Int.Input("overlap", default=64, min=0, max=TILE_MAX, step=32, tooltip=TOOLTIPS["overlap"]),
        io.Int.Input("temporal_size", default=64, min=TEMPORAL_MIN, max=TEMPORAL_MAX, step=4,
                     tooltip=TOOLTIPS["temporal_size"]),
        io.Int.Input("temporal_overlap", default=8, min=TEMPORAL_OVERLAP_MIN, max=TEMPORAL_MAX, step=4,
                     tooltip=TOOLTIPS["temporal_overlap"]),
        io.String.Input("devices", default="auto", tooltip=TOOLTIPS["devices"]),
        io.Combo.Input("mode", options=list(MODES), default="auto", optional=True, tooltip=TOOLTIPS["mode"]),
        io.Combo.Input("sharding", options=list(SHARDING), default="auto", optional=True, tooltip=SHARDING_TOOLTIP),
    ]


DESCRIPTION = ("Encodes images and videos in tiles or exact row bands on the devices you name: the same latent as "
               "VAE Encode (Tiled) (tiled) or VAE Encode (exact).")


def encode(job: EncodeJob):
    """Run a prepared encode; the latent tensor as VAE Encode returns it."""
    run = job.start(NodeProgress.poll)
    latent, out = blend.allocate_output(run.plan)
    engine.decode(run.plan, job.tensor, run.units, out, on_unit=run.progress.unit)
    run.progress.finish()
    return job.result(latent, run.plan)


class ParallelVAEEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        outputs = [io.Latent.Output(tooltip="The latent, as VAE Encode (exact) or VAE Encode (Tiled) (tiled) gives it.")]
        return latent_node("ParallelVAEEncode", "Parallel Tiled VAE Encode", DESCRIPTION, encode_inputs(), outputs,
                           category=compat.latent_category(), hidden=[io.Hidden.unique_id])

    @classmethod
    def validate_inputs(cls, tile_size=None, overlap=None, temporal_size=None, temporal_overlap=None,
                        devices=None, mode=None, sharding=None):
        return queue_checks(tile_size, overlap, temporal_size, temporal_overlap, devices, mode, sharding)

    @classmethod
    def execute(cls, pixels, vae, tile_size, overlap, temporal_size, temporal_overlap, devices,
                mode="auto", sharding=None) -> io.NodeOutput:
        job = EncodeJob.prepare(pixels, vae, tile_size, overlap, temporal_size, temporal_overlap, devices,
                                cls.hidden.unique_id if cls.hidden is not None else None, mode, sharding)
        return io.NodeOutput({"samples": encode(job)})


__all__ = ["ParallelVAEEncode", "encode"]
