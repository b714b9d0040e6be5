// The search page: plain JS against the app's own API (/properties, /items, /items/{id}/image,
// /search). The page state lives in the URL query string, so a link reproduces a search.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { item: null, upload: null, conditions: {}, method: "teacher", lambda: null, beta: null, k: 8,
                compare: false, method2: "student", lambda2: 0 };
let properties = {};
let galleryOffset = 0;
const PAGE = 16;
let searchCount = 0;

async function fetchJSON(url, options = {}) {
  const ctrl = new AbortController();
  const timer = setTimeout(() => ctrl.abort(), 30000);  // never hang on a failed request
  try {
    const r = await fetch(url, { ...options, signal: ctrl.signal });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.error || `${r.status} ${r.statusText}`);
    return body;
  } catch (err) {
    if (err.name === "AbortError") throw new Error("the server did not answer within 30 s");
    throw err;
  } finally {
    clearTimeout(timer);
  }
}

function showError(message) {
  const box = $("error");
  box.textContent = message ? `Error: ${message}` : "";
  box.hidden = !message;
}

function fromURL() {
  const q = new URLSearchParams(location.search);
  state.item = q.get("item");
  state.method = q.get("method") || state.method;
  state.k = parseInt(q.get("k") || state.k, 10);
  state.lambda = q.has("lambda") ? parseFloat(q.get("lambda")) : null;
  state.beta = q.has("beta") ? parseFloat(q.get("beta")) : null;
  state.compare = q.has("compare");
  if (state.compare) {
    const [m2, l2] = q.get("compare").split(":");
    state.method2 = m2 || "student";
    state.lambda2 = l2 ? parseFloat(l2) : 0;
  }
  state.conditions = {};
  for (const [key, value] of q.entries()) {
    if (!["item", "method", "k", "lambda", "beta", "compare"].includes(key)) state.conditions[key] = value;
  }
}

function toURL() {
  const q = new URLSearchParams();
  if (state.item) q.set("item", state.item);
  for (const [p, v] of Object.entries(state.conditions)) if (v) q.set(p, v);
  q.set("method", state.method);
  if (state.method === "teacher" && state.lambda !== null) q.set("lambda", String(state.lambda));
  if (state.method === "soft_filtered_knn" && state.beta !== null) q.set("beta", String(state.beta));
  q.set("k", String(state.k));
  if (state.compare) q.set("compare", `${state.method2}:${state.lambda2}`);
  history.replaceState(null, "", `${location.pathname}?${q}`);
}

function option(value, text, selected) {
  const o = document.createElement("option");
  o.value = value; o.textContent = text; o.selected = !!selected;
  return o;
}

function buildConditions() {
  const box = $("conditions");
  box.textContent = "";
  for (const [prop, labels] of Object.entries(properties)) {
    const row = document.createElement("div");
    row.className = "row";
    const label = document.createElement("label");
    label.htmlFor = `cond-${prop}`; label.textContent = prop;
    const select = document.createElement("select");
    select.id = `cond-${prop}`; select.dataset.prop = prop;
    select.append(option("", "none", !state.conditions[prop]));
    const current = state.conditions[prop];
    if (current && !labels.includes(current)) select.append(option(current, `${current} (unknown)`, true));
    for (const l of labels) select.append(option(l, l, l === current));
    select.addEventListener("change", () => {
      if (select.value) state.conditions[prop] = select.value; else delete state.conditions[prop];
      toURL(); search();
    });
    row.append(label, select);
    box.append(row);
  }
  const fp = $("filter-prop");
  for (const prop of Object.keys(properties)) fp.append(option(prop, prop));
}

function setLambdaControl() {
  const slider = $("lambda");
  if (state.lambda !== null && state.lambda > 0) slider.value = Math.log10(state.lambda);
  if (state.lambda === 0) slider.value = slider.min;
  $("lambda-value").textContent = state.lambda === null ? "(server default)" : `= ${state.lambda}`;
  slider.disabled = state.method !== "teacher";
}

function syncControls() {
  $("method").value = state.method;
  $("k").value = state.k;
  $("compare").checked = state.compare;
  $("method2").value = state.method2;
  $("lambda2").value = state.lambda2;
  if (state.beta !== null) $("beta").value = state.beta;
  $("beta").disabled = state.method !== "soft_filtered_knn";
  setLambdaControl();
}

function thumb(id, size) {
  return `/items/${encodeURIComponent(id)}/image?size=${size}`;
}

