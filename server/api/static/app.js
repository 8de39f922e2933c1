// The emo-serve playground: streams a completion over the same /v1/completions SSE that clients
// use (with return_expert_pool) and polls /v1/expert_cache to draw which experts sit where.
// Plain JS, no build step, nothing fetched from outside the server.
"use strict";

const POLL_STREAMING_MS = 250; // while a request runs, paging is what there is to see
const POLL_IDLE_MS = 2000; // other clients may be paging too
const KEY_STORAGE = "emo-serve-api-key"; // sessionStorage: the key lives as long as the tab

const $ = (id) => document.getElementById(id);
const ui = {
  prompt: $("prompt"), model: $("model"), poolSize: $("pool-size"), maxTokens: $("max-tokens"),
  send: $("send"), status: $("status"), output: $("output"), hitRate: $("hit-rate"),
  map: $("pool-map"), summary: $("cache-summary"), version: $("version"),
  keyDialog: $("key-dialog"), keyForm: $("key-form"), keyInput: $("api-key"), keyError: $("key-error"),
};

let apiKey = sessionStorage.getItem(KEY_STORAGE);
let keyPrompt = null; // the pending askForKey() promise, shared by every request that got a 401
let keyAnswered = null; // resolves keyPrompt
let streaming = null; // AbortController of the running completion
let layout = ""; // layers and expert ids the map was built for
let cells = new Map(); // "layer:expert" -> cell element
let pool = null; // the last request's pool: experts[layer] = ids
let lastSnapshot = null;
let pollTimer = 0;

// ---- HTTP with the API key --------------------------------------------------------------
function askForKey(message) {
  if (!keyPrompt) {
    keyPrompt = new Promise((resolve) => { keyAnswered = resolve; });
    ui.keyError.textContent = message;
    ui.keyInput.value = "";
    ui.keyDialog.showModal();
    ui.keyInput.focus();
  }
  return keyPrompt;
}

// fetch() of a path relative to the page, with the key once one is known; on 401 asks for a
// (new) key and tries again.
async function api(path, init = {}) {
  for (;;) {
    const headers = new Headers(init.headers || {});
    if (apiKey) headers.set("Authorization", `Bearer ${apiKey}`);
    const sentKey = apiKey;
    const response = await fetch(path, { ...init, headers });
    if (response.status !== 401) return response;
    if (keyPrompt) { await keyPrompt; continue; }
    if (sentKey !== apiKey) continue; // another request already got a new key
    await askForKey(sentKey ? "The server refused that key; try again." : "");
  }
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON: fall through */ }
  return `HTTP ${response.status} ${response.statusText}`;
}

function setStatus(text, isError = false) {
  ui.status.textContent = text;
  ui.status.classList.toggle("error", isError);
}

// ---- models ------------------------------------------------------------------------------
async function loadModels() {
  const response = await api("v1/models");
  if (!response.ok) { setStatus(await errorMessage(response), true); return; }
  const chosen = ui.model.value;
  ui.model.replaceChildren(...(await response.json()).data.map((card) => {
    const option = new Option(card.id, card.id);
    if (card.parent) option.dataset.parent = card.parent; // a named pool ("<served>:<name>")
    return option;
  }));
  if ([...ui.model.options].some((o) => o.value === chosen)) ui.model.value = chosen;
  syncPoolSize();
}

// A named pool fixes its experts, and so their number: a pool size would be refused.
function syncPoolSize() {
  const named = Boolean(ui.model.selectedOptions[0]?.dataset.parent);
  ui.poolSize.disabled = named;
  ui.poolSize.title = named ? "A named pool fixes its own size" : "";
}

async function loadVersion() {
  const response = await fetch("version");
  if (response.ok) ui.version.textContent = `v${(await response.json()).version}`;
}

