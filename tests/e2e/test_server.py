"""End to end through a real ComfyUI server driven by API prompt JSON, as API users and the
editor drive it."""
import json

import pytest

from testkit.comfy_env import REPO
from testkit.prompts import decode_prompt
from testkit.server import saved_images

INPUTS = ["samples", "vae", "tile_size", "overlap", "temporal_size", "temporal_overlap", "devices"]


@pytest.mark.every_runtime
def test_object_info_lists_the_node_with_its_inputs(server):
    info = server.object_info("ParallelVAEDecode")["ParallelVAEDecode"]
    assert info["display_name"] == "Parallel Tiled VAE Decode"
    assert info["category"] == "latent"
    required = info["input"]["required"]
    assert list(required) == INPUTS
    assert [required[n][0] for n in INPUTS] == ["LATENT", "VAE", "INT", "INT", "INT", "INT", "STRING"]
    assert {k: required["tile_size"][1][k] for k in ("default", "min", "step")} == {"default": 512, "min": 0,
                                                                                    "step": 32}
    assert [required[n][1]["default"] for n in INPUTS[3:]] == [64, 64, 8, "auto"]
    assert all(required[n][1].get("tooltip") for n in INPUTS)
    assert "never cut in time" in required["temporal_size"][1]["tooltip"]
    mode = info["input"]["optional"]["mode"]  # optional: prompts written before it still validate
    assert all(m in json.dumps(mode) for m in ('"auto"', '"exact"', '"tiled"'))
    assert mode[-1]["default"] == "auto" and "untiled VAE Decode" in mode[-1]["tooltip"]
    assert info["output"] == ["IMAGE"]


@pytest.mark.every_runtime
def test_image_latent_decodes_like_vae_decode_tiled_through_the_api(server, put_latent):
    put_latent("sd_batch2.latent", (2, 4, 10, 14), seed=1)
    core = {"tile_size": 64, "overlap": 16, "temporal_size": 64, "temporal_overlap": 8}
    run = server.run(decode_prompt("sd", "sd_batch2.latent", core, tile_size=64, overlap=16))
    assert run.ok, (run.error, server.log_tail())
    ours, ref = saved_images(server, run, "4"), saved_images(server, run, "6")
    assert ours.shape == ref.shape == (2, 80, 112, 3)
    assert abs(ours - ref).max() <= 1  # 8-bit PNGs: at most a rounding step apart
    assert (ours == ref).mean() > 0.999
    progress = [m["data"] for m in run.of_type("progress") if m["data"]["node"] == "3"]
    values = [p["value"] for p in progress]  # ComfyUI 0.9.2+ throttles updates: some values, in order
    assert values and values == sorted(set(values)) and set(values) <= set(range(1, 29))
    assert values[-1] == 28 and {p["max"] for p in progress} == {28}
    assert run.progress_texts("3")[-1] == "cpu 28/28 (tiled, 28 tiles, in-process)"


def test_wan_video_latent_decodes_like_vae_decode_tiled_through_the_api(server, put_latent):
    put_latent("wan_video.latent", (1, 16, 3, 10, 14), seed=2)
    # VAEDecodeTiled with a temporal tile covering every frame: the causal cache is never restarted
    core = {"tile_size": 64, "overlap": 16, "temporal_size": 64, "temporal_overlap": 8}
    run = server.run(decode_prompt("wan21", "wan_video.latent", core, tile_size=64, overlap=16,
                                   temporal_size=8, temporal_overlap=4))
    assert run.ok, (run.error, server.log_tail())
    ours, ref = saved_images(server, run, "4"), saved_images(server, run, "6")
    assert ours.shape == ref.shape == (9, 80, 112, 3)
    assert abs(ours - ref).max() <= 1


@pytest.mark.every_runtime
def test_bad_input_is_the_nodes_error_and_the_server_keeps_serving(server, put_latent):
    put_latent("wan_for_sd.latent", (1, 16, 3, 8, 8), seed=3)
    run = server.run(decode_prompt("sd", "wan_for_sd.latent"))
    err = run.error
    assert err is not None and err["node_id"] == "3" and err["node_type"] == "ParallelVAEDecode"
    assert err["exception_type"].endswith("errors.InputError")
    assert err["exception_message"].startswith("samples: got a video latent [B, C, T, H, W]")

    # widget values are checked when the prompt is queued, before anything runs
    put_latent("small.latent", (1, 4, 8, 8), seed=4)
    bad = server.queue(decode_prompt("sd", "small.latent", devices="cuda:99"))
    assert bad.status_code == 400
    details = [e["details"] for e in bad.json()["node_errors"]["3"]["errors"]]
    assert any("devices: cuda:99 is not visible (visible: cpu" in d for d in details)

    good = server.run(decode_prompt("sd", "small.latent", tile_size=64, overlap=16))
    assert good.ok, (good.error, server.log_tail())
    assert saved_images(server, good, "4").shape == (1, 64, 64, 3)


