"""A real headless ComfyUI server with the pack, and the real ComfyUI frontend in headless Chromium
(driven by selenium with the system's chromium + chromedriver: no browser is downloaded)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from testkit import demo_assets
from testkit.comfy_env import REPO
from testkit.server import ComfyServer, prepare_base

CHROMIUM = Path(os.environ.get("PVAE_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("PVAE_CHROMEDRIVER", "/usr/bin/chromedriver"))
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--window-size=1400,1000"]

SHOTS = REPO / "test-artifacts" / "browser"


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: tests in headless Chromium against a real ComfyUI server")


def _require_browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"browser tests need headless Chromium: {', '.join(missing)} not found "
                    f"(apt-get install chromium chromium-driver; scripts/setup.sh does it as root)")


# The frontend's two node renderers: LiteGraph drawing nodes on a canvas (the default), and "Nodes 2.0"
# (setting Comfy.VueNodes.Enabled, frontend 1.27+), where each node is a Vue component in the DOM and the
# canvas hooks (onDrawBackground...) are never called. DOM widgets live in both.
RENDERERS = ("canvas", "vue")


def write_user_settings(base: Path, renderer: str) -> None:
    """The default user's settings, read by the frontend when the page loads: the first-run tutorial
    done (so no template browser covers the canvas), no minimap, and the node renderer."""
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                                    "Comfy.VueNodes.Enabled": renderer == "vue"}))


@pytest.fixture(scope="session")
def ui_server(tmp_path_factory, vae_dir):
    """A server whose models/ and input/ hold the example workflows' files as ``make run`` puts them
    (settings: write_user_settings)."""
    _require_browser()
    base = prepare_base(tmp_path_factory.mktemp("comfy-ui-base"))
    demo_assets.prepare_templates(base, seed=4)  # what make run puts in place
    write_user_settings(base, renderer="canvas")
    srv = ComfyServer(base).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def driver(ui_server):
    _require_browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    d.set_script_timeout(60)
    # Before any page script: a fresh start (no workflow kept from the previous test) and no "try
    # Nodes 2.0" banner over the canvas (frontend 1.32; 1.49 shows none).
    d.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
        localStorage.clear(); sessionStorage.clear();
        localStorage.setItem('vueNodesBannerDismissed', 'true');"""})
    yield d
    d.quit()


