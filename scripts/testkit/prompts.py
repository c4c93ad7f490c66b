"""API prompts built from the example workflow, pointed at test files."""
from __future__ import annotations

import json

from . import random_vaes
from .comfy_env import REPO

EXAMPLE_API = REPO / "example_workflows" / "parallel_vae_decode_api.json"
VIDEO_API = REPO / "example_workflows" / "parallel_vae_video_api.json"
SETTINGS = ("tile_size", "overlap", "temporal_size", "temporal_overlap")


def example_prompt(vae_name: str, latent_name: str) -> dict:
    """The example workflow (API form): Load VAE + Load Latent -> Parallel Tiled VAE Decode (node 3)
    -> Save Image (node 4), with our files."""
    prompt = json.loads(EXAMPLE_API.read_text())
    prompt["1"]["inputs"]["vae_name"] = vae_name
    prompt["2"]["inputs"]["latent"] = latent_name
    return prompt


def vae_decode_tiled(settings: dict) -> dict:
    """A VAEDecodeTiled node on the example's latent (node 2) and VAE (node 1)."""
    return {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["2", 0], "vae": ["1", 0], **settings}}


def decode_prompt(vae_family: str, latent_name: str, core_settings=None, mode="tiled", **settings) -> dict:
    """The example workflow with a random-weight VAE, plus an optional VAEDecodeTiled branch
    (nodes 5 and 6) on the same latent. ``mode`` is tiled unless given (``None`` leaves it out, as
    in a prompt written before the input existed)."""
    prompt = example_prompt(random_vaes.vae_filename(vae_family), latent_name)
    prompt["3"]["inputs"].update(settings)
    _set_mode(prompt["3"]["inputs"], mode)
    prompt["4"]["inputs"]["filename_prefix"] = f"e2e/{latent_name}/parallel"
    if core_settings is not None:
        prompt["5"] = vae_decode_tiled(core_settings)
        prompt["6"] = {"class_type": "SaveImage",
                       "inputs": {"images": ["5", 0], "filename_prefix": f"e2e/{latent_name}/core"}}
    return prompt


def _set_mode(inputs: dict, mode) -> None:
    if mode is None:
        inputs.pop("mode", None)
    else:
        inputs["mode"] = mode


def video_prompt(vae_name: str, latent_name: str, prefix: str, mode="tiled", **settings) -> dict:
    """The video example (API form): Load VAE + Load Latent -> Parallel Tiled VAE Decode (Stream)
    (node 3) -> Save Video (Stream) (node 4); ``settings`` go to node 3 or 4, whichever has them."""
    prompt = json.loads(VIDEO_API.read_text())
    prompt["1"]["inputs"]["vae_name"] = vae_name
    prompt["2"]["inputs"]["latent"] = latent_name
    prompt["4"]["inputs"]["filename_prefix"] = prefix
    for key, value in settings.items():
        node = "4" if key in prompt["4"]["inputs"] else "3"
        assert key in prompt[node]["inputs"], key
        prompt[node]["inputs"][key] = value
    _set_mode(prompt["3"]["inputs"], mode)
    return prompt
