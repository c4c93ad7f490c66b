"""Parallel Tiled VAE Decode: VAEDecodeTiled's output, computed tile by tile on the named devices
(the node's schema and its queue-time checks; the decode itself is job.py's)."""
from __future__ import annotations

from ..parallel_vae import blend, engine, families
from ..parallel_vae.plan import TEMPORAL_MAX, TEMPORAL_MIN, TEMPORAL_OVERLAP_MIN, TILE_AUTO, TILE_MAX
from ._api import io, latent_node
from .job import MODES, DecodeJob, queue_checks
from .sharding import SHARDING, SHARDING_TOOLTIP
from .progress import NodeProgress

CAUSAL_NOTE = ("Causal video VAEs (Wan 2.1, Wan 2.2, TAEHV) ignore it: they are never cut in time, because "
               "restarting their causal cache at a temporal tile edge makes the video flicker. Each spatial "
               "tile is decoded frame after frame with its cache carried forward instead.")

EXACT_NOTE = " Not used in exact mode, which has no tile seams to blend."

TOOLTIPS = {
    "samples": "The latent to decode: an image latent [B, C, H, W] or a video latent [B, C, T, H, W] made for "
               "this VAE.",
    "vae": "The VAE to decode with (Load VAE, or the VAE output of a checkpoint loader).",
    "tile_size": "Tile width and height in pixels, as in VAE Decode (Tiled). Smaller tiles need less memory. "
                 "0 = auto: the largest tile every device has memory for (from its free memory and ComfyUI's "
                 "estimate of the VAE's memory per pixel); the progress text says what was chosen and why. "
                 "Image VAEs average three tile grids (t/2 x 2t, 2t x t/2, t x t) exactly like VAE Decode (Tiled). "
                 "In exact mode it bounds a band instead: a band's own rows hold at most tile_size x tile_size "
                 "pixels, so a wide image gets more bands than devices when memory asks for it.",
    "overlap": "Pixels shared by neighbouring tiles, blended with a linear feather. Must be smaller than "
               "tile_size; values above tile_size/4 are reduced to tile_size/4, as VAE Decode (Tiled) does."
               + EXACT_NOTE,
    "temporal_size": "Video VAEs only: frames per temporal tile (non-causal video VAEs are cut into temporal "
                     "tiles like VAE Decode (Tiled)). " + CAUSAL_NOTE + EXACT_NOTE,
    "temporal_overlap": "Video VAEs only: frames shared by neighbouring temporal tiles; must be smaller than "
                        "temporal_size. " + CAUSAL_NOTE + EXACT_NOTE,
    "devices": "Where to decode: auto (every visible GPU, else the CPU), cpu, cpu:N (N CPU worker processes "
               "sharing the cores), cuda (every GPU), or a list such as cuda:0,cuda:1. Two or more devices, or "
               "cpu:N, decode on persistent worker processes (one per device, kept between prompts; tiles go to "
               "whichever is free). One device (cpu, or a single GPU) decodes inside ComfyUI. A device that is "
               "not visible is an error.",
    "mode": "exact: the same image as the untiled VAE Decode (no seams), computed in row bands spread over the "
            "devices; image VAE bands pass each other their edge rows and normalisation statistics, Wan bands "
            "decode their rows plus a margin as wide as the decoder's reach. Supported: "
            + "; ".join(families.EXACT_SUPPORTED) + ". "
            "tiled: the same result as VAE Decode (Tiled), seams included. auto: exact where the VAE supports "
            "it, else tiled.",
}


def decode_inputs() -> list:
    return [
        io.Latent.Input("samples", tooltip=TOOLTIPS["samples"]),
        io.Vae.Input("vae", tooltip=TOOLTIPS["vae"]),
        io.Int.Input("tile_size", default=512, min=TILE_AUTO, max=TILE_MAX, step=32, tooltip=TOOLTIPS["tile_size"]),
        io.Int.Input("overlap", default=64, min=0, max=TILE_MAX, step=32, tooltip=TOOLTIPS["overlap"]),
        io.Int.Input("temporal_size", default=64, min=TEMPORAL_MIN, max=TEMPORAL_MAX, step=4,
                     tooltip=TOOLTIPS["temporal_size"]),
        io.Int.Input("temporal_overlap", default=8, min=TEMPORAL_OVERLAP_MIN, max=TEMPORAL_MAX, step=4,
                     tooltip=TOOLTIPS["temporal_overlap"]),
        io.String.Input("devices", default="auto", tooltip=TOOLTIPS["devices"]),
        # optional, so API prompts written before it existed still run (as auto)
        io.Combo.Input("mode", options=list(MODES), default="auto", optional=True, tooltip=TOOLTIPS["mode"]),
        io.Combo.Input("sharding", options=list(SHARDING), default="auto", optional=True, tooltip=SHARDING_TOOLTIP),
    ]


DESCRIPTION = ("Decodes latents in tiles with the same result as VAE Decode (Tiled), on the devices you name. "
               "Causal video VAEs (Wan, TAEHV) are never cut in time, so their videos do not flicker at tile edges.")


class ParallelVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        outputs = [io.Image.Output(tooltip="The decoded images; a video's frames come as one image batch.")]
        return latent_node("ParallelVAEDecode", "Parallel Tiled VAE Decode", DESCRIPTION, decode_inputs(), outputs,
                           hidden=[io.Hidden.unique_id])

    @classmethod
    def validate_inputs(cls, tile_size=None, overlap=None, temporal_size=None, temporal_overlap=None,
                        devices=None, mode=None, sharding=None):
        return queue_checks(tile_size, overlap, temporal_size, temporal_overlap, devices, mode, sharding)

    @classmethod
    def execute(cls, samples, vae, tile_size, overlap, temporal_size, temporal_overlap, devices,
                mode="auto", sharding=None) -> io.NodeOutput:
        job = DecodeJob.prepare(samples, vae, tile_size, overlap, temporal_size, temporal_overlap, devices,
                                cls.hidden.unique_id if cls.hidden is not None else None, mode, sharding)
        run = job.start(NodeProgress.poll)
        storage, out = blend.allocate_output(run.plan)
        engine.decode(run.plan, job.latent, run.units, out, finish=job.finisher(run.progress),
                      on_unit=run.progress.unit)
        run.progress.finish()
        return io.NodeOutput(storage.reshape((-1,) + tuple(storage.shape[-3:])))
