// Live preview for Parallel Tiled VAE Decode (and its stream variant): the latest decoded frame, a
// filmstrip of the recent frames, and a tile map showing which device decoded which tile.
// Protocol: docs/STREAM_PROTOCOL.md. No build step, no dependencies.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPES = new Set(["ParallelVAEDecode", "ParallelVAEDecodeStream"]);
const WIDGET_NAME = "parallel_vae_preview";
const KEEP_FRAMES = 16; // thumbnails (and object URLs) kept per node
const MAP_HEIGHT = 110; // CSS pixels of the tile map
const PANEL_MIN_HEIGHT = 300; // CSS pixels of the whole panel, at least
const LANE_COLOURS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7"];

// Once the server sends previews with metadata, the frontend also re-dispatches each one as a legacy
// `b_preview`: from then on the legacy event is a duplicate and is ignored.
let previewsHaveMetadata = false;

const STYLE = `
.pvae-root { display: flex; flex-direction: column; gap: 4px; font: 11px sans-serif;
  color: var(--input-text, #ddd); overflow: hidden; box-sizing: border-box; padding: 2px;
  min-height: ${PANEL_MIN_HEIGHT}px; }
.pvae-status { flex: none; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; opacity: .85; }
/* flex-basis 0: the frame takes the height left over and never sizes the panel (the Vue renderer sizes
   a DOM widget by its content, so an auto basis would grow the node with each frame's aspect ratio) */
.pvae-frame { flex: 1 1 0; min-height: 60px; object-fit: contain; width: 100%;
  background: #0004; cursor: pointer; }
.pvae-strip { display: flex; gap: 2px; height: 36px; flex: none; overflow-x: auto; overflow-y: hidden; }
.pvae-strip img { height: 32px; flex: none; border: 2px solid transparent; cursor: pointer; }
.pvae-strip img.pvae-sel { border-color: #fff; }
.pvae-tiles { width: 100%; flex: none; }
.pvae-legend { display: flex; flex-wrap: wrap; gap: 2px 10px; flex: none; }
.pvae-legend span::before { content: ""; display: inline-block; width: 9px; height: 9px; margin-right: 3px;
  background: var(--c); vertical-align: -1px; }
/* Vue renderer ("Nodes 2.0"): the node shows the latest preview of its own under the widgets (the
   canvas renderer draws it in onDrawBackground, skipped below); the panel already shows these frames. */
.lg-node:has(.pvae-root) .lg-node-widgets ~ img,
.lg-node:has(.pvae-root) .lg-node-widgets ~ img + div { display: none; }
`;

function injectStyle() {
  if (document.getElementById("pvae-style")) return;
  const style = document.createElement("style");
  style.id = "pvae-style";
  style.textContent = STYLE;
  document.head.appendChild(style);
}

function el(tag, cls, parent) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (parent) parent.appendChild(e);
  return e;
}

// An event is for `node` when it names its id, or a subgraph path ending in it ("12:3").
function isFor(node, id) {
  const s = String(id), mine = String(node.id); // ids are numbers, or strings in newer frontends
  if (id == null || node.id == null || mine === "-1") return false; // -1: not in a graph yet
  return s === mine || s.endsWith(":" + mine);
}

class PreviewPanel {
  constructor(node) {
    this.node = node;
    this.listeners = [];
    this.resetRun(null);

    injectStyle();
    this.root = el("div", "pvae-root");
    this.status = el("div", "pvae-status", this.root);
    this.status.textContent = "waiting for a decode";
    this.img = el("img", "pvae-frame", this.root);
    this.img.alt = "";
    this.img.style.display = "none";
    this.img.addEventListener("click", () => this.select(null)); // back to following the live frame
    this.strip = el("div", "pvae-strip", this.root);
    this.canvas = el("canvas", "pvae-tiles", this.root);
    this.canvas.style.height = `${MAP_HEIGHT}px`;
    this.legend = el("div", "pvae-legend", this.root);
    this.updateAttributes();
  }

