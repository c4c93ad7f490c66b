"""make demo: run the example workflows on a real headless ComfyUI.

Starts ComfyUI (CPU when there is no GPU) with the pack and posts to /prompt:
1. example_workflows/parallel_vae_decode_api.json (mode auto), then the same graph with ComfyUI's
   own node for the mode that ran in place of Parallel Tiled VAE Decode: VAE Decode for exact mode,
   VAE Decode (Tiled) for tiled mode; prints where the images landed, how long each decode took, and
   the largest pixel difference between the two.
2. example_workflows/parallel_vae_video_api.json (Parallel Tiled VAE Decode (Stream) -> Save Video
   (Stream)); prints the saved video, read back with PyAV, and when the first preview frame arrived.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from testkit import demo_assets, prompts  # noqa: E402
from testkit.comfy_env import REPO  # noqa: E402
from testkit.server import ComfyServer, saved_images  # noqa: E402

BASE = REPO / "demo-output" / "comfy-base"


def video_demo(server: ComfyServer, assets) -> int:
    import json

    import av

    prompt = json.loads(prompts.VIDEO_API.read_text())
    run = server.run(prompt)
    if not run.ok:
        print(f"video workflow failed: {run.error or run.response}\n{server.log_tail()}", file=sys.stderr)
        return 1
    entry = run.outputs("4")["images"][0]
    path = BASE / "output" / entry["subfolder"] / entry["filename"]
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = sum(1 for _ in container.decode(stream))
        size, codec = f"{stream.codec_context.width}x{stream.codec_context.height}", stream.codec_context.name
    start = next(m["t"] for m in run.of_type("executing") if m["data"].get("node") == "3")
    previews = [m["t"] - start for m in run.of_type("binary") if m["event"] in (1, 4)]
    print(f"video: {assets.description}; latent {list(assets.in_shape)}")
    print(f"Save Video (Stream) wrote {path}")
    first = f", the first after {previews[0]:.2f} s" if previews else ""
    print(f"  {frames} frames {size} {codec}, decoded and encoded in {run.node_seconds('4'):.2f} s; "
          f"{len(previews)} preview frames{first}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--vae", type=Path, help="a real VAE .safetensors (default: a random-weight SD VAE)")
    args = ap.parse_args()

    assets = demo_assets.prepare(BASE, args.vae)
    print(f"VAE: {assets.description}")
    print(f"latent: random {list(assets.in_shape)} -> {BASE / 'input' / assets.latent_name}")

    ours = prompts.example_prompt(assets.vae_name, assets.latent_name)
    settings = {k: ours["3"]["inputs"][k] for k in prompts.SETTINGS}
    tiled = prompts.example_prompt(assets.vae_name, assets.latent_name)
    tiled["3"] = prompts.vae_decode_tiled(settings)
    if assets.causal:  # compare with a temporal tile covering every frame: ours never cuts time
        tiled["3"]["inputs"]["temporal_size"] = max(settings["temporal_size"], 4 * assets.in_shape[2])
    tiled["4"]["inputs"]["filename_prefix"] = "parallel_vae/vae_decode_tiled"
    untiled = prompts.example_prompt(assets.vae_name, assets.latent_name)
    untiled["3"] = {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 0]}}
    untiled["4"]["inputs"]["filename_prefix"] = "parallel_vae/vae_decode"

    video = demo_assets.prepare_video(BASE)
    t0 = time.monotonic()
    with ComfyServer(BASE) as server:
        print(f"ComfyUI started in {time.monotonic() - t0:.1f} s at {server.url} (log: {server.log_path})")
        run = server.run(ours)
        if not run.ok:
            print(f"Parallel Tiled VAE Decode failed: {run.error or run.response}\n{server.log_tail()}", file=sys.stderr)
            return 1
        text = run.progress_texts("3")[-1]
        exact = "(exact," in text
        core_label = "VAE Decode" if exact else "VAE Decode (Tiled)"
        print(f"Parallel Tiled VAE Decode ran in {'exact' if exact else 'tiled'} mode ({text}); comparing with "
              f"{core_label}" + ("" if exact or not assets.causal else
                                 f" with temporal_size={tiled['3']['inputs']['temporal_size']}, so that it does not "
                                 f"cut time either"))
        results = {}
        for label, prompt in (("Parallel Tiled VAE Decode", None), (core_label, untiled if exact else tiled)):
            if prompt is not None:
                run = server.run(prompt)
                if not run.ok:
                    print(f"{label} failed: {run.error or run.response}\n{server.log_tail()}", file=sys.stderr)
                    return 1
            images = saved_images(server, run, "4")
            files = [BASE / "output" / f["subfolder"] / f["filename"] for f in run.outputs("4")["images"]]
            results[label] = images
            print(f"{label}: {images.shape[0]} image(s) of {images.shape[2]}x{images.shape[1]} in "
                  f"{run.node_seconds('3'):.2f} s -> {files[0]}" + (f" (+{len(files) - 1} more)" if len(files) > 1 else ""))
        a, b = results.values()
        diff = abs(a - b)
        print(f"max abs difference vs {core_label}: {int(diff.max())}/255 on 8-bit PNGs; "
              f"identical pixels: {100 * (diff == 0).mean():.2f}%")
        print("(float32 equality within 1e-4 is what `make test` checks; see README 'Correctness')\n")
        return video_demo(server, video)


if __name__ == "__main__":
    sys.exit(main())
