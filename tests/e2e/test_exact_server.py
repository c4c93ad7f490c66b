"""Exact mode through a real ComfyUI server driven by API prompt JSON."""
import pytest

from testkit.prompts import decode_prompt
from testkit.server import saved_images


def with_vae_decode(prompt: dict, name: str) -> dict:
    """Add ComfyUI's untiled VAE Decode of the same latent (nodes 5 and 6)."""
    prompt["5"] = {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 0]}}
    prompt["6"] = {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": f"e2e/{name}/core"}}
    return prompt


@pytest.mark.every_runtime
def test_exact_equals_vae_decode_through_the_api_in_process_and_on_workers(server, put_latent):
    put_latent("sd_exact.latent", (2, 4, 21, 14), seed=41)
    for devices in ("cpu", "cpu:2"):
        prompt = with_vae_decode(decode_prompt("sd", "sd_exact.latent", tile_size=96, overlap=16, devices=devices,
                                               mode="exact"), "sd_exact")
        run = server.run(prompt)
        assert run.ok, (run.http_status, run.response, run.error, server.log_tail())
        ours, ref = saved_images(server, run, "4"), saved_images(server, run, "6")
        assert ours.shape == ref.shape == (2, 168, 112, 3)
        assert abs(ours - ref).max() <= 1  # 8-bit PNGs: at most a rounding step apart
        assert (ours == ref).mean() > 0.999
        assert "exact, 6 bands" in run.progress_texts("3")[-1], devices  # 3 per image


def test_an_old_prompt_without_mode_still_runs_as_auto(server, put_latent):
    put_latent("sd_old.latent", (1, 4, 12, 10), seed=42)
    prompt = with_vae_decode(decode_prompt("sd", "sd_old.latent", tile_size=64, overlap=16, mode=None), "sd_old")
    assert "mode" not in prompt["3"]["inputs"]
    run = server.run(prompt)
    assert run.ok, (run.error, server.log_tail())
    ours, ref = saved_images(server, run, "4"), saved_images(server, run, "6")
    assert abs(ours - ref).max() <= 1
    assert "(exact, " in run.progress_texts("3")[-1]


def test_exact_on_an_unsupported_vae_is_the_nodes_error_and_the_next_prompt_runs(server, put_latent):
    put_latent("taehv_exact.latent", (1, 16, 3, 6, 5), seed=43)
    run = server.run(decode_prompt("taehv", "taehv_exact.latent", tile_size=64, overlap=16, mode="exact"))
    err = run.error
    assert err is not None and err["node_id"] == "3" and err["exception_type"].endswith("errors.InputError")
    assert err["exception_message"].startswith("mode: exact is not available for TAEHV")
    assert "Wan 2.2" in err["exception_message"] and "mode=tiled" in err["exception_message"]

    bad = server.queue(decode_prompt("taehv", "taehv_exact.latent", mode="fast"))
    assert bad.status_code == 400  # not one of the options: refused when queued

    good = server.run(decode_prompt("taehv", "taehv_exact.latent", tile_size=64, overlap=16, mode="auto"))
    assert good.ok, (good.error, server.log_tail())
    assert saved_images(server, good, "4").shape == (9, 48, 40, 3)
