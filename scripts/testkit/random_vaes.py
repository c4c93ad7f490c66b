"""Architecture-faithful VAEs with random weights, saved as safetensors for the real VAELoader.

ComfyUI picks the architecture from state-dict keys and shapes only, so each family here is
built by asking ComfyUI itself for the module it would construct from a few detection keys,
then filling *every* tensor of that module's state dict (ComfyUI's layers skip initialisation,
so a missing key would be uninitialised memory). The last layer is then calibrated so the raw
output has a standard deviation near 0.35: outputs that saturate at the clamp would make
equality tests blind.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import comfy_env

# Bump when the recipe changes so cached files are rebuilt.
RECIPE_VERSION = 1
TARGET_STD = 0.35


@dataclass(frozen=True)
class Family:
    name: str
    detect: dict  # key -> shape: just enough for ComfyUI's detector to pick the architecture
    head: str  # the output layer's weight, scaled during calibration
    probe_latent: tuple  # latent shape used to calibrate
    save_dtype: torch.dtype = torch.float32
    metadata: tuple = ()  # (key, value) pairs of the file's metadata that decide the architecture
    calibrate: bool = True  # False for VAEs the tests only load (each tensor is still filled)
    prefixes: tuple = ()  # (module prefix, file prefix): key renames the file's format uses


FAMILIES = {
    "sd": Family(
        "sd",
        {"decoder.conv_in.weight": (512, 4, 3, 3), "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
         "post_quant_conv.weight": (4, 4, 1, 1)},
        "decoder.conv_out.weight", (1, 4, 8, 8)),
    # 16-channel image VAE without post_quant_conv: ComfyUI builds AutoencodingEngine (Flux/SD3 style).
    "flux": Family(
        "flux",
        {"decoder.conv_in.weight": (512, 16, 3, 3), "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3)},
        "decoder.conv_out.weight", (1, 16, 8, 8)),
    # Wan 2.1 reads its width from decoder.head.0.gamma: dim=16 keeps it small (3.6 M parameters).
    "wan21": Family(
        "wan21",
        {"decoder.middle.0.residual.0.gamma": (64, 1, 1, 1), "decoder.head.0.gamma": (16, 1, 1, 1),
         # ComfyUI 0.33 reads the image channels from the encoder and the head's width (RGBA Wan VAEs)
         "encoder.conv1.weight": (16, 3, 3, 3, 3), "decoder.head.2.weight": (3, 16, 3, 3, 3)},
        "decoder.head.2.weight", (1, 16, 2, 4, 4)),
    # The real Wan 2.1 width (dim=96, 127 M parameters), for benchmarks.
    "wan21_full": Family(
        "wan21_full",
        {"decoder.middle.0.residual.0.gamma": (384, 1, 1, 1), "decoder.head.0.gamma": (96, 1, 1, 1),
         "encoder.conv1.weight": (96, 3, 3, 3, 3), "decoder.head.2.weight": (3, 96, 3, 3, 3)},
        "decoder.head.2.weight", (1, 16, 2, 4, 4)),
    # Wan 2.2's width is fixed by ComfyUI (705 M parameters); stored in bf16 to halve the file.
    "wan22": Family(
        "wan22",
        {"decoder.middle.0.residual.0.gamma": (1024, 1, 1, 1),
         "decoder.upsamples.0.upsamples.0.residual.2.weight": (1024, 1024, 3, 3, 3)},
        "decoder.head.2.weight", (1, 48, 2, 2, 2), torch.bfloat16),
    # A non-causal video VAE (ComfyUI tiles it in time): Cosmos' wavelet tokenizer, 106 M parameters.
    "cosmos": Family(
        "cosmos",
        {"decoder.unpatcher3d.wavelets": (2,)},
        "decoder.conv_out.1.conv3d.weight", (1, 16, 2, 4, 4)),
    # HunyuanVideo's VAE (SD's layout in 3-D convs, causal padding, global mid attention: ComfyUI
    # tiles it in time); its width is fixed by ComfyUI (246 M parameters), stored in bf16.
    "hunyuan": Family(
        "hunyuan",
        {"decoder.conv_in.conv.weight": (512, 16, 3, 3, 3), "post_quant_conv.weight": (16, 16, 1, 1, 1)},
        "decoder.conv_out.conv.weight", (1, 16, 2, 4, 4), torch.bfloat16),
    # LTX-Video 0.9's VAE: the architecture ComfyUI picks from the weights alone, without metadata
    # (its default config, version 0 by a 512-wide first decoder block), stored in bf16.
    "ltxv": Family(
        "ltxv",
        {"decoder.up_blocks.0.res_blocks.0.conv1.conv.weight": (512, 512, 3, 3, 3)},
        "decoder.conv_out.conv.weight", (1, 128, 2, 2, 2), torch.bfloat16),
    # fp32 decoder.1.weight means lighttaew2_1 (no latent scaling); fp16 would mean TAEHV-Hunyuan.
    # LTXV whose architecture comes from the file's metadata (a small config; 4.1 M parameters):
    # built without that metadata it is another model. ComfyUI passes it from 0.9.2 on.
    "ltxv_meta": Family(
        "ltxv_meta",
        {"decoder.up_blocks.0.res_blocks.0.conv1.conv.weight": (128, 128, 3, 3, 3)},
        "decoder.conv_out.conv.weight", (1, 128, 2, 2, 2),
        metadata=(("config", json.dumps({"vae": {
            "_class_name": "CausalVideoAutoencoder", "dims": 3, "in_channels": 3, "out_channels": 3,
            "latent_channels": 128, "decoder_base_channels": 16, "encoder_base_channels": 16,
            "decoder_blocks": [["res_x", {"num_layers": 1}], ["compress_all", {"residual": True, "multiplier": 2}]] * 3
            + [["res_x", {"num_layers": 1}]],
            "encoder_blocks": [["res_x", {"num_layers": 1}], ["compress_all", {}]] * 3 + [["res_x", {"num_layers": 1}]],
            "scaling_factor": 1.0, "norm_layer": "pixel_norm", "patch_size": 4, "latent_log_var": "uniform",
            "use_quant_conv": False, "causal_decoder": False, "timestep_conditioning": False}})),)),
    # SeedVR2's video VAE tiles itself (handles_tiling, ComfyUI 0.28+); 251 M parameters, bf16 file.
    "seedvr2": Family(
        "seedvr2",
        {"decoder.up_blocks.2.upsamplers.0.upscale_conv.weight": (1024, 256, 1, 1, 1)},
        "", (), torch.bfloat16, calibrate=False),
    # MiniMax-H3's audio VAE has 2-D latents [B, 32, 2, T] (ComfyUI 0.30+); 151 M parameters, bf16 file.
    "minimax_audio": Family(
        "minimax_audio",
        {"pre_block.attn.zero_k_bias": (2048,)},
        "", (), torch.bfloat16, calibrate=False),
    # LTX-2's audio VAE (mel autoencoder + HiFi-GAN vocoder), its architecture from the metadata's
    # config as in LTX-2 checkpoints, shrunk (213 k parameters): keys as in the checkpoint (audio_vae.,
    # vocoder.), which Load LTXV Audio VAE reads from the checkpoints folder (ComfyUI 0.10+)
    "ltx2_audio": Family(
        "ltx2_audio",
        {"vocoder.resblocks.0.convs1.0.weight": (16, 16, 3)},
        "", (), calibrate=False, prefixes=(("autoencoder.", "audio_vae."),),
        metadata=(("config", json.dumps({
            "audio_vae": {"model": {"params": {"ddconfig": {
                "double_z": True, "mel_bins": 64, "z_channels": 8, "resolution": 256, "downsample_time": False,
                "in_channels": 2, "out_ch": 2, "ch": 8, "ch_mult": [1, 2, 4], "num_res_blocks": 1,
                "attn_resolutions": [], "dropout": 0.0, "mid_block_add_attention": False, "norm_type": "pixel",
                "causality_axis": "height"}, "sampling_rate": 16000}},
                "preprocessing": {"stft": {"filter_length": 1024, "hop_length": 160}}},
            "vocoder": {"upsample_initial_channel": 32, "resblock_kernel_sizes": [3],
                        "resblock_dilation_sizes": [[1, 3, 5]], "upsample_rates": [5, 4, 2, 2, 2],
                        "upsample_kernel_sizes": [16, 16, 8, 4, 4], "stereo": True}})),)),
    "taehv": Family(
        "taehv",
        {"decoder.22.bias": (3,), "decoder.1.weight": (256, 16, 3, 3)},
        "decoder.22.weight", (1, 16, 2, 4, 4)),
}


def _metadata_kwargs(fam: Family) -> dict:
    if not fam.metadata:
        return {}
    import inspect

    import comfy.sd

    if "metadata" not in inspect.signature(comfy.sd.VAE.__init__).parameters:
        raise RuntimeError(f"the {fam.name} test VAE needs a ComfyUI whose VAE takes file metadata (0.9.2+)")
    return {"metadata": dict(fam.metadata)}


def _fill(key: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "gamma" or (leaf == "weight" and len(shape) == 1):  # norm scales
        return 1.0 + 0.05 * torch.randn(shape, generator=gen)
    if leaf == "bias" or len(shape) <= 1:
        return 0.02 * torch.randn(shape, generator=gen)
    fan_in = shape[1] * math.prod(shape[2:])
    return torch.randn(shape, generator=gen) * (1.0 / math.sqrt(fan_in))


def build_state_dict(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    comfy_env.boot()
    import comfy.sd

    fam = FAMILIES[family]
    probe = {k: torch.zeros(s) for k, s in fam.detect.items()}
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # "Missing VAE keys": expected, we only read the layout
    try:
        model = comfy.sd.VAE(sd=probe, **_metadata_kwargs(fam)).first_stage_model
    finally:
        logging.disable(previous)
    layout = model.state_dict()
    gen = torch.Generator().manual_seed(seed)
    sd = {k: _fill(k, v.shape, gen).to(v.dtype) for k, v in layout.items()}
    # Detection keys that the module keeps as non-persistent buffers (Cosmos' wavelets) are not
    # in its state dict; real files carry them, so ours do too, with the module's own values.
    buffers = dict(model.named_buffers())
    for key in fam.detect:
        if key not in sd:
            leaf = key.rsplit(".", 1)[-1]
            sd[key] = next(v for name, v in buffers.items() if name.rsplit(".", 1)[-1] == leaf).clone()
    if fam.calibrate:
        _calibrate(fam, sd, seed)
    for module_prefix, file_prefix in fam.prefixes:
        sd = {file_prefix + k[len(module_prefix):] if k.startswith(module_prefix) else k: v for k, v in sd.items()}
    return {k: v.to(fam.save_dtype) if v.is_floating_point() else v for k, v in sd.items()}


@torch.inference_mode()
def _calibrate(fam: Family, sd: dict, seed: int) -> None:
    import comfy.sd

    vae = comfy.sd.VAE(sd=sd, **_metadata_kwargs(fam))
    z = torch.randn(fam.probe_latent, generator=torch.Generator().manual_seed(seed + 1))
    raw = vae.first_stage_model.decode(z.to(vae.vae_dtype)).float()
    std = raw.std().item()
    if not math.isfinite(std) or std == 0:
        raise RuntimeError(f"random {fam.name} VAE decodes to std={std}")
    scale = TARGET_STD / std
    sd[fam.head] = sd[fam.head] * scale
    bias = fam.head[: -len("weight")] + "bias"
    if bias in sd:
        sd[bias] = sd[bias] * scale


def cache_dir() -> Path:
    """Where built VAE files are kept across runs: $PVAE_CACHE/test-vaes, else .cache/test-vaes."""
    return Path(os.environ.get("PVAE_CACHE", comfy_env.REPO / ".cache")).resolve() / "test-vaes"


def vae_filename(family: str, seed: int = 0) -> str:
    return f"random_{family}_r{RECIPE_VERSION}_s{seed}.safetensors"


def ensure_vae_file(family: str, directory: Path, seed: int = 0) -> Path:
    """Build (once) and return the safetensors file for ``family`` in ``directory``."""
    import safetensors.torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / vae_filename(family, seed)
    if not path.exists():
        sd = build_state_dict(family, seed)
        tmp = path.with_suffix(".partial")
        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp),
                                    metadata={"pvae_random_vae": family, "seed": str(seed),
                                              **dict(FAMILIES[family].metadata)})
        tmp.rename(path)
    return path


def load_in_process(family: str, cpu: bool = True):
    """Boot ComfyUI in this process (on the CPU unless ``cpu=False``) and load the cached random VAE
    of ``family`` through the real VAELoader: (ComfyUI's nodes module, the VAE). For benchmarks."""
    nodes = comfy_env.boot(cpu=cpu)
    import folder_paths

    directory = cache_dir()
    ensure_vae_file(family, directory)
    folder_paths.add_model_folder_path("vae", str(directory), is_default=True)
    (vae,) = nodes.VAELoader().load_vae(vae_filename(family))
    return nodes, vae
