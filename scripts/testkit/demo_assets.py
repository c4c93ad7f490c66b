"""The files the example workflows name (VAEs, latents, an image), in a ComfyUI base directory:
``prepare_templates`` puts every runnable template's in place (what ``make run`` does)."""
from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import comfy_env, latents, random_vaes
from .server import prepare_base

DEMO_VAE = "parallel_vae_demo_sd.safetensors"  # the names example_workflows/ uses
DEMO_LATENT = "parallel_vae_demo.latent"
DEMO_IMAGE = "parallel_vae_demo.png"  # example_workflows/parallel_vae_img2img*.json
DEMO_VIDEO_VAE = "parallel_vae_demo_wan21.safetensors"  # example_workflows/parallel_vae_video*.json
DEMO_VIDEO_LATENT = "parallel_vae_demo_video.latent"
DEMO_VIDEO_SHAPE = (1, 16, 5, 32, 32)  # 17 frames of 256 x 256 from the Wan 2.1 VAE
DEMO_LTX2_VAE = "parallel_vae_demo_ltx2_video.safetensors"  # example_workflows/parallel_vae_ltx2_av*.json
DEMO_LTX2_AUDIO = "parallel_vae_demo_ltx2_audio.safetensors"  # in models/checkpoints, as LTX-2's checkpoint
DEMO_LTX2_LATENT = "parallel_vae_demo_ltx2.latent"
DEMO_LTX2_SHAPE = (1, 128, 5, 8, 8)  # 33 frames of 256 x 256 from an LTXV-layout video VAE


@dataclass
class DemoAssets:
    vae_name: str
    latent_name: str
    description: str
    causal: bool
    in_shape: tuple


def _link(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(src.resolve())


def prepare(base: Path, vae_path: Optional[Path] = None, seed: int = 0) -> DemoAssets:
    base = prepare_base(Path(base))
    if vae_path is None:
        src = random_vaes.ensure_vae_file("sd", random_vaes.cache_dir())
        vae_name = DEMO_VAE
        description = ("an architecture-faithful SD VAE (AutoencoderKL, 83.7 M parameters) with random "
                       "weights, made by this demo: no weights were downloaded")
    else:
        src = Path(vae_path).expanduser()
        if not src.is_file():
            raise SystemExit(f"VAE={vae_path}: no such file")
        vae_name = src.name
        description = f"your VAE {src}"
    _link(src, base / "models" / "vae" / vae_name)

    # Read the VAE's latent layout through ComfyUI itself, then let it go before the server starts.
    comfy_env.boot()
    pack = comfy_env.load_pack()
    import comfy.sd
    import comfy.utils

    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(src)))
    spec = pack.nodes.vae_info.describe(vae)
    description += f"; ComfyUI detected: {spec.label}"
    del vae
    gc.collect()
    # 256 x 384 pixels for 8x VAEs; 5 latent frames (17 pixel frames for 4x-in-time VAEs) for video
    hw = (256 // spec.spatial_compression, 384 // spec.spatial_compression)
    shape = (1, spec.latent_channels) + ((5,) if spec.latent_dim == 3 else ()) + hw
    latents.save_latent(latents.random_latent(shape, seed), base / "input" / DEMO_LATENT)
    save_demo_image(base / "input" / DEMO_IMAGE)
    return DemoAssets(vae_name, DEMO_LATENT, description, spec.causal, shape)


def save_demo_image(path: Path, height: int = 256, width: int = 384) -> Path:
    """A smooth colour picture (gradients and rings) for the encode example to encode."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = np.hypot(y - height / 2, x - width / 2)
    rgb = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(r / 9.0)], -1)
    Image.fromarray((rgb * 255).round().astype(np.uint8)).save(path)
    return path


def prepare_video(base: Path, seed: int = 0) -> DemoAssets:
    """The video example's files: a random-weight Wan 2.1 VAE (ComfyUI's layout, small width) and a
    random video latent, under the names the workflow uses."""
    base = prepare_base(Path(base))
    _link(random_vaes.ensure_vae_file("wan21", random_vaes.cache_dir()), base / "models" / "vae" / DEMO_VIDEO_VAE)
    latents.save_latent(latents.random_latent(DEMO_VIDEO_SHAPE, seed), base / "input" / DEMO_VIDEO_LATENT)
    return DemoAssets(DEMO_VIDEO_VAE, DEMO_VIDEO_LATENT, "a Wan 2.1 VAE (causal video, small width) with random "
                      "weights, made by this demo", True, DEMO_VIDEO_SHAPE)


def ltx2_supported() -> bool:
    """Whether this ComfyUI has LTX-2's audio nodes and builds VAEs from file metadata (0.10+)."""
    import importlib.util
    import inspect

    comfy_env.boot()
    import comfy.sd

    return (importlib.util.find_spec("comfy_extras.nodes_lt_audio") is not None
            and "metadata" in inspect.signature(comfy.sd.VAE.__init__).parameters)


def prepare_ltx2(base: Path, seed: int = 0) -> DemoAssets:
    """The LTX-2 audio+video example's files: an LTXV-layout video VAE and LTX-2's audio VAE (random
    weights, small configs from their metadata, as LTX-2's files carry them) and a video latent."""
    base = prepare_base(Path(base))
    cache = random_vaes.cache_dir()
    _link(random_vaes.ensure_vae_file("ltxv_meta", cache), base / "models" / "vae" / DEMO_LTX2_VAE)
    (base / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
    _link(random_vaes.ensure_vae_file("ltx2_audio", cache), base / "models" / "checkpoints" / DEMO_LTX2_AUDIO)
    latents.save_latent(latents.random_latent(DEMO_LTX2_SHAPE, seed), base / "input" / DEMO_LTX2_LATENT)
    return DemoAssets(DEMO_LTX2_VAE, DEMO_LTX2_LATENT, "LTXV-layout video and LTX-2 audio VAEs with random "
                      "weights, made by this demo", False, DEMO_LTX2_SHAPE)


# The templates that run on the files above (parallel_vae_ltx2_av where this ComfyUI has LTX-2's
# audio nodes); parallel_vae_wan_i2v needs the user's Wan 2.1 14B model, its UMT5-XXL text encoder
# and CLIP vision (no random stand-in is small enough to build).
TEMPLATES = ("parallel_vae_decode", "parallel_vae_img2img", "parallel_vae_video", "parallel_vae_ltx2_av")
NEEDS_USER_MODELS = ("parallel_vae_wan_i2v",)


def runnable_templates() -> tuple[str, ...]:
    return tuple(t for t in TEMPLATES if t != "parallel_vae_ltx2_av" or ltx2_supported())


def prepare_templates(base: Path, vae_path: Optional[Path] = None, seed: int = 0) -> list[DemoAssets]:
    """Every runnable template's files in ``base``: the decode and img2img examples' (prepare), the
    video example's (prepare_video) and, where this ComfyUI runs it, the LTX-2 example's."""
    done = [prepare(base, vae_path, seed), prepare_video(base, seed)]
    if ltx2_supported():
        done.append(prepare_ltx2(base, seed))
    return done
