"""Parallel Tiled VAE Decode: VAEDecodeTiled's output, computed tile by tile on the named devices."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from ..parallel_vae import blend, engine, exact, sizing
from ..parallel_vae import devices as device_lists
from ..parallel_vae.errors import InputError
from ..parallel_vae.exact import shares as exact_shares
from ..parallel_vae.inputs import check_latent
from ..parallel_vae.plan import (TEMPORAL_MAX, TEMPORAL_MIN, TEMPORAL_OVERLAP_MIN, TILE_AUTO, TILE_MAX,
                                 validate_settings)
from ._api import io
from . import compat, lanes, ray_pool, vae_info, workers
from .progress import NodeProgress

log = logging.getLogger("parallel_vae")

CAUSAL_NOTE = ("Causal video VAEs (Wan 2.1, Wan 2.2, TAEHV) ignore it: they are never cut in time, because "
               "restarting their causal cache at a temporal tile edge makes the video flicker. Each spatial "
               "tile is decoded frame after frame with its cache carried forward instead.")

EXACT_NOTE = " Not used in exact mode, which has no tile seams to blend."
MODES = ("auto", "exact", "tiled")

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
            + "; ".join(exact.SUPPORTED) + ". "
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
    ]


class ParallelVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ParallelVAEDecode",
            display_name="Parallel Tiled VAE Decode",
            category="latent",
            description="Decodes latents in tiles with the same result as VAE Decode (Tiled), on the devices you "
                        "name. Causal video VAEs (Wan, TAEHV) are never cut in time, so their videos do not "
                        "flicker at tile edges.",
            inputs=decode_inputs(),
            outputs=[io.Image.Output(tooltip="The decoded images; a video's frames come as one image batch.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, tile_size=None, overlap=None, temporal_size=None, temporal_overlap=None,
                        devices=None, mode=None):
        """Queue-time checks of the widget values, so a bad value fails before hours of sampling.

        Linked inputs arrive as None here and are checked again when the node runs.
        """
        try:
            if None not in (tile_size, overlap, temporal_size, temporal_overlap):
                validate_settings(tile_size, overlap, temporal_size, temporal_overlap)
            if devices is not None:
                device_lists.parse(devices)
            check_mode(mode)
        except InputError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, samples, vae, tile_size, overlap, temporal_size, temporal_overlap, devices,
                mode="auto") -> io.NodeOutput:
        job = DecodeJob.prepare(samples, vae, tile_size, overlap, temporal_size, temporal_overlap, devices,
                                cls.hidden.unique_id if cls.hidden is not None else None, mode)
        lane, progress = job.start(NodeProgress.poll)
        storage, out = blend.allocate_output(job.plan)
        lanes.last_report = engine.decode(job.plan, job.latent, lane, out, finish=job.finisher(progress),
                                          on_unit=progress.unit)
        progress.finish()
        return io.NodeOutput(storage.reshape((-1,) + tuple(storage.shape[-3:])))


def check_mode(mode) -> str:
    if mode is None:
        return "auto"
    if mode not in MODES:
        raise InputError("mode", f"{mode!r} is not one of {', '.join(MODES)}")
    return mode


def exact_refusal(spec, vae) -> str | None:
    return exact.refusal(spec.family, vae.first_stage_model)


def device_frees(vae, named) -> list[tuple[str, int]]:
    """(name, free bytes) of each device that decodes. ComfyUI's own device counts its free
    memory as ComfyUI does (what it could free too); worker devices are measured, Ray lanes by
    their actors on their machines."""
    if device_lists.uses_ray(named):
        return ray_pool.lane_frees(named)
    if device_lists.uses_workers(named):
        on_cpu = sum(d.kind == "cpu" for d in named)
        return [(d.name, sizing.free_bytes(d, on_cpu)) for d in named]
    device = lanes.choose(named, vae)
    return [(device.name, sizing.free_bytes(device, own=lanes.free_memory(device.torch_device)))]


def auto_tile(vae, spec, named) -> sizing.Choice:
    """tile_size 0: the largest tile all ``named`` devices have memory for."""
    return sizing.choose(vae_info.decode_cost(vae, spec), device_frees(vae, named))


def exact_lanes(vae, spec, named, shape, tile_size: int, auto: bool):
    """What exact.plan needs of the devices: 1 in ComfyUI's process; on workers and Ray lanes,
    each lane's measured speed, and with tile_size auto its own memory (rows it can hold, one band)."""
    if not device_lists.uses_workers(named):
        return 1
    if device_lists.uses_ray(named):
        names, speeds = ray_pool.lane_speeds(named)
    else:
        names, speeds = [d.name for d in named], workers.speeds(named)
    row_px = shape[-1] * spec.scales[-1].factor * spec.scales[-2].factor  # output pixels of one latent row
    if not auto:
        band_rows = max(1, tile_size * tile_size // row_px)
        return [exact_shares.LaneShare(n, v, None, band_rows) for n, v in zip(names, speeds)]
    cost = vae_info.decode_cost(vae, spec)
    frees = dict(device_frees(vae, named))
    out = []
    for name, v in zip(names, speeds):
        rows = max(1, int(min(sizing.max_pixels(cost, frees[name]) // row_px, 1 << 30)))
        out.append(exact_shares.LaneShare(name, v, rows, rows))
    return out


def first_part(samples):
    """A nested (audio+video) latent's first part where core's VAE Decode (Tiled) decodes that
    (ComfyUI 0.32+); older ComfyUI fails on them, and so does check_latent, with a clear message."""
    if getattr(samples, "is_nested", False) and compat.NESTED_FIRST_PART:
        return samples.unbind()[0]
    return samples


def to_frames(region):
    """A finished region ``[1, C, F, H, W]`` or ``[1, C, H, W]`` as IMAGE frames ``[n, H, W, C]`` (a view)."""
    return region[0].movedim(0, -1) if region.dim() == 5 else region.movedim(1, -1)


@dataclass
class DecodeJob:
    """Everything a decode needs, checked: shared by the decode node and the stream node."""

    vae: object
    spec: object
    latent: object
    plan: object
    devices: list
    node_id: object
    sized: str = ""  # why tile_size 0 became the size used; how exact rows were shared by device

    @classmethod
    def prepare(cls, samples, vae, tile_size, overlap, temporal_size, temporal_overlap, devices, node_id,
                mode="auto"):
        mode = check_mode(mode)
        spec = vae_info.describe(vae)
        if not isinstance(samples, dict) or "samples" not in samples:
            raise InputError("samples", "expected a LATENT (a dict with a 'samples' tensor)")
        latent = check_latent(first_part(samples["samples"]), spec)
        named = device_lists.parse(devices)
        sized, auto = "", tile_size == TILE_AUTO
        if auto:
            choice = auto_tile(vae, spec, named)
            tile_size, sized = choice.tile_size, choice.why
            overlap = min(overlap, tile_size // 4)  # what VAE Decode (Tiled) makes of a larger one
        settings = spec.settings(tile_size, overlap, temporal_size, temporal_overlap)
        refusal = exact_refusal(spec, vae) if mode != "tiled" else None
        if mode == "exact" and refusal is not None:
            raise InputError("mode", f"exact is not available for {spec.label}: {refusal}. Exact mode supports "
                                     f"{'; '.join(exact.SUPPORTED)}. Use mode=tiled (or auto, which picks tiled "
                                     f"for this VAE).")
        shape = tuple(latent.shape)
        if mode != "tiled" and refusal is None:
            plan = exact.plan(spec.family, vae.first_stage_model, shape, spec.scales, spec.out_channels,
                              tile_size, exact_lanes(vae, spec, named, shape, tile_size, auto))
            if plan.lanes and auto:
                sized = f"auto: rows by device speed and memory: {exact_shares.describe(plan)}"
            elif plan.lanes:
                sized = f"rows by device speed: {exact_shares.describe(plan)}"
        else:
            plan = spec.plan(shape, settings)
        return cls(vae, spec, latent, plan, named, node_id, sized)

    def start(self, poll: Callable[[], None]):
        """The lane to decode on (workers wait with ``poll``) and the node's progress reporter."""
        if device_lists.uses_ray(self.devices):
            pool = ray_pool.get_pool(self.devices)
            lane = engine.PoolLane(pool, workers.model_source(self.vae, self.spec, self.devices), poll=poll)
            note = f"{len(pool.specs)} Ray lane{'s' if len(pool.specs) > 1 else ''}"
        elif device_lists.uses_workers(self.devices):
            pool = workers.get_pool(self.devices)
            lane = engine.PoolLane(pool, workers.model_source(self.vae, self.spec, self.devices), poll=poll)
            note = f"{len(self.devices)} worker process{'es' if len(self.devices) > 1 else ''}"
        else:
            lane = lanes.local_lane(self.vae, self.spec, lanes.choose(self.devices, self.vae), self.plan, poll)
            note = "in-process"
        what = f"{len(self.plan.tiles)} bands" if self.plan.exact else f"{len(self.plan.tiles)} tiles"
        note = f"{self.plan.mode}, {what}, {note}" + (f"; {self.sized}" if self.sized else "")
        log.info("parallel_vae: %s, latent %s -> %s mode, %s x %d steps on %s", self.spec.label,
                 list(self.latent.shape), self.plan.mode, what, self.plan.steps, ", ".join(lane.names))
        return lane, NodeProgress(self.plan, self.node_id, lane.names, note, self.sized)

    def finisher(self, progress: NodeProgress) -> Callable:
        """The blender's hook for each finished segment: ComfyUI's post-processing of the pixels (to
        0..1, in place), then the frames to the progress reporter (their preview)."""
        def finish(segment, region) -> None:
            result = self.vae.process_output(region)
            if result is not region:
                region.copy_(result)
            progress.frames(to_frames(region))

        return finish
