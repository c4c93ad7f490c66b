"""One real headless ComfyUI server (main.py --cpu) per session, with the pack in custom_nodes/
and random-weight VAE files in models/vae/."""
from __future__ import annotations

import pytest

from testkit import latents, random_vaes
from testkit.server import ComfyServer, prepare_base


@pytest.fixture(scope="session")
def server(tmp_path_factory, vae_dir):
    base = prepare_base(tmp_path_factory.mktemp("comfy-base"))
    for family in ("sd", "wan21"):
        path = random_vaes.ensure_vae_file(family, vae_dir)
        (base / "models" / "vae" / path.name).symlink_to(path)
    srv = ComfyServer(base).start()
    yield srv
    srv.stop()


@pytest.fixture
def put_latent(server):
    """Write a random latent into the server's input folder, for LoadLatent."""
    def put(name: str, shape, seed: int = 0):
        z = latents.random_latent(shape, seed)
        latents.save_latent(z, server.base / "input" / name)
        return z

    return put
