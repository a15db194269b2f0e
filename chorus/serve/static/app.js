// Chorus studio: a thin client of the server's JSON API (/api/*, /sdapi/v1/png-info). No libraries.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  key: localStorage.getItem("chorus-api-key") || "",
  info: null,
  jobs: [],          // unfinished jobs this page submitted, oldest first
  lastSeed: null,
  seen: new Set(),   // gallery entries shown ("job/index")
};

// --- HTTP -------------------------------------------------------------------------------------
function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

async function api(path, opts) {
  opts = opts || {};
  const init = { method: opts.method || "GET", headers: headers(opts.body !== undefined ? { "Content-Type": "application/json" } : {}) };
  if (opts.body !== undefined) init.body = JSON.stringify(opts.body);
  const r = await fetch(path, init);
  if (r.status === 401) {
    $("auth").hidden = false;
    throw new Error("This server needs an API key: enter it above.");
  }
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) throw new Error((data && data.error) || (r.status + " " + r.statusText));
  return data;
}

async function imageSrc(url) {
  if (!state.key) return url;
  const r = await fetch(url, { headers: headers() });
  if (!r.ok) throw new Error("cannot load " + url);
  return URL.createObjectURL(await r.blob());
}

// Server-sent events over fetch (EventSource cannot send an Authorization header).
async function streamEvents(path, onEvent) {
  const r = await fetch(path, { headers: headers({ Accept: "text/event-stream" }) });
  if (!r.ok || !r.body) throw new Error("events: " + r.status);
  const reader = r.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) {
        const stop = onEvent(event, JSON.parse(data));
        if (stop) { reader.cancel().catch(() => {}); return; }
      }
    }
  }
}

// --- the form ---------------------------------------------------------------------------------
function showError(msg) {
  const el = $("error");
  el.textContent = msg || "";
  el.hidden = !msg;
}

function mode() { return $("mode-img2img").checked ? "img2img" : "txt2img"; }

function currentModel() {
  const name = $("model").value;
  return (state.info.models.find((m) => m.name === name)) || state.info.models[0];
}

function applyModelGeometry(resetSize) {
  const m = currentModel();
  for (const id of ["width", "height"]) {
    const el = $(id);
    el.step = m.size_multiple;
    el.min = m.size_multiple;
    const v = parseInt(el.value, 10);
    if (resetSize || !v || v % m.size_multiple) el.value = m.default_size;
  }
  if (resetSize) {            // on load: the model's recommended steps and CFG scale (sampling_defaults.json)
    $("steps").value = m.steps;
    $("guidance").value = m.guidance;
  }
}

function fillSelect(sel, items, value) {
  sel.innerHTML = "";
  for (const it of items) {
    const o = document.createElement("option");
    o.value = it.value;
    o.textContent = it.label;
    sel.appendChild(o);
  }
  if (value !== undefined) sel.value = value;
}

async function loadInfo() {
  const info = await api("/api/info");
  state.info = info;
  fillSelect($("model"), info.models.map((m) => ({ value: m.name, label: m.name })), info.current_model);
  fillSelect($("sampler"), info.samplers.map((s) => ({ value: s.name, label: s.label })), info.defaults.sampler);
  $("steps").max = info.limits.steps;
  $("batch").max = info.limits.images;
  applyModelGeometry(true);
  $("status").textContent = `chorus ${info.version} · model ${info.current_model} · queue ${info.pending}/${info.queue_size}`;
  $("auth").hidden = !info.auth || !!state.key;
}

function readFileAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const fr = new FileReader();
    fr.onload = () => resolve(fr.result);
    fr.onerror = () => reject(fr.error);
    fr.readAsDataURL(file);
  });
}

