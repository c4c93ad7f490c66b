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
from ..parallel_vae.plan import TILE_AUTO, Plan, validate_settings
from ..parallel_vae.spec import VaeSpec
from ..parallel_vae.units import Decoded
from . import backends, compat, vae_info
from .model import vae_model
from .progress import NodeProgress

log = logging.getLogger("parallel_vae")

MODES = ("auto", "exact", "tiled")


def check_mode(mode) -> str:
    if mode is None:
        return "auto"
    if mode not in MODES:
        raise InputError("mode", f"{mode!r} is not one of {', '.join(MODES)}")
    return mode


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
class DecodeJob:
    """Everything a decode needs, checked."""

    vae: object  # ComfyUI's VAE
    spec: VaeSpec
    latent: torch.Tensor
    devices: list[Device]
    tile_size: int
    overlap: int
    temporal_size: int
    temporal_overlap: int
    exact: bool  # the mode asked for or picked (auto: exact where the VAE has an executor)
    node_id: object

    @classmethod
    def prepare(cls, samples, vae, tile_size, overlap, temporal_size, temporal_overlap, devices, node_id,
                mode="auto") -> "DecodeJob":
        mode = check_mode(mode)
        spec = vae_info.describe(vae)
        if not isinstance(samples, dict) or "samples" not in samples:
            raise InputError("samples", "expected a LATENT (a dict with a 'samples' tensor)")
        latent = check_latent(first_part(samples["samples"]), spec)
        named = device_lists.parse(devices)
        validate_settings(tile_size, overlap, temporal_size, temporal_overlap)
        refusal = families.exact_refusal(spec.family, vae.first_stage_model) if mode != "tiled" else None
        if mode == "exact" and refusal is not None:
            raise InputError("mode", f"exact is not available for {spec.label}: {refusal}. Exact mode supports "
                                     f"{'; '.join(families.EXACT_SUPPORTED)}. Use mode=tiled (or auto, which picks "
                                     f"tiled for this VAE).")
        return cls(vae, spec, latent, named, tile_size, overlap, temporal_size, temporal_overlap,
                   mode != "tiled" and refusal is None, node_id)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.spec.out_shape(tuple(self.latent.shape))

    def plan_for(self, backend: backends.Backend) -> Planned:
        """The plan on ``backend``'s lanes, and why it is sized so (tile_size 0: from the lanes'
        free memory, measured once; exact rows: by lane speed and memory)."""
        spec, shape = self.spec, tuple(self.latent.shape)
        tile_size, overlap, sized = self.tile_size, self.overlap, ""
        auto = tile_size == TILE_AUTO
        frees = backend.free_bytes() if auto else {}
        cost = vae_info.decode_cost(self.vae, spec) if auto else None
        if auto:
            choice = sizing.choose(cost, list(frees.items()))
            tile_size, sized = choice.tile_size, choice.why
            overlap = min(overlap, tile_size // 4)  # what VAE Decode (Tiled) makes of a larger one
        if not self.exact:
            settings = spec.settings(tile_size, overlap, self.temporal_size, self.temporal_overlap)
            return Planned(spec.plan(shape, settings), tile_size, sized)
        row_px = shape[-1] * spec.scales[-1].factor * spec.scales[-2].factor  # output pixels of one latent row
        max_rows = None
        if auto:
            max_rows = {name: max(1, int(min(sizing.max_pixels(cost, free) // row_px, 1 << 30)))
                        for name, free in frees.items()}
        terms = backend.exact_terms(max(1, tile_size * tile_size // row_px), max_rows)
        model = self.vae.first_stage_model
        plan = exact.plan(shape, spec.scales, spec.out_channels, tile_size, families.exact_halo(spec.family, model),
                          families.exact_lockstep(spec.family), terms)
        if plan.shares:
            what = "auto: rows by device speed and memory" if auto else "rows by device speed"
            sized = f"{what}: {shares.describe(plan)}"
        return Planned(plan, tile_size, sized)

    def start(self, poll: Callable[[], None], order: str = "tile") -> Started:
        """Reach the backend, plan, and start decoding (an in-process lane loads the model now, in
        the caller's thread); workers wait with ``poll``."""
        backend = backends.backend_for(self.devices)
        planned = self.plan_for(backend)
        plan, sized = planned.plan, planned.why
        units = backend.results(plan, self.latent, vae_model(self.vae, self.spec), order, poll)
        what = f"{len(plan.tiles)} bands" if plan.exact else f"{len(plan.tiles)} tiles"
        note = f"{plan.mode}, {what}, {backend.note}" + (f"; {sized}" if sized else "")
        log.info("parallel_vae: %s, latent %s -> %s mode, %s x %d steps on %s", self.spec.label,
                 list(self.latent.shape), plan.mode, what, plan.steps, ", ".join(backend.lanes))
        return Started(plan, units, NodeProgress(plan, self.node_id, backend.lanes, note, sized))

    def finisher(self, progress: NodeProgress) -> Callable:
        """The blender's hook for each finished segment: ComfyUI's post-processing of the pixels (to
        0..1, in place), then the frames to the progress reporter (their preview)."""
        def finish(segment, region) -> None:
            result = self.vae.process_output(region)
            if result is not region:
                region.copy_(result)
            progress.frames(to_frames(region))

        return finish


__all__ = ["DecodeJob", "MODES", "Planned", "Started", "check_mode", "first_part", "to_frames"]
