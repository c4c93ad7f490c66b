"""The correctness contract, line by line, against ComfyUI's own nodes (random-weight VAEs in the
exact layouts, loaded by the real VAELoader; float32 on the CPU)."""
import pytest

from testkit.compare import TOL, latent, max_diff

# Causal video VAEs: (family, latent shape [B, C, T, H, W]) small enough for a 2-core CPU.
CAUSAL = [
    ("wan21", (1, 16, 3, 10, 14)),
    ("wan22", (1, 48, 2, 4, 6)),
    ("taehv", (1, 16, 3, 10, 14)),
]


def frames(shape, k=4):
    """Pixel frames a causal VAE makes from a latent: k*T - (k-1) per item."""
    return shape[0] * (k * shape[2] - (k - 1))


# --- image VAEs: equal to VAEDecodeTiled (same grids, feathers and three-pass average) ----------
@pytest.mark.parametrize("family, shape, tile, overlap", [
    ("sd", (2, 4, 10, 14), 64, 16),   # batch > 1, non-square, 14 tiles per item over three grids
    ("sd", (1, 4, 13, 9), 96, 64),    # overlap above tile/4: clamped to 24 like core; odd sizes
    ("flux", (1, 16, 10, 8), 64, 32),  # 16-channel Flux-style AutoencodingEngine (batches: the sd case)
])
def test_image_vae_equals_vae_decode_tiled(load_vae, decode, core_tiled, family, shape, tile, overlap):
    vae, z = load_vae(family), latent(shape, 1)
    ours = decode(z, vae, tile, overlap)
    ref = core_tiled(z, vae, tile, overlap)
    assert ours.shape == (shape[0], shape[2] * 8, shape[3] * 8, 3)
    assert max_diff(ours, ref) <= TOL
    assert 0.05 < ours.std().item(), "the random VAE must not decode to a flat image"


def test_image_latent_smaller_than_a_tile_equals_vae_decode_tiled(load_vae, decode, core_tiled):
    vae, z = load_vae("sd"), latent((2, 4, 6, 5), 2)
    assert max_diff(decode(z, vae, 512, 64), core_tiled(z, vae, 512, 64)) <= TOL


# --- causal video VAEs: time is never cut -----------------------------------------------------
@pytest.mark.parametrize("family, shape", CAUSAL)
def test_causal_vae_equals_vae_decode_tiled_with_time_uncut(load_vae, decode, core_tiled, family, shape):
    vae, z = load_vae(family), latent(shape, 3)
    all_frames = 4 * shape[2]  # a temporal tile that covers every frame
    ref = core_tiled(z, vae, 64, 16, all_frames, 8)
    # our node ignores temporal_size/temporal_overlap for causal VAEs: small values change nothing
    ours = decode(z, vae, 64, 16, 8, 4)
    assert ours.shape == ref.shape == (frames(shape), shape[3] * vae.spacial_compression_decode(),
                                       shape[4] * vae.spacial_compression_decode(), 3)
    assert max_diff(ours, ref) <= TOL


@pytest.mark.parametrize("family, shape", CAUSAL)
def test_causal_vae_with_one_tile_equals_vae_decode(load_vae, decode, core_decode, family, shape):
    vae, z = load_vae(family), latent(shape, 4)
    ours = decode(z, vae, 1024, 64)
    assert max_diff(ours, core_decode(z, vae)) <= TOL


def test_causal_batch_of_two_videos(load_vae, decode, core_tiled):
    vae, z = load_vae("wan21"), latent((2, 16, 2, 10, 10), 5)
    ours = decode(z, vae, 64, 16)
    assert ours.shape[0] == 2 * 5
    assert max_diff(ours, core_tiled(z, vae, 64, 16, 64, 8)) <= TOL


def test_vae_decode_tiled_temporal_tiles_differ_and_ours_do_not(load_vae, decode, core_tiled, core_decode):
    """Why time is never cut: ComfyUI's temporal tiles restart Wan's causal cache (flicker)."""
    vae, z = load_vae("wan21"), latent((1, 16, 5, 6, 6), 6)
    full = core_decode(z, vae)
    cut = core_tiled(z, vae, 512, 64, 8, 4)  # 2 latent frames per temporal tile
    ours = decode(z, vae, 512, 64, 8, 4)
    assert max_diff(cut, full) > 1e-2
    assert max_diff(ours, full) <= TOL


# --- other video VAEs: VAEDecodeTiled's geometry, temporal tiles included -----------------------
def test_non_causal_video_vae_follows_vae_decode_tiled_with_temporal_tiles(load_vae, decode, core_tiled):
    vae, z = load_vae("cosmos"), latent((1, 16, 3, 4, 6), 7)
    ours = decode(z, vae, 64, 16, 16, 8)  # 2 latent frames per temporal tile, 1 shared: time is cut
    ref = core_tiled(z, vae, 64, 16, 16, 8)
    assert ours.shape == ref.shape == (17, 32, 48, 3)
    assert max_diff(ours, ref) <= TOL
