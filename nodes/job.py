"""One decode as the nodes run it: the inputs checked (``DecodeJob.prepare``, no backend touched),
then on ``start`` the backend for ``devices`` (once), the plan sized for its lanes, and the units
it decodes. Shared by the decode node and the stream node (whose recipe is only prepared: the
backend is reached when the stream opens)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ..parallel_vae import exact, families, sizing
from ..parallel_vae import devices as device_lists
from ..parallel_vae.devices import Device
from ..parallel_vae.errors import InputError
from ..parallel_vae.exact import shares
from ..parallel_vae.inputs import check_latent
from ..parallel_vae.plan import TILE_AUTO, TILE_MIN, Plan, validate_settings
from ..parallel_vae.rates import model_key
from ..parallel_vae.spec import VaeSpec
from ..parallel_vae.units import Decoded
from . import backends, compat, vae_info
from .model import vae_model
from .progress import NodeProgress
from .sharding import check_sharding, lanes_for

log = logging.getLogger("parallel_vae")

MODES = ("auto", "exact", "tiled")


def check_mode(mode) -> str:
    if mode is None:
        return "auto"
    if mode not in MODES:
        raise InputError("mode", f"{mode!r} is not one of {', '.join(MODES)}")
    return mode


def queue_checks(tile_size=None, overlap=None, temporal_size=None, temporal_overlap=None, devices=None,
                 mode=None, sharding=None):
    """The decode and encode nodes' queue-time checks of their widget values, so a bad value fails
    before hours of sampling: True, or the message naming the input. Linked inputs arrive as None
    here and are checked again when the node runs."""
    try:
        if None not in (tile_size, overlap, temporal_size, temporal_overlap):
            validate_settings(tile_size, overlap, temporal_size, temporal_overlap)
        if devices is not None:
            device_lists.parse(devices)
        check_mode(mode)
        check_sharding(sharding)
    except InputError as e:
        return str(e)
    return True


def first_part(samples):
    """A nested (audio+video) latent's first part where core's VAE Decode (Tiled) decodes that
    (ComfyUI 0.32+); older ComfyUI fails on them, and so does check_latent, with a clear message."""
    if getattr(samples, "is_nested", False) and compat.NESTED_FIRST_PART:
        return samples.unbind()[0]
    return samples


def to_frames(region):
    """A finished region ``[1, C, F, H, W]`` or ``[1, C, H, W]`` as IMAGE frames ``[n, H, W, C]`` (a view)."""
    return region[0].movedim(0, -1) if region.dim() == 5 else region.movedim(1, -1)


def exact_wanted(mode: str, spec: VaeSpec, vae, direction: str = "decode") -> bool:
    """Whether a job runs in exact mode: asked for, or auto where the VAE has an executor; exact
    asked for a VAE without one is an error naming the supported families."""
    if mode == "tiled":
        return False
    refusal = families.exact_refusal(spec.family, vae.first_stage_model, direction)
    if mode == "exact" and refusal is not None:
        raise InputError("mode", f"exact is not available for {spec.label}: {refusal}. Exact {direction} supports "
                                 f"{'; '.join(families.exact_supported(direction))}. Use mode=tiled (or auto, "
                                 f"which picks tiled for this VAE).")
    return refusal is None


@dataclass
class Planned:
    """A plan for a backend's lanes, the tile size it was made with, and why (tile_size 0, exact rows)."""

    plan: Plan
    tile_size: int
    why: str


@dataclass
class Started:
    """A decode under way: its plan, its units as the backend yields them, its progress."""

    plan: Plan
    units: Iterator[Decoded]
    progress: NodeProgress


