// latentforge web UI: plain JS over the HTTP API (no build step).
// Jobs are submitted (202), then followed through their server-sent events, read with fetch so
// the API key header goes along; polling GET /v1/jobs/{id} is the fallback.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
const state = { models: [], samplers: [], source: null, tab: "txt2img", loras: [], control: null };
const FINAL = new Set(["done", "failed", "cancelled"]);

// ----- API -----------------------------------------------------------------------------------
function headers(json) {
  const h = {};
  const key = $("#api-key").value.trim();
  if (key) h["Authorization"] = `Bearer ${key}`;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function api(path, options = {}) {
  const r = await fetch(path, { ...options, headers: headers(options.body !== undefined) });
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  return { status: r.status, ok: r.ok, data, headers: r.headers };
}

function describeError(status, data, headersIn) {
  const detail = data && data.detail;
  let text;
  if (Array.isArray(detail)) {
    text = detail.map((d) => `${(d.loc || []).filter((p) => p !== "body").join(".")}: ${d.msg}`)
      .join("; ");
  } else {
    text = detail || `HTTP ${status}`;
  }
  if (status === 401) text = "this server needs an API key (top right): " + text;
  if (status === 429) text += ` (retry after ${headersIn.get("Retry-After") || "?"} s)`;
  return text;
}

function showMessage(text, kind = "error") {
  const box = $("#message");
  box.textContent = text;
  box.className = kind === "error" ? "" : "info";
  box.hidden = !text;
}

// ----- set-up --------------------------------------------------------------------------------
async function loadModels() {
  const r = await api("/v1/models");
  if (!r.ok) { showMessage(describeError(r.status, r.data, r.headers)); return; }
  state.models = r.data.filter((m) => m.status !== "broken");  // listed with why they do not load
  const sel = $("#model");
  sel.replaceChildren(...state.models.map((m) => new Option(m.name + (m.default ? " (default)" : ""),
    m.name, m.default, m.default)));
  if (!state.models.length) showMessage("this server has no models");
  modelChanged();
}

async function loadSamplers() {
  const r = await api("/v1/samplers");
  if (!r.ok) return;
  state.samplers = r.data;
  const sel = $("#sampler");
  sel.replaceChildren(new Option("model default", ""),
    ...r.data.map((s) => { const o = new Option(s.name, s.name); o.title = s.doc; return o; }));
}

// LoRAs by name from the server's loras folder (A1111's list), and its embeddings' trigger words
async function loadAdapters() {
  const [loras, embeddings] = await Promise.all([api("/sdapi/v1/loras"), api("/sdapi/v1/embeddings")]);
  const names = loras.ok ? loras.data.map((l) => l.name) : [];
  const words = embeddings.ok ? Object.keys(embeddings.data.loaded || {}) : [];
  $("#lora-name").replaceChildren(...names.map((n) => new Option(n, n)));
  $("#lora-name").closest(".row").hidden = !names.length;
  $("#embeddings").textContent = words.length ? `embeddings: ${words.join(", ")}` : "";
  $("#adapters").hidden = !names.length && !words.length;
  state.loras = state.loras.filter((l) => names.includes(l.name));
  showLoras();
}

// ControlNets by name from the server's controlnets folder; the control image, when one is chosen
async function loadControlNets() {
  const r = await api("/v1/controlnets");
  const names = r.ok ? r.data.map((c) => c.name) : [];
  $("#control-net").replaceChildren(new Option("model default", ""), ...names.map((n) => new Option(n, n)));
}

async function readControlImage() {
  const file = $("#control-image").files[0];
  state.control = file ? await fileToDataUrl(file) : null;
}

function controlParams() {
  if (!state.control) return null;
  const unit = { image: state.control, scale: Number($("#control-scale").value) || 0 };
  if ($("#control-net").value) unit.controlnet = $("#control-net").value;
  if ($("#control-preprocess").value) unit.preprocess = $("#control-preprocess").value;
  return [unit];
}

function showLoras() {
  $("#lora-list").replaceChildren(...state.loras.map((l, i) => {
    const li = document.createElement("li");
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = `remove ${l.name}`;
    remove.addEventListener("click", () => { state.loras.splice(i, 1); showLoras(); });
    li.append(`${l.name}:${l.scale}`, remove);
    return li;
  }));
}

function addLora() {
  const name = $("#lora-name").value;
  const scale = Number($("#lora-scale").value);
  if (!name || !Number.isFinite(scale)) return;
  const same = state.loras.find((l) => l.name === name);  // one entry per LoRA: the new scale
  if (same) same.scale = scale; else state.loras.push({ name, scale });
  showLoras();
}

// which model tasks (model.json "task") each mode can run
const TASKS = {
  txt2img: ["generate"], img2img: ["generate"], interpolate: ["generate"],
  inpaint: ["generate", "inpaint"], upscale: ["superres"],
};

function modelFor(kind) {
  // the chosen model if it can do this, else the default, else the first one that can
  const ok = (m) => m && TASKS[kind].includes(m.task);
  const chosen = state.models.find((m) => m.name === $("#model").value);
  if (ok(chosen)) return chosen;
  return state.models.find((m) => m.default && ok(m)) || state.models.find(ok) || null;
}

function sizeChoices(m) {
  // the model's own size first, then wider, taller and larger ones on its grid, within its limit
  const snap = (v) => Math.max(m.size_multiple, Math.round(v / m.size_multiple) * m.size_multiple);
  const sizes = [[m.width, m.height], [snap(m.width * 1.5), m.height], [m.width, snap(m.height * 1.5)],
    [snap(m.width * 2), snap(m.height * 2)]];
  const seen = new Set();
  return sizes.filter(([w, h]) => {
    const key = `${w}x${h}`;
    if (w > m.max_side || h > m.max_side || seen.has(key)) return false;
    seen.add(key);
    return true;
  });
}

function modelChanged() {
  const m = modelFor("txt2img") || state.models[0];
  if (!m) return;
  $("#size").replaceChildren(...sizeChoices(m).map(([w, h]) => new Option(`${w} × ${h}`, `${w}x${h}`)));
  $("#steps").placeholder = `model default (${m.defaults.steps ?? "?"})`;
  $("#guidance").placeholder = `model default (${m.defaults.guidance ?? "?"})`;
  $("#layout").options[0].text = `model default (${m.defaults.layout ?? "none"})`;
  $("#layout").disabled = m.conditioning !== "text";
  const hint = m.conditioning === "class"
    ? `class model: name a class in the prompt (${m.class_names.join(", ")})`
    : m.conditioning === "text" ? "text model" : "unconditional model: the prompt is ignored";
  $("#class-hint").textContent = hint;
  const paint = modelFor("inpaint") || m;
  for (const c of $$("#paint canvas")) { c.width = paint.width; c.height = paint.height; }
  const up = modelFor("upscale");
  $("#upscale-model").textContent = up
    ? `model ${up.name}: x${up.scale}` : "this server has no super-resolution model";
  drawSource();
}

async function pollHealth() {
  try {
    const r = await fetch("/health");
    const h = await r.json();
    $("#health").textContent = `queue ${h.queued}/${h.max_queue} · running ${h.running}`;
  } catch (e) {
    $("#health").textContent = "server unreachable";
  }
}

// ----- tabs ----------------------------------------------------------------------------------
function selectTab(name) {
  state.tab = name;
  for (const b of $$("nav [role=tab]")) b.setAttribute("aria-selected", b.dataset.tab === name);
  for (const p of $$(".panel")) p.hidden = p.dataset.panel !== name;
  $("#num").closest("label").hidden = name === "upscale" || name === "interpolate";
  if (name === "inpaint") drawSource();
}

// ----- input images (shared by img2img, inpaint, upscale) ------------------------------------
function setSource(dataUrl) {
  state.source = dataUrl;
  for (const img of $$(".source-img")) img.src = dataUrl;
  drawSource();
}

function fileToDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function drawSource() {
  const canvas = $("#paint-image");
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (!state.source) return;
  const img = new Image();
  img.onload = () => ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  img.src = state.source;
}

// ----- mask painting -------------------------------------------------------------------------
function setupPainting() {
  const canvas = $("#paint-mask");
  const ctx = canvas.getContext("2d");
  let last = null;
  const at = (e) => {
    const r = canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * canvas.width / r.width,
      (e.clientY - r.top) * canvas.height / r.height];
  };
  const dab = ([x, y]) => {
    const radius = Number($("#brush").value) / 2;
    ctx.fillStyle = "#ff3b30";  // shown red over the image; exported as white on black
    ctx.beginPath();
    ctx.arc(x, y, radius, 0, 2 * Math.PI);
    ctx.fill();
  };
  const stroke = (p) => {  // dabs along the segment, so fast strokes leave no gaps
    const [x0, y0] = last || p;
    const n = Math.max(1, Math.ceil(Math.hypot(p[0] - x0, p[1] - y0) * 2));
    for (let i = 1; i <= n; i++) dab([x0 + (p[0] - x0) * i / n, y0 + (p[1] - y0) * i / n]);
    last = p;
  };
  canvas.addEventListener("pointerdown", (e) => {
    canvas.setPointerCapture(e.pointerId);
    last = null;
    stroke(at(e));
  });
  canvas.addEventListener("pointermove", (e) => { if (e.buttons & 1) stroke(at(e)); });
  canvas.addEventListener("pointerup", () => { last = null; });
  $("#clear-mask").addEventListener("click", () => ctx.clearRect(0, 0, canvas.width, canvas.height));
}

