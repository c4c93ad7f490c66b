"""How the node behaves inside ComfyUI: per-unit progress through ComfyUI's hook, the interrupt
button between tiles, a preallocated output, and the VAE rebuilt on another device."""
import pytest
import torch

from testkit.compare import TOL, latent, max_diff


@pytest.fixture
def progress_hook():
    import comfy.utils

    calls = []
    yield calls
    comfy.utils.set_progress_bar_global_hook(None)


def test_progress_advances_once_per_unit_on_this_node(load_vae, decode, progress_hook):
    import comfy.utils

    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None: progress_hook.append((value, total, node_id)))
    decode(latent((1, 16, 3, 10, 14)), load_vae("wan21"), 64, 16)
    # 4 spatial tiles x 3 latent frames: one update per tile-step, on the node's own id
    assert progress_hook == [(i, 12, "9") for i in range(1, 13)]


def test_interrupt_stops_between_tiles_and_the_next_decode_works(load_vae, decode, progress_hook):
    import comfy.model_management as mm
    import comfy.utils

    def hook(value, total, preview, node_id=None):
        progress_hook.append(value)
        if value == 3:
            mm.interrupt_current_processing(True)  # what POST /interrupt does

    comfy.utils.set_progress_bar_global_hook(hook)
    vae, z = load_vae("sd"), latent((1, 4, 10, 14), 12)
    with pytest.raises(mm.InterruptProcessingException):
        decode(z, vae)
    assert progress_hook == [1, 2, 3]  # stopped at the next tile boundary, 11 tiles never ran
    assert not mm.processing_interrupted()  # the flag was consumed, like ComfyUI's own checks
    comfy.utils.set_progress_bar_global_hook(None)
    assert decode(z, vae).shape == (1, 80, 112, 3)


def test_output_is_one_preallocated_contiguous_buffer(load_vae, decode):
    images = decode(latent((2, 16, 3, 6, 6)), load_vae("taehv"), 64, 16)
    assert images.shape == (18, 48, 48, 3) and images.is_contiguous()
    assert images.untyped_storage().nbytes() == images.numel() * 4  # no concatenation leftovers


def test_vae_rebuilt_on_another_device_decodes_identically(pack, load_vae, core_decode):
    vae = load_vae("wan21")
    copy = pack.nodes.lanes.rebuild_on(vae, torch.device("cpu"))
    assert copy is not vae and type(copy.first_stage_model) is type(vae.first_stage_model)
    assert pack.nodes.lanes.rebuild_on(vae, torch.device("cpu")) is copy  # built once per device
    z = latent((1, 16, 2, 6, 6), 13)
    assert max_diff(core_decode(z, copy), core_decode(z, vae)) <= TOL


def test_stepper_frames_equal_the_models_own_decode(pack, load_vae):
    """Each causal adapter steps frame by frame and matches first_stage_model.decode bit for bit."""
    models = pack.parallel_vae.models
    for family in ("wan21", "taehv"):
        vae = load_vae(family)
        dec = models.make_decoder(family, vae.first_stage_model, vae.vae_dtype, vae.device)
        assert dec.can_step
        z = latent((1, 16, 3, 5, 5), 14)
        with torch.inference_mode():
            steps = list(dec.steps(z))
            whole = vae.first_stage_model.decode(z).float()
        assert [s.shape[2] for s in steps] == [1, 4, 4]
        assert torch.equal(torch.cat(steps, 2), whole)
