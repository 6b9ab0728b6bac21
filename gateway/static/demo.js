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

async function start(event) {
  event.preventDefault();
  if (current) return;
  ui.output.textContent = "";
  ui.output.classList.remove("error");
  ui.usage.textContent = "";
  ui.reconnects.hidden = true;
  const headers = { "Content-Type": "application/json" };
  if (keyRequired) {
    const key = ui.key.value.trim();
    if (!key) { showError("Enter your API key (make run printed it; it is in local/demo.key)."); return; }
    sessionStorage.setItem("gateway-key", key);
    headers["Authorization"] = "Bearer " + key;
  }
  setBusy(true);
  setStatus("starting...");
  let resp, body;
  try {
    resp = await fetch("/v1/streams", {
      method: "POST", headers,
      body: JSON.stringify({
        model: ui.model.value.trim(),
        messages: [{ role: "user", content: ui.prompt.value }],
      }),
    });
    body = await resp.json();
  } catch (e) {
    showError("Could not reach the gateway: " + e);
    return;
  }
  if (resp.status !== 201) {
    showError((body && body.error && body.error.message) || "HTTP " + resp.status);
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
  ui.stop.disabled = true;
  setStatus("stopping...");
  try {
    await fetch(current.url, { method: "DELETE" });
  } catch (e) {
    finish("stop failed: " + e);
  }
  // The stream itself ends with done (cancelled), which finishes the UI.
}

ui.form.addEventListener("submit", start);
ui.stop.addEventListener("click", stop);
loadConfig();
