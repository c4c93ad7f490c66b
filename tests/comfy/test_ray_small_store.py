"""A Ray cluster whose object store cannot hold a VAE's weights (and may not use the disk): the
node fails with an error saying what to change, and the same actors then decode a VAE that fits,
on both nodes, as the local workers do. (A refused put once left a lane waiting for that VAE for
good, so it sat out every later job.)"""
from __future__ import annotations

import pytest
import torch

from testkit import ray_cluster
from testkit.compare import latent

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

RAY = "ray:cpu:1"
SMALL_STORE = 80 << 20  # Ray's least (75 MiB) and more than a small Wan 2.1's 14 MiB, less than SD's 319


@pytest.fixture(scope="module")
def small_cluster(ray_attached):
    with ray_attached(object_store=SMALL_STORE) as c:
        yield c


def test_weights_the_store_cannot_hold_are_a_clear_error_and_the_lanes_stay_usable(pack, load_vae, decode, hold_vae,
                                                                                 small_cluster):
    with pytest.raises(Exception, match=r"object store on this machine could not take 31\d\.\d MiB") as err:
        decode(latent((1, 4, 8, 8), 81), load_vae("sd"), 64, 16, devices=RAY)
    assert "--object-store-memory" in str(err.value)

    wan, v = load_vae("wan21"), latent((1, 16, 2, 8, 12), 82)
    pool = pack.nodes.backends.ray_pool()
    hold_vae(pool, wan)  # both lanes take the next VAE: neither still waits for SD's load
    assert torch.equal(decode(v, wan, 64, 16, 8, 4, devices=RAY), decode(v, wan, 64, 16, 8, 4, devices="cpu:2"))
    assert set(pool.transport.result_nodes) == ray_cluster.worker_node_ids(small_cluster), "results came from both nodes"
