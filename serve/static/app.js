// Stepwise's web page: plain JS, no build step. It speaks the server's API:
//   GET  stepwise/v1/models          the models and their step policies
//   POST sdapi/v1/txt2img | img2img  AUTOMATIC1111's shapes, plus "model"
//   GET  sdapi/v1/progress           polled while a request runs
//   POST sdapi/v1/interrupt
// URLs are relative so the page also works behind a path prefix.
"use strict";

const POLL_MS = 300;
const $ = (id) => document.getElementById(id);

let models = [];
let initImage = null; // base64 PNG/JPEG of the chosen input image, without the data: prefix
let running = false;

function fmt(x, digits = 1) {
  return Number(x).toFixed(digits).replace(/\.0+$/, "");
}

function currentModel() {
  return models.find((m) => m.id === $("model").value) || null;
}

function range(lo, hi) {
  return lo === hi ? `${lo}` : `${lo}\u2013${hi}`;
}

// ---- the form ------------------------------------------------------------

function applyModel(m) {
  if (!m) return;
  $("steps").value = m.default_steps;
  const [lo, hi] = m.recommended_steps || [m.default_steps, m.default_steps];
  // each on its own line, so a narrow column never breaks a range at its dash
  $("steps-note").textContent =
    `recommended ${range(lo, hi)}, max useful ${m.max_useful_steps}\n` +
    `default ${m.default_steps}` +
    (m.min_steps ? `, min ${m.min_steps}` : "");
  $("steps").dataset.min = m.min_steps;
  $("steps").dataset.max = m.max_useful_steps;
  $("guidance").value = m.guidance;
  $("guidance-note").textContent = m.cfg
    ? `classifier-free guidance, default ${fmt(m.guidance)}`
    : "no CFG for this model (guidance 1 or less runs one pass)";
  $("negative-field").classList.toggle("muted", !m.cfg);
  $("width").value = m.width;
  $("height").value = m.height;
  for (const id of ["width", "height"]) {
    if (m.size_multiple) $(id).step = m.size_multiple;
    if (m.min_size) $(id).min = m.min_size;
    if (m.max_size) $(id).max = m.max_size;
  }
  const canImg2img = m.img2img !== false;
  $("init_image").disabled = !canImg2img;
  if (!canImg2img) clearImage();
  $("img2img-note").textContent = canImg2img ? "" : "this model has no image-to-image";
  $("model-note").textContent = modelNote(m);
  checkSteps();
}

function modelNote(m) {
  const parts = [m.family];
  if (m.kind) parts.push(m.kind);
  if (m.random_weights) parts.push("random weights (a test build)");
  if (m.step_s) parts.push(`about ${fmt(m.step_s, 2)} s a step here at ${m.width}\u00d7${m.height}`);
  if (m.loaded === false) parts.push("not loaded yet: the first request loads it");
  return parts.join(" \u00b7 ") + (m.reason ? ` \u2014 ${m.reason}` : "");
}

// A hint only: the server's step policy decides, and its refusal is shown as it says it.
function checkSteps() {
  const m = currentModel();
  const n = Number($("steps").value);
  const out = m && n && (n < m.min_steps || n > m.max_useful_steps);
  $("steps").classList.toggle("outside", Boolean(out));
}

async function loadModels() {
  let r;
  try {
    r = await fetch("stepwise/v1/models");
  } catch (e) {
    showError(`Cannot reach the server: ${e.message}`);
    return;
  }
  if (!r.ok) {
    showError(await errorText(r));
    return;
  }
  models = await r.json();
  const sel = $("model");
  sel.replaceChildren();
  for (const m of models) {
    const o = document.createElement("option");
    o.value = m.id;
    o.textContent = optionText(m);
    sel.appendChild(o);
  }
  const loaded = models.find((m) => m.loaded);
  if (loaded) sel.value = loaded.id;
  applyModel(currentModel());
  sel.dataset.ready = "1";
}

function optionText(m) {
  return `${m.name} (${m.id})` + (m.loaded === false ? " \u2014 not loaded" : "");
}

