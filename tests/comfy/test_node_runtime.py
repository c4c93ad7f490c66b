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
    # 4 spatial tiles x 3 latent frames: 12 units, each an update on the node's own id; ComfyUI
    # 0.9.2+ throttles the updates it passes on (100 ms / 0.5%), so only some values arrive there,
    # always in order and always the final one.
    values = [v for v, _, _ in progress_hook]
    assert values and values == sorted(set(values)) and set(values) <= set(range(1, 13))
    assert progress_hook[-1] == (12, 12, "9")
    assert {(total, node) for _, total, node in progress_hook} == {(12, "9")}


def test_interrupt_stops_between_tiles_and_the_next_decode_works(load_vae, decode, progress_hook):
    import comfy.model_management as mm
    import comfy.utils

    def hook(value, total, preview, node_id=None):
        progress_hook.append(value)
        if value >= 3 and not interrupted:  # the first update from the third tile on (ComfyUI may skip some)
            interrupted.append(value)
            mm.interrupt_current_processing(True)  # what POST /interrupt does

    interrupted = []
    comfy.utils.set_progress_bar_global_hook(hook)
    vae, z = load_vae("sd"), latent((1, 4, 10, 14), 12)
    with pytest.raises(mm.InterruptProcessingException):
        decode(z, vae)
    # stopped at the next tile boundary: no unit after the one that saw the interrupt, of 14
    assert interrupted and progress_hook[-1] == interrupted[0] < 14
    assert not mm.processing_interrupted()  # the flag was consumed, like ComfyUI's own checks
    comfy.utils.set_progress_bar_global_hook(None)
    assert decode(z, vae).shape == (1, 80, 112, 3)


def test_output_is_one_preallocated_contiguous_buffer(load_vae, decode):
    images = decode(latent((2, 16, 3, 6, 6)), load_vae("taehv"), 64, 16)
    assert images.shape == (18, 48, 48, 3) and images.is_contiguous()
    assert images.untyped_storage().nbytes() == images.numel() * 4  # no concatenation leftovers


def test_vae_rebuilt_on_another_device_decodes_identically(pack, load_vae, core_decode):
    vae = load_vae("wan21")
    copy = pack.nodes.model.rebuild_on(vae, torch.device("cpu"))
    assert copy is not vae and type(copy.first_stage_model) is type(vae.first_stage_model)
    assert pack.nodes.model.rebuild_on(vae, torch.device("cpu")) is copy  # built once per device
    z = latent((1, 16, 2, 6, 6), 13)
    assert max_diff(core_decode(z, copy), core_decode(z, vae)) <= TOL
