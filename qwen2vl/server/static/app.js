// The chat page of `qwen2vl serve`: talks to the server's own /v1/chat/completions, streaming.
// No framework, no build step: this file is served as is.
"use strict";

// --- grounding boxes: the same parsing and mapping as qwen2vl/grounding.py ------------------

// How the model writes its boxes comes with each answer, in the X-Grounding response header
// (grounding.grounding_header): `syntax` "tokens" (Qwen2-VL's box tokens) or "json" (Qwen2.5-VL's
// and Qwen3-VL's bbox_2d / point_2d objects), `frame` "normalized" ([0, 1000) of the image) or
// "resized" (pixels of the resized image the model saw), and each image's sizes. Without the
// header, Qwen2-VL's.
const NORMALIZED_RANGE = 1000;
const QWEN2_VL_GROUNDING = {syntax: "tokens", frame: "normalized", images: []};
const NUMBER = String.raw`(-?\d+(?:\.\d+)?)`;
// The server streams text with special tokens skipped, so the <|box_start|> ... markers are
// optional here: a bare "(x1,y1),(x2,y2)" is a box too.
const REF_OR_BOX = new RegExp(
  String.raw`<\|object_ref_start\|>([\s\S]*?)<\|object_ref_end\|>` +
  String.raw`|(?:<\|box_start\|>)?\(\s*${NUMBER}\s*,\s*${NUMBER}\s*\)\s*,\s*\(\s*${NUMBER}\s*,\s*${NUMBER}\s*\)(?:<\|box_end\|>)?`,
  "g");

// Without the reference markers, a box's label is the phrase just before it ("the red circle(...)").
function phraseBefore(text) {
  const phrase = text.split(/[.;:!?\n]|,\s/).pop().replace(/^\s*(?:and|,)\s+/i, "").trim();
  return phrase || null;
}

// Every box and point in `text`, in the model's coordinates, in the order written.
function parseBoxes(text, syntax = "tokens") {
  return syntax === "json" ? jsonMarks(text) : tokenBoxes(text);
}

// Qwen2-VL's boxes; a box takes the label of the nearest reference before it.
function tokenBoxes(text) {
  const boxes = [];
  let label = null;
  let end = 0;
  for (const match of text.matchAll(REF_OR_BOX)) {
    if (match[1] !== undefined) {
      label = match[1].trim();
    } else {
      label = phraseBefore(text.slice(end, match.index)) || label;
      const [x1, y1, x2, y2] = match.slice(2, 6).map(Number);
      boxes.push({label, x1: Math.min(x1, x2), y1: Math.min(y1, y2), x2: Math.max(x1, x2), y2: Math.max(y1, y2)});
    }
    end = match.index + match[0].length;
  }
  return boxes;
}

// Where the JSON value opening at `start` closes (brackets counted outside strings); -1 if it does not.
function jsonEnd(text, start) {
  let depth = 0, inString = false;
  for (let i = start; i < text.length; i++) {
    const c = text[i];
    if (inString) {
      if (c === "\\") i++;
      else if (c === '"') inString = false;
    } else if (c === '"') {
      inString = true;
    } else if (c === "{" || c === "[") {
      depth++;
    } else if ((c === "}" || c === "]") && --depth === 0) {
      return i + 1;
    }
  }
  return -1;
}

function numbers(value, count) {
  return Array.isArray(value) && value.length === count && value.every((v) => typeof v === "number" && Number.isFinite(v));
}

function markOf(object) {
  const label = typeof object.label === "string" ? object.label.trim() : null;
  if (numbers(object.bbox_2d, 4)) {
    const [x1, y1, x2, y2] = object.bbox_2d;
    return {label, x1: Math.min(x1, x2), y1: Math.min(y1, y2), x2: Math.max(x1, x2), y2: Math.max(y1, y2)};
  }
  if (numbers(object.point_2d, 2)) return {label, x: object.point_2d[0], y: object.point_2d[1]};
  return null;
}

