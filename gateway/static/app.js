// Demo page for sdxl-serve: queue a job (POST /v1/jobs), follow its server-sent events (queue position,
// one progress event per denoising step, then the result), and show the four images from their URLs.
// With an input image chosen (and optionally a mask), the job is sent as multipart/form-data with the files,
// and the strength slider's value; without one, as JSON, as before.
// The LoRA adapters the workers offer (GET /v1/loras) are listed to pick from, each with its scale; the picked
// ones go with the request as `loras`. Adapter names come from operators' folders: they are only ever text here.
// On a server that needs an API key the page asks for one first and sends it with every request; an
// EventSource cannot send it, so such a job is followed by polling its status, and its images are fetched
// with the key and shown from blobs.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("generate-form");
const button = $("generate");
const cancelButton = $("cancel");
const statusEl = $("status");
const resultsEl = $("results");
const jobEl = $("job");
const queueEl = $("queue-position");
const progressEl = $("progress");
const progressText = $("progress-text");
const elapsedEl = $("elapsed");
const errorEl = $("error");
const imagesEl = $("images");
const timingsEl = $("timings");
const emptyEl = $("empty");
const keyForm = $("key-form");
const keyInput = $("api-key");
const keyError = $("key-error");
const KEY_STORAGE = "sdxl-serve-api-key";

const EVENTS = ["queued", "started", "progress", "succeeded", "failed", "cancelled"];
// When the event stream breaks before the job finished, poll its status instead; give up after this
// many failed polls in a row.
const POLL_INTERVAL_MS = 1000;
const POLL_MAX_FAILURES = 5;
// The request fields the gateway may name in a 400, and the inputs they come from.
const FIELD_INPUTS = {
  prompt: "prompt", negative_prompt: "negative-prompt", seed: "seed", guidance_scale: "guidance-scale",
  num_inference_steps: "steps", output_format: "output-format", scheduler: "scheduler", width: "size",
  height: "size", image: "init-image", mask: "mask-image", strength: "strength",
};
const imageInput = $("init-image");
const maskInput = $("mask-image");
const strengthInput = $("strength");
const lorasEl = $("loras");
const loraList = $("lora-list");
// The protocol's bounds on one request's adapters (common/protocol.py); GET /v1/loras gives the cluster's limit.
const LORA_SCALE = { min: -4, max: 4, step: 0.05, value: 1 };
const MAX_LORAS = 8;
const EXTENSIONS = { "image/png": "png", "image/jpeg": "jpg", "image/webp": "webp" };

let current = null;  // the Job being followed, if any
let needsKey = false;  // the server answered 401 and no key is set: Generate waits for one
let keyInMemory = "";  // the key, where sessionStorage is off

// The API key this tab was given, if any; kept in sessionStorage so a reload does not ask again.
function apiKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) || keyInMemory;
  } catch (err) {
    return keyInMemory;
  }
}

