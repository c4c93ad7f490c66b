"""Bad input: a clear error raised from the node, naming the input and what is allowed, and the
next decode works."""
import pytest
import torch

from testkit.compare import latent


@pytest.fixture(scope="module")
def InputError(pack):
    return pack.parallel_vae.errors.InputError


def expect(InputError, name, fragment, fn, *args, **kw):
    with pytest.raises(InputError) as e:
        fn(*args, **kw)
    assert e.value.input_name == name
    assert str(e.value).startswith(f"{name}: ")
    assert fragment in str(e.value), str(e.value)
    return str(e.value)


def test_latent_channels_that_do_not_match_the_vae(InputError, load_vae, decode):
    msg = expect(InputError, "samples", "has 16 channels", decode, latent((1, 16, 8, 8)), load_vae("sd"))
    assert "takes 4-channel latents" in msg


def test_video_latent_for_an_image_vae(InputError, load_vae, decode):
    msg = expect(InputError, "samples", "a video latent [B, C, T, H, W]", decode, latent((1, 4, 3, 8, 8)),
                 load_vae("sd"))
    assert "decodes [B, C, H, W] image latents" in msg


def test_image_latent_for_a_video_vae(InputError, load_vae, decode):
    msg = expect(InputError, "samples", "an image latent [B, C, H, W]", decode, latent((1, 16, 8, 8)),
                 load_vae("wan21"))
    assert "Wan 2.1 VAE" in msg and "[B, C, T, H, W] video latents" in msg


def test_overlap_as_large_as_the_tile(InputError, load_vae, decode):
    expect(InputError, "overlap", "must be smaller than tile_size (64 px)", decode, latent((1, 4, 8, 8)),
           load_vae("sd"), 64, 64)


def test_temporal_overlap_as_large_as_temporal_size(InputError, load_vae, decode):
    expect(InputError, "temporal_overlap", "smaller than temporal_size", decode, latent((1, 16, 2, 8, 8)),
           load_vae("wan21"), 64, 16, 16, 16)


def test_device_that_is_not_visible(InputError, load_vae, decode):
    msg = expect(InputError, "devices", "cuda:99 is not visible", decode, latent((1, 4, 8, 8)), load_vae("sd"),
                 devices="cuda:99")
    assert "(visible: cpu" in msg


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_in_the_latent(InputError, load_vae, decode, bad):
    z = latent((1, 4, 8, 8))
    z[0, 1, 2, 3] = bad
    expect(InputError, "samples", "contains 1 NaN or inf value", decode, z, load_vae("sd"))


def test_empty_batch(InputError, load_vae, decode):
    expect(InputError, "samples", "is empty (shape [0, 4, 8, 8])", decode, torch.zeros(0, 4, 8, 8), load_vae("sd"))


def test_vae_that_comfyui_could_not_initialise(InputError, comfy, decode):
    import comfy.sd

    broken = comfy.sd.VAE(sd={"not.a.vae.weight": torch.zeros(1)})
    assert broken.first_stage_model is None
    msg = expect(InputError, "vae", "ComfyUI could not initialise this VAE", decode, latent((1, 4, 8, 8)), broken)
    assert "No VAE weights detected" in msg


def test_a_good_decode_after_errors(load_vae, decode, core_tiled):
    vae, z = load_vae("sd"), latent((1, 4, 8, 8), 11)
    assert (decode(z, vae) - core_tiled(z, vae)).abs().max() <= 1e-4


def test_queue_time_validation_of_widget_values(pack):
    node = pack.nodes.ParallelVAEDecode
    assert node.validate_inputs(64, 16, 64, 8, "auto") is True
    assert node.validate_inputs(None, None, None, None, None) is True  # linked inputs: checked when run
    assert node.validate_inputs(64, 64, 64, 8, "auto").startswith("overlap: ")
    assert node.validate_inputs(64, 16, 8, 8, "cpu").startswith("temporal_overlap: ")
    assert node.validate_inputs(64, 16, 64, 8, "tpu").startswith("devices: 'tpu' is not a device")
    assert node.validate_inputs(16, 0, 64, 8, "auto").startswith("tile_size: ")