  // --- run state -----------------------------------------------------------------------------
  resetRun(promptId) {
    for (const f of this.frames ?? []) URL.revokeObjectURL(f.url);
    this.promptId = promptId;
    this.frames = []; // {url, thumb}, the last KEEP_FRAMES
    this.frameCount = 0;
    this.selected = null; // a frame the user picked, else follow the newest
    this.plan = null;
    this.tileState = []; // per tile: {lane, steps}
    this.done = {};
    this.framesDone = 0;
    this.seconds = null;
    this.streaming = false; // between this node's plan and its done (or the end of the prompt)
    this.executing = false;
    if (this.strip) this.strip.replaceChildren();
    if (this.img) this.img.style.display = "none";
  }

  startRunIfNew(promptId) {
    if (promptId && promptId !== this.promptId) this.resetRun(promptId);
  }

  // --- api listeners -------------------------------------------------------------------------
  on(type, fn) {
    api.addEventListener(type, fn);
    this.listeners.push([type, fn]);
  }

  attach() {
    if (this.listeners.length) return;
    this.on("parallel_vae.plan", ({ detail }) => isFor(this.node, detail?.node) && this.onPlan(detail));
    this.on("parallel_vae.progress", ({ detail }) => isFor(this.node, detail?.node) && this.onProgress(detail));
    this.on("parallel_vae.done", ({ detail }) => isFor(this.node, detail?.node) && this.onDone(detail));
    this.on("b_preview_with_metadata", ({ detail }) => {
      previewsHaveMetadata = true;
      if (detail?.blob && (isFor(this.node, detail.nodeId) || isFor(this.node, detail.displayNodeId))) {
        this.startRunIfNew(detail.promptId ?? detail.jobId); // frontends from about 1.40 name it jobId
        this.addFrame(detail.blob);
      }
    });
    // Legacy previews carry no node id: take them while this node executes or streams (plan..done).
    this.on("b_preview", ({ detail }) => {
      if (!previewsHaveMetadata && detail instanceof Blob && (this.executing || this.streaming)) this.addFrame(detail);
    });
    this.on("executing", ({ detail }) => {
      this.executing = isFor(this.node, detail);
      if (detail == null && this.streaming) { // the prompt ended without our done (interrupted, failed)
        this.streaming = false;
        this.render();
      }
    });
    if (typeof ResizeObserver === "function") {
      this.resizeObserver = new ResizeObserver(() => this.drawTiles());
      this.resizeObserver.observe(this.root);
    }
    this.updateAttributes();
  }

  detach() {
    for (const [type, fn] of this.listeners) api.removeEventListener(type, fn);
    this.listeners = [];
    this.resizeObserver?.disconnect();
    this.resizeObserver = null;
    this.resetRun(null);
  }

  // --- events --------------------------------------------------------------------------------
  onPlan(d) {
    this.startRunIfNew(d.prompt_id);
    this.plan = {
      width: d.width, height: d.height, frames: d.frames, steps: Math.max(1, d.steps || 1),
      units: d.units, tiles: Array.isArray(d.tiles) ? d.tiles : [], lanes: Array.isArray(d.lanes) ? [...d.lanes] : [],
      mode: d.mode === "exact" ? "exact" : "tiled",
      sized: typeof d.sized === "string" ? d.sized : "",
    };
    this.tileState = this.plan.tiles.map(() => null);
    this.done = Object.fromEntries(this.plan.lanes.map((l) => [l, 0]));
    this.framesDone = 0;
    this.seconds = null;
    this.streaming = true;
    this.render();
  }

  onProgress(d) {
    this.startRunIfNew(d.prompt_id);
    if (d.done) Object.assign(this.done, d.done);
    if (d.units != null && this.plan) this.plan.units = d.units;
    if (d.frames_done != null) this.framesDone = d.frames_done;
    for (const [index, lane, steps] of Array.isArray(d.tiles) ? d.tiles : []) {
      if (index >= 0 && index < this.tileState.length) this.tileState[index] = { lane: this.laneName(lane), steps };
    }
    this.render();
  }

