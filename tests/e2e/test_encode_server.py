"""Parallel Tiled VAE Encode and Parallel VAE through a real ComfyUI server driven by API prompt JSON:
the latents ComfyUI's own nodes save (SaveLatent), read back and compared."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from testkit import random_vaes
from testkit.server import saved_images

TOL = 1e-4


def put_image(server, name: str, height: int, width: int, seed: int) -> None:
    """An RGBA PNG in the server's input folder: LoadImage gives its pixels and, from the alpha, a mask."""
    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[height // 4:height // 2, width // 4:width // 2, 3] = 0  # LoadImage's mask is 1 where alpha is 0
    Image.fromarray(rgba, "RGBA").save(server.base / "input" / name)


def saved_latent(server, run, node_id: str) -> torch.Tensor:
    files = run.outputs(node_id).get("latents", [])
    assert files, f"node {node_id} saved no latent; outputs: {run.history.get('outputs')}"
    f = files[0]
    return load_file(str(server.base / "output" / f["subfolder"] / f["filename"]))["latent_tensor"]


def node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def save(source: list, prefix: str) -> dict:
    return node("SaveLatent", samples=source, filename_prefix=f"e2e_encode/{prefix}")


@pytest.mark.every_runtime
def test_both_nodes_equal_core_through_the_api(server):
    put_image(server, "encode_in.png", 104, 80, seed=1)
    sd = random_vaes.vae_filename("sd")
    prompt = {
        "1": node("VAELoader", vae_name=sd),
        "2": node("LoadImage", image="encode_in.png"),
        "3": node("ParallelVAEEncode", pixels=["2", 0], vae=["1", 0], tile_size=0, overlap=64, temporal_size=64,
                  temporal_overlap=8, devices="cpu:2", mode="exact"),
        "4": save(["3", 0], "exact"),
        "5": node("VAEEncode", pixels=["2", 0], vae=["1", 0]),
        "6": save(["5", 0], "core"),
        "7": node("ParallelVAEEncode", pixels=["2", 0], vae=["1", 0], tile_size=64, overlap=16, temporal_size=64,
                  temporal_overlap=8, devices="cpu"),  # no mode: an API prompt may leave it out (auto)
        "8": node("ParallelVAEEncode", pixels=["2", 0], vae=["1", 0], tile_size=64, overlap=16, temporal_size=64,
                  temporal_overlap=8, devices="cpu:2", mode="tiled"),
        "9": save(["8", 0], "tiled"),
        "10": node("VAEEncodeTiled", pixels=["2", 0], vae=["1", 0], tile_size=64, overlap=16, temporal_size=64,
                   temporal_overlap=8),
        "11": save(["10", 0], "core_tiled"),
        "12": save(["7", 0], "auto"),
        # Parallel VAE, used by core's own nodes
        "20": node("ParallelVAE", vae=["1", 0], devices="cpu:2", mode="exact", tile_size=0),
        "21": save(["22", 0], "pv_encode"),
        "22": node("VAEEncode", pixels=["2", 0], vae=["20", 0]),
        "23": node("VAEDecode", samples=["5", 0], vae=["20", 0]),
        "24": node("SaveImage", images=["23", 0], filename_prefix="e2e_encode/pv_decode"),
        "25": node("VAEDecode", samples=["5", 0], vae=["1", 0]),
        "26": node("SaveImage", images=["25", 0], filename_prefix="e2e_encode/core_decode"),
        "27": node("VAEEncodeForInpaint", pixels=["2", 0], vae=["20", 0], mask=["2", 1], grow_mask_by=6),
        "28": save(["27", 0], "pv_inpaint"),
        "29": node("VAEEncodeForInpaint", pixels=["2", 0], vae=["1", 0], mask=["2", 1], grow_mask_by=6),
        "30": save(["29", 0], "core_inpaint"),
    }
    run = server.run(prompt)
    assert run.ok, (run.error, server.log_tail())
    core = saved_latent(server, run, "6")
    assert core.shape == (1, 4, 13, 10)
    for ours, ref in (("4", core), ("12", core), ("9", saved_latent(server, run, "11")),
                      ("21", core), ("28", saved_latent(server, run, "30"))):
        got = saved_latent(server, run, ours)
        assert got.shape == ref.shape and (got - ref).abs().max().item() <= TOL, ours
    inpaint = saved_latent(server, run, "30")
    assert (inpaint - core).abs().max().item() > 1e-2, "the mask changed what was encoded"
    decoded, ref = saved_images(server, run, "24"), saved_images(server, run, "26")
    assert decoded.shape == ref.shape == (1, 104, 80, 3) and abs(decoded - ref).max() <= 1
    assert "exact, " in run.progress_texts("3")[-1] and "cpu[1]" in run.progress_texts("3")[-1]
    assert "(exact, " in run.progress_texts("7")[-1], "auto is exact for an SD VAE"


def test_bad_input_is_the_nodes_error_and_the_next_prompt_runs(server):
    put_image(server, "encode_tiny.png", 6, 40, seed=2)
    sd, taehv = random_vaes.vae_filename("sd"), random_vaes.vae_filename("taehv")
    encode = {"tile_size": 64, "overlap": 16, "temporal_size": 64, "temporal_overlap": 8, "devices": "cpu:2"}
    tiny = {"1": node("VAELoader", vae_name=sd), "2": node("LoadImage", image="encode_tiny.png"),
            "3": node("ParallelVAEEncode", pixels=["2", 0], vae=["1", 0], **encode), "4": save(["3", 0], "tiny")}
    run = server.run(tiny)
    err = run.error
    assert err is not None and err["node_id"] == "3" and err["exception_type"].endswith("errors.InputError")
    assert err["exception_message"].startswith("pixels: 40x6 px is smaller than one latent pixel")

    put_image(server, "encode_ok.png", 64, 48, seed=3)
    unsupported = {"1": node("VAELoader", vae_name=taehv), "2": node("LoadImage", image="encode_ok.png"),
                   "3": node("ParallelVAEEncode", pixels=["2", 0], vae=["1", 0], **encode, mode="exact"),
                   "4": save(["3", 0], "taehv")}
    err = server.run(unsupported).error
    assert err is not None and err["node_id"] == "3"
    assert err["exception_message"].startswith("mode: exact is not available for TAEHV")
    assert "SD 1.x/2.x" in err["exception_message"]

    good = dict(tiny, **{"2": node("LoadImage", image="encode_ok.png")})
    run = server.run(good)
    assert run.ok, (run.error, server.log_tail())
    assert saved_latent(server, run, "4").shape == (1, 4, 8, 6)
