// The gateway's demo page: start a detached generation (POST /v1/streams), follow it with
// EventSource (GET /v1/streams/{id}, which resumes by itself after a dropped connection),
// stop it with DELETE. No build step, no framework, no inline code (strict CSP).
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  form: $("chat"), keyRow: $("key-row"), key: $("key"), model: $("model"), prompt: $("prompt"),
  send: $("send"), stop: $("stop"), status: $("status"), reconnects: $("reconnects"),
  output: $("output"), usage: $("usage"),
};
let keyRequired = true;
let current = null; // {source, url, reconnects}

function setStatus(text) { ui.status.textContent = text; }
function setBusy(busy) { ui.send.disabled = busy; ui.stop.disabled = !busy; }

function showError(message) {
  ui.output.classList.add("error");
  ui.output.textContent = message;
  setStatus("error");
  setBusy(false);
}

function finish(text) {
  if (current) { current.source.close(); current = null; }
  setStatus(text);
  setBusy(false);
}

async function loadConfig() {
  try {
    const resp = await fetch("/demo/config");
    const cfg = await resp.json();
    keyRequired = cfg.key_required;
    if (!ui.model.value) ui.model.value = cfg.model;
  } catch (e) {
    ui.model.value = ui.model.value || "gpt-4o-mini";
  }
  ui.keyRow.hidden = !keyRequired;
  ui.key.value = sessionStorage.getItem("gateway-key") || "";
  document.body.dataset.ready = "true";
}

// A response's error as a sentence: the gateway's JSON error, or (from nginx and other
// proxies, which answer 502 or 413 with an HTML page) the status and what it means.
const STATUS_TEXT = {
  401: "the gateway wants a valid API key",
  413: "the prompt is too large",
  502: "the gateway is not answering (is it running?)",
  503: "the gateway is unavailable or draining",
  504: "the gateway took too long to answer",
};
async function errorText(resp) {
  let body = null;
  try { body = JSON.parse(await resp.text()); } catch (e) { /* not JSON: a proxy's page */ }
  const message = body && body.error && body.error.message;
  if (typeof message === "string" && message) return message;
  const meaning = STATUS_TEXT[resp.status];
  return "HTTP " + resp.status + (meaning ? ": " + meaning : "");
}

// Only Latin-1 can go in an HTTP header: anything else is not a key we ever issue.
function badKey(key) { return /[^\x20-\x7e]/.test(key); }

function askForKey(message) {
  keyRequired = true;
  ui.keyRow.hidden = false;
  showError(message);
  ui.key.focus();
}

async function start(event) {
  event.preventDefault();
  if (current) return;
  ui.output.textContent = "";
  ui.output.classList.remove("error");
  ui.usage.textContent = "";
  ui.reconnects.hidden = true;
  const headers = { "Content-Type": "application/json" };
  // The key is sent whenever one is typed; whether one is needed is the server's answer
  // (a 401), so a reload that turns auth on or off needs no reload of the page.
  const key = ui.key.value.trim();
  if (key) {
    if (badKey(key)) { askForKey("That is not an API key: keys are plain ASCII (gw-...)."); return; }
    sessionStorage.setItem("gateway-key", key);
    headers["Authorization"] = "Bearer " + key;
  }
  setBusy(true);
  setStatus("starting...");
  let resp;
  try {
    resp = await fetch("/v1/streams", {
      method: "POST", headers,
      body: JSON.stringify({
        model: ui.model.value.trim(),
        messages: [{ role: "user", content: ui.prompt.value }],
      }),
    });
  } catch (e) {
    showError("Could not reach the gateway: " + e.message);
    return;
  }
  if (resp.status === 401) {
    const why = await errorText(resp);
    askForKey(key ? why : "Enter your API key (make run printed it; it is in local/demo.key).");
    return;
  }
  let body = null;
  if (resp.status === 201) {
    try { body = await resp.json(); } catch (e) { body = null; }
  }
  if (!body || typeof body.url !== "string") {
    showError(resp.status === 201 ? "HTTP 201 without a stream URL" : await errorText(resp));
    return;
  }
  follow(body.url);
}

function follow(url) {
  const source = new EventSource(url);
  current = { source, url, reconnects: 0, opened: false };
  const mine = current;
  source.onopen = () => {
    if (mine.opened) {
      mine.reconnects += 1;
      ui.reconnects.textContent = "reconnected " + mine.reconnects + "x";
      ui.reconnects.hidden = false;
    }
    mine.opened = true;
    setStatus("streaming...");
  };
  source.onerror = () => {
    // EventSource reconnects by itself (readyState CONNECTING) with Last-Event-ID.
    if (source.readyState === EventSource.CONNECTING) setStatus("reconnecting...");
    else if (current === mine) finish("connection closed");
  };
  source.addEventListener("delta", (e) => {
    const delta = JSON.parse(e.data);
    if (typeof delta.content === "string") ui.output.textContent += delta.content;
  });
  source.addEventListener("usage", (e) => {
    const u = JSON.parse(e.data);
    ui.usage.textContent = `tokens: ${u.prompt_tokens} prompt + ${u.completion_tokens} completion = ${u.total_tokens}`;
  });
  source.addEventListener("done", (e) => {
    const reason = JSON.parse(e.data).finish_reason;
    finish(reason === "cancelled" ? "stopped" : "done (" + reason + ")");
  });
  source.addEventListener("fail", (e) => {
    const err = JSON.parse(e.data).error || {};
    const text = ui.output.textContent;
    finish("failed");
    ui.output.classList.add("error");
    ui.output.textContent = text + (text ? "\n\n" : "") + "Error: " + (err.message || "unknown");
  });
}

async function stop() {
  if (!current) return;
  const mine = current;
  ui.stop.disabled = true;
  setStatus("stopping...");
  let failure = null;
  try {
    const resp = await fetch(mine.url, { method: "DELETE" });
    // 404: the stream had already ended; its done event finishes the UI.
    if (!resp.ok && resp.status !== 404) failure = await errorText(resp);
  } catch (e) {
    failure = "could not reach the gateway: " + e.message;
  }
  if (failure && current === mine) {
    // The generation goes on: say so, and let the user try again.
    setStatus("stop failed: " + failure);
    ui.stop.disabled = false;
  }
  // Otherwise the stream itself ends with done (cancelled), which finishes the UI.
}

ui.form.addEventListener("submit", start);
ui.stop.addEventListener("click", stop);
loadConfig();