  onDone(d) {
    this.startRunIfNew(d.prompt_id);
    if (d.done) Object.assign(this.done, d.done);
    if (d.frames != null) this.framesDone = d.frames;
    this.seconds = d.seconds ?? 0;
    this.streaming = false;
    this.render();
  }

  laneName(lane) {
    const lanes = this.plan?.lanes ?? [];
    const name = String(lane);
    if (this.plan && !lanes.includes(name)) lanes.push(name);
    return name;
  }

  laneColour(name) {
    const i = Math.max(0, (this.plan?.lanes ?? []).indexOf(name));
    return LANE_COLOURS[i % LANE_COLOURS.length];
  }

  // --- frames --------------------------------------------------------------------------------
  addFrame(blob) {
    this.frameCount++;
    const frame = { url: URL.createObjectURL(blob) };
    frame.thumb = el("img", null, this.strip);
    frame.thumb.src = frame.url;
    frame.thumb.title = `frame ${this.frameCount}`;
    frame.thumb.addEventListener("click", () => this.select(frame === this.frames.at(-1) ? null : frame));
    this.frames.push(frame);
    while (this.frames.length > KEEP_FRAMES) {
      const old = this.frames.shift();
      old.thumb.remove();
      URL.revokeObjectURL(old.url);
      if (this.selected === old) this.selected = null;
    }
    this.strip.scrollLeft = this.strip.scrollWidth;
    this.showFrame();
    this.updateAttributes();
  }

  select(frame) {
    this.selected = frame;
    this.showFrame();
  }

  showFrame() {
    const frame = this.selected ?? this.frames.at(-1);
    for (const f of this.frames) f.thumb.classList.toggle("pvae-sel", f === frame && this.selected !== null);
    if (!frame) return;
    if (this.img.src !== frame.url) this.img.src = frame.url;
    this.img.style.display = "";
  }

  // --- drawing -------------------------------------------------------------------------------
  tilesDrawn() {
    return this.tileState.filter((t) => t && t.steps > 0).length;
  }

  // The panel's state on its element (data-*), as it shows it: for styles and automation.
  updateAttributes() {
    const ds = this.root.dataset;
    ds.pvaeNode = String(this.node.id);
    ds.frames = String(this.frameCount);
    ds.tiles = String(this.plan?.tiles.length ?? 0);
    ds.mode = this.plan?.mode ?? "";
    ds.sized = this.plan?.sized ?? "";
    ds.tilesDrawn = String(this.tilesDrawn());
    ds.lanes = (this.plan?.lanes ?? []).join(",");
    ds.state = !this.plan ? "idle" : this.streaming ? "running" : this.seconds != null ? "done" : "stopped";
  }

  render() {
    this.updateAttributes();
    const p = this.plan;
    if (p) {
      const units = p.units || 0;
      const total = Object.values(this.done).reduce((a, b) => a + b, 0);
      const parts = [`${p.width}×${p.height}`, p.frames > 1 ? `${this.framesDone}/${p.frames} frames` : null,
        p.mode === "exact" ? `exact · ${p.tiles.length} bands` : `tiled · ${p.tiles.length} tiles`,
        p.sized ? p.sized.split(":")[0] : null,
        units ? `${total}/${units} steps` : null,
        this.streaming ? "decoding…" : this.seconds != null ? `done in ${Number(this.seconds).toFixed(1)} s` : "stopped"];
      this.status.textContent = parts.filter(Boolean).join(" · ");
      this.legend.replaceChildren(...p.lanes.map((lane) => {
        const item = document.createElement("span");
        item.style.setProperty("--c", this.laneColour(lane));
        item.textContent = `${lane} ${this.done[lane] ?? 0}/${units}`;
        return item;
      }));
    }
    this.drawTiles();
  }

