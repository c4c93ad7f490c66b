"""What the engine needs to know about a VAE, in plain data (the nodes build it from ComfyUI's VAE)."""
from __future__ import annotations

from dataclasses import dataclass

from . import families
from . import plan as plans


@dataclass(frozen=True)
class VaeSpec:
    family: str  # a key of families.FAMILIES
    label: str  # for messages, e.g. "Wan 2.1 VAE (WanVAE)"
    latent_channels: int
    scales: tuple[plans.AxisScale, ...]  # one per latent axis: (H, W) or (T, H, W)
    out_channels: int = 3

    @property
    def latent_dim(self) -> int:
        return len(self.scales)

    @property
    def causal(self) -> bool:
        return families.of(self.family).causal

    @property
    def spatial_compression(self) -> int:
        return self.scales[-1].factor

    @property
    def temporal_compression(self):
        return self.scales[0].factor if self.latent_dim == 3 else None

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The decoded pixels' shape ``[B, C, *axes]`` for a latent of this shape."""
        return (in_shape[0], self.out_channels) + tuple(s.size(n) for s, n in zip(self.scales, in_shape[2:]))

    def settings(self, tile_size: int, overlap: int, temporal_size: int, temporal_overlap: int):
        return plans.settings_from_pixels(tile_size, overlap, temporal_size, temporal_overlap,
                                          self.spatial_compression, self.temporal_compression)

    def plan(self, in_shape: tuple[int, ...], settings: plans.TileSettings) -> plans.Plan:
        if self.latent_dim == 2:
            return plans.plan_image(in_shape, settings, self.scales[-1], self.out_channels)
        make = plans.plan_causal if self.causal else plans.plan_video
        return make(in_shape, settings, self.scales, self.out_channels)
