"""The live preview widget (web/parallel_vae_preview.js) in the real ComfyUI frontend, in headless
Chromium: first against synthetic protocol events (docs/STREAM_PROTOCOL.md), then on a real decode of
the example video workflow through a real server."""
from __future__ import annotations

import json

import pytest

from testkit import demo_assets
from testkit.comfy_env import REPO

pytestmark = pytest.mark.browser

WORKFLOWS = REPO / "example_workflows"
LISTENERS_PER_NODE = 6  # plan, progress, done, b_preview_with_metadata, b_preview, executing
FINISHED = ("execution_success", "execution_error", "execution_interrupted")


def listeners(page) -> int:
    return page.js("return window.__pvaeTest.listeners()")


def remove_node_and_count_listeners(page, node_id: int) -> tuple[int, int]:
    return tuple(page.js("""
        const before = window.__pvaeTest.listeners();
        const node = app.graph.getNodeById(arguments[0]);
        app.graph.remove(node);
        // events for the removed node must reach nothing (and throw nothing)
        api.dispatchCustomEvent('parallel_vae.plan', {node: String(arguments[0]), prompt_id: 'gone', width: 8,
                                height: 8, frames: 1, tiles: [[0, 0, 8, 8, 0]], steps: 1, lanes: ['cpu'], units: 1});
        return [before, window.__pvaeTest.listeners()];""", node_id))


