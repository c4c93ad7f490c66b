"""Ray lanes in ComfyUI's process, on a simulated cluster on this machine (a head that takes no
work and two nodes with one CPU each): the node's output over Ray equals its output on local
workers and ComfyUI's own nodes (SD and Wan, tiled and exact, IMAGE and stream node), the units
run on both nodes, a warm prompt ships no weights, pixels travel in the decoder's dtype, and an
actor killed, a node removed or an interrupt mid-job change nothing in the output."""
from __future__ import annotations

import time

import pytest
import torch

from testkit import interrupt, ray_cluster
from testkit.compare import TOL, latent, max_diff
from testkit.procs import before_sending, sigkill

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray

RAY = "ray:cpu:1"  # one CPU lane on each of the two nodes


@pytest.fixture(scope="module")
def cluster(ray_attached):
    with ray_attached() as c:
        yield c


@pytest.fixture
def ray_pool(pack, cluster):
    return pack.nodes.backends.ray_pool


def test_sd_over_two_ray_nodes_equals_local_workers_and_comfyuis_nodes(pack, load_vae, decode, core_tiled,
                                                                        core_decode, cluster, ray_pool, hold_vae,
                                                                        decodes):
    vae, z = load_vae("sd"), latent((1, 4, 16, 12), 61)
    tiled = decode(z, vae, 64, 16, devices=RAY, mode="tiled")
    assert max_diff(tiled, core_tiled(z, vae, 64, 16)) <= TOL
    pool = ray_pool()
    assert {s.node_id for s in pool.specs} == ray_cluster.worker_node_ids(cluster), "one lane on each node"
    hold_vae(pool, vae)  # tiles are pulled: an actor still loading rightly gets none

    puts, loads = pool.transport.puts, pool.stats.loads
    exact = decode(z, vae, 64, 16, devices=RAY, mode="exact")
    assert max_diff(exact, core_decode(z, vae)) <= TOL
    per_lane = decodes.last.per_lane()  # bands in lock-step: every lane has rows
    assert sorted(per_lane) == sorted(pool.names) and all(n > 0 for n in per_lane.values()), per_lane
    assert set(pool.transport.result_nodes) == ray_cluster.worker_node_ids(cluster), "results came from both nodes"
    assert pool.transport.puts - puts == 1, "a warm prompt puts its latent only, no weights"
    assert pool.stats.loads == loads, "no worker built the VAE again"
    assert sorted(pool.speeds.rates) == sorted(pool.names), "each lane's speed measured, for the next rows"

    assert torch.equal(tiled, decode(z, vae, 64, 16, devices="cpu:2", mode="tiled"))
    assert torch.equal(exact, decode(z, vae, 64, 16, devices="cpu:2", mode="exact"))



def test_encode_over_two_ray_nodes_equals_local_workers_and_comfyuis_nodes(pack, comfy, load_vae, decode, cluster,
                                                                            ray_pool, hold_vae):
    vae = load_vae("sd")
    px = torch.rand((1, 136, 96, 3), generator=torch.Generator().manual_seed(66))

    def encode(devices, mode, tile_size=64):
        with torch.inference_mode():
            return pack.nodes.ParallelVAEEncode.execute(px, vae, tile_size, 16, 64, 8, devices, mode).result[0][
                "samples"]

    with torch.inference_mode():
        core = comfy.VAEEncode().encode(vae, px)[0]["samples"]
        core_tiled = comfy.VAEEncodeTiled().encode(vae, px, 64, 16)[0]["samples"]
    tiled = encode(RAY, "tiled")
    assert max_diff(tiled, core_tiled) <= TOL
    exact = encode(RAY, "exact", 0)  # bands in lock-step across the nodes, attention keys gathered
    assert max_diff(exact, core) <= TOL
    assert set(ray_pool().transport.result_nodes) == ray_cluster.worker_node_ids(cluster)
    assert torch.equal(exact, encode("cpu:2", "exact", 0))
    pool = ray_pool()
    hold_vae(pool, vae)
    puts, loads = pool.transport.puts, pool.stats.loads
    decode(exact, vae, 64, 16, devices=RAY, mode="exact")
    assert pool.transport.puts - puts == 1 and pool.stats.loads == loads, "the encode's copy decodes: no weights"

    wan = load_vae("wan21")  # bands on the actors in lock-step, exchanging edge rows and keys
    video = torch.rand((5, 256, 64, 3), generator=torch.Generator().manual_seed(67))
    with torch.inference_mode():
        ours = pack.nodes.ParallelVAEEncode.execute(video, wan, 128, 16, 64, 8, RAY, "exact").result[0]["samples"]
        assert max_diff(ours, comfy.VAEEncode().encode(wan, video)[0]["samples"]) <= TOL


