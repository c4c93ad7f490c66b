"""A Ray cluster on this machine for tests and benchmarks: a head that takes no work and
one-CPU nodes (ray.cluster_utils.Cluster; Linux only, as Ray's multi-node clusters)."""
from __future__ import annotations

import contextlib
import os

OBJECT_STORE = 200 << 20  # per node; tiles and one VAE fit many times over


@contextlib.contextmanager
def simulated(nodes: int = 2):
    from ray.cluster_utils import Cluster

    saved = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                             "object_store_memory": OBJECT_STORE})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
        yield cluster
    finally:
        cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
        else:
            os.environ["RAY_USAGE_STATS_ENABLED"] = saved