@pytest.mark.timeout(180)
def test_widget_follows_protocol_events(page):
    """Synthetic events on the image decode node (id 3 of parallel_vae_decode.json), in each node
    renderer: frames are counted and told apart by their bytes, only events for this node (or a
    subgraph path ending in it) count, legacy previews (no node id) count only while the node decodes
    and never twice, the filmstrip keeps the last 16 frames and revokes the others' object URLs, a
    preview of a new prompt starts a new run whether the frontend calls its id promptId (up to about
    1.39) or jobId, the panel keeps its size as frames come and the node shows no second copy of them,
    and the node's api listeners go when the node goes."""
    # load_workflow sees what the editor warns about: the same workflow naming a VAE not there warns
    broken = json.loads((WORKFLOWS / "parallel_vae_decode.json").read_text())
    next(n for n in broken["nodes"] if n["type"] == "VAELoader")["widgets_values"] = ["no_such_vae.safetensors"]
    assert "no_such_vae.safetensors" in json.dumps(page.load_graph(broken))
    assert page.load_workflow(WORKFLOWS / "parallel_vae_decode.json") == []
    assert page.wait_for_panel(3)["pvaeNode"] == "3"
    assert page.widget_state(1) is None  # only the decode nodes get the widget
    assert listeners(page) == LISTENERS_PER_NODE

    result = page.js_async("""
        const jpeg = (colour) => new Promise((resolve) => {
          const c = document.createElement('canvas'); c.width = c.height = 16;
          const g = c.getContext('2d'); g.fillStyle = colour; g.fillRect(0, 0, 16, 16);
          c.toBlob(resolve, 'image/jpeg', 0.9);
        });
        const send = (type, detail) => api.dispatchCustomEvent(type, detail);
        const settle = () => new Promise((r) => setTimeout(r, 300));
        const preview = async (nodeId, colour, ids = {promptId: 'p1'}) => {
          const blob = await jpeg(colour);
          // what the frontend does with a type-4 message: the metadata event, then the legacy duplicate
          send('b_preview_with_metadata', {blob, nodeId, displayNodeId: nodeId, ...ids});
          send('b_preview', blob);
        };
        const node = app.graph.getNodeById(3);
        const root = node.widgets.find((w) => w.name === 'parallel_vae_preview').element;
        const state = async () => ({...root.dataset, distinctFrames: String(await window.__pvaeTest.distinctFrames(root))});
        // how the node looks: its size, the panel's, and images in the node besides the panel's (the Vue
        // renderer draws each node as an element of its own; the canvas renderer has none)
        const vueNode = document.querySelector('.lg-node[data-node-id="3"]');
        const looks = () => {
          const others = vueNode ? [...vueNode.querySelectorAll('img')].filter((i) => !root.contains(i)) : [];
          return {nodeSize: [...node.size].map(Math.round), panelHeight: Math.round(root.getBoundingClientRect().height),
                  frameHeight: Math.round(root.querySelector('.pvae-frame').getBoundingClientRect().height),
                  otherImages: others.length, otherImagesShown: others.filter((i) => i.getClientRects().length).length};
        };
        await settle();
        const idle = looks();
        // image VAE: three passes of tiles over a 256 x 256 image
        const tiles = [[0, 0, 128, 256, 0], [128, 0, 128, 256, 0], [0, 0, 256, 128, 1], [0, 128, 256, 128, 1],
                       [0, 0, 128, 128, 2], [128, 0, 128, 128, 2], [0, 128, 128, 128, 2], [128, 128, 128, 128, 2]];
        const plan = {prompt_id: 'p1', width: 256, height: 256, frames: 1, tiles, steps: 1,
                      lanes: ['cpu[0]', 'cpu[1]'], units: 8};
        send('b_preview', await jpeg('#888'));  // legacy preview (no node id) while node 3 is idle: not ours
        send('parallel_vae.plan', {...plan, node: '4', tiles: tiles.slice(0, 1)});  // another node's
        send('parallel_vae.plan', {...plan, node: '3'});
        send('b_preview', await jpeg('#888'));  // legacy preview while node 3 decodes: ours
        send('parallel_vae.progress', {node: '3', prompt_id: 'p1', done: {'cpu[0]': 2, 'cpu[1]': 1}, units: 8,
                                       tiles: [[0, 'cpu[0]', 1], [2, 'cpu[1]', 1], [5, 'cpu[0]', 1]], frames_done: 0});
        send('parallel_vae.progress', {node: '4', prompt_id: 'p1', done: {'cpu[0]': 8}, units: 8,
                                       tiles: [[7, 'cpu[0]', 1]], frames_done: 0});
        await preview('3', '#f00'); await preview('3', '#f00'); await preview('3', '#00f');
        await preview('4', '#0f0');     // another node's preview
        await preview('12:3', '#ff0');  // node 3 inside subgraph 12
        await settle();
        const first = await state();
        const firstUrl = root.querySelector('.pvae-strip img').src;
        for (let i = 0; i < 20; i++) await preview('3', `rgb(${10 * i}, 90, 200)`);
        await settle();
        const flooded = {...(await state()), thumbs: root.querySelectorAll('.pvae-strip img').length,
                         firstUrlLoads: await window.__pvaeTest.urlLoads(firstUrl),
                         newestUrlLoads: await window.__pvaeTest.urlLoads(
                           [...root.querySelectorAll('.pvae-strip img')].at(-1).src),
                         mainShowsNewest: root.querySelector('.pvae-frame').src ===
                                          [...root.querySelectorAll('.pvae-strip img')].at(-1).src,
                         looks: looks()};
        send('parallel_vae.done', {node: '3', prompt_id: 'p1', seconds: 1.5, done: {'cpu[0]': 5, 'cpu[1]': 3},
                                   frames: 1});
        const done = {...(await state()), legend: root.querySelector('.pvae-legend').textContent,
                      status: root.querySelector('.pvae-status').textContent};
        send('parallel_vae.plan', {...plan, node: '3', prompt_id: 'p2'});  // a new prompt starts afresh
        const next = await state();
        send('executing', null);  // the prompt ended without node 3's done (interrupted, failed)
        const ended = await state();
        // previews name their prompt promptId (frontends up to about 1.39) or jobId (newer): either way
        // one of a new prompt starts a new run (frame count and hashes from zero), one of the same does not
        await preview('3', '#fff', {promptId: 'p2'});
        await preview('3', '#0ff', {jobId: 'p3'}); await preview('3', '#0ff', {jobId: 'p3'});
        await settle();
        const byJobId = await state();
        await preview('3', '#f0f', {promptId: 'p4'}); await preview('3', '#f0f', {promptId: 'p4'});
        await settle();
        const byPromptId = await state();
        return {idle, first, flooded, done, next, ended, byJobId, byPromptId};""")

    first = result["first"]
    assert (first["frames"], first["distinctFrames"]) == ("5", "4"), first
    assert (first["tiles"], first["tilesDrawn"], first["lanes"]) == ("8", "3", "cpu[0],cpu[1]"), first
    assert first["state"] == "running"
    flooded = result["flooded"]
    # 25 frames counted; the filmstrip keeps the last 16, all different
    assert (flooded["frames"], flooded["distinctFrames"], flooded["thumbs"]) == ("25", "16", 16), flooded
    assert flooded["newestUrlLoads"] and not flooded["firstUrlLoads"], "the oldest frame's object URL is revoked"
    assert flooded["mainShowsNewest"], flooded
    done = result["done"]
    assert done["state"] == "done" and "cpu[0] 5/8" in done["legend"] and "cpu[1] 3/8" in done["legend"], done
    assert "done in 1.5 s" in done["status"], done
    assert (result["next"]["frames"], result["next"]["tilesDrawn"], result["next"]["state"]) == ("0", "0", "running")
    assert result["ended"]["state"] == "stopped"
    for key in ("byJobId", "byPromptId"):
        assert (result[key]["frames"], result[key]["distinctFrames"]) == ("2", "1"), (key, result[key])

    idle, looks = result["idle"], result["flooded"]["looks"]
    assert looks["nodeSize"] == idle["nodeSize"] and looks["panelHeight"] == idle["panelHeight"], (idle, looks)
    assert looks["frameHeight"] >= 60, looks  # the latest frame is shown, not squeezed out
    if page.renderer == "vue":
        # The Vue node shows the frontend's own preview of its latest image under the widgets: here it
        # must stay hidden (the panel shows those frames). The frontend must have made it, or this checks
        # nothing: if a newer one stops making it, drop the rule in web/ that hides it, and this.
        assert looks["otherImages"] >= 1 and looks["otherImagesShown"] == 0, looks

    assert remove_node_and_count_listeners(page, 3) == (LISTENERS_PER_NODE, 0)
    assert page.our_errors() == []