class Page:
    """The ComfyUI editor in the browser, with a recorder of the api events the tests wait on."""

    RECORDER = """
      const app = window.comfyAPI.app.app, api = window.comfyAPI.api.api;
      window.__pvaeTest = {events: [], warnings: []};
      for (const type of ["execution_start", "execution_success", "execution_error", "execution_interrupted",
                          "parallel_vae.plan", "parallel_vae.progress", "parallel_vae.done"]) {
        api.addEventListener(type, (e) => window.__pvaeTest.events.push({type, detail: e.detail}));
      }
      // What loadGraphData warns about (missing node types, missing models). Frontends up to about
      // 1.3x call app.showMissingNodesError/showMissingModelsError (dialogs); newer ones (1.49) leave
      // them in the opened workflow's pendingWarnings (an error overlay and the Errors tab show them),
      // read by warningsOfLastLoad() below. Neither there: fail rather than see no warnings ever.
      const legacy = ["showMissingNodesError", "showMissingModelsError"].filter((n) => typeof app[n] === "function");
      if (legacy.length === 2) {
        for (const name of legacy) {
          const original = app[name].bind(app);
          app[name] = (...args) => { window.__pvaeTest.warnings.push({name, args}); return original(...args); };
        }
      }
      // The preview widgets' listeners on the api: those added from the pack's web/ file (by its stack)
      // and not removed since. The extension's own setup listeners came before this and are not counted.
      const ours = new Set();
      const add = EventTarget.prototype.addEventListener, remove = EventTarget.prototype.removeEventListener;
      EventTarget.prototype.addEventListener = function (type, fn, ...rest) {
        if (this === api && fn && /parallel_vae_preview\\.js/.test(new Error().stack)) ours.add(fn);
        return add.call(this, type, fn, ...rest);
      };
      EventTarget.prototype.removeEventListener = function (type, fn, ...rest) {
        if (this === api) ours.delete(fn);
        return remove.call(this, type, fn, ...rest);
      };
      window.__pvaeTest.listeners = () => ours.size;
      // Frames a panel shows in its filmstrip that differ in their pixels (FNV-1a of each decoded
      // thumbnail; the frontend's content security policy lets no page script fetch a blob: URL).
      window.__pvaeTest.distinctFrames = async (root) => {
        const hashes = new Set();
        for (const img of root.querySelectorAll(".pvae-strip img")) {
          await img.decode();
          const c = document.createElement("canvas");
          c.width = img.naturalWidth; c.height = img.naturalHeight;
          const g = c.getContext("2d");
          g.drawImage(img, 0, 0);
          const bytes = g.getImageData(0, 0, c.width, c.height).data;
          let h = 0x811c9dc5;
          for (let i = 0; i < bytes.length; i++) h = Math.imul(h ^ bytes[i], 0x01000193);
          hashes.add(`${h >>> 0}:${c.width}x${c.height}`);
        }
        return hashes.size;
      };
      // Whether an object URL still loads as an image (a revoked one does not).
      window.__pvaeTest.urlLoads = (url) => new Promise((resolve) => {
        const img = new Image();
        img.onload = () => resolve(true);
        img.onerror = () => resolve(false);
        img.src = url;
      });
      const pinia = document.querySelector("#vue-app")?.__vue_app__?.config?.globalProperties?.$pinia;
      const workflows = pinia?._s?.get("workflow");
      window.__pvaeTest.warningsOfLastLoad = () => {
        const pending = workflows?.activeWorkflow?.pendingWarnings;
        const found = Object.entries(pending ?? {}).filter(([, v]) => Array.isArray(v) && v.length)
                            .map(([name, v]) => ({name, args: [JSON.parse(JSON.stringify(v))]}));
        return [...window.__pvaeTest.warnings, ...found];
      };
      if (legacy.length < 2 && !(workflows && "activeWorkflow" in workflows))
        throw new Error("cannot see this frontend's load warnings (no showMissing*Error, no workflow store)");
    """

    def __init__(self, driver, server: ComfyServer, renderer: str = "canvas"):
        self.d = driver
        self.server = server
        self.renderer = renderer

    def open(self, timeout: float = 90) -> "Page":
        write_user_settings(self.server.base, self.renderer)
        self.d.get(self.server.url)
        # Ready: node definitions registered (after every extension's setup) and the start-up workflow
        # (the default graph: storage is cleared on each load) on the canvas, so nothing we load races it.
        self.wait_for("return !!(app?.graph?.nodes?.length && window.LiteGraph?.registered_node_types?.VAELoader"
                      " && app.extensions.some((e) => e.name === 'parallel_vae.preview'));",
                      timeout, "the ComfyUI frontend did not start")
        # The renderer asked for is the one drawing (LiteGraph.vueNodesMode follows the setting).
        vue = self.js("return [app.extensionManager?.setting?.get('Comfy.VueNodes.Enabled'),"
                      " window.LiteGraph.vueNodesMode];")
        assert vue == [self.renderer == "vue"] * 2, (self.renderer, vue)
        self.d.execute_script(self.RECORDER)
        return self

    def wait_for_panel(self, node_id: int, timeout: float = 20) -> dict:
        """Waits until node ``node_id``'s preview panel is in the page: in the Vue renderer, inside the
        node's own element (mounted a moment after the graph loads). Returns widget_state()."""
        self.wait_for("""
            const node = app.graph.getNodeById(arguments[0]);
            const root = node?.widgets?.find((w) => w.name === 'parallel_vae_preview')?.element;
            const vueNode = document.querySelector(`.lg-node[data-node-id="${arguments[0]}"]`);
            return root?.isConnected && root.getClientRects().length > 0
                   && (arguments[1] === 'vue' ? !!vueNode?.contains(root) : !vueNode);""",
                      timeout, f"node {node_id}'s preview panel was not shown ({self.renderer} renderer)",
                      node_id, self.renderer)
        return self.widget_state(node_id)

    def js(self, script: str, *args):
        return self.d.execute_script("const app = window.comfyAPI?.app?.app, api = window.comfyAPI?.api?.api;\n"
                                     + script, *args)

    def js_async(self, script: str, *args):
        """Runs ``script`` as the body of an async function; returns what it returns (or raises its error)."""
        result = self.d.execute_async_script(
            "const done = arguments[arguments.length - 1];\n"
            "const app = window.comfyAPI.app.app, api = window.comfyAPI.api.api;\n"
            f"(async () => {{ {script} }})().then((v) => done({{ok: v}}), (e) => done({{error: String(e && e.stack || e)}}));",
            *args)
        if "error" in result:
            raise AssertionError(f"page script failed: {result['error']}")
        return result.get("ok")

    def wait_for(self, script: str, timeout: float, what: str, *args, interval: float = 0.25):
        """Polls ``script`` (with ``app`` and ``api`` in scope) until it returns something truthy; on
        timeout saves a screenshot to test-artifacts/browser/ and fails with the console and server log."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(script, *args)
            if value:
                return value
            if time.monotonic() > deadline:
                SHOTS.mkdir(parents=True, exist_ok=True)
                self.d.save_screenshot(str(SHOTS / "timeout.png"))
                raise AssertionError(f"{what} within {timeout} s (screenshot: {SHOTS / 'timeout.png'})\n"
                                     f"browser console:\n{self.console_text()}\n"
                                     f"server log:\n{self.server.log_tail()}")
            time.sleep(interval)

    def load_workflow(self, path: Path) -> list:
        """Opens a UI-format workflow the way the editor does; returns what it warned about (missing
        node types or models)."""
        return self.load_graph(json.loads(Path(path).read_text()))

    def load_graph(self, graph: dict) -> list:
        return self.js_async("window.__pvaeTest.warnings = []; await app.loadGraphData(arguments[0]);"
                             "return window.__pvaeTest.warningsOfLastLoad();", graph)

    def widget_state(self, node_id: int) -> dict:
        """The preview widget's data-* attributes on node ``node_id``, and how many of the frames in
        its filmstrip differ (None when it has no widget)."""
        return self.js_async("""
            const node = app.graph.getNodeById(arguments[0]);
            const w = node?.widgets?.find((w) => w.name === 'parallel_vae_preview');
            return w ? {...w.element.dataset, inDocument: w.element.isConnected,
                        distinctFrames: String(await window.__pvaeTest.distinctFrames(w.element))} : null;""",
                             node_id)

    def events(self, type_: str = None) -> list:
        evs = self.d.execute_script("return window.__pvaeTest.events")
        return [e for e in evs if type_ is None or e["type"] == type_]

    def console(self) -> list[dict]:
        return self.d.get_log("browser")

    def our_errors(self) -> list[str]:
        """Console errors (uncaught exceptions, failed loads) that come from this pack's web/ files. The
        frontend logs some errors of its own on every start (a 404 for user.css, a TypeError in its
        workflow store, blocked calls to api.comfy.org); those are not ours."""
        return [e["message"] for e in self.console()
                if e["level"] == "SEVERE" and ("parallel_vae" in e["message"] or "pvae" in e["message"])]

    def console_text(self) -> str:
        return "\n".join(e["message"] for e in self.console())[-6000:]


@pytest.fixture(params=RENDERERS)
def renderer(request) -> str:
    """The node renderer a ``page`` test runs under; a test can narrow it with
    ``@pytest.mark.parametrize("renderer", ["canvas"])``."""
    return request.param


@pytest.fixture
def page(driver, ui_server, renderer):
    return Page(driver, ui_server, renderer).open()
