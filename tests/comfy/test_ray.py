"""Ray lanes in ComfyUI's process, on a simulated cluster on this machine (a head that takes no
work and two nodes with one CPU each): the node's output over Ray equals its output on local
workers and ComfyUI's own nodes, the units run on both nodes, a warm prompt ships no weights."""
from __future__ import annotations

import pytest
import torch

from testkit import ray_cluster
from testkit.compare import TOL, latent, max_diff

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster(pack):
    mp = pytest.MonkeyPatch()
    with ray_cluster.simulated(2) as c:
        mp.setenv("RAY_ADDRESS", c.address)
        try:
            yield c
        finally:
            pack.nodes.ray_pool.shutdown_pool()
            ray.shutdown()
            mp.undo()


def test_sd_over_two_ray_nodes_equals_local_workers_and_comfyuis_nodes(pack, load_vae, decode, core_tiled,
                                                                        core_decode, cluster):
    vae, z = load_vae("sd"), latent((1, 4, 24, 20), 61)
    tiled = decode(z, vae, 64, 16, devices="ray:cpu:1", mode="tiled")
    assert max_diff(tiled, core_tiled(z, vae, 64, 16)) <= TOL
    per_lane = pack.nodes.lanes.last_report.per_lane()
    pool = pack.nodes.ray_pool.current_pool()
    assert len({s.node_id for s in pool.specs}) == 2, "one lane on each node"
    assert sorted(per_lane) == sorted(pool.names) and all(n > 0 for n in per_lane.values()), per_lane

    puts, loads = pool.workers.puts, pool.stats.loads
    exact = decode(z, vae, 64, 16, devices="ray:cpu:1", mode="exact")
    assert max_diff(exact, core_decode(z, vae)) <= TOL
    assert pool.workers.puts - puts == 1, "a warm prompt puts its latent only, no weights"
    assert pool.stats.loads == loads, "no worker built the VAE again"

    assert torch.equal(tiled, decode(z, vae, 64, 16, devices="cpu:2", mode="tiled"))
    assert torch.equal(exact, decode(z, vae, 64, 16, devices="cpu:2", mode="exact"))

    # ComfyUI's "free" (and the stop route) stops the actors too; the next prompt brings them back
    assert pack.nodes.workers.release("a test") == 4  # two local workers, two actors
    assert [h.state.value for h in pool.handles] == ["dead", "dead"] and not pool.pids()
    assert torch.equal(decode(z, vae, 64, 16, devices="ray:cpu:1", mode="tiled"), tiled)
    pack.nodes.workers.shutdown_pool()