// Every JSON object of `text` that is a box or a point; one cut short or of neither kind is
// skipped, and the objects inside it are still looked at.
function jsonMarks(text) {
  const marks = [];
  let start = text.indexOf("{");
  while (start !== -1) {
    const end = jsonEnd(text, start);
    let mark = null;
    if (end !== -1) {
      try {
        const value = JSON.parse(text.slice(start, end));
        if (value && typeof value === "object" && !Array.isArray(value)) mark = markOf(value);
      } catch (error) {
        mark = null;  // not JSON: skipped
      }
    }
    if (mark) {
      marks.push(mark);
      start = text.indexOf("{", end);
    } else {
      start = text.indexOf("{", start + 1);
    }
  }
  return marks;
}

// `mark` (a box or a point), given in a `frame` = [width, height] coordinate range, in pixels of
// a `width` x `height` image (grounding.Box.scaled, Point.scaled).
function scaled(mark, width, height, frame = [NORMALIZED_RANGE, NORMALIZED_RANGE]) {
  const sx = width / frame[0], sy = height / frame[1];
  if ("x" in mark) return {label: mark.label, x: mark.x * sx, y: mark.y * sy};
  return {label: mark.label, x1: mark.x1 * sx, y1: mark.y1 * sy, x2: mark.x2 * sx, y2: mark.y2 * sy};
}

// The frame the answer's coordinates are in, for the prompt's last image (grounding.to_image).
function frameOf(grounding) {
  const last = grounding.images[grounding.images.length - 1];
  if (grounding.frame === "resized" && last) return [last.resized_width, last.resized_height];
  return [NORMALIZED_RANGE, NORMALIZED_RANGE];
}

// --- state -----------------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);
const ui = {
  conversation: $("conversation"), emptyHint: $("empty-hint"), composer: $("composer"), message: $("message"),
  file: $("file"), attachments: $("attachments"), send: $("send"), stop: $("stop"), dropHint: $("drop-hint"),
  newChat: $("new-chat"), openSettings: $("open-settings"), settings: $("settings"), openKey: $("open-key"),
  keyDialog: $("key-dialog"), keyReason: $("key-reason"), apiKey: $("api-key"), modelName: $("model-name"),
  temperature: $("temperature"), maxTokens: $("max-tokens"), maxPixels: $("max-pixels"),
};
const SETTINGS_KEY = "qwen2vl.settings";
const API_KEY = "qwen2vl.apiKey";

const state = {
  history: [],      // OpenAI messages sent so far (and the answers)
  attachments: [],  // {kind: "image"|"video", name, url (data: URI), width, height}
  controller: null, // the AbortController of the request in flight
  model: null,
};

// --- helpers ---------------------------------------------------------------------------------

function element(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "dataset") Object.assign(node.dataset, value);
    else if (name in node && !name.includes("-")) node[name] = value;
    else node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function authHeaders() {
  const key = localStorage.getItem(API_KEY);
  return key ? {Authorization: `Bearer ${key}`} : {};
}

function scrollToEnd() {
  ui.conversation.scrollTop = ui.conversation.scrollHeight;
}

// The server's error message from an error response (OpenAI's shape), or the status line.
async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) {
      const param = body.error.param && !body.error.message.includes(body.error.param) ? ` (${body.error.param})` : "";
      message = body.error.message + param;
    }
  } catch (_) { /* not JSON: keep the status line */ }
  return {status: response.status, message};
}

function showError(text, className = "") {
  const node = element("div", {className: `error ${className}`, role: "alert", dataset: {role: "error"}}, [text]);
  ui.conversation.append(node);
  scrollToEnd();
  return node;
}

// --- settings and API key --------------------------------------------------------------------

function loadSettings() {
  const saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}");
  ui.temperature.value = saved.temperature ?? "";
  ui.maxTokens.value = saved.max_tokens ?? "";
  ui.maxPixels.value = saved.max_pixels ?? "";
}

function saveSettings() {
  localStorage.setItem(SETTINGS_KEY, JSON.stringify({
    temperature: ui.temperature.value, max_tokens: ui.maxTokens.value, max_pixels: ui.maxPixels.value,
  }));
}