// ---- the expert map ----------------------------------------------------------------------
function buildMap(layers) {
  const widest = Math.max(1, ...layers.map((l) => l.experts.length));
  cells = new Map();
  const rows = layers.map((l) => {
    const row = document.createElement("div");
    row.className = "row";
    row.style.setProperty("--experts", widest);
    const label = document.createElement("span");
    label.className = "layer";
    label.textContent = `L${l.layer}`;
    row.append(label);
    for (const expert of l.experts) {
      const cell = document.createElement("span");
      cell.className = "cell";
      cell.dataset.layer = l.layer;
      cell.dataset.expert = expert;
      cell.dataset.state = "absent";
      cells.set(`${l.layer}:${expert}`, cell);
      row.append(cell);
    }
    return row;
  });
  ui.map.replaceChildren(...rows);
  ui.map.classList.toggle("dense", widest > 64); // e.g. 128 experts: 1px gaps leave room for cells
  ui.map.setAttribute("aria-label",
    `Expert residency: ${layers.length} MoE layers by up to ${widest} routable experts`);
}

function cellState(inSet, layer, expert) {
  const key = `${layer}:${expert}`;
  if (inSet.loading.has(key)) return "loading";
  if (inSet.pinned.has(key)) return "pinned";
  if (inSet.resident.has(key)) return "resident";
  if (inSet.host.has(key)) return "host";
  return "absent";
}

function drawSnapshot(snap) {
  lastSnapshot = snap;
  const signature = snap.layers.map((l) => `${l.layer}:${l.experts.join(",")}`).join(";");
  if (signature !== layout) {
    buildMap(snap.layers);
    layout = signature;
    markPool(pool);
  }
  const inSet = { loading: new Set(), pinned: new Set(), resident: new Set(), host: new Set() };
  const slabs = new Map();
  for (const l of snap.layers) {
    for (const e of l.device.loading) inSet.loading.add(`${l.layer}:${e}`);
    for (const e of l.device.pinned) inSet.pinned.add(`${l.layer}:${e}`);
    for (const e of l.device.resident) inSet.resident.add(`${l.layer}:${e}`);
    for (const e of l.host.resident) inSet.host.add(`${l.layer}:${e}`);
    slabs.set(l.slab, l);
  }
  for (const cell of cells.values()) {
    const { layer, expert } = cell.dataset;
    const state = cellState(inSet, layer, expert);
    if (cell.dataset.state !== state) {
      cell.dataset.state = state;
      cell.title = `layer ${layer}, expert ${expert}: ${state}`;
    }
  }
  const deviceSlots = [...slabs.values()].reduce((n, l) => n + l.device.capacity, 0);
  const hostSlots = [...slabs.values()].reduce((n, l) => n + l.host.capacity, 0);
  const total = snap.layers.reduce((n, l) => n + l.experts.length, 0);
  ui.summary.textContent =
    `Device: ${snap.device.resident} of ${deviceSlots} slots filled, ${snap.pinned_slots} pinned, ` +
    `${inSet.loading.size} loading. Host RAM: ${snap.host.resident} of ${hostSlots} slots. ` +
    `${total} pageable experts in all.`;
  showHitRate();
}

function markPool(experts) {
  pool = experts;
  for (const cell of cells.values()) {
    const ids = experts && experts[cell.dataset.layer];
    if (ids && ids.includes(Number(cell.dataset.expert))) cell.dataset.pool = "1";
    else delete cell.dataset.pool;
  }
}

// ---- hit rate ----------------------------------------------------------------------------
let requestUsage = null;

function rate(hits, misses) {
  const n = hits + misses;
  return n ? `${(100 * hits / n).toFixed(1)}% (${hits} hits, ${misses} misses)` : "–";
}

function showHitRate() {
  const parts = [];
  if (requestUsage && requestUsage.expert_cache_hits !== undefined) {
    parts.push(`this request ${rate(requestUsage.expert_cache_hits, requestUsage.expert_cache_misses)}`);
  }
  if (lastSnapshot) parts.push(`server ${rate(lastSnapshot.device.hits, lastSnapshot.device.misses)}`);
  ui.hitRate.textContent = `Device hit rate: ${parts.join(" · ") || "–"}`;
}