function maskDataUrl() {
  // painted pixels (alpha over half) -> white = regenerate, the rest black; null if none
  const mask = $("#paint-mask");
  const { width, height } = mask;
  const painted = mask.getContext("2d").getImageData(0, 0, width, height).data;
  const out = document.createElement("canvas");
  out.width = width;
  out.height = height;
  const ctx = out.getContext("2d");
  const image = ctx.createImageData(width, height);
  let any = false;
  for (let i = 0; i < painted.length; i += 4) {
    const on = painted[i + 3] > 127 ? 255 : 0;
    any = any || on > 0;
    image.data.set([on, on, on, 255], i);
  }
  if (!any) return null;
  ctx.putImageData(image, 0, 0);
  return out.toDataURL("image/png");
}

// ----- requests ------------------------------------------------------------------------------
function numberOrNull(el) {
  return el.value === "" ? null : Number(el.value);
}

function samplingParams(kind, withNum = true) {
  const model = modelFor(kind);
  const body = { model: model ? model.name : null };
  const sampler = $("#sampler").value;
  if (sampler) body.sampler = sampler;
  for (const [id, key] of [["#steps", "steps"], ["#guidance", "guidance"], ["#seed", "seed"]]) {
    const v = numberOrNull($(id));
    if (v !== null) body[key] = v;
  }
  if (withNum) body.num = numberOrNull($("#num")) || 1;
  if (["txt2img", "img2img", "inpaint"].includes(kind) && state.loras.length) {
    body.loras = state.loras.map((l) => `${l.name}:${l.scale}`);
  }
  const controls = ["txt2img", "img2img", "inpaint"].includes(kind) ? controlParams() : null;
  if (controls) body.controls = controls;
  return body;
}