// fetch() with the API key, when one is set.
function api(url, options = {}) {
  const key = apiKey();
  if (!key) return fetch(url, options);
  return fetch(url, { ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${key}` } });
}

// Ask for a key (again, after a refusal): show the key form, hold Generate until one is given.
function askForKey(message = "") {
  needsKey = true;
  button.disabled = true;
  keyForm.hidden = false;
  keyError.textContent = message;
  keyError.hidden = !message;
  keyInput.focus();
}

// Only the fields the user filled: the server picks a random seed and its default steps when they
// are omitted, and its schema is strict (numbers must be JSON numbers, not strings).
function requestBody() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative-prompt").value,
    guidance_scale: Number($("guidance-scale").value),
    output_format: $("output-format").value,
    scheduler: $("scheduler").value,
  };
  const size = /^(\d+)x(\d+)$/.exec($("size").value);
  if (size) Object.assign(body, { width: Number(size[1]), height: Number(size[2]) });
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = Number(seed);
  const steps = $("steps").value.trim();
  if (steps !== "") body.num_inference_steps = Number(steps);
  const loras = pickedLoras().map((row) => ({ name: row.name, scale: Number(row.scale.value) }));
  if (loras.length) body.loras = loras;  // none picked: the request is as it was before adapters
  return body;
}

// The request as fetch() sends it: JSON, or with an input image, a form with the files and every other field
// as its JSON text (the gateway reads a form field by the same rules as the JSON value).
function requestInit() {
  const body = requestBody();
  const image = imageInput.files[0];
  if (!image) {
    return { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  }
  const data = new FormData();
  for (const [name, value] of Object.entries(body)) {
    data.append(name, typeof value === "string" ? value : JSON.stringify(value));
  }
  data.append("strength", strengthInput.value);
  data.append("image", image);
  if (maskInput.files[0]) data.append("mask", maskInput.files[0]);
  return { method: "POST", body: data };  // the browser sets the multipart Content-Type and boundary
}

// The mask and the strength apply to an input image only.
function syncImageInputs() {
  const chosen = imageInput.files.length > 0;
  maskInput.disabled = !chosen;
  strengthInput.disabled = !chosen;
  if (!chosen) maskInput.value = "";
}

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

const ms = (value) => (value == null ? "–" : `${Math.round(value)} ms`);
const seconds = (value) => `${(value / 1000).toFixed(1)} s`;
const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;

function setState(state) {
  resultsEl.dataset.state = state;
}

function clearResults() {
  errorEl.hidden = true;
  errorEl.className = "error";
  errorEl.replaceChildren();
  imagesEl.replaceChildren();
  timingsEl.replaceChildren();
  queueEl.hidden = true;
  queueEl.textContent = "";
  setProgress(0, 1);
  progressText.textContent = "";
  progressEl.dataset.stepsSeen = "0";
  delete resultsEl.dataset.jobId;
  for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
}

function setProgress(step, total) {
  progressEl.max = total;
  progressEl.value = step;
  progressText.textContent = `${step} / ${total}`;
}

// `title` is the headline; `lines` are extra paragraphs (strings or nodes).
function showError(title, lines = [], warn = false) {
  errorEl.className = warn ? "error warn" : "error";
  errorEl.replaceChildren(el("strong", {}, title), ...lines.filter(Boolean).map((l) => el("p", {}, l)));
  errorEl.hidden = false;
}

function retryAfter(response) {
  const value = Number.parseInt(response.headers.get("Retry-After") || "", 10);
  return Number.isFinite(value) && value >= 0 ? `retry in ${plural(value, "second")}` : "retry shortly";
}

// The input a 400's field names, and what to call it; null when the page has none for it.
function fieldTarget(field) {
  if (!field) return null;
  if (!FIELD_INPUTS[field]) return loraTarget(field);
  const input = $(FIELD_INPUTS[field]);
  return { input, label: input.labels[0].firstChild.textContent.trim() };
}

// A field of `loras`: `loras[i].name` and `loras[i].scale` are the i-th adapter picked (the request lists them in
// the page's order), `loras` the picker as a whole.
function loraTarget(field) {
  const match = /^loras(?:\[(\d+)\](?:\.(name|scale))?)?$/.exec(field);
  if (!match) return null;
  const picked = pickedLoras();
  const row = match[1] === undefined ? undefined : picked[Number(match[1])];
  if (!row) {
    const first = picked[0] || loraRows()[0];
    return first ? { input: first.box, label: "LoRA adapters" } : null;
  }
  if (match[2] === "scale") return { input: row.scale, label: `LoRA ${row.name} scale` };
  return { input: row.box, label: `LoRA ${row.name}` };
}

// A 400 names the field at fault: say which input it is, and mark and focus that input.
function showFieldError(error, message) {
  const target = fieldTarget(error.field);
  const input = target && target.input;
  const name = error.field ? (target ? `${target.label} (${error.field})` : error.field) : "request";
  showError(`Invalid ${name}`, [message, error.code && `code: ${error.code}`]);
  if (input) {
    input.setAttribute("aria-invalid", "true");
    input.focus();
  }
}

function showHttpError(response, body) {
  // A proxy in front of the gateway may answer with HTML; fall back to the HTTP status line.
  const error = (body && body.error) || {};
  const message = error.message || `HTTP ${response.status} ${response.statusText}`.trim();
  const status = response.status;
  if (status === 429) {
    showError(`Server busy: too many requests, ${retryAfter(response)}.`, [message], true);
  } else if (status === 503) {
    const why = error.code === "queue_unavailable" ? "the job queue is unreachable" : "no worker is ready yet";
    showError(`Server busy: ${why}, ${retryAfter(response)}.`, [message], true);
  } else if (status === 400) {
    showFieldError(error, message);
  } else if (status === 413) {
    showError("Request too large: shorten the prompts, or choose a smaller image.", [message]);
  } else if (status === 401 || status === 403) {
    // Keys are configured and the key is missing, unknown or revoked: ask for one.
    showError("This server needs a valid API key: enter one above.", [message]);
    askForKey(message);
  } else {
    showError(`Error ${status}${error.code ? ` (${error.code})` : ""}`, [message]);
  }
}

const sleep = (delayMs) => new Promise((resolve) => { setTimeout(resolve, delayMs); });

// The JSON body of a successful GET, or null for an error answer or no answer at all.
async function fetchJson(url) {
  try {
    const response = await api(url, { cache: "no-store" });
    return response.ok ? await response.json() : null;
  } catch (err) {
    return null;
  }
}

// With a key, an image URL cannot go into <img src> (the browser would fetch it without the key): fetch it
// with the key and show it from a blob URL instead.
async function imageSource(url) {
  if (!apiKey()) return url;
  try {
    const response = await api(url);
    return response.ok ? URL.createObjectURL(await response.blob()) : url;
  } catch (err) {
    return url;
  }
}

async function showImages(job, result) {
  const ext = EXTENSIONS[result.media_type] || "img";
  const count = result.images.length;
  const sources = await Promise.all(result.images.map(imageSource));
  const flagged = result.nsfw || [];  // per image, from the safety checker; absent without one
  sources.forEach((url, i) => {
    const n = i + 1;
    if (flagged[i]) {
      imagesEl.append(withheldCell(url, n, count));
      return;
    }
    const img = el("img", { className: "result-image loading", alt: `image ${n} of ${count}` });
    img.addEventListener("load", () => img.classList.remove("loading"), { once: true });
    img.addEventListener("error", () => img.classList.replace("loading", "broken"), { once: true });
    img.src = url;  // each image loads from its own URL, as soon as it is in the page
    const link = el("a", { className: "download", href: url, download: `sdxl-${job.id}-${n}.${ext}` },
      "Download", el("span", { className: "visually-hidden" }, ` image ${n}`));
    imagesEl.append(el("figure", { className: "cell" }, img,
      el("figcaption", {}, el("span", {}, `image ${n}`), link)));
  });
}

// An image the safety checker flagged: the worker replaced it (black or blurred), so the cell keeps its square
// with a notice over it instead, and offers no download.
function withheldCell(url, n, count) {
  const img = el("img", { className: "result-image", alt: "" });
  img.src = url;
  const notice = el("p", { className: "withheld-notice" }, "Withheld by the safety checker");
  const frame = el("div", { className: "withheld-frame" }, img, notice);
  const cell = el("figure", { className: "cell withheld", role: "img",
    ariaLabel: `image ${n} of ${count}, withheld by the safety checker` }, frame,
    el("figcaption", {}, el("span", {}, `image ${n}`), el("span", { className: "withheld-tag" }, "withheld")));
  cell.dataset.nsfw = "true";
  return cell;
}

function showTimings(result, roundTripMs) {
  const t = result.timings || {};
  const line = (pairs) => pairs.filter(([, value]) => value != null).flatMap(([label, value], i) => [
    ...(i ? [" · "] : []),
    el("span", { className: "item" }, el("b", {}, label), ` ${value}`),  // keep "label value" together
  ]);
  timingsEl.append(
    ...line([["seed", result.seed], ["size", `${result.width}×${result.height}`],
      ["steps", result.num_inference_steps], ["scheduler", result.scheduler], ["format", result.media_type],
      ["worker", result.worker]]),
    " ", el("br"),  // the space keeps the two lines apart in textContent too
    ...line([["queued", ms(t.queued_ms)], ["generate", ms(t.generate_ms)], ["encode", ms(t.encode_ms)],
      ["total", t.total_ms == null ? null : ms(t.total_ms)], ["round trip", ms(roundTripMs)]]),
  );
}

/** One submitted job: follows its events (or, when the stream breaks, its status) until it finishes. */
class Job {
  constructor(accepted, startedAt) {
    this.id = accepted.id;
    this.statusUrl = accepted.status_url;
    this.eventsUrl = accepted.events_url;
    this.startedAt = startedAt;
    this.source = null;
    this.done = false;
    this.cancelling = false;
    this.step = 0;
  }

  follow() {
    if (apiKey()) {  // an EventSource cannot send the key
      this.poll();
      return;
    }
    const source = new EventSource(this.eventsUrl);
    this.source = source;
    for (const name of EVENTS) {
      source.addEventListener(name, (event) => this.apply(name, JSON.parse(event.data)));
    }
    // Without this the browser would reconnect forever; the status URL tells us the rest.
    source.addEventListener("error", () => {
      if (this.done) return;
      this.closeStream();
      statusEl.textContent = "Lost the event stream; checking the job's status…";
      this.poll();
    });
  }

  closeStream() {
    if (this.source) this.source.close();
    this.source = null;
  }

  apply(name, data) {
    if (this.done) return;
    if (name === "queued") this.queued(data.position);
    else if (name === "started") this.running(data.worker);
    else if (name === "progress") this.progress(data.step, data.total);
    else if (name === "succeeded") this.succeeded(data.result);
    else if (name === "failed") this.failed(data.error);
    else if (name === "cancelled") this.cancelled();
  }

  queued(position) {
    setState("queued");
    const ahead = position == null ? "" : position === 0 ? "next in line" : `${plural(position, "job")} ahead`;
    queueEl.dataset.position = position == null ? "" : String(position);
    queueEl.textContent = ahead ? `Queue position: ${ahead}` : "Queued";
    queueEl.hidden = false;
    statusEl.textContent = ahead ? `Queued, ${ahead}` : "Queued";
  }

  running(worker) {
    setState("running");
    queueEl.hidden = true;
    this.step = 0;  // a worker taking over an abandoned job starts the steps again
    progressText.textContent = "";
    progressEl.value = 0;
    statusEl.textContent = worker ? `Generating on ${worker}…` : "Generating…";
  }

  progress(step, total) {
    setProgress(step, total);
    if (step > this.step) progressEl.dataset.stepsSeen = String(Number(progressEl.dataset.stepsSeen) + 1);
    this.step = step;
  }

  succeeded(result) {
    const roundTrip = performance.now() - this.startedAt;
    this.finish("succeeded");
    setProgress(result.num_inference_steps, result.num_inference_steps);
    showImages(this, result);
    showTimings(result, roundTrip);
    statusEl.textContent = `Done in ${seconds(roundTrip)}`;
    elapsedEl.textContent = seconds(roundTrip);  // the same figure as the status, whatever the rounding
  }

  failed(error) {
    this.finish("failed");
    showError(`Generation failed${error && error.code ? ` (${error.code})` : ""}`, [error && error.message]);
    statusEl.textContent = "Failed";
  }

  cancelled() {
    this.finish("cancelled");
    showError("Cancelled: the job will not produce images.", [], true);
    statusEl.textContent = "Cancelled";
  }

  finish(state) {
    this.done = true;
    this.closeStream();
    setState(state);
    queueEl.hidden = true;
    if (state !== "succeeded" && this.step === 0) jobEl.hidden = true;  // an empty bar says nothing
    endRun();
  }

  // Polling stands in for the event stream: the same handlers, fed from GET status_url.
  async poll() {
    let failures = 0;
    while (!this.done && failures < POLL_MAX_FAILURES) {
      const state = await fetchJson(this.statusUrl);
      if (state) {
        failures = 0;
        this.applyState(state);
      } else {
        failures += 1;
      }
      if (!this.done) await sleep(POLL_INTERVAL_MS);
    }
    if (!this.done) this.lost();
  }

  applyState(state) {
    const status = state.status;
    if (status === "queued") this.queued(state.queue_position);
    else if (status === "running") {
      if (resultsEl.dataset.state !== "running") this.running(state.worker);
      if (state.progress) this.progress(state.progress.step, state.progress.total);
    } else if (status === "succeeded") this.succeeded(state.result);
    else if (status === "failed") this.failed(state.error);
    else if (status === "cancelled") this.cancelled();
  }

  lost() {
    this.finish("error");
    const link = el("a", { href: this.statusUrl, target: "_blank", rel: "noopener" }, "its status");
    showError("Lost track of the job: the server stopped answering.", [
      el("span", {}, "Job id: ", el("code", {}, this.id)),
      el("span", {}, "It may still finish: check ", link, " later."),
    ], true);
    statusEl.textContent = "";
  }

  async cancel() {
    if (this.cancelling) return;  // not `disabled`: that would take the keyboard focus off the button
    this.cancelling = true;
    statusEl.textContent = "Cancelling…";
    try {
      const response = await api(this.statusUrl, { method: "DELETE" });
      const body = await response.json().catch(() => null);
      if (response.ok) {
        this.apply("cancelled", { id: this.id });
      } else if (response.status === 409) {
        // Too late: it finished meanwhile, and its final event is on its way.
        statusEl.textContent = `Too late to cancel: the job already ${(body && body.job_status) || "finished"}.`;
      } else {
        showHttpError(response, body);
      }
    } catch (err) {
      statusEl.textContent = "Could not reach the server to cancel the job.";
    } finally {
      this.cancelling = false;
    }
  }
}

let elapsedTimer = null;
let showElapsed = () => {};

function startRun() {
  clearResults();
  setState("submitting");
  jobEl.hidden = false;
  emptyEl.hidden = true;
  button.disabled = true;
  statusEl.textContent = "Submitting…";
  const startedAt = performance.now();
  showElapsed = () => { elapsedEl.textContent = seconds(performance.now() - startedAt); };
  showElapsed();
  elapsedTimer = setInterval(showElapsed, 100);
  return startedAt;
}

function endRun() {
  clearInterval(elapsedTimer);
  showElapsed();  // the final figure, not the last tick's
  button.disabled = needsKey;
  // A hidden button drops the keyboard focus on the floor: hand it to Generate instead.
  if (document.activeElement === cancelButton) button.focus();
  cancelButton.hidden = true;
  current = null;
}

async function generate() {
  const startedAt = startRun();
  let response;
  let body;
  try {
    response = await api("/v1/jobs", requestInit());
    body = await response.json().catch(() => null);
  } catch (err) {
    // fetch only rejects when no HTTP response came back at all.
    showError("Network error: could not reach the server.", [String((err && err.message) || err)]);
    failRun();
    return;
  }
  if (response.status !== 202 || !body || !body.events_url) {
    showHttpError(response, body);
    failRun();
    return;
  }
  current = new Job(body, startedAt);
  resultsEl.dataset.jobId = body.id;
  cancelButton.hidden = false;
  statusEl.textContent = "Queued";
  setState("queued");
  current.follow();
}

function failRun() {
  setState("error");
  jobEl.hidden = true;
  statusEl.textContent = "";
  endRun();
}

// The adapters listed, each its checkbox, its scale input and its name (kept as data, never as markup).
function loraRows() {
  return [...loraList.children].map((item) => ({
    box: item.querySelector("input[type=checkbox]"),
    scale: item.querySelector("input[type=number]"),
    name: item.dataset.name,
  }));
}

function pickedLoras() {
  return lorasEl.hidden ? [] : loraRows().filter((row) => row.box.checked);
}

// One adapter's row: ids by position, so a name never reaches an id or a selector; its text goes in as text.
function loraRow(name, index) {
  const box = el("input", { type: "checkbox", id: `lora-${index}`, name: "lora" });
  const scale = el("input", { type: "number", id: `lora-scale-${index}`, required: true, disabled: true,
    ...LORA_SCALE });
  const item = el("li", { className: "lora-row" },
    box, el("label", { htmlFor: box.id, className: "lora-name" }, name),
    el("label", { htmlFor: scale.id, className: "lora-scale-label" },
      el("span", { className: "visually-hidden" }, `${name} `), "scale"),
    scale);
  item.dataset.name = name;
  return item;
}

// A scale applies to a picked adapter only; once the cluster's limit is picked, the others wait.
function syncLoras() {
  const full = pickedLoras().length >= Number(lorasEl.dataset.max);
  for (const row of loraRows()) {
    row.scale.disabled = !row.box.checked;
    row.box.disabled = full && !row.box.checked;
  }
}

// The adapters the workers offer, to pick from; none offered (or no answer): no picker, requests as before.
async function loadLoras() {
  const listing = await fetchJson("/v1/loras");
  const names = ((listing && listing.data) || []).map((card) => String(card.id));
  const most = Math.min(Number((listing && listing.max_loras) || MAX_LORAS), MAX_LORAS);
  loraList.replaceChildren(...names.map(loraRow));
  lorasEl.dataset.max = String(most);
  $("lora-limit").textContent = `up to ${most} per request`;
  lorasEl.hidden = names.length === 0;
  syncLoras();
  form.dataset.loras = names.length ? "offered" : "none";
}

function setOptions(select, values) {
  select.replaceChildren(...values.map((value) => el("option", { value }, value)));
}

// What the workers serve bounds the inputs: their sizes and schedulers (the defaults first) and the step
// range, and the adapters offered. Without an answer the page keeps the server's defaults and the server checks
// the values.
async function loadServed() {
  let models = null;
  try {
    const response = await api("/v1/models", { cache: "no-store" });
    if (response.status === 401 || response.status === 403) {
      const body = await response.json().catch(() => null);
      askForKey(apiKey() ? ((body && body.error && body.error.message) || "the key was refused") : "");
      form.dataset.served = "needs-key";
      return;
    }
    models = response.ok ? await response.json() : null;
  } catch (err) {
    models = null;
  }
  const card = models && models.data && models.data[0];
  $("model-notice").hidden = !(card && card.random_weights);
  if (card) {
    setOptions($("size"), card.sizes);
    setOptions($("scheduler"), card.schedulers);
    // The placeholder is the default alone: a narrow input cuts "default 20" short.
    Object.assign($("steps"), { min: card.min_steps, max: card.max_steps, placeholder: String(card.default_steps) });
    $("steps-range").textContent = `${card.min_steps}–${card.max_steps}`;
  }
  form.dataset.served = card ? "loaded" : "unknown";
  loadLoras();  // only once the key, if one is needed, is known good: a refused listing would say nothing new
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  if (!button.disabled) generate();
});

keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const key = keyInput.value.trim();
  if (!key) return;
  keyInMemory = key;
  try {
    sessionStorage.setItem(KEY_STORAGE, key);
  } catch (err) {
    // Storage may be off (a privacy setting): the key then lasts as long as the page.
  }
  needsKey = false;
  keyForm.hidden = true;
  keyError.hidden = true;
  button.disabled = false;
  loadServed();  // learns at once whether the key is good; asks again if not
});

imageInput.addEventListener("change", syncImageInputs);
loraList.addEventListener("change", syncLoras);
strengthInput.addEventListener("input", () => { $("strength-value").textContent = strengthInput.value; });

cancelButton.addEventListener("click", () => {
  if (current) current.cancel();
});

// The browser's own validation can block a submit (an empty prompt, steps out of range) without a submit
// event: the last answer's error box would stay beside the browser's message, so it goes now.
form.addEventListener("invalid", () => {
  errorEl.hidden = true;
  errorEl.replaceChildren();
}, true);

// Editing an input the server rejected clears its mark.
form.addEventListener("input", (event) => event.target.removeAttribute("aria-invalid"));

// Ctrl/Cmd+Enter in a text box submits; requestSubmit runs the browser's validation first.
form.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    form.requestSubmit();
  }
});

loadServed();
