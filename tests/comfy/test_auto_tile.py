"""tile_size 0 (auto) through the node: the size follows the free memory (simulated with
PARALLEL_VAE_MEMORY_LIMIT), the decode equals VAE Decode (Tiled) at the size chosen (tiled mode)
or the untiled VAE Decode (exact mode), and the progress text says what was chosen and why."""
from __future__ import annotations

import pytest

from testkit.compare import TOL, latent, max_diff


def chosen(pack, vae, devices: str) -> int:
    """The tile size the node picks for ``devices`` now (tile_size 0, tiled mode)."""
    job = pack.nodes.job.DecodeJob.prepare({"samples": latent((1, 4, 8, 8), 0)}, vae, 0, 64, 64, 8, devices, None,
                                           "tiled")
    return job.plan_for(pack.nodes.backends.backend_for(job.devices)).tile_size


def test_auto_tile_shrinks_with_memory_and_equals_vae_decode_tiled_at_the_chosen_size(
        pack, load_vae, decode, core_tiled, monkeypatch):
    sizing = pack.parallel_vae.sizing
    vae, z = load_vae("sd"), latent((1, 4, 16, 18), 51)
    sizes = []
    for mib in (8192, 400, 160):
        monkeypatch.setenv(sizing.MEMORY_LIMIT_ENV, str(mib))
        sizes.append(chosen(pack, vae, "cpu"))
    assert sizes[0] > sizes[1] > sizes[2], sizes
    for mib, size in zip((400, 160), sizes[1:]):
        monkeypatch.setenv(sizing.MEMORY_LIMIT_ENV, str(mib))
        ours = decode(z, vae, 0, 64, devices="cpu")
        ref = core_tiled(z, vae, size, min(64, size // 4))
        assert max_diff(ours, ref) <= TOL, (mib, size)
    other = core_tiled(z, vae, sizes[1], min(64, sizes[1] // 4))
    assert max_diff(ours, other) > TOL, "the sizes give different images, so equality proves the size used"


def test_auto_tile_in_exact_mode_equals_untiled_vae_decode_and_says_why(pack, load_vae, decode, core_decode,
                                                                        decodes, monkeypatch):
    sizing = pack.parallel_vae.sizing
    vae, z = load_vae("sd"), latent((1, 4, 24, 20), 52)
    monkeypatch.setenv(sizing.MEMORY_LIMIT_ENV, "160")
    texts = []
    monkeypatch.setattr(pack.nodes.progress, "send_text", lambda text, node_id: texts.append(text))
    ours = decode(z, vae, 0, 64, devices="cpu", mode="exact")
    assert max_diff(ours, core_decode(z, vae)) <= TOL
    size = chosen(pack, vae, "cpu")
    assert f"auto {size} px: cpu has 0.2 GiB free" in texts[-1], texts[-1]
    bands = len(decodes.last.units)
    assert bands == -(-24 // max(1, size * size // (20 * 64))), (bands, size)


@pytest.mark.parametrize("bad", [-32, 32])
def test_tile_size_below_the_minimum_other_than_zero_is_an_error(pack, bad):
    assert "tile_size" in pack.nodes.ParallelVAEDecode.validate_inputs(bad, 16, 64, 8, "cpu", "tiled")
    assert pack.nodes.ParallelVAEDecode.validate_inputs(0, 64, 64, 8, "cpu", "tiled") is True


def test_auto_tile_gives_every_lane_a_tile_and_equals_vae_decode_tiled_at_that_size(pack, load_vae, decode,
                                                                                 core_tiled, decodes, monkeypatch):
    """Free memory allows one tile per grid (3 in all) for a small image; on 4 workers the size
    halves until each has a tile (issue 22: never fewer tiles than lanes)."""
    texts = []
    monkeypatch.setattr(pack.nodes.progress, "send_text", lambda text, node_id: texts.append(text))
    vae, z = load_vae("sd"), latent((1, 4, 12, 12), 53)  # 96x96 px
    try:
        ours = decode(z, vae, 0, 64, devices="cpu:4")
        units = len(decodes.last.units)
        size = int(texts[-1].split(" px for a tile on each of the 4 lanes")[0].rsplit("; ", 1)[-1])
    finally:
        pack.nodes.backends.shutdown()
    assert units >= 4, units
    assert max_diff(ours, core_tiled(z, vae, size, min(64, size // 4))) <= TOL, size