def frontend_node_summary(page) -> list[dict]:
    return page.js("""
        return app.graph.nodes.map((n) => ({
          id: Number(n.id),  // frontend 1.49 keeps node ids as strings ("3") at run time
          type: n.type, registered: n.constructor.comfyClass === n.type,
          values: (n.widgets ?? []).filter((w) => w.name !== 'parallel_vae_preview').map((w) => w.value),
          preview: !!n.widgets?.some((w) => w.name === 'parallel_vae_preview'),
          links: (n.inputs ?? []).filter((i) => !i.widget).map((i) => i.link),  // sockets, not widget inputs
          sockets: (n.inputs ?? []).filter((i) => !i.widget).map((i) => i.name),
        })).sort((a, b) => a.id - b.id);""")


@pytest.mark.timeout(420)
@pytest.mark.parametrize("renderer", ["canvas"])  # the decode takes a minute on 2 cores: run it once
def test_widget_shows_a_real_stream_decode(page, artifacts):
    """Load example_workflows/parallel_vae_video.json in the editor, queue it, and watch the widget on
    the ParallelVAEDecodeStream node fill with distinct frames and decoded tiles; then switch the
    editor to the Vue node renderer and find the same panel, showing the same, in the node's element."""
    assert page.load_workflow(WORKFLOWS / "parallel_vae_video.json") == []  # no missing nodes or models
    nodes = frontend_node_summary(page)
    assert [(n["id"], n["type"], n["registered"]) for n in nodes] == [
        (1, "VAELoader", True), (2, "LoadLatent", True), (3, "ParallelVAEDecodeStream", True),
        (4, "ParallelVAESaveVideo", True)], nodes
    assert nodes[2]["values"] == [128, 32, 64, 8, "auto", 8, "auto", "auto"] and nodes[2]["preview"], nodes[2]
    assert nodes[3]["values"] == ["parallel_vae/video", 16, "mp4", 19], nodes[3]
    optional = {("ParallelVAESaveVideo", "audio")}  # a silent video: nothing connected to audio
    assert all(link is not None for n in nodes for name, link in zip(n["sockets"], n["links"])
               if (n["type"], name) not in optional), nodes

    twin = WORKFLOWS / "parallel_vae_video_api.json"
    if twin.exists():  # the editor's prompt for the UI workflow is the API example
        prompt = page.js_async("return (await app.graphToPrompt()).output;")
        expected = json.loads(twin.read_text())
        strip = lambda p: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in p.items()}
        assert strip(prompt) == strip(expected)

    # a snapshot of the widget at each progress event: it must fill while the decode runs, not at the end
    page.js("""
        window.__pvaeTest.snapshots = [];
        const w = app.graph.getNodeById(3).widgets.find((w) => w.name === 'parallel_vae_preview');
        api.addEventListener('parallel_vae.progress', () => window.__pvaeTest.snapshots.push({...w.element.dataset}));""")
    page.js_async("await app.queuePrompt(0, 1);")
    page.wait_for("return window.__pvaeTest.events.some((e) => arguments[0].includes(e.type));",
                  240, "the prompt did not finish", list(FINISHED), interval=0.5)
    errors = page.events("execution_error") + page.events("execution_interrupted")
    assert not errors, (errors, page.server.log_tail())
    page.wait_for("""
        const d = app.graph.getNodeById(3).widgets.find((w) => w.name === 'parallel_vae_preview').element.dataset;
        return +d.frames >= 2 && +d.tilesDrawn >= 1;""",
                  10, "the widget did not show >= 2 frames and >= 1 drawn tile")

    state = page.widget_state(3)
    assert int(state["distinctFrames"]) >= 2 and int(state["tilesDrawn"]) >= 1, state
    assert int(state["tiles"]) >= int(state["tilesDrawn"]) and state["lanes"], state
    assert state["state"] == "done" and state["inDocument"], state
    plans = page.events("parallel_vae.plan")
    assert [p["detail"]["node"] for p in plans] == ["3"], plans
    live = [snap for snap in page.js("return window.__pvaeTest.snapshots")
            if snap["state"] == "running" and int(snap["tilesDrawn"]) >= 1]
    assert live, "the tile map only filled once the decode was over"

    page.js("""app.canvas.ds.offset = [0, 0]; app.canvas.ds.scale = 1; app.canvas.setDirty(true, true);""")
    out = artifacts / "browser"
    out.mkdir(parents=True, exist_ok=True)
    page.d.save_screenshot(str(out / "widget.png"))

    # The user turns on "Nodes 2.0" (the Vue renderer) in the settings: the nodes are redrawn as
    # elements, and the panel moves into its node's with what it showed (no listener lost or doubled).
    page.js_async("await app.extensionManager.setting.set('Comfy.VueNodes.Enabled', true);")
    page.renderer = "vue"
    assert page.wait_for_panel(3) == state
    assert listeners(page) == LISTENERS_PER_NODE
    page.d.save_screenshot(str(out / "widget-vue.png"))

    assert remove_node_and_count_listeners(page, 3) == (LISTENERS_PER_NODE, 0)
    assert page.our_errors() == []


@pytest.mark.timeout(420)
@pytest.mark.parametrize("renderer", ["canvas"])
@pytest.mark.parametrize("template", [t for t in demo_assets.TEMPLATES if t != "parallel_vae_video"])
def test_each_template_opens_without_warnings_and_runs_on_what_make_run_puts_in_place(page, template):
    """The editor opens the template (no missing node or model), turns it into its prompt itself and
    runs it on the files make run prepares (parallel_vae_video: test_widget_shows_a_real_stream_decode)."""
    if template not in demo_assets.runnable_templates():
        pytest.skip(f"{template} needs nodes this ComfyUI lacks")
    assert page.load_workflow(WORKFLOWS / f"{template}.json") == []
    page.js_async("await app.queuePrompt(0, 1);")
    page.wait_for("return window.__pvaeTest.events.some((e) => arguments[0].includes(e.type));",
                  300, f"{template} did not finish", list(FINISHED), interval=0.5)
    errors = page.events("execution_error") + page.events("execution_interrupted")
    assert not errors and page.events("execution_success"), (errors, page.server.log_tail())
