"""The real ComfyUI package, booted in this process in CPU mode, with random-weight VAE files
built in ComfyUI's exact layouts and loaded through the real VAELoader."""
from __future__ import annotations

import pytest
import torch

from testkit import comfy_env, observe, random_vaes, ray_cluster


@pytest.fixture(scope="session")
def comfy(vae_dir):
    nodes = comfy_env.boot()
    import folder_paths

    folder_paths.add_model_folder_path("vae", str(vae_dir), is_default=True)
    return nodes


@pytest.fixture(scope="session")
def pack(comfy):
    return comfy_env.load_pack()


@pytest.fixture(scope="session")
def load_vae(comfy, vae_dir):
    loaded = {}

    def load(family: str):
        if family not in loaded:
            random_vaes.ensure_vae_file(family, vae_dir)
            (loaded[family],) = comfy.VAELoader().load_vae(random_vaes.vae_filename(family))
        return loaded[family]

    return load


@pytest.fixture(scope="session")
def decode(pack):
    """Run ParallelVAEDecode the way ComfyUI's executor does (hidden inputs on a class clone).

    ``mode`` defaults to tiled here, what most tests compare with VAEDecodeTiled; ``mode=None``
    leaves the input out, as an old prompt does (the node's default, auto)."""
    node = comfy_env.node_clone(pack.nodes.ParallelVAEDecode, {"UNIQUE_ID": "9"})

    def run(latent, vae, tile_size=64, overlap=16, temporal_size=64, temporal_overlap=8, devices="auto",
            mode="tiled", sharding=None):
        extra = {} if mode is None else {"mode": mode}
        if sharding is not None:
            extra["sharding"] = sharding
        with torch.inference_mode():
            out = node.execute({"samples": latent}, vae, tile_size, overlap, temporal_size, temporal_overlap, devices,
                               **extra)
        return out.result[0]

    return run


@pytest.fixture
def save(pack, comfy, tmp_path):
    """Run Save Video (Stream) into ``tmp_path`` (ComfyUI's output folder for the test); returns
    (the node's output, the saved frame or video files)."""
    import folder_paths

    old = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path))
    node = comfy_env.node_clone(pack.nodes.ParallelVAESaveVideo, {"UNIQUE_ID": "8", "PROMPT": {"8": {}},
                                                                "EXTRA_PNGINFO": None})

    def run(stream, fmt="png", fps=16.0, crf=19, prefix="pvae/clip", audio=None):
        extra = {} if audio is None else {"audio": audio}
        with torch.inference_mode():
            out = node.execute(stream, prefix, fps, fmt, crf, **extra)
        return out, [tmp_path / e["subfolder"] / e["filename"] for e in out.ui["images"]]

    yield run
    folder_paths.set_output_directory(old)


@pytest.fixture(scope="session")
def core_tiled(comfy):
    def run(latent, vae, tile_size=64, overlap=16, temporal_size=64, temporal_overlap=8):
        with torch.inference_mode():
            return comfy.VAEDecodeTiled().decode(vae, {"samples": latent}, tile_size, overlap, temporal_size,
                                                 temporal_overlap)[0]

    return run


@pytest.fixture(scope="session")
def core_decode(comfy):
    def run(latent, vae):
        with torch.inference_mode():
            return comfy.VAEDecode().decode(vae, {"samples": latent})[0]

    return run


@pytest.fixture(scope="session")
def stream_of(pack):
    """Run ParallelVAEDecodeStream as the executor does; returns its stream (a recipe)."""
    node = comfy_env.node_clone(pack.nodes.ParallelVAEDecodeStream, {"UNIQUE_ID": "7"})

    def make(z, vae, tile_size=64, overlap=16, temporal_size=64, temporal_overlap=8, devices="auto",
             frames_per_batch=3, mode="tiled"):
        with torch.inference_mode():
            return node.execute({"samples": z}, vae, tile_size, overlap, temporal_size, temporal_overlap, devices,
                                frames_per_batch, mode=mode).result[0]

    return make


@pytest.fixture(scope="session")
def to_images(pack):
    def run(stream):
        with torch.inference_mode():
            return pack.nodes.ParallelVAEStreamToImages.execute(stream).result[0]

    return run


@pytest.fixture
def torch_threads():
    """Run a block with another torch thread count (float sums depend on it), restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _asks_of_heap(pack, monkeypatch, method: str) -> list:
    """Every argument heap.HEAP.``method`` is called with in this process, in order (the call goes on)."""
    heap = pack.parallel_vae.heap.HEAP
    original, asked = getattr(heap, method), []

    def recording(flag=True):
        asked.append(flag)
        return original(flag)

    monkeypatch.setattr(heap, method, recording)
    return asked


@pytest.fixture
def band_heaps(pack, monkeypatch) -> list:
    """What each exact item asks of heap.Heap.bands_running in this process (True: what a band
    frees goes back as its turn ends while its bands run), in order."""
    return _asks_of_heap(pack, monkeypatch, "bands_running")


@pytest.fixture
def block_reuse(pack, monkeypatch) -> list:
    """What each exact item asks of heap.Heap.reusing_blocks (True: a worker's large blocks come
    from its heap while the item runs), in order."""
    return _asks_of_heap(pack, monkeypatch, "reusing_blocks")


@pytest.fixture
def one_thread(torch_threads):
    """Bit-identity across band counts holds where no CPU kernel splits one output's sum over
    threads. oneDNN on an AVX-512 Xeon does for 1x1 convs, by the input's size, so at 2 threads
    bands of other heights differ by up to 8e-7 there (none on the EPYC it was first measured on);
    at one thread nothing is split. The same goes for comparing in-process output with `cpu:2`'s
    bit for bit: each worker runs one thread. Equality with VAE Decode (TOL) holds at any thread count."""
    torch_threads(1)


@pytest.fixture(scope="session")
def source_of(pack):
    """What workers are sent of a ComfyUI VAE (the node's own ModelSource for it)."""
    return lambda vae: pack.nodes.model.vae_model(vae, pack.nodes.vae_info.describe(vae)).source


@pytest.fixture(scope="session")
def hold_vae(source_of):
    """Load ``vae`` in every worker (or actor) of ``pool`` and wait until each holds it. Units are
    pulled, so a worker still starting or loading when a small job runs rightly gets none, and a
    worker that came up after a job ended holds nothing until the next one: tests that count which
    worker decoded what make every worker ready first."""
    return lambda pool, vae: pool.wait_ready(source_of(vae))


@pytest.fixture(scope="session")
def ray_attached(pack):
    """``ray_attached(**kw)``: this process attached to a simulated Ray cluster
    (testkit.ray_cluster.attached); the pack's workers and actors end before Ray's driver does."""
    return lambda **kw: ray_cluster.attached(pack.nodes.backends.shutdown, **kw)


@pytest.fixture
def decodes(pack):
    """The units of the latest decode: ``decodes.last`` (an engine.Report: tile, step, lane, pid)."""
    with observe.decodes(pack) as seen:
        yield seen
