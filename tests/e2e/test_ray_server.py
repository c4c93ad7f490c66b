"""A real ComfyUI server attached to a Ray cluster through RAY_ADDRESS (a simulated cluster on
this machine: a head that takes no work and two one-CPU nodes): API JSON with
devices=ray:cpu:1 equals VAE Decode (Tiled); a bad Ray value is a clear node error at queue time,
and an unreachable cluster a clear node error when the node runs; the server keeps serving; no
actor outlives a killed ComfyUI."""
from __future__ import annotations

import time

import pytest

from testkit import procs, ray_cluster
from testkit.prompts import decode_prompt
from testkit.server import saved_images

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    with ray_cluster.simulated(2) as c:
        yield c


def test_api_prompt_on_ray_lanes_equals_vae_decode_tiled(own_server, put_latent_to, cluster):
    own_server.env.update(RAY_ADDRESS=cluster.address, RAY_USAGE_STATS_ENABLED="0")
    server = own_server.start()
    put_latent_to(server, "sd_ray.latent", (1, 4, 12, 14), seed=71)
    core = {"tile_size": 64, "overlap": 16, "temporal_size": 64, "temporal_overlap": 8}
    run = server.run(decode_prompt("sd", "sd_ray.latent", core, tile_size=64, overlap=16, devices="ray:cpu:1"))
    assert run.ok, (run.error, server.log_tail())
    ours, ref = saved_images(server, run, "4"), saved_images(server, run, "6")
    assert ours.shape == ref.shape == (1, 96, 112, 3)
    assert abs(ours.astype(int) - ref.astype(int)).max() <= 1  # 8-bit PNGs: a rounding step at most
    assert "2 Ray lanes" in run.progress_texts("3")[-1], run.progress_texts("3")

    bad = server.queue(decode_prompt("sd", "sd_ray.latent", devices="ray:gpu"))
    assert bad.status_code == 400
    details = [e["details"] for e in bad.json()["node_errors"]["3"]["errors"]]
    assert any("'ray:gpu' is not a Ray device; use ray" in d for d in details), details

    again = server.run(decode_prompt("sd", "sd_ray.latent", core, tile_size=64, overlap=16, devices="ray:cpu:1"))
    assert again.ok, (again.error, server.log_tail())
    assert (saved_images(server, again, "4") == ours).all()

    shown = server.get("/parallel_vae/workers").json()["ray"]
    assert [(r["state"], r["models"]) for r in shown["workers"]] == [("up", 1)] * 2, shown
    assert all(r["device"].startswith(r["node"]) for r in shown["workers"]), "named by machine"
    assert sorted(r["pid"] for r in shown["workers"]) == procs.ray_actors()

    # ComfyUI killed: its actors go with it (Ray's owner fate-sharing), on every node
    assert len(procs.ray_actors()) == 2, "ps shows ray::ParallelVAEWorker, one per lane"
    server.proc.kill()
    server.proc.wait(10)
    deadline = time.monotonic() + 30
    while procs.ray_actors() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not procs.ray_actors(), "an actor outlived ComfyUI"


def test_no_cluster_is_a_node_error_saying_how_to_start_one(own_server, put_latent_to):
    own_server.env.update(RAY_ADDRESS="127.0.0.1:9", RAY_USAGE_STATS_ENABLED="0")  # nothing listens
    server = own_server.start()
    put_latent_to(server, "sd_noray.latent", (1, 4, 8, 8), seed=72)
    run = server.run(decode_prompt("sd", "sd_noray.latent", tile_size=64, overlap=16, devices="ray:cpu:1"))
    err = run.error
    assert err is not None and err["exception_type"].endswith("errors.InputError"), (err, server.log_tail())
    assert err["exception_message"].startswith("devices: no Ray cluster to attach to")
    assert "ray start --head" in err["exception_message"]
    good = server.run(decode_prompt("sd", "sd_noray.latent", tile_size=64, overlap=16, devices="cpu"))
    assert good.ok, (good.error, server.log_tail())