async function buildRequest(kind, form) {
  const f = (name) => form.elements[name];
  const base = samplingParams(kind, kind !== "upscale" && kind !== "interpolate");
  if (kind === "txt2img") {
    const [w, h] = $("#size").value.split("x").map(Number);
    const body = { ...base, prompt: f("prompt").value, negative_prompt: f("negative_prompt").value,
      width: w, height: h };
    if (f("layout").value) body.layout = f("layout").value;
    if (f("bf16").checked) body.bf16 = true;
    return body;
  }
  if (kind === "interpolate") {
    const body = { ...base, prompt_a: f("prompt_a").value, prompt_b: f("prompt_b").value,
      frames: Number(f("frames").value) };
    if (f("mode").value === "seeds") {
      return { ...body, seed_a: Number(f("seed_a").value), seed_b: Number(f("seed_b").value) };
    }
    const [a, b] = [f("image_a").files[0], f("image_b").files[0]];
    if (!a || !b) throw new Error("choose image A and image B");
    return { ...body, image_a: await fileToDataUrl(a), image_b: await fileToDataUrl(b) };
  }
  if (!state.source) throw new Error("choose an input image, or generate one first");
  const body = { ...base, prompt: f("prompt").value, image: state.source };
  if (kind === "img2img") body.strength = Number(f("strength").value);
  if (kind === "upscale") body.noise_level = Number(f("noise_level").value);
  if (kind === "inpaint") {
    body.mask = maskDataUrl();
    if (!body.mask) throw new Error("paint the part to regenerate on the image first");
    body.feather = Number(f("feather").value) || 0;
  }
  return body;
}

async function submit(kind, form) {
  showMessage("");
  let body;
  try {
    body = await buildRequest(kind, form);
  } catch (e) {
    showMessage(e.message);
    return;
  }
  const r = await api(`/v1/${kind}`, { method: "POST", body: JSON.stringify(body) });
  if (r.status !== 202) {
    showMessage(describeError(r.status, r.data, r.headers), "error");
    return;
  }
  const title = body.prompt || body.prompt_a || kind;
  follow(r.data.id, `${kind}: ${title}`);
}

