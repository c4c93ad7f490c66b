"""One real headless ComfyUI server (main.py --cpu) per session, with the pack in custom_nodes/
and random-weight VAE files in models/vae/."""
from __future__ import annotations

import pytest

from testkit import latents, random_vaes
from testkit.server import ComfyServer, prepare_base


def new_server(base, vae_dir) -> ComfyServer:
    base = prepare_base(base)
    for family in ("sd", "wan21", "taehv"):  # taehv: a VAE without an exact executor
        path = random_vaes.ensure_vae_file(family, vae_dir)
        (base / "models" / "vae" / path.name).symlink_to(path)
    return ComfyServer(base)


@pytest.fixture(scope="session")
def server(tmp_path_factory, vae_dir):
    srv = new_server(tmp_path_factory.mktemp("comfy-base"), vae_dir).start()
    yield srv
    srv.stop()


@pytest.fixture
def own_server(tmp_path, vae_dir):
    """A server of this test's own (for tests that kill it)."""
    srv = new_server(tmp_path / "comfy-base", vae_dir)
    yield srv
    srv.stop()


@pytest.fixture
def put_latent_to():
    """Write a random latent into a server's input folder, for LoadLatent."""
    def put(server, name: str, shape, seed: int = 0):
        z = latents.random_latent(shape, seed)
        latents.save_latent(z, server.base / "input" / name)
        return z

    return put


@pytest.fixture
def put_latent(server, put_latent_to):
    return lambda name, shape, seed=0: put_latent_to(server, name, shape, seed)