async function requestBody() {
  const body = {
    source: "page",
    prompt: $("prompt").value,
    negative: $("negative").value,
    model: $("model").value,
    sampler: $("sampler").value,
    steps: parseInt($("steps").value, 10),
    guidance: parseFloat($("guidance").value),
    width: parseInt($("width").value, 10),
    height: parseInt($("height").value, 10),
    n: parseInt($("batch").value, 10),
    seed: $("seed-random").checked ? -1 : parseInt($("seed").value, 10),
  };
  if ($("controlnet").value.trim()) {
    const cfile = $("control-image").files[0];
    if (!cfile) throw new Error("A ControlNet needs its condition image: choose a file.");
    body.controlnet = $("controlnet").value.trim();
    body.control_image = await readFileAsDataURL(cfile);
    body.control_scale = parseFloat($("control-scale").value);
  }
  if (mode() === "img2img") {
    const file = $("init-image").files[0];
    if (!file) throw new Error("img2img needs an init image: choose a file.");
    body.init_image = await readFileAsDataURL(file);
    body.strength = parseFloat($("strength").value);
    body.edit_method = $("edit-method").value;
    if (body.edit_method === "pnp") {
      body.tau_f = parseFloat($("tau-f").value);
      body.tau_attn = parseFloat($("tau-attn").value);
    }
  }
  return body;
}

// --- jobs -------------------------------------------------------------------------------------
function progressText(j) {
  const unfinished = j.state === "queued" || j.state === "running";
  if (unfinished && j.loading) return `loading model ${j.loading}…`;
  if (j.state === "queued") return j.position > 1 ? `queued (${j.position - 1} ahead)` : "queued";
  if (j.state === "running") {
    const img = j.images > 1 ? ` · image ${j.image + 1}/${j.images}` : "";
    const eta = j.eta != null ? ` · eta ${j.eta.toFixed(1)} s` : "";
    return `step ${j.step}/${j.steps}${img} · ${Math.round(j.progress * 100)}%${eta}`;
  }
  if (j.state === "done") return `done: ${j.results.length} image(s)`;
  if (j.state === "interrupted") return `interrupted (${j.results.length} image(s) kept)`;
  if (j.state === "error") return "error";
  return j.state;
}

function showProgress(j) {
  // the page shows the oldest unfinished job (the one running, or next); finished ones report once
  const head = state.jobs[0];
  if (head && head.id !== j.id && j.state !== "done" && j.state !== "error" && j.state !== "interrupted") return;
  $("progress-bar").value = j.progress || 0;
  $("progress-text").textContent = progressText(j);
}

function finishJob(j) {
  state.jobs = state.jobs.filter((x) => x.id !== j.id);
  $("interrupt").disabled = state.jobs.length === 0;
}

function showResult(src, infotext, seed) {
  $("result").src = src;
  $("infotext").textContent = infotext || "";
  if (seed !== undefined && seed !== null) state.lastSeed = seed;
}

function addToGallery(entry, src) {
  const key = entry.job + "/" + entry.index;
  if (state.seen.has(key)) return;
  state.seen.add(key);
  const img = document.createElement("img");
  img.src = src;
  img.alt = entry.settings ? entry.settings.prompt : "";
  img.title = entry.infotext || "";
  img.dataset.job = entry.job;
  img.dataset.index = entry.index;
  img.addEventListener("click", () => showResult(img.src, entry.infotext, entry.seed));
  $("gallery").prepend(img);
}

function onJobEvent(event, j) {
  if (j.preview_data) $("preview").src = j.preview_data;
  showProgress(j);
  if (event === "progress") return false;
  if (event === "done" || event === "interrupted") {
    (j.images_data || []).forEach((src, i) => addToGallery(j.results[i], src));
    if (j.images_data && j.images_data.length) {
      const last = j.results.length - 1;
      showResult(j.images_data[last], j.results[last].infotext, j.results[0].seed);
    }
  }
  if (event === "error") showError(j.error || "the job failed");
  finishJob(j);
  if (state.jobs.length) showProgress(state.jobs[0]);
  return true;
}

async function pollJob(id) {
  for (;;) {
    const j = await api(`/api/jobs/${id}`);
    if (["done", "error", "interrupted"].includes(j.state)) {
      j.images_data = await Promise.all(j.results.map((r) => imageSrc(r.url)));
      onJobEvent(j.state, j);
      return;
    }
    showProgress(j);
    await new Promise((r) => setTimeout(r, 500));
  }
}

async function watch(job) {
  try {
    await streamEvents(`/api/jobs/${job.id}/events`, onJobEvent);
  } catch (e) {
    await pollJob(job.id);
  }
}