// ----- following a job -----------------------------------------------------------------------
function follow(id, title) {
  const card = $("#job-template").content.firstElementChild.cloneNode(true);
  card.dataset.job = id;
  $(".job-title", card).textContent = title;
  $(".cancel", card).addEventListener("click", () => api(`/v1/jobs/${id}`, { method: "DELETE" }));
  $("#jobs").prepend(card);
  const update = (ev) => {
    const pct = Math.round((ev.progress || 0) * 100);
    const bar = $(".bar", card);
    bar.setAttribute("aria-valuenow", String(pct));
    $(".fill", card).style.width = `${pct}%`;
    let status = ev.status;
    if (ev.status === "queued" && ev.queue_position != null) status += ` (#${ev.queue_position + 1})`;
    if (ev.status === "running") status = `step ${ev.step} / ${ev.total}`;
    if (ev.cancel_requested && !FINAL.has(ev.status)) status += " · cancelling";
    $(".job-status", card).textContent = status;
    if (ev.preview) {
      const img = $(".preview", card);
      img.src = `data:image/png;base64,${ev.preview}`;
      img.hidden = false;
    }
  };
  const finish = (job) => {
    update(job);
    $(".cancel", card).hidden = true;
    if (job.status === "done") {
      addResults(job);
      card.remove();
    } else {
      card.classList.add("failed");
      $(".job-status", card).textContent = job.status === "failed" ? `failed: ${job.error}` : "cancelled";
      const close = document.createElement("button");
      close.textContent = "Dismiss";
      close.addEventListener("click", () => card.remove());
      $(".job-head", card).append(close);
    }
  };
  streamEvents(id, update, finish).catch(() => pollJob(id, update, finish));
}

async function streamEvents(id, update, finish) {
  const r = await fetch(`/v1/jobs/${id}/events`, { headers: headers(false) });
  if (!r.ok || !r.body) throw new Error(`events: HTTP ${r.status}`);
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new Error("event stream ended early");
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (!data) continue;
      const payload = JSON.parse(data);
      if (FINAL.has(event)) { finish(payload); reader.cancel(); return; }
      update(payload);
    }
  }
}

async function pollJob(id, update, finish) {
  for (;;) {
    const r = await api(`/v1/jobs/${id}`);
    if (!r.ok) { finish({ status: "failed", error: describeError(r.status, r.data, r.headers) }); return; }
    if (FINAL.has(r.data.status)) { finish(r.data); return; }
    update(r.data);
    await new Promise((res) => setTimeout(res, 300));
  }
}

// ----- results -------------------------------------------------------------------------------
function describeParams(p) {
  const keys = ["prompt", "negative", "seed", "sampler", "steps", "guidance", "layout", "precision",
    "strength", "prompt_a", "prompt_b", "seed_a", "seed_b", "scale", "loras", "model"];
  const hidden = { layout: "none", precision: "fp32" };  // the plain cases go unsaid
  const shown = (k) => p[k] !== undefined && p[k] !== "" && p[k] !== hidden[k];
  return keys.filter(shown).map((k) => `${k}: ${p[k]}`).join(" · ");
}

function addResults(job) {
  const gallery = $("#gallery");
  if (job.kind === "interpolate") {
    const fig = document.createElement("figure");
    fig.className = "result strip";
    const frames = document.createElement("div");
    frames.className = "frames";
    for (const im of job.images) frames.append(resultImage(im));
    const cap = document.createElement("figcaption");
    cap.textContent = describeParams(job.parameters);
    fig.append(frames, cap);
    gallery.prepend(fig);
    return;
  }
  for (const im of [...job.images].reverse()) {
    const fig = document.createElement("figure");
    fig.className = "result";
    const cap = document.createElement("figcaption");
    cap.textContent = describeParams(im.parameters);
    const actions = document.createElement("div");
    actions.className = "actions";
    const use = document.createElement("button");
    use.type = "button";
    use.textContent = "use as input";
    use.addEventListener("click", () => setSource(`data:image/png;base64,${im.png}`));
    const save = document.createElement("a");
    save.href = `data:image/png;base64,${im.png}`;
    save.download = `latentforge-${im.parameters.seed ?? "image"}.png`;
    save.textContent = "download";
    actions.append(use, save);
    fig.append(resultImage(im), cap, actions);
    gallery.prepend(fig);
  }
  // the newest result is the default input of the editing tabs
  setSource(`data:image/png;base64,${job.images[0].png}`);
}

function resultImage(im) {
  const img = document.createElement("img");
  img.className = "pixel";
  img.src = `data:image/png;base64,${im.png}`;
  img.alt = im.parameters.prompt || "result";
  img.title = JSON.stringify(im.parameters);
  return img;
}