function askForKey(reason) {
  ui.keyReason.textContent = reason;
  ui.apiKey.value = localStorage.getItem(API_KEY) || "";
  ui.openKey.hidden = false;
  if (!ui.keyDialog.open) ui.keyDialog.showModal();
  ui.apiKey.focus();
}

// Whether the server wants a key (its public OpenAPI document says so), then the model's name.
async function connect() {
  try {
    const openapi = await fetch("openapi.json");
    if (openapi.ok && (await openapi.json()).security) {
      ui.openKey.hidden = false;
      if (!localStorage.getItem(API_KEY)) {
        askForKey("This server needs an API key (the --api-key it was started with).");
        return;
      }
    }
    const models = await fetch("v1/models", {headers: authHeaders()});
    if (!models.ok) {
      const error = await errorOf(models);
      showError(`The server refused the page: ${error.message}`, "connection");
      if (error.status === 401) askForKey(`The server refused the key: ${error.message}`);
      return;
    }
    ui.conversation.querySelectorAll(".error.connection").forEach((node) => node.remove());  // resolved now
    state.model = (await models.json()).data[0].id;
    ui.modelName.textContent = ui.modelName.title = state.model;
  } catch (error) {
    showError(`Could not reach the server (${error.message}). Is qwen2vl serve running?`, "connection");
  }
}

// --- attachments -----------------------------------------------------------------------------

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function imageSize(url) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve({width: image.naturalWidth, height: image.naturalHeight});
    image.onerror = () => reject(new Error("the browser cannot decode it as an image"));
    image.src = url;
  });
}

async function attach(files) {
  for (const file of files) {
    const kind = file.type.startsWith("video/") ? "video" : file.type.startsWith("image/") ? "image" : null;
    if (kind === null) {
      showError(`${file.name}: not an image or a video (${file.type || "unknown type"}); attach an image or a video file`);
      continue;
    }
    try {
      const url = await readAsDataURL(file);
      const size = kind === "image" ? await imageSize(url) : {};
      state.attachments.push({kind, name: file.name, url, ...size});
    } catch (error) {
      showError(`${file.name}: ${error.message}`);
    }
  }
  renderAttachments();
}

function describe(item) {
  return item.kind === "image" ? `image ${item.name} (${item.width}×${item.height} pixels)` : `video ${item.name}`;
}

function mediaElement(item) {
  if (item.kind === "video") {
    return element("video", {src: item.url, controls: true, preload: "metadata", "aria-label": `Attached ${describe(item)}`});
  }
  return element("img", {src: item.url, alt: `Attached ${describe(item)}`});
}

function renderAttachments() {
  ui.attachments.replaceChildren(...state.attachments.map((item, index) => element("li", {}, [
    mediaElement(item),
    element("button", {type: "button", className: "remove", title: `Remove ${item.name}`,
                       "aria-label": `Remove ${describe(item)}`, onclick: () => {
      state.attachments.splice(index, 1);
      renderAttachments();
      ui.message.focus();
    }}, ["×"]),
  ])));
}

// --- the conversation ------------------------------------------------------------------------

function userContent(text, attachments) {
  const maxPixels = ui.maxPixels.value ? {max_pixels: Number(ui.maxPixels.value)} : {};
  const parts = attachments.map((item) => item.kind === "image"
    ? {type: "image_url", image_url: {url: item.url}, ...maxPixels}
    : {type: "video_url", video_url: {url: item.url}, ...maxPixels});
  if (text) parts.push({type: "text", text});
  return parts;
}

function samplingFields() {
  const fields = {};
  if (ui.temperature.value !== "") fields.temperature = Number(ui.temperature.value);
  if (ui.maxTokens.value !== "") fields.max_tokens = Number(ui.maxTokens.value);
  return fields;
}

// The image an answer's boxes refer to: the latest one of the conversation.
function latestImage() {
  for (let i = state.history.length - 1; i >= 0; i--) {
    const item = (state.history[i].attachments || []).filter((a) => a.kind === "image").pop();
    if (item) return item;
  }
  return null;
}

