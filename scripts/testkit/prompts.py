"""API prompts built from the example workflow, pointed at test files."""
from __future__ import annotations

import copy
import json

from .comfy_env import REPO
from . import random_vaes

EXAMPLE_API = REPO / "example_workflows" / "parallel_vae_decode_api.json"


def decode_prompt(vae_family: str, latent_name: str, core_settings=None, **settings) -> dict:
    """The example workflow (API form) with our VAE and latent, plus an optional VAEDecodeTiled
    branch (nodes 5 and 6) on the same latent."""
    prompt = json.loads(EXAMPLE_API.read_text())
    prompt["1"]["inputs"]["vae_name"] = random_vaes.vae_filename(vae_family)
    prompt["2"]["inputs"]["latent"] = latent_name
    prompt["3"]["inputs"].update(settings)
    prompt["4"]["inputs"]["filename_prefix"] = f"e2e/{latent_name}/parallel"
    if core_settings is not None:
        prompt["5"] = {"class_type": "VAEDecodeTiled",
                       "inputs": {"samples": ["2", 0], "vae": ["1", 0], **core_settings}}
        prompt["6"] = {"class_type": "SaveImage",
                       "inputs": {"images": ["5", 0], "filename_prefix": f"e2e/{latent_name}/core"}}
    return copy.deepcopy(prompt)