def test_wan_tiled_and_exact_image_and_stream_nodes_equal_local_workers(pack, load_vae, decode, core_tiled,
                                                                        core_decode, stream_of, to_images, cluster,
                                                                        ray_pool):
    vae = load_vae("wan21")
    v = latent((1, 16, 3, 10, 14), 62)
    tiled = decode(v, vae, 64, 16, 8, 4, devices=RAY)  # causal: time is never cut
    assert max_diff(tiled, core_tiled(v, vae, 64, 16, 64, 8)) <= TOL
    assert torch.equal(tiled, decode(v, vae, 64, 16, 8, 4, devices="cpu:2"))
    assert torch.equal(to_images(stream_of(v, vae, 64, 16, 8, 4, devices=RAY)), tiled)

    # two bands of 16 rows (tile_size 64 caps a band there) in lock-step, their edge rows passed through
    # ComfyUI's process; lanes measured alike, so both pools cut the same bands (Wan's bands of other
    # heights agree to about 2e-6, not bit for bit: scripts/testkit/speeds.py)
    e = latent((1, 16, 2, 32, 4), 63)
    for pool in filter(None, (ray_pool(), pack.nodes.backends.local_pool())):
        pool.speeds.rates.update({name: 1.0 for name in pool.speeds.rates})
    exact = decode(e, vae, 64, 16, devices=RAY, mode="exact")
    assert max_diff(exact, core_decode(e, vae)) <= TOL
    assert torch.equal(exact, decode(e, vae, 64, 16, devices="cpu:2", mode="exact"))
    ray_pool().speeds.rates.update({name: 1.0 for name in ray_pool().speeds.rates})
    assert torch.equal(to_images(stream_of(e, vae, 64, 16, devices=RAY, mode="exact")), exact)
    assert set(ray_pool().transport.result_nodes) == ray_cluster.worker_node_ids(cluster)


def test_pixels_travel_in_the_decoders_dtype(comfy, load_vae, decode, cluster, ray_pool):
    import comfy.sd

    full = load_vae("wan21")  # bf16 convolutions are slow on a CPU: a small VAE, one tile
    half = comfy.sd.VAE(sd=full.get_sd(), dtype=torch.bfloat16)  # a bf16 VAE, as on most GPUs
    assert half.vae_dtype == torch.bfloat16
    z = latent((1, 16, 2, 4, 4), 64)

    def sent(vae):
        before = ray_pool().transport.result_bytes if ray_pool() else 0
        out = decode(z, vae, 64, 16, devices=RAY)
        return out, ray_pool().transport.result_bytes - before

    (wide, wide_bytes), (ours, half_bytes) = sent(full), sent(half)
    assert half_bytes * 2 == wide_bytes > 0, "the same pixels, in half the bytes"
    assert max_diff(ours, wide) > 0, "decoded in bf16"
    assert torch.equal(ours, decode(z, half, 64, 16, devices="cpu:2")), "widened back exactly"


def test_sigkill_of_an_actor_mid_job_gives_the_same_output_and_the_lane_rejoins(pack, load_vae, decode, ray_pool,
                                                                                hold_vae, decodes):
    vae, z = load_vae("sd"), latent((1, 4, 16, 16), 65)
    clean = decode(z, vae, 64, 16, devices="cpu:2")
    decode(latent((1, 4, 8, 8), 66), vae, 64, 16, devices=RAY)
    pool = ray_pool()
    hold_vae(pool, vae)  # both actors hold the VAE: each pulls a tile at once
    lane = pool.names[1]
    victim, restarts = pool.pids()[lane], pool.stats.restarts
    killed = before_sending(pool, lane, "Task", sigkill)  # dies holding a tile
    ours = decode(z, vae, 64, 16, devices=RAY)
    assert killed.is_set(), "the actor never got a task"
    assert pool.stats.restarts == restarts + 1
    assert torch.equal(ours, clean)
    hold_vae(pool, vae)  # the restarted actor (up after the job ended) builds the VAE again
    assert torch.equal(decode(z, vae, 64, 16, devices=RAY), clean)
    assert ray_pool() is pool and pool.pids()[lane] != victim
    assert decodes.last.per_lane().get(lane, 0) > 0, "the restarted actor rejoined"


def test_interrupt_mid_decode_returns_within_2_s_and_the_next_prompt_runs_on_the_same_actors(
        comfy, load_vae, decode, core_tiled, ray_pool, monkeypatch):
    import comfy.model_management as mm
    import comfy.utils

    vae = load_vae("sd")
    decode(latent((1, 4, 8, 8), 67), vae, 64, 16, devices=RAY)  # warm
    pids = ray_pool().pids()
    z = latent((1, 4, 48, 48), 68)  # ~100 tiles: tens of seconds on two one-CPU lanes
    units = []  # ComfyUI's progress bar advances once per unit decoded
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, *a, **k: units.append(value))
    press = interrupt.Press(lambda: max(units, default=0) >= 2)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            decode(z, vae, 64, 16, devices=RAY)
        returned = time.monotonic() - press.at
    finally:
        press.stop()
    assert returned < 2.0, f"returned {returned:.2f} s after the interrupt"
    assert max(units) < 50, "it stopped long before the end"
    small = latent((1, 4, 10, 10), 69)
    assert max_diff(decode(small, vae, 64, 16, devices=RAY), core_tiled(small, vae, 64, 16)) <= TOL
    assert ray_pool().pids() == pids, "the same actors"


