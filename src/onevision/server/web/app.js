// onevision chat page: OpenAI chat completions with stream=true, media re-sent as data URIs every turn.
// Model text only ever goes through textContent / text nodes (never innerHTML).
const $ = (role) => document.querySelector(`[data-role="${role}"]`);
const log = $("log"), box = $("message"), sendButton = $("send"), stopButton = $("stop"), picker = $("attach");
const KEY = "onevision.apiKey";

let model = null;          // id from /v1/models
let history = [];          // OpenAI messages of the finished turns
let pending = [];          // [{kind: "image"|"video", url: dataURI}] attached to the next message
let controller = null;     // AbortController of the running request

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ------------------------------------------------------------------ API key (asked once, sessionStorage only)
function askKey(reason) {
  const dialog = document.getElementById("key-dialog"), input = $("api-key");
  dialog.querySelector("p").textContent = reason;
  input.value = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      const key = input.value.trim();
      if (key) sessionStorage.setItem(KEY, key);
      resolve(key);
    }, { once: true });
    dialog.showModal();
  });
}

async function api(path, init = {}) {
  // fetch with the stored key; a 401 asks for the key (once per 401) and retries
  for (let attempt = 0; ; attempt++) {
    const headers = { ...(init.headers || {}) };
    const key = sessionStorage.getItem(KEY);
    if (key) headers.Authorization = `Bearer ${key}`;
    const response = await fetch(path, { ...init, headers });
    if (response.status !== 401 || attempt >= 2) return response;
    const message = (await errorMessage(response)) || "This server needs an API key.";
    if (!(await askKey(message))) return response;
  }
}

async function errorMessage(response) {
  // OpenAI error shape {"error": {"message": ...}} -> message; anything else -> the raw text
  const text = await response.text();
  try { return JSON.parse(text).error.message || text; } catch { return text; }
}

async function loadModel() {
  try {
    const response = await api("/v1/models");
    if (!response.ok) throw new Error(`${response.status}: ${await errorMessage(response)}`);
    model = (await response.json()).data[0].id;
    $("model").textContent = model;
  } catch (e) {
    $("model").textContent = `models unavailable (${e.message})`;
  }
}

// ------------------------------------------------------------------ attachments
function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function attach(files) {
  for (const file of files) {
    const kind = file.type.startsWith("video/") ? "video" : file.type.startsWith("image/") ? "image" : null;
    if (!kind) { notice(`${file.name}: only images and videos can be attached (got ${file.type || "unknown type"})`); continue; }
    pending.push({ kind, url: await readAsDataURL(file) });
  }
  showPending();
}

function thumb(item) {
  const node = el(item.kind === "video" ? "video" : "img");
  node.src = item.url;
  if (item.kind === "video") { node.muted = true; node.controls = true; }
  return node;
}

function showPending() {
  const area = $("pending");
  area.replaceChildren();
  pending.forEach((item, i) => {
    const figure = el("figure");
    const remove = el("button", "", "×");
    remove.type = "button";
    remove.title = "remove";
    remove.onclick = () => { pending.splice(i, 1); showPending(); };
    figure.append(thumb(item), remove);
    area.append(figure);
  });
}

picker.addEventListener("change", () => { attach([...picker.files]); picker.value = ""; });
log.addEventListener("dragover", (e) => { e.preventDefault(); log.classList.add("drag"); });
log.addEventListener("dragleave", () => log.classList.remove("drag"));
log.addEventListener("drop", (e) => { e.preventDefault(); log.classList.remove("drag"); attach([...e.dataTransfer.files]); });
document.addEventListener("paste", (e) => {
  const files = [...(e.clipboardData?.files || [])];
  if (files.length) { e.preventDefault(); attach(files); }
});

// ------------------------------------------------------------------ conversation
function scroll() { log.scrollTop = log.scrollHeight; }

function notice(text) {
  log.querySelector(".hint")?.remove();
  const node = el("div", "msg assistant");
  node.append(el("span", "error", text));
  log.append(node);
  scroll();
}

function showUser(text, media) {
  log.querySelector(".hint")?.remove();
  const node = el("div", "msg user");
  node.dataset.role = "user";
  if (media.length) {
    const thumbs = el("div", "thumbs");
    media.forEach((item) => thumbs.append(thumb(item)));
    node.append(thumbs);
  }
  node.append(document.createTextNode(text));
  log.append(node);
}

function settings() {
  const maxTokens = parseInt($("max-tokens").value, 10);
  const temperature = parseFloat($("temperature").value);
  return { max_tokens: maxTokens > 0 ? maxTokens : 512, temperature: temperature >= 0 ? temperature : 0.7 };
}

// SSE: "data: {...}\n\n" events; yields parsed JSON objects until [DONE]
async function* events(body) {
  const reader = body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
    if (done) return;
  }
}

async function send() {
  const text = box.value.trim();
  if (controller || (!text && !pending.length)) return;
  const media = pending;
  const content = media.map((m) => (m.kind === "video"
    ? { type: "video_url", video_url: { url: m.url } } : { type: "image_url", image_url: { url: m.url } }));
  if (text) content.push({ type: "text", text });
  const user = { role: "user", content };
  showUser(text, media);
  box.value = "";
  pending = [];
  showPending();

  const bubble = el("div", "msg assistant");
  bubble.dataset.role = "assistant";
  bubble.dataset.done = "false";
  const answer = document.createTextNode("");
  bubble.append(answer);
  log.append(bubble);
  scroll();

  controller = new AbortController();
  sendButton.disabled = true;
  stopButton.hidden = false;
  let failed = null;
  try {
    if (!model) await loadModel();
    const response = await api("/v1/chat/completions", {
      method: "POST", signal: controller.signal, headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: model || "onevision", messages: [...history, user], stream: true, ...settings() }),
    });
    if (!response.ok) {
      const retry = response.headers.get("retry-after");
      failed = `${response.status}: ${await errorMessage(response)}` + (retry ? ` (retry after ${retry} s)` : "");
    } else {
      for await (const event of events(response.body)) {
        if (event.error) { failed = event.error.message || JSON.stringify(event.error); break; }
        const delta = event.choices?.[0]?.delta?.content;
        if (delta) { answer.appendData(delta); scroll(); }
      }
    }
  } catch (e) {
    if (e.name === "AbortError") bubble.dataset.stopped = "true";
    else failed = `request failed: ${e.message}`;
  } finally {
    if (failed) bubble.append(el("span", "error", failed));
    else history.push(user, { role: "assistant", content: answer.data });  // a failed turn is not re-sent
    controller = null;
    sendButton.disabled = false;
    stopButton.hidden = true;
    bubble.dataset.done = "true";
    scroll();
  }
}

document.getElementById("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
box.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
});
stopButton.addEventListener("click", () => controller?.abort());
$("new-chat").addEventListener("click", () => {
  controller?.abort();
  history = [];
  pending = [];
  showPending();
  log.replaceChildren(el("p", "hint", "New chat. Drop, paste or attach images and videos; Enter sends."));
  box.focus();
});

loadModel();