// ---- polling -----------------------------------------------------------------------------
async function poll() {
  clearTimeout(pollTimer);
  try {
    if (!document.hidden) {
      const response = await api("v1/expert_cache");
      if (response.ok) drawSnapshot(await response.json());
      else ui.summary.textContent = `Expert cache snapshot: ${await errorMessage(response)}`;
    }
  } catch (err) {
    ui.summary.textContent = `Expert cache snapshot unavailable (${err.message}); retrying.`;
  }
  pollTimer = setTimeout(poll, streaming ? POLL_STREAMING_MS : POLL_IDLE_MS);
}

// ---- completions -------------------------------------------------------------------------
function parsePoolSize() {
  const raw = ui.poolSize.value.trim().toLowerCase();
  if (raw === "") return { ok: true };
  if (raw === "full") return { ok: true, value: "full" };
  if (/^[0-9]+$/.test(raw) && Number(raw) >= 1) return { ok: true, value: Number(raw) };
  return { ok: false };
}

function handleEvent(data) {
  if (data === "[DONE]") return true;
  const chunk = JSON.parse(data);
  if (chunk.error) throw new Error(chunk.error.message);
  for (const choice of chunk.choices || []) {
    if (choice.text) ui.output.textContent += choice.text;
    if (choice.expert_pool) markPool(choice.expert_pool.experts);
  }
  if (chunk.expert_pool) markPool(chunk.expert_pool.experts);
  if (chunk.usage) { requestUsage = chunk.usage; showHitRate(); }
  return false;
}

// Reads "data: ..." events separated by blank lines, as the server frames them.
async function readEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ") && handleEvent(line.slice(6))) return;
      }
    }
  }
}

async function send() {
  if (streaming) { streaming.abort(); return; }
  const size = ui.poolSize.disabled ? { ok: true } : parsePoolSize();
  if (!size.ok) { setStatus("Pool size must be a positive whole number, 'full', or empty.", true); return; }
  const body = {
    model: ui.model.value || undefined,
    prompt: ui.prompt.value,
    max_tokens: Number(ui.maxTokens.value) || undefined,
    stream: true,
    stream_options: { include_usage: true },
    return_expert_pool: true,
  };
  if (size.value !== undefined) body.expert_pool = size.value;
  streaming = new AbortController();
  ui.output.textContent = "";
  requestUsage = null;
  markPool(null);
  ui.send.textContent = "Stop";
  ui.send.classList.add("stop");
  setStatus("Generating…");
  poll();
  const started = performance.now();
  try {
    const response = await api("v1/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: streaming.signal,
    });
    if (!response.ok) { setStatus(await errorMessage(response), true); return; }
    await readEvents(response);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const tokens = requestUsage ? `${requestUsage.completion_tokens} tokens ` : "";
    setStatus(`Done: ${tokens}in ${seconds} s.`);
  } catch (err) {
    if (err.name === "AbortError") setStatus("Stopped.");
    else setStatus(err.message, true);
  } finally {
    streaming = null;
    ui.send.textContent = "Send";
    ui.send.classList.remove("stop");
    poll(); // the final picture: pins dropped, the pool still marked
  }
}

ui.send.addEventListener("click", send);
ui.model.addEventListener("change", syncPoolSize);
ui.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey = ui.keyInput.value.trim();
  sessionStorage.setItem(KEY_STORAGE, apiKey);
  ui.keyDialog.close();
});
// Without a key nothing works, so Escape does not dismiss the dialog; should it close anyway,
// the waiting requests go on, get 401 again and ask again.
ui.keyDialog.addEventListener("cancel", (event) => event.preventDefault());
ui.keyDialog.addEventListener("close", () => {
  const answered = keyAnswered;
  keyPrompt = keyAnswered = null;
  if (answered) answered();
});
ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) send();
});

(async () => {
  loadVersion().catch(() => {});
  try {
    await loadModels();
  } catch (err) {
    setStatus(`Cannot reach the server: ${err.message}`, true);
  }
  poll();
})();