function drawBoxes(figure, image, text, grounding) {
  const frame = frameOf(grounding);
  const marks = parseBoxes(text, grounding.syntax).map((mark) => scaled(mark, image.width, image.height, frame));
  const overlay = figure.querySelector(".boxes");
  overlay.replaceChildren(...marks.map((mark) => {
    const percent = (value, total) => `${(100 * value) / total}%`;
    const point = "x" in mark;
    const node = element("div", {className: point ? "point" : "box",
                                 dataset: point ? {point: `${mark.x},${mark.y}`} : {box: `${mark.x1},${mark.y1},${mark.x2},${mark.y2}`},
                                 title: mark.label || (point ? "point" : "box")},
                         mark.label ? [element("span", {className: "box-label"}, [mark.label])] : []);
    Object.assign(node.style, point ? {left: percent(mark.x, image.width), top: percent(mark.y, image.height)} :
      {left: percent(mark.x1, image.width), top: percent(mark.y1, image.height),
       width: percent(mark.x2 - mark.x1, image.width), height: percent(mark.y2 - mark.y1, image.height)});
    return node;
  }));
  figure.hidden = marks.length === 0;
  const count = (n, one, many) => `${n} ${n === 1 ? one : many}`;
  const points = marks.filter((mark) => "x" in mark).length, boxes = marks.length - points;
  const drawn = [boxes || !points ? count(boxes, "box", "boxes") : "", points ? count(points, "point", "points") : ""];
  const labels = marks.map((mark) => mark.label || "unlabelled").join(", ");
  figure.querySelector("img").alt = `${image.name} with ${drawn.filter(Boolean).join(" and ")} drawn: ${labels}`;
}

function addUserMessage(text, attachments) {
  const node = element("article", {className: "message user", dataset: {role: "user"}, "aria-label": "You"}, [
    element("div", {className: "media"}, attachments.map(mediaElement)),
    element("div", {className: "text"}, [text]),
  ]);
  ui.conversation.append(node);
  return node;
}

function addAssistantMessage(image) {
  const content = element("div", {className: "content"});
  const figure = element("figure", {className: "grounding", hidden: true}, image ? [
    element("img", {src: image.url, alt: image.name}), element("div", {className: "boxes"}),
  ] : []);
  const stats = element("div", {className: "stats"}, ["waiting for the first token…"]);
  const node = element("article", {className: "message assistant", dataset: {role: "assistant"}, "aria-label": "Assistant",
                                   "aria-busy": "true"}, [content, figure, stats]);
  ui.conversation.append(node);
  return {node, content, figure, stats};
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  if (busy) ui.stop.focus();
  else ui.message.focus();
}

function timing(started, firstToken, finished, tokens) {
  if (firstToken === null) return "no tokens";
  const parts = [`first token ${Math.round(firstToken - started)} ms`];
  if (tokens > 1 && finished > firstToken) parts.push(`${((tokens - 1) * 1000 / (finished - firstToken)).toFixed(1)} tokens/s`);
  parts.push(`${tokens} token${tokens === 1 ? "" : "s"}`);
  return parts.join(" · ");
}