@pytest.mark.every_runtime
def test_example_workflows_are_listed_as_templates_and_use_real_nodes(server):
    templates = server.get("/api/workflow_templates").json()
    assert sorted(templates["parallel_tiled_vae"]) == ["parallel_vae_decode", "parallel_vae_decode_api",
                                                       "parallel_vae_img2img", "parallel_vae_img2img_api",
                                                       "parallel_vae_ltx2_av", "parallel_vae_ltx2_av_api",
                                                       "parallel_vae_video", "parallel_vae_video_api",
                                                       "parallel_vae_wan_i2v", "parallel_vae_wan_i2v_api"]
    known = server.get("/object_info").json()
    video = server.get("/api/workflow_templates/parallel_tiled_vae/parallel_vae_video.json").json()
    assert {n["type"] for n in video["nodes"]} == {"VAELoader", "LoadLatent", "ParallelVAEDecodeStream",
                                                   "ParallelVAESaveVideo"}
    video_api = json.loads((REPO / "example_workflows" / "parallel_vae_video_api.json").read_text())
    assert {n["class_type"] for n in video_api.values()} <= set(known)
    served = server.get("/api/workflow_templates/parallel_tiled_vae/parallel_vae_decode.json").json()
    assert {n["type"] for n in served["nodes"]} <= set(known)
    api = json.loads((REPO / "example_workflows" / "parallel_vae_decode_api.json").read_text())
    ui_node = next(n for n in served["nodes"] if n["type"] == "ParallelVAEDecode")
    api_inputs = api["3"]["inputs"]
    assert ui_node["widgets_values"] == [api_inputs[k] for k in INPUTS[2:] + ["mode", "sharding"]]


@pytest.mark.every_runtime
def test_every_template_runs_unchanged_on_what_make_run_puts_in_place(tmp_path):
    """Each runnable template's API form, posted as it ships, on a server prepared the way make run
    prepares its own (demo_assets.prepare_templates); the editor's own conversion of the UI forms
    runs in the browser tests."""
    from testkit import demo_assets, sound
    from testkit.server import ComfyServer

    demo_assets.prepare_templates(tmp_path / "base")
    srv = ComfyServer(tmp_path / "base").start()
    try:
        listed = srv.get("/api/workflow_templates").json()["parallel_tiled_vae"]
        assert {t for t in listed if not t.endswith("_api")} == set(demo_assets.TEMPLATES) | set(
            demo_assets.NEEDS_USER_MODELS)
        runnable = demo_assets.runnable_templates()  # parallel_vae_ltx2_av: ComfyUI 0.10+ (LTX-2's nodes)
        for name in runnable:
            run = srv.run(json.loads((REPO / "example_workflows" / f"{name}_api.json").read_text()))
            assert run.ok, (name, run.error, srv.log_tail())
            saved = [o for o in run.history.get("outputs", {}).values() if o.get("images")]
            assert saved, (name, "saved nothing")
            if name == "parallel_vae_ltx2_av":  # LTX-2's sound, decoded by its audio VAE, in the mp4
                entry = run.outputs("9")["images"][0]
                samples, rate, codec = sound.read(srv.base / "output" / entry["subfolder"] / entry["filename"])
                assert (codec, rate, samples.shape[0]) == ("aac", 16000, 2)
                assert abs(samples.shape[1] / rate - 33 / 25) <= 1 / 25
    finally:
        srv.stop()


@pytest.mark.every_runtime
def test_the_wan_i2v_template_needs_only_the_users_model_files(server):
    """The Wan image-to-video template is valid against the live node definitions, short only of
    the model files a user brings (and every link lands on a node input of the right type)."""
    from testkit import demo_assets

    ui = server.get("/api/workflow_templates/parallel_tiled_vae/parallel_vae_wan_i2v.json").json()
    known = server.get("/object_info").json()
    nodes = {n["id"]: n for n in ui["nodes"]}
    for _, src, slot, dst, dst_slot, kind in ui["links"]:
        assert nodes[src]["outputs"][slot]["type"] == kind == nodes[dst]["inputs"][dst_slot]["type"]
    assert {n["type"] for n in nodes.values()} <= set(known)
    demo_assets.save_demo_image(server.base / "input" / "example.png", 64, 96)
    wan = json.loads((REPO / "example_workflows" / "parallel_vae_wan_i2v_api.json").read_text())
    refused = server.queue(wan)
    assert refused.status_code == 400
    errors = refused.json()["node_errors"]
    assert set(errors) == {"1", "2", "5", "9"}, errors  # the loaders: model files this machine has not
    assert {e["type"] for node in errors.values() for e in node["errors"]} == {"value_not_in_list"}