  drawTiles() {
    const p = this.plan, canvas = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const cssWidth = canvas.clientWidth || 300;
    canvas.width = Math.round(cssWidth * dpr);
    canvas.height = Math.round(MAP_HEIGHT * dpr);
    const ctx = canvas.getContext("2d");
    if (!ctx) return;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssWidth, MAP_HEIGHT);
    if (!p || !p.width || !p.height) return;
    // Image VAEs average several tile grids (passes): one small map per pass, side by side.
    const passes = 1 + Math.max(0, ...p.tiles.map((t) => t[4] || 0));
    const gap = 6, boxW = (cssWidth - gap * (passes - 1)) / passes;
    const scale = Math.min(boxW / p.width, MAP_HEIGHT / p.height);
    const mapW = p.width * scale, mapH = p.height * scale;
    for (let pass = 0; pass < passes; pass++) {
      const ox = pass * (boxW + gap) + (boxW - mapW) / 2, oy = (MAP_HEIGHT - mapH) / 2;
      ctx.fillStyle = "#0005";
      ctx.fillRect(ox, oy, mapW, mapH);
      p.tiles.forEach(([x, y, w, h, tilePass], i) => {
        if ((tilePass || 0) !== pass) return;
        const rx = ox + x * scale, ry = oy + y * scale, rw = w * scale, rh = h * scale;
        const state = this.tileState[i];
        if (state && state.steps > 0) {
          const colour = this.laneColour(state.lane);
          ctx.globalAlpha = 0.3;
          ctx.fillStyle = colour;
          ctx.fillRect(rx, ry, rw, rh);
          ctx.globalAlpha = 1; // the solid part grows with the steps done
          ctx.fillRect(rx, ry, rw, rh * Math.min(1, state.steps / p.steps));
        }
        ctx.strokeStyle = "#fff6";
        ctx.lineWidth = 1;
        ctx.strokeRect(rx + 0.5, ry + 0.5, Math.max(0, rw - 1), Math.max(0, rh - 1));
      });
    }
  }
}

app.registerExtension({
  name: "parallel_vae.preview",
  setup() {
    // The api reports a websocket message type nobody ever listened to as unknown (a console warning):
    // make ours known even while no widget is on the canvas. Never removed, not counted.
    for (const type of ["parallel_vae.plan", "parallel_vae.progress", "parallel_vae.done"])
      api.addEventListener(type, () => {});
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!NODE_TYPES.has(nodeData?.name)) return;
    const proto = nodeType.prototype;
    const { onNodeCreated, onAdded, onRemoved, onDrawBackground } = proto;

    proto.onNodeCreated = function (...args) {
      const result = onNodeCreated?.apply(this, args);
      if (typeof this.addDOMWidget !== "function") {
        console.warn("[parallel_vae] this frontend has no addDOMWidget: no live preview");
        return result;
      }
      const panel = new PreviewPanel(this);
      const widget = this.addDOMWidget(WIDGET_NAME, "parallel_vae_preview", panel.root, {
        serialize: false,
        getMinHeight: () => PANEL_MIN_HEIGHT, // the canvas renderer sizes the panel from this
      });
      if (widget) widget.serialize = false;
      this.__pvaePanel = panel;
      if (this.graph) panel.attach();
      const [w, h] = this.size ?? [0, 0];
      this.setSize?.([Math.max(w, 360), Math.max(h, 480)]);
      return result;
    };

    proto.onAdded = function (...args) {
      const result = onAdded?.apply(this, args);
      this.__pvaePanel?.attach();
      return result;
    };

    // The frontend draws a node's previews under its widgets; the widget already shows these frames, so
    // a node with the widget skips that second, larger copy (these nodes have no other image outputs).
    proto.onDrawBackground = function (...args) {
      if (this.__pvaePanel) return;
      return onDrawBackground?.apply(this, args);
    };

    proto.onRemoved = function (...args) {
      this.__pvaePanel?.detach();
      return onRemoved?.apply(this, args);
    };
  },
});
