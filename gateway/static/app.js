// Demo page for sdxl-serve: POST the form to /v1/generate and show the four images.
"use strict";

const $ = (id) => document.getElementById(id);
const form = $("generate-form");
const button = $("generate");
const statusEl = $("status");
const errorEl = $("error");
const imagesEl = $("images");
const timingsEl = $("timings");
const emptyEl = $("empty");

// Only the fields the user filled: the server picks a random seed and its default steps when they
// are omitted, and its schema is strict (numbers must be JSON numbers, not strings).
function requestBody() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative-prompt").value,
    guidance_scale: Number($("guidance-scale").value),
  };
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = Number(seed);
  const steps = $("steps").value.trim();
  if (steps !== "") body.num_inference_steps = Number(steps);
  return body;
}

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

const ms = (value) => (value == null ? "–" : `${Math.round(value)} ms`);

function clearResults() {
  errorEl.hidden = true;
  errorEl.className = "error";
  errorEl.replaceChildren();
  imagesEl.replaceChildren();
  timingsEl.replaceChildren();
}

function showImages(data, roundTripMs) {
  data.images.forEach((b64, i) => {
    const n = i + 1;
    const src = `data:image/png;base64,${b64}`;
    const img = el("img", { className: "result-image", src, alt: `image ${n}` });
    const link = el("a", { href: src, download: `sdxl-${data.id}-${n}.png` }, "Download");
    imagesEl.append(el("figure", { className: "cell" }, img,
      el("figcaption", {}, el("span", {}, `image ${n}`), link)));
  });
  const t = data.timings || {};
  const line = (pairs) => pairs.flatMap(([label, value], i) => [
    ...(i ? [" · "] : []),
    el("span", { className: "item" }, el("b", {}, label), ` ${value}`),  // keep "label value" together
  ]);
  timingsEl.append(
    ...line([["seed", data.seed], ["size", `${data.width}×${data.height}`],
      ["steps", data.num_inference_steps], ["worker", data.worker]]),
    " ", el("br"),  // the space keeps the two lines apart in textContent too
    ...line([["queued", ms(t.queued_ms)], ["generate", ms(t.generate_ms)], ["encode", ms(t.encode_ms)],
      ["total", ms(t.total_ms)], ["round trip", ms(roundTripMs)]]),
  );
}

// `title` is the headline; `lines` are extra paragraphs (strings or nodes).
function showError(title, lines = [], warn = false) {
  errorEl.className = warn ? "error warn" : "error";
  errorEl.replaceChildren(el("strong", {}, title), ...lines.filter(Boolean).map((l) => el("p", {}, l)));
  errorEl.hidden = false;
}

function showHttpError(response, body) {
  // A proxy in front of the gateway may answer with HTML; fall back to the HTTP status line.
  const error = (body && body.error) || {};
  const message = error.message || `HTTP ${response.status} ${response.statusText}`.trim();
  const field = error.field ? `Field: ${error.field}` : null;
  if (response.status === 503) {
    showError("Server busy or starting: no worker is ready yet, try again in a few seconds.", [message]);
  } else if (response.status === 504 && body && body.id) {
    const status = body.status_url
      ? el("a", { href: body.status_url, target: "_blank", rel: "noopener" }, "check its status")
      : null;
    showError("Still running: the job did not finish before the gateway's timeout.", [
      el("span", {}, "Job id: ", el("code", {}, body.id)),
      status && el("span", {}, "It may still finish: ", status, "."),
      message,
    ], true);
  } else {
    showError(`Error ${response.status}${error.code ? ` (${error.code})` : ""}`, [message, field]);
  }
}

async function generate() {
  clearResults();
  emptyEl.textContent = "Waiting for a worker to generate the images…";
  button.disabled = true;
  const started = performance.now();
  const tick = () => {
    statusEl.textContent = `Generating… ${((performance.now() - started) / 1000).toFixed(1)} s`;
  };
  tick();
  const timer = setInterval(tick, 100);
  try {
    const response = await fetch("/v1/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody()),
    });
    const body = await response.json().catch(() => null);
    const roundTrip = performance.now() - started;
    if (response.ok && body && Array.isArray(body.images)) {
      showImages(body, roundTrip);
      statusEl.textContent = `Done in ${(roundTrip / 1000).toFixed(1)} s`;
    } else {
      showHttpError(response, body);
      statusEl.textContent = "";
    }
  } catch (err) {
    // fetch only rejects when no HTTP response came back at all.
    showError("Network error: could not reach the server.", [String(err && err.message || err)]);
    statusEl.textContent = "";
  } finally {
    clearInterval(timer);
    emptyEl.hidden = true;
    button.disabled = false;
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  if (!button.disabled) generate();
});

// Ctrl/Cmd+Enter in a text box submits; requestSubmit runs the browser's validation first.
form.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    form.requestSubmit();
  }
});