function labelText(labels) {
  return Object.entries(labels).map(([p, v]) => `${p}: ${v}`).join(", ");
}

async function showQuery() {
  const view = $("query-view");
  view.textContent = "";
  const img = document.createElement("img");
  const caption = document.createElement("p");
  if (state.upload) {
    img.src = URL.createObjectURL(state.upload);
    img.alt = `uploaded image ${state.upload.name}`;
    caption.textContent = `uploaded: ${state.upload.name}`;
  } else if (state.item) {
    img.src = thumb(state.item, 256);
    img.alt = `query item ${state.item}`;
    caption.textContent = state.item;
  } else {
    caption.textContent = "No query yet.";
    view.append(caption);
    return;
  }
  view.append(img, caption);
}

async function loadGallery() {
  const q = new URLSearchParams({ offset: galleryOffset, limit: PAGE });
  const prop = $("filter-prop").value, label = $("filter-label").value;
  if (prop && label) q.set(prop, label);
  try {
    const page = await fetchJSON(`/items?${q}`);
    const box = $("gallery");
    box.textContent = "";
    for (const it of page.items) {
      const b = document.createElement("button");
      b.type = "button"; b.setAttribute("role", "listitem");
      b.setAttribute("aria-pressed", String(it.id === state.item));
      b.title = `${it.id} (${labelText(it.labels)})`;
      const img = document.createElement("img");
      img.src = thumb(it.id, 128); img.alt = `${it.id}: ${labelText(it.labels)}`; img.loading = "lazy";
      b.append(img);
      b.addEventListener("click", () => { state.item = it.id; state.upload = null; toURL(); showQuery(); search();
                                          loadGallery(); });
      box.append(b);
    }
    const last = Math.min(page.total, galleryOffset + PAGE);
    $("page-info").textContent = page.total ? `${galleryOffset + 1}–${last} of ${page.total}` : "no items";
    $("prev").disabled = galleryOffset === 0;
    $("next").disabled = last >= page.total;
  } catch (err) { showError(err.message); }
}

function request(method, lambda) {
  const conditions = { ...state.conditions };
  if (state.upload) {
    const form = new FormData();
    form.append("image", state.upload);
    form.append("conditions", JSON.stringify(conditions));
    form.append("method", method);
    form.append("k", String(state.k));
    if (method === "teacher" && lambda !== null) form.append("lambda", String(lambda));
    if (method === "soft_filtered_knn" && state.beta !== null) form.append("beta", String(state.beta));
    return { path: "/search", options: { method: "POST", body: form } };
  }
  const body = { item_id: state.item, conditions, method, k: state.k };
  if (method === "teacher" && lambda !== null) body.lambda = lambda;
  if (method === "soft_filtered_knn" && state.beta !== null) body.beta = state.beta;
  if (Object.keys(conditions).some((p) => RESERVED.has(p))) {  // a property named like a field: JSON body
    return { path: "/search", options: { method: "POST", headers: { "Content-Type": "application/json" },
                                         body: JSON.stringify(body) } };
  }
  // an item query as GET /search?…: the same answer, and through Serve one round trip fewer
  // (the replica does not fetch a request body from the HTTP proxy)
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(body)) if (key !== "conditions") params.append(key, String(value));
  for (const [p, label] of Object.entries(conditions)) params.append(p, label);
  return { path: "/search?" + params.toString(), options: { method: "GET" } };
}

const RESERVED = new Set(["item_id", "image", "conditions", "method", "k", "lambda", "beta"]);

function render(box, title, answer) {
  box.textContent = "";
  const h = document.createElement("h2");
  h.textContent = title;
  const meta = document.createElement("p");
  meta.className = "meta";
  const t = answer.timing_ms || {};
  const parts = [`${answer.items.length} results`];
  if (answer.iterations !== undefined) parts.push(`${answer.iterations} iterations, λ = ${answer.lambda}`);
  if (answer.beta !== undefined) parts.push(`β = ${answer.beta}`);
  parts.push("server ms: " + Object.entries(t).map(([k, v]) => `${k} ${v.toFixed(1)}`).join(", "));
  meta.textContent = parts.join(" · ");
  const grid = document.createElement("div");
  grid.className = "grid";
  answer.items.forEach((it, rank) => {
    const ok = Object.entries(state.conditions).every(([p, v]) => it.labels[p] === v);
    const card = document.createElement("figure");
    card.className = "result" + (ok ? " ok" : "");
    card.dataset.ok = String(ok);
    card.dataset.id = it.id;
    const img = document.createElement("img");
    img.src = thumb(it.id, 256);
    img.alt = `${rank + 1}. ${it.id}: ${labelText(it.labels)}`;
    const cap = document.createElement("figcaption");
    const mark = document.createElement("span");
    mark.className = "mark";
    mark.textContent = ok ? "✓ satisfies" : "✗ misses";
    mark.setAttribute("aria-label", ok ? "satisfies every condition" : "does not satisfy every condition");
    const score = document.createElement("small");
    score.textContent = `${rank + 1}. score ${it.score.toFixed(3)}`;
    const labels = document.createElement("small");
    labels.textContent = labelText(it.labels);
    cap.append(mark, score, labels);
    card.append(img, cap);
    grid.append(card);
  });
  box.append(h, meta, grid);
}