async function generate(ev) {
  if (ev) ev.preventDefault();
  showError("");
  try {
    const body = await requestBody();
    const job = await api("/api/jobs", { method: "POST", body });
    state.jobs.push(job);
    $("interrupt").disabled = false;
    showProgress(job);
    watch(job).catch((e) => showError(e.message));
  } catch (e) {
    showError(e.message);
  }
}

async function interrupt() {
  const head = state.jobs[0];
  if (!head) return;
  try {
    await api(`/api/jobs/${head.id}/interrupt`, { method: "POST" });
  } catch (e) {
    showError(e.message);
  }
}

async function loadGallery() {
  const g = await api("/api/gallery");
  for (const entry of g.images) addToGallery(entry, await imageSrc(entry.url));
}

// --- PNG info (drop a PNG to read its settings) ----------------------------------------------
function setIf(id, value) { if (value !== undefined && value !== null && value !== "") $(id).value = value; }

function fillForm(s) {
  if (s.prompt !== undefined) $("prompt").value = s.prompt;
  if (s.negative !== undefined) $("negative").value = s.negative;
  if (s.model && state.info.models.some((m) => m.name === s.model)) { $("model").value = s.model; applyModelGeometry(false); }
  if (s.sampler && [...$("sampler").options].some((o) => o.value === s.sampler)) $("sampler").value = s.sampler;
  setIf("steps", s.steps);
  setIf("guidance", s.guidance);
  setIf("width", s.width);
  setIf("height", s.height);
  setIf("strength", s.strength);
  if (s.seed !== undefined && s.seed !== null) {
    $("seed").value = s.seed;
    $("seed-random").checked = false;
  }
}

async function readPng(file) {
  showError("");
  try {
    const image = await readFileAsDataURL(file);
    const r = await api("/sdapi/v1/png-info", { method: "POST", body: { image } });
    const info = $("drop-info");
    info.hidden = false;
    if (!r.source) {
      info.textContent = `${file.name}: no generation settings found in this image.`;
      return;
    }
    fillForm(r.settings || {});
    const extra = r.unmapped && r.unmapped.length ? `\n(not used: ${r.unmapped.join(", ")})` : "";
    info.textContent = `${file.name} (${r.source}):\n${r.info}${extra}`;
  } catch (e) {
    showError(e.message);
  }
}

function dropTarget(el) {
  el.addEventListener("dragover", (e) => { e.preventDefault(); $("drop").classList.add("over"); });
  el.addEventListener("dragleave", () => $("drop").classList.remove("over"));
  el.addEventListener("drop", (e) => {
    const file = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
    if (!file) return;
    e.preventDefault();
    $("drop").classList.remove("over");
    readPng(file);
  });
}

// --- wiring -----------------------------------------------------------------------------------
function wire() {
  $("form").addEventListener("submit", generate);
  $("interrupt").addEventListener("click", interrupt);
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(e); });
  $("model").addEventListener("change", () => applyModelGeometry(false));
  $("seed-random").addEventListener("change", () => { if ($("seed-random").checked) $("seed").value = -1; });
  $("seed").addEventListener("input", () => { $("seed-random").checked = parseInt($("seed").value, 10) === -1; });
  $("seed-reuse").addEventListener("click", () => {
    if (state.lastSeed === null) { showError("No image yet: generate one first."); return; }
    $("seed").value = state.lastSeed;
    $("seed-random").checked = false;
  });
  for (const r of document.querySelectorAll("input[name=mode]")) {
    r.addEventListener("change", () => { $("img2img-panel").hidden = mode() !== "img2img"; });
  }
  $("init-image").addEventListener("change", async () => {
    const f = $("init-image").files[0];
    const img = $("init-preview");
    if (!f) { img.hidden = true; return; }
    img.src = await readFileAsDataURL(f);
    img.hidden = false;
  });
  $("drop-file").addEventListener("change", () => { const f = $("drop-file").files[0]; if (f) readPng(f); });
  dropTarget($("drop"));
  dropTarget($("prompt"));
  $("auth").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = $("api-key").value.trim();
    localStorage.setItem("chorus-api-key", state.key);
    start();
  });
}

async function start() {
  try {
    await loadInfo();
    await loadGallery();
    document.body.dataset.ready = "1";
  } catch (e) {
    $("status").textContent = "not connected";
    showError(e.message);
  }
}

document.addEventListener("DOMContentLoaded", () => { wire(); start(); });