def auto_tile(pack, vae, devices: str) -> int:
    """The tile size the node picks for ``devices`` now (tile_size 0, tiled mode)."""
    job = pack.nodes.job.DecodeJob.prepare({"samples": latent((1, 4, 8, 8), 0)}, vae, 0, 64, 64, 8, devices, None,
                                           "tiled")
    return job.plan_for(pack.nodes.backends.backend_for(job.devices)).tile_size


def test_tile_size_auto_follows_the_free_memory_each_actor_measures(pack, load_vae, decode, core_tiled, core_decode,
                                                                    monkeypatch, ray_pool):
    sizing = pack.parallel_vae.sizing
    vae, z = load_vae("sd"), latent((1, 4, 16, 18), 72)
    decode(latent((1, 4, 8, 8), 73), vae, 64, 16, devices=RAY)
    pool = ray_pool()
    measured = pool.transport.free_memory(pool.start())
    assert sorted(measured) == sorted(pool.names) and min(measured.values()) > 1 << 30, measured
    monkeypatch.setenv(sizing.MEMORY_LIMIT_ENV, f"{pool.names[1]}=160")  # one tight lane decides
    size = auto_tile(pack, vae, RAY)
    monkeypatch.setenv(sizing.MEMORY_LIMIT_ENV, "160")
    assert size == auto_tile(pack, vae, "cpu") < 512
    monkeypatch.setenv(sizing.MEMORY_LIMIT_ENV, f"{pool.names[1]}=160")
    assert max_diff(decode(z, vae, 0, 64, devices=RAY), core_tiled(z, vae, size, min(64, size // 4))) <= TOL
    assert max_diff(decode(z, vae, 0, 64, devices=RAY, mode="exact"), core_decode(z, vae)) <= TOL


def test_an_exact_prompt_with_tile_size_auto_looks_at_the_cluster_once_and_measures_each_lane_once(
        pack, load_vae, decode, core_decode, stream_of, monkeypatch, ray_pool):
    """tile_size 0 needs each lane's free memory, exact mode each lane's rows: one look at the
    cluster's machines and one free-memory round (each lane asked once) serve both. Building the
    stream node's recipe reaches no cluster at all."""
    lookups, rounds = [], []
    nodes = ray.nodes
    monkeypatch.setattr(ray, "nodes", lambda: lookups.append(1) or nodes())
    actors = pack.parallel_vae.ray_workers.RayActors
    measure = actors.free_memory

    def counted(self, handles):
        measured = measure(self, handles)
        rounds.append(sorted(measured))
        return measured

    monkeypatch.setattr(actors, "free_memory", counted)
    vae, z = load_vae("sd"), latent((1, 4, 16, 12), 74)
    stream_of(z, vae, 0, 16, devices=RAY, mode="exact")
    assert (lookups, rounds) == ([], []), "the stream node's recipe reached the cluster"
    ours = decode(z, vae, 0, 16, devices=RAY, mode="exact")
    assert max_diff(ours, core_decode(z, vae)) <= TOL
    assert len(lookups) == 1, "one look at the cluster's machines"
    assert rounds == [sorted(ray_pool().names)], "one free-memory round, each lane once"


def test_removing_a_node_mid_job_gives_the_same_output_from_the_other(pack, load_vae, decode, cluster, ray_pool,
                                                                      hold_vae):
    """Last in the module: the cluster keeps one worker node."""
    vae, z = load_vae("sd"), latent((1, 4, 16, 16), 70)
    clean = decode(z, vae, 64, 16, devices="cpu:2")
    decode(latent((1, 4, 8, 8), 71), vae, 64, 16, devices=RAY)
    pool = ray_pool()
    hold_vae(pool, vae)
    spec = pool.specs[1]
    node = next(n for n in cluster.list_all_nodes() if n.node_id == spec.node_id)
    earlier = len(pool.stats.events)  # the pool's life so far (the SIGKILL test killed this lane too)
    removed = before_sending(pool, spec.name, "Task", lambda h: cluster.remove_node(node, allow_graceful=False))
    start = time.monotonic()
    ours = decode(z, vae, 64, 16, devices=RAY)
    assert removed.is_set(), "the node's actor never got a task"
    took = time.monotonic() - start
    assert torch.equal(ours, clean)
    deaths = [text for _, text in pool.stats.events[earlier:] if spec.name in text and "died" in text]
    assert deaths and len(deaths) <= 3, "\n".join(deaths)  # no start retried on a machine that is gone
    assert took < 60, took
    assert torch.equal(decode(z, vae, 64, 16, devices=RAY), clean)

    # ComfyUI's "free" (and the stop route) stops the actors too (a dead actor starts again on the
    # next prompt as after a SIGKILL, above)
    pool = ray_pool()  # the machines left, once Ray has marked the node dead (health checks, ~13 s)
    # an actor still starting counts as running too (the removed node's lane, retried by the last
    # job, until Ray marks that node dead)
    actors = sum(h.live for h in pool.handles)
    assert actors >= len(pool.pids()) >= 1
    assert pack.nodes.backends.release("a test") == 2 + actors  # two local workers and the actors
    assert {h.state.value for h in pool.handles} == {"dead"} and not pool.pids()
