"""A Ray cluster on this machine for tests and benchmarks: a head that takes no work and
one-CPU nodes (ray.cluster_utils.Cluster; Linux only, as Ray's multi-node clusters)."""
from __future__ import annotations

import contextlib
import os

# Per node: the weights of a full-size SD VAE (319 MiB in float32) and the rest of what the tests
# keep put fit in memory with room to spare, so nothing ever spills to disk.
OBJECT_STORE = 1 << 30
# Ray writes what the store cannot hold to disk, and fails that once the disk is 95% full: a shared
# CI disk decided the outcome. A threshold of 0 makes any use of the disk fail at once, on every
# machine alike, so a test that outgrows the store is caught here, not on a full day.
NO_DISK = {"local_fs_capacity_threshold": 0.0}


@contextlib.contextmanager
def simulated(nodes: int = 2, object_store: int = OBJECT_STORE):
    from ray.cluster_utils import Cluster

    saved = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                             "object_store_memory": object_store,
                                                             "_system_config": NO_DISK})
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=1, object_store_memory=object_store)
        yield cluster
    finally:
        cluster.shutdown()
        if saved is None:
            os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
        else:
            os.environ["RAY_USAGE_STATS_ENABLED"] = saved
