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
def _env(name: str, value: str):
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


@contextlib.contextmanager
def simulated(nodes: int = 2, object_store: int = OBJECT_STORE):
    from ray.cluster_utils import Cluster

    with _env("RAY_USAGE_STATS_ENABLED", "0"):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                                 "object_store_memory": object_store,
                                                                 "_system_config": NO_DISK})
        try:
            for _ in range(nodes):
                cluster.add_node(num_cpus=1, object_store_memory=object_store)
            yield cluster
        finally:
            cluster.shutdown()


@contextlib.contextmanager
def attached(release, nodes: int = 2, object_store: int = OBJECT_STORE):
    """A simulated cluster this process reaches through RAY_ADDRESS, as the pack does in ComfyUI;
    on the way out ``release()`` ends what the process holds there, then its Ray driver ends."""
    import ray

    with simulated(nodes, object_store) as cluster, _env("RAY_ADDRESS", cluster.address):
        try:
            yield cluster
        finally:
            release()
            ray.shutdown()


def worker_node_ids(cluster) -> set[str]:
    """The nodes that take work (not the head)."""
    return {n.node_id for n in cluster.list_all_nodes() if n is not cluster.head_node}