// After a request: the models' loaded state and step times, without touching the form's values.
async function refreshModels() {
  try {
    const r = await fetch("stepwise/v1/models", { cache: "no-store" });
    if (!r.ok) return;
    const fresh = await r.json();
    for (const o of $("model").options) {
      const m = fresh.find((x) => x.id === o.value);
      if (m) o.textContent = optionText(m);
    }
    models = fresh;
    const m = currentModel();
    if (m) $("model-note").textContent = modelNote(m);
  } catch (_) {
    // the list stays as it was
  }
}

function readImage(file) {
  return new Promise((resolve, reject) => {
    const fr = new FileReader();
    fr.onload = () => resolve(fr.result);
    fr.onerror = () => reject(fr.error);
    fr.readAsDataURL(file);
  });
}

async function onImageChosen() {
  const f = $("init_image").files[0];
  if (!f) return clearImage();
  const url = await readImage(f);
  initImage = url.slice(url.indexOf(",") + 1);
  $("init-preview").src = url;
  $("init-preview").hidden = false;
  $("clear-image").hidden = false;
  $("strength").disabled = false;
}

function clearImage() {
  initImage = null;
  $("init_image").value = "";
  $("init-preview").hidden = true;
  $("init-preview").removeAttribute("src");
  $("clear-image").hidden = true;
  $("strength").disabled = true;
}

function requestBody() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    steps: parseInt($("steps").value, 10),
    cfg_scale: parseFloat($("guidance").value),
    width: parseInt($("width").value, 10),
    height: parseInt($("height").value, 10),
    seed: parseInt($("seed").value, 10),
    model: $("model").value,
  };
  if (Number.isNaN(body.seed)) body.seed = -1;
  if (initImage) {
    body.init_images = [initImage];
    body.denoising_strength = parseFloat($("strength").value);
  }
  return body;
}

// ---- errors ----------------------------------------------------------------

async function errorText(r) {
  let text = "";
  try {
    text = await r.text();
    const j = JSON.parse(text);
    if (typeof j.detail === "string") return j.detail;
    // FastAPI's validation errors: a list of {loc, msg}
    if (Array.isArray(j.detail)) {
      return j.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
    }
    if (j.error || j.message) return j.error?.message || j.message || String(j.error);
  } catch (_) {
    // not JSON: fall through to the raw text
  }
  return `HTTP ${r.status} ${r.statusText}${text ? `: ${text.slice(0, 300)}` : ""}`;
}