@dataclass
class Job:
    """Everything one decode or encode needs, checked; ``tensor`` is its input (a latent to
    decode, or pixels through the VAE's crop and process_input to encode)."""

    vae: object  # ComfyUI's VAE
    spec: VaeSpec
    tensor: torch.Tensor
    devices: list[Device]
    tile_size: int
    overlap: int
    temporal_size: int
    temporal_overlap: int
    exact: bool  # the mode asked for or picked (auto: exact where the VAE has an executor)
    node_id: object
    pinned: bool = False  # sharding "every device": every lane named, however small the job

    direction = "decode"

    def cost(self) -> sizing.Cost:
        """Bytes of one tile by its pixels (tile_size 0 sizes tiles from it)."""
        raise NotImplementedError

    def tiled_plan(self, tile_size: int, overlap: int) -> Plan:
        raise NotImplementedError

    def exact_plan(self, tile_size: int, terms) -> Plan:
        raise NotImplementedError

    def row_px(self) -> int:
        """Pixels of one latent row (exact bands are sized by the pixels they hold)."""
        shape, scales = self.tensor.shape, self.spec.scales
        width = shape[-1] * scales[-1].factor if self.direction == "decode" else shape[-1]
        return width * scales[-2].factor

    def plan_for(self, backend: backends.Backend) -> Planned:
        """The plan on ``backend``'s lanes, and why it is sized so (tile_size 0: from the lanes'
        free memory, measured once; exact rows: by lane speed and memory)."""
        tile_size, overlap, sized = self.tile_size, self.overlap, ""
        auto = tile_size == TILE_AUTO
        frees = backend.free_bytes() if auto else {}
        cost = self.cost() if auto else None
        if auto:
            choice = sizing.choose(cost, list(frees.items()))
            tile_size, sized = choice.tile_size, choice.why
            overlap = min(overlap, tile_size // 4)  # what VAE Decode (Tiled) makes of a larger one
        if not self.exact:
            plan = self.tiled_plan(tile_size, overlap)
            lanes = len(backend.lanes)
            if auto and len(plan.tiles) < lanes:  # memory allows fewer tiles than lanes: use them all
                while len(plan.tiles) < lanes and tile_size > TILE_MIN:
                    tile_size = max(TILE_MIN, tile_size // 2 // 32 * 32)
                    overlap = min(overlap, tile_size // 4)
                    plan = self.tiled_plan(tile_size, overlap)
                sized += f"; {tile_size} px for a tile on each of the {lanes} lanes"
            return Planned(plan, tile_size, sized)
        row_px = self.row_px()
        max_rows = None
        if auto:
            max_rows = {name: max(1, int(min(sizing.max_pixels(cost, free) // row_px, 1 << 30)))
                        for name, free in frees.items()}
        terms = backend.exact_terms(max(1, tile_size * tile_size // row_px), max_rows)
        plan = self.exact_plan(tile_size, terms)
        if plan.shares:
            what = "auto: rows by device speed and memory" if auto else "rows by device speed"
            sized = f"{what}: {shares.describe(plan)}"
        return Planned(plan, tile_size, sized)

    def start(self, poll: Callable[[], None], order: str = "tile") -> Started:
        """Reach the backend, choose its lanes, plan, and start decoding (an in-process lane loads
        the model now, in the caller's thread); workers wait with ``poll``."""
        model = vae_model(self.vae, self.spec)
        backend, chose = lanes_for(self, backends.backend_for(self.devices),
                                   model_key(model.source.fingerprint, self.direction))
        planned = self.plan_for(backend)
        plan, sized = planned.plan, "; ".join(w for w in (chose, planned.why) if w)
        units = backend.results(plan, self.tensor, model, order, poll)
        what = f"{len(plan.tiles)} bands" if plan.exact else f"{len(plan.tiles)} tiles"
        note = f"{plan.mode}, {what}, {backend.note}" + (f"; {sized}" if sized else "")
        log.info("parallel_vae: %s %s, %s %s, %s mode, %s x %d steps on %s", self.direction, self.spec.label,
                 "latent" if self.direction == "decode" else "pixels", list(self.tensor.shape), plan.mode, what,
                 plan.steps, ", ".join(backend.lanes))
        return Started(plan, units, NodeProgress(plan, self.node_id, backend.lanes, note, sized))


@dataclass
class DecodeJob(Job):
    """A decode: ``tensor`` is the latent."""

    @classmethod
    def prepare(cls, samples, vae, tile_size, overlap, temporal_size, temporal_overlap, devices, node_id,
                mode="auto", sharding=None) -> "DecodeJob":
        mode = check_mode(mode)
        spec = vae_info.describe(vae)
        if not isinstance(samples, dict) or "samples" not in samples:
            raise InputError("samples", "expected a LATENT (a dict with a 'samples' tensor)")
        latent = check_latent(first_part(samples["samples"]), spec)
        named = device_lists.parse(devices)
        validate_settings(tile_size, overlap, temporal_size, temporal_overlap)
        pinned = check_sharding(sharding)
        return cls(vae, spec, latent, named, tile_size, overlap, temporal_size, temporal_overlap,
                   exact_wanted(mode, spec, vae), node_id, pinned)

    @property
    def latent(self) -> torch.Tensor:
        return self.tensor

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.spec.out_shape(tuple(self.tensor.shape))

    def cost(self) -> sizing.Cost:
        return vae_info.decode_cost(self.vae, self.spec)

    def tiled_plan(self, tile_size: int, overlap: int) -> Plan:
        settings = self.spec.settings(tile_size, overlap, self.temporal_size, self.temporal_overlap)
        return self.spec.plan(tuple(self.tensor.shape), settings)

    def exact_plan(self, tile_size: int, terms) -> Plan:
        spec = self.spec
        return exact.plan(tuple(self.tensor.shape), spec.scales, spec.out_channels, tile_size, terms)

    def finisher(self, progress: NodeProgress) -> Callable:
        """The blender's hook for each finished segment: ComfyUI's post-processing of the pixels (to
        0..1, in place), then the frames to the progress reporter (their preview)."""
        def finish(segment, region) -> None:
            result = self.vae.process_output(region)
            if result is not region:
                region.copy_(result)
            progress.frames(to_frames(region))

        return finish



__all__ = ["DecodeJob", "Job", "exact_wanted", "queue_checks", "MODES", "Planned", "Started", "check_mode", "first_part", "to_frames"]