// Server-sent events of `response` as parsed `data:` payloads, until [DONE].
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send() {
  const text = ui.message.value.trim();
  if (state.controller || (!text && state.attachments.length === 0)) return;
  const attachments = state.attachments;
  const turn = {role: "user", content: userContent(text, attachments), attachments};
  state.attachments = [];
  ui.message.value = "";
  renderAttachments();
  ui.emptyHint.hidden = true;
  const userNode = addUserMessage(text, attachments);
  state.history.push(turn);
  const image = latestImage();
  const answer = addAssistantMessage(image);
  scrollToEnd();

  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const started = performance.now();
  let firstToken = null, tokens = 0, usageTokens = null, finish = null, reply = "";
  const restoreDraft = () => {  // the server refused the turn: it leaves the history, its text and media come back
    state.history.pop();
    userNode.classList.add("failed");
    userNode.append(element("div", {className: "stats"}, ["not sent"]));
    ui.message.value = text;
    state.attachments = attachments;
    renderAttachments();
  };
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", signal: controller.signal,
      headers: {"Content-Type": "application/json", ...authHeaders()},
      body: JSON.stringify({
        ...(state.model ? {model: state.model} : {}),
        messages: state.history.map(({role, content}) => ({role, content})),
        stream: true, stream_options: {include_usage: true}, ...samplingFields(),
      }),
    });
    if (!response.ok) {
      const error = await errorOf(response);
      answer.node.remove();
      restoreDraft();
      showError(`The server refused the message: ${error.message}`);
      if (error.status === 401) askForKey(`The server refused the key: ${error.message}`);
      return;
    }
    const grounding = JSON.parse(response.headers.get("X-Grounding") || "null") || QWEN2_VL_GROUNDING;
    for await (const chunk of events(response)) {
      if (chunk.error) throw Object.assign(new Error(chunk.error.message), {fromServer: true});
      if (chunk.usage) usageTokens = chunk.usage.completion_tokens;
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        if (firstToken === null) firstToken = performance.now();
        tokens += 1;
        reply += choice.delta.content;
        answer.content.textContent = reply;
        if (image) drawBoxes(answer.figure, image, reply, grounding);
        answer.stats.textContent = timing(started, firstToken, performance.now(), tokens);
        scrollToEnd();
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    const note = finish === "length" ? " · cut at max tokens" : "";
    answer.stats.textContent = timing(started, firstToken, performance.now(), usageTokens ?? tokens) + note;
  } catch (error) {
    if (controller.signal.aborted) {
      answer.stats.textContent = `${timing(started, firstToken, performance.now(), tokens)} · stopped`;
    } else {
      const why = error.fromServer ? error.message : `the connection to the server was lost (${error.message})`;
      if (reply) {
        answer.stats.textContent = `${timing(started, firstToken, performance.now(), tokens)} · interrupted`;
      } else {
        answer.node.remove();
        restoreDraft();
      }
      showError(`The answer did not complete: ${why}.${reply ? "" : " Your message is back in the box; send it again."}`);
    }
  } finally {
    answer.node.setAttribute("aria-busy", "false");
    if (reply) state.history.push({role: "assistant", content: reply});
    state.controller = null;
    setBusy(false);
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

function newChat() {
  stop();
  state.history = [];
  state.attachments = [];
  renderAttachments();
  ui.conversation.replaceChildren(ui.emptyHint);
  ui.emptyHint.hidden = false;
  ui.message.value = "";
  ui.message.focus();
}

// --- wiring ----------------------------------------------------------------------------------

ui.composer.addEventListener("submit", (event) => { event.preventDefault(); send(); });
ui.message.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && state.controller && !document.querySelector("dialog[open]")) stop();  // Esc in a dialog closes it
});
ui.stop.addEventListener("click", stop);
ui.newChat.addEventListener("click", newChat);
ui.file.addEventListener("change", () => { attach([...ui.file.files]); ui.file.value = ""; });
ui.message.addEventListener("paste", (event) => {
  const files = [...event.clipboardData.files];
  if (files.length) { event.preventDefault(); attach(files); }
});
document.addEventListener("dragover", (event) => { event.preventDefault(); ui.dropHint.hidden = false; });
document.addEventListener("dragleave", (event) => { if (!event.relatedTarget) ui.dropHint.hidden = true; });
document.addEventListener("drop", (event) => {
  event.preventDefault();
  ui.dropHint.hidden = true;
  attach([...event.dataTransfer.files]);
});
ui.openSettings.addEventListener("click", () => { loadSettings(); ui.settings.showModal(); ui.temperature.focus(); });
ui.settings.addEventListener("close", () => {
  if (ui.settings.returnValue === "save") saveSettings();
  else loadSettings();
  ui.message.focus();
});
ui.openKey.addEventListener("click", () => askForKey("The API key this page sends as 'Authorization: Bearer <key>'."));
$("key-cancel").addEventListener("click", () => ui.keyDialog.close("cancel"));
ui.keyDialog.addEventListener("close", () => {
  if (ui.keyDialog.returnValue === "save" && ui.apiKey.value.trim()) {
    localStorage.setItem(API_KEY, ui.apiKey.value.trim());
    connect();
  }
  ui.message.focus();
});

loadSettings();
connect();
ui.message.focus();