// ----- wiring --------------------------------------------------------------------------------
// ----- PNG info ------------------------------------------------------------------------------
// The server reads the chunks (/sdapi/v1/png-info): A1111's `parameters`, or latentforge's own
// turned into it, and `latentforge`, the settings in latentforge's keys, which fill the form.
async function readPngInfo(file) {
  const data = await fileToDataUrl(file);
  const r = await api("/sdapi/v1/png-info", { method: "POST", body: JSON.stringify({ image: data }) });
  const send = $("#pnginfo-send");
  send.disabled = true;
  if (!r.ok) { showMessage((r.data && r.data.errors) || `HTTP ${r.status}`); return; }
  $("#pnginfo-text").textContent = r.data.info || "this PNG holds no generation parameters";
  const fields = Object.entries(r.data.parameters || {}).filter(([k]) => k !== "Prompt");
  $("#pnginfo-fields").replaceChildren(...fields.flatMap(([k, v]) => {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = k;
    dd.textContent = v;
    return [dt, dd];
  }));
  state.pngInfo = r.data.latentforge || {};
  send.disabled = !state.pngInfo.seed;
}

function sendPngInfo() {
  const p = state.pngInfo || {};
  $("#prompt").value = p.prompt || "";
  $("#negative").value = p.negative || "";
  if ([...$("#sampler").options].some((o) => o.value === p.sampler)) $("#sampler").value = p.sampler;
  $("#steps").value = p.steps || "";
  $("#guidance").value = p.guidance || "";
  $("#seed").value = p.seed || "";
  $("#num").value = p.num || 1;
  const size = `${p.width}x${p.height}`;
  if ([...$("#size").options].some((o) => o.value === size)) $("#size").value = size;
  // the PNG's LoRAs ("NAME:SCALE"), those this server has
  const have = new Set([...$("#lora-name").options].map((o) => o.value));
  let recorded = [];
  try { recorded = JSON.parse(p.loras || "[]"); } catch (e) { recorded = []; }
  state.loras = recorded.map((t) => [t.slice(0, t.lastIndexOf(":")), Number(t.slice(t.lastIndexOf(":") + 1))])
    .filter(([name, scale]) => have.has(name) && Number.isFinite(scale))
    .map(([name, scale]) => ({ name, scale }));
  showLoras();
  selectTab("txt2img");
}

function init() {
  const key = $("#api-key");
  key.value = localStorage.getItem("latentforge-api-key") || "";
  $("#key-form").addEventListener("submit", (e) => { e.preventDefault(); key.blur(); });
  key.addEventListener("change", () => {
    localStorage.setItem("latentforge-api-key", key.value.trim());
    loadModels();
    loadSamplers();
    loadAdapters();
  });
  for (const b of $$("nav [role=tab]")) b.addEventListener("click", () => selectTab(b.dataset.tab));
  for (const form of $$(".panel")) {
    const go = form.dataset.panel === "pnginfo" ? sendPngInfo : () => submit(form.dataset.panel, form);
    form.addEventListener("submit", (e) => { e.preventDefault(); go(); });
  }
  for (const input of $$(".source-file")) {
    input.addEventListener("change", async () => {
      if (input.files[0]) setSource(await fileToDataUrl(input.files[0]));
    });
  }
  const strength = $("#form-img2img").elements.strength;
  strength.addEventListener("input", () => { $("#strength-out").textContent = strength.value; });
  for (const radio of $$("#form-interpolate [name=mode]")) {
    radio.addEventListener("change", () => {
      for (const row of $$("#form-interpolate [data-mode]")) row.hidden = row.dataset.mode !== radio.value;
    });
  }
  $("#prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("#form-txt2img").requestSubmit();
  });
  $("#model").addEventListener("change", modelChanged);
  const info = $("#form-pnginfo");
  $("#pnginfo-file").addEventListener("change", (e) => { if (e.target.files[0]) readPngInfo(e.target.files[0]); });
  info.addEventListener("dragover", (e) => e.preventDefault());
  info.addEventListener("drop", (e) => {
    e.preventDefault();
    if (e.dataTransfer.files[0]) readPngInfo(e.dataTransfer.files[0]);
  });
  setupPainting();
  $("#lora-add").addEventListener("click", addLora);
  $("#control-image").addEventListener("change", readControlImage);
  $("#control-clear").addEventListener("click", () => { $("#control-image").value = ""; state.control = null; });
  loadModels();
  loadSamplers();
  loadAdapters();
  loadControlNets();
  pollHealth();
  setInterval(pollHealth, 5000);
}

document.addEventListener("DOMContentLoaded", init);