async function search() {
  if (!state.item && !state.upload) return;
  const n = ++searchCount;
  const area = $("results-area");
  area.setAttribute("aria-busy", "true");
  showError("");
  const jobs = [[state.method, state.lambda]];
  if (state.compare) jobs.push([state.method2, state.lambda2]);
  try {
    const answers = await Promise.all(jobs.map(([m, l]) => { const r = request(m, l);
                                                             return fetchJSON(r.path, r.options); }));
    if (n !== searchCount) return;  // a newer search has started
    render($("results-a"), describe(...jobs[0]), answers[0]);
    $("results-b").hidden = !state.compare;
    if (state.compare) render($("results-b"), describe(...jobs[1]), answers[1]);
    area.dataset.searches = String(n);
  } catch (err) {
    if (n === searchCount) showError(err.message);
  } finally {
    if (n === searchCount) area.setAttribute("aria-busy", "false");
  }
}

function describe(method, lambda) {
  if (method === "teacher") return `teacher (λ = ${lambda === null ? "default" : lambda})`;
  return method.replace(/_/g, " ");
}

function useUpload(file) {
  if (!file) return;
  state.upload = file; state.item = null;
  toURL(); showQuery(); search();
}

async function init() {
  fromURL();
  try { properties = await fetchJSON("/properties"); } catch (err) { showError(err.message); return; }
  buildConditions();
  syncControls();
  $("method").addEventListener("change", (e) => { state.method = e.target.value; syncControls(); toURL(); search(); });
  $("beta").addEventListener("change", (e) => { const v = parseFloat(e.target.value);
                                                 state.beta = Number.isFinite(v) && v >= 0 ? v : null;
                                                 toURL(); search(); });
  $("lambda").addEventListener("input", (e) => { $("lambda-value").textContent = `= ${(10 ** e.target.value).toPrecision(2)}`; });
  $("lambda").addEventListener("change", (e) => { state.lambda = Number((10 ** e.target.value).toPrecision(3));
                                                   setLambdaControl(); toURL(); search(); });
  $("k").addEventListener("change", (e) => { state.k = Math.max(1, Math.min(100, parseInt(e.target.value, 10) || 8));
                                             toURL(); search(); });
  $("compare").addEventListener("change", (e) => { state.compare = e.target.checked; toURL(); search(); });
  $("method2").addEventListener("change", (e) => { state.method2 = e.target.value; toURL(); if (state.compare) search(); });
  $("lambda2").addEventListener("change", (e) => { state.lambda2 = parseFloat(e.target.value) || 0; toURL();
                                                   if (state.compare) search(); });
  $("go").addEventListener("click", search);
  $("upload").addEventListener("change", (e) => useUpload(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over");
                                         useUpload(e.dataTransfer.files[0]); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("upload").click(); });
  $("filter-prop").addEventListener("change", (e) => {
    const fl = $("filter-label");
    fl.textContent = "";
    fl.append(option("", "any"));
    for (const l of properties[e.target.value] || []) fl.append(option(l, l));
    fl.disabled = !e.target.value;
    galleryOffset = 0; loadGallery();
  });
  $("filter-label").addEventListener("change", () => { galleryOffset = 0; loadGallery(); });
  $("prev").addEventListener("click", () => { galleryOffset = Math.max(0, galleryOffset - PAGE); loadGallery(); });
  $("next").addEventListener("click", () => { galleryOffset += PAGE; loadGallery(); });
  showQuery();
  loadGallery();
  if (state.item) search();  // a deep link shows its results without a click
}

document.addEventListener("DOMContentLoaded", init);