function showError(msg) {
  const e = $("error");
  e.textContent = msg;
  e.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// ---- progress --------------------------------------------------------------

function setProgress(p) {
  const st = p.state || {};
  const frac = Math.max(0, Math.min(1, Number(p.progress) || 0));
  $("progress").value = frac;
  $("progress").setAttribute("aria-valuetext", `${Math.round(frac * 100)}%`);
  if (st.sampling_steps) {
    $("progress-text").textContent = `step ${st.sampling_step} / ${st.sampling_steps}`;
  } else if (p.textinfo) {
    $("progress-text").textContent = p.textinfo;
  }
  $("eta").textContent = p.eta_relative > 0 ? `\u2248 ${fmt(p.eta_relative)} s left` : "";
  if (p.current_image) {
    $("preview").src = `data:image/png;base64,${p.current_image}`;
    $("preview").hidden = false;
  }
}

async function poll() {
  while (running) {
    const t0 = performance.now();
    try {
      const r = await fetch("sdapi/v1/progress", { cache: "no-store" });
      if (r.ok && running) setProgress(await r.json());
    } catch (_) {
      // a missed poll is not an error; the request itself reports failures
    }
    const wait = POLL_MS - (performance.now() - t0);
    if (wait > 0) await new Promise((res) => setTimeout(res, wait));
  }
}

function setRunning(on) {
  running = on;
  $("generate").disabled = on;
  $("interrupt").hidden = !on;
  $("running").hidden = !on;
  document.body.classList.toggle("busy", on);
  if (on) {
    $("progress").value = 0;
    $("progress-text").textContent = "starting\u2026";
    $("eta").textContent = "";
    $("preview").hidden = true;
    $("preview").removeAttribute("src");
  }
}

// ---- the result ------------------------------------------------------------

function parseInfo(info) {
  if (!info) return {};
  if (typeof info === "object") return info;
  try {
    return JSON.parse(info);
  } catch (_) {
    return {};
  }
}

// A step's cost: its denoiser pass plus the scheduler's update (engine/profile.py's rows).
function stepMs(s) {
  if (typeof s.denoiser_ms === "number") return s.denoiser_ms + (Number(s.scheduler_ms) || 0);
  for (const k of ["ms", "step_ms", "total_ms"]) {
    if (typeof s[k] === "number") return s[k];
  }
  return 0;
}

const SVG = "http://www.w3.org/2000/svg";

function svgEl(name, attrs, text) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

// One bar per step, the step's denoiser time; hover a bar for its numbers.
function profileChart(steps) {
  const W = 360;
  const H = 120;
  const left = 44;
  const bottom = 18;
  const top = 8;
  const ms = steps.map(stepMs);
  const max = Math.max(...ms, 1);
  const slot = (W - left - 4) / steps.length;
  const bw = Math.max(1, slot * 0.8);
  const svg = svgEl("svg", {
    viewBox: `0 0 ${W} ${H}`,
    width: W,
    height: H,
    role: "img",
    "aria-label": `denoiser time per step, ${steps.length} steps, longest ${fmt(max, 0)} ms`,
  });
  svg.appendChild(svgEl("line", { x1: left, y1: top, x2: left, y2: H - bottom, class: "axis" }));
  svg.appendChild(svgEl("line", { x1: left, y1: H - bottom, x2: W, y2: H - bottom, class: "axis" }));
  svg.appendChild(svgEl("text", { x: left - 4, y: top + 8, "text-anchor": "end", class: "label" }, `${fmt(max, 0)} ms`));
  svg.appendChild(svgEl("text", { x: left - 4, y: H - bottom, "text-anchor": "end", class: "label" }, "0"));
  steps.forEach((s, i) => {
    const h = ((H - bottom - top) * ms[i]) / max;
    const x = left + 2 + i * slot + (slot - bw) / 2;
    const bar = svgEl("rect", {
      x: fmt(x, 2),
      y: fmt(H - bottom - h, 2),
      width: fmt(bw, 2),
      height: fmt(h, 2),
      class: "bar",
      "data-ms": ms[i],
    });
    const idx = s.index ?? i;
    const extra = Object.entries(s)
      .filter(([k, v]) => k !== "index" && typeof v === "number")
      .map(([k, v]) => `, ${k.replace(/_/g, " ")} ${fmt(v, 3)}`)
      .join("");
    bar.appendChild(svgEl("title", {}, `step ${idx}: ${fmt(ms[i])} ms${extra}`));
    svg.appendChild(bar);
  });
  const first = steps[0].index ?? 0;
  const last = steps[steps.length - 1].index ?? steps.length - 1;
  svg.appendChild(svgEl("text", { x: left + 2, y: H - 4, class: "label" }, `step ${first}`));
  if (steps.length > 1) {
    svg.appendChild(svgEl("text", { x: W - 2, y: H - 4, "text-anchor": "end", class: "label" }, `step ${last}`));
  }
  return svg;
}

function addParam(dl, k, v) {
  if (v === undefined || v === null || v === "" || typeof v === "object") return;
  dl.appendChild(Object.assign(document.createElement("dt"), { textContent: k }));
  dl.appendChild(Object.assign(document.createElement("dd"), { textContent: String(v) }));
}

function showResult(res, sent) {
  const info = parseInfo(res.info);
  const png = (res.images || [])[0];
  if (!png) {
    showError("The server answered without an image.");
    return;
  }
  const url = png.startsWith("data:") ? png : `data:image/png;base64,${png}`;
  $("result-image").src = url;
  $("download").href = url;

  const p = Object.assign({}, sent, res.parameters || {});
  delete p.init_images;
  const dl = $("params");
  dl.replaceChildren();
  addParam(dl, "model", info.model || info.sd_model_name || p.model);
  addParam(dl, "prompt", p.prompt);
  addParam(dl, "negative prompt", p.negative_prompt);
  addParam(dl, "steps", p.steps);
  addParam(dl, "guidance", p.cfg_scale);
  addParam(dl, "size", `${info.width || p.width}\u00d7${info.height || p.height}`);
  addParam(dl, "seed", info.seed ?? p.seed);
  if (sent.init_images) addParam(dl, "strength", p.denoising_strength);
  addParam(dl, "sampler", info.sampler_name || p.sampler_name);
  const infotext = (info.infotexts || [])[0] || "";
  $("infotext").textContent = infotext;
  $("infotext").hidden = !infotext;

  // the server's info has one profile per image ("profiles"); a single "profile" is read as well
  const prof = info.profile || (info.profiles || [])[0] || {};
  const steps = Array.isArray(prof) ? prof : prof.steps || [];
  const box = $("profile");
  box.replaceChildren();
  if (steps.length) {
    box.appendChild(profileChart(steps));
    const ms = steps.map(stepMs);
    const total = ms.reduce((a, b) => a + b, 0);
    const skip = new Set(["mean_step_ms", "median_step_ms"]);
    const totals = Object.entries(Array.isArray(prof) ? {} : prof)
      .filter(([k, v]) => typeof v === "number" && v > 0 && k.endsWith("_ms") && !skip.has(k))
      .map(([k, v]) => `${k.replace(/_ms$/, "").replace(/_/g, " ")} ${fmt(v, 0)} ms`);
    if (prof.peak_rss_mb) totals.push(`peak memory ${fmt(prof.peak_rss_mb, 0)} MB`);
    $("profile-summary").textContent =
      `${steps.length} steps, ${fmt(total, 0)} ms denoising (${fmt(total / steps.length, 0)} ms a step)` +
      (totals.length ? `; ${totals.join(", ")}` : "");
  } else {
    $("profile-summary").textContent = "no per-step profile in the answer";
  }
  const sw = info.stepwise || {};
  const notes = [];
  if (sw.interrupted) notes.push("interrupted: the image is what the steps so far made");
  if (sw.steps_run && sw.steps_run !== p.steps) notes.push(`${sw.steps_run} steps run`);
  for (const w of sw.warnings || []) notes.push(w);
  // the policy's word on the step count: amber when it warned ("warn"), plain when in range ("ok")
  const warned = notes.length > 0 || (sw.verdict && sw.verdict !== "ok");
  if (sw.advice && !notes.includes(sw.advice)) notes.push(sw.advice);
  $("result-notes").textContent = notes.join("\n");
  $("result-notes").hidden = !notes.length;
  $("result-notes").classList.toggle("warn", Boolean(warned));
  $("result").hidden = false;
}

// ---- submit ------------------------------------------------------------------

async function generate(ev) {
  ev.preventDefault();
  if (running) return;
  clearError();
  const body = requestBody();
  const endpoint = body.init_images ? "sdapi/v1/img2img" : "sdapi/v1/txt2img";
  setRunning(true);
  const polling = poll();
  try {
    const r = await fetch(endpoint, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!r.ok) {
      showError(await errorText(r));
    } else {
      showResult(await r.json(), body);
    }
  } catch (e) {
    showError(`The request failed: ${e.message}`);
  } finally {
    setRunning(false);
    await polling;
    refreshModels();
  }
}

async function interrupt() {
  try {
    await fetch("sdapi/v1/interrupt", { method: "POST" });
    $("progress-text").textContent = "interrupting\u2026";
  } catch (_) {
    // the request's own answer tells what happened
  }
}

$("form").addEventListener("submit", generate);
$("model").addEventListener("change", () => applyModel(currentModel()));
$("steps").addEventListener("input", checkSteps);
$("init_image").addEventListener("change", onImageChosen);
$("clear-image").addEventListener("click", clearImage);
$("interrupt").addEventListener("click", interrupt);
loadModels();
