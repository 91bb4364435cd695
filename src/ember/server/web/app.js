/* Ember web chat: a plain client of the public Ollama API (/api/tags, /api/ps,
 * /api/chat with images as base64, /api/version). No framework, no build step, no network access
 * beyond the server that served this page. Model text is never inserted as
 * HTML: renderMarkdown() escapes everything first and only then adds a small
 * whitelist of tags. */
"use strict";

// ---------------------------------------------------------------- Markdown --

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

// Placeholders for already-rendered inline pieces (code spans, links): the
// input never contains U+0000 (we strip it), so these cannot be forged.
const HOLE = "\u0000";

function renderInline(escaped) {
  const holes = [];
  const keep = (html) => HOLE + (holes.push(html) - 1) + HOLE;
  let s = escaped;
  // Code spans first: nothing inside them is Markdown.
  s = s.replace(/(`+)([^`\n]|[^`\n][^\n]*?[^`\n])\1(?!`)/g, (_, _ticks, code) => keep("<code>" + code.trim() + "</code>"));
  // [text](http(s)://url): any other scheme (javascript:, data:, ...) stays text.
  s = s.replace(/\[([^\[\]\n]+)\]\(\s*(https?:\/\/[^\s()]+)\s*\)/g,
    (_, label, url) => keep('<a href="' + url + '" target="_blank" rel="noopener noreferrer">' + emphasis(label) + "</a>"));
  // Bare http(s) URLs.
  s = s.replace(/\bhttps?:\/\/[^\s()\u0000]+/g, (url) => {
    let tail = "";
    const m = /(?:[.,;:!?'\]]|&quot;|&#39;|&gt;)+$/.exec(url);
    if (m) { tail = m[0]; url = url.slice(0, -tail.length); }
    if (!/^https?:\/\/./.test(url)) return url + tail;
    return keep('<a href="' + url + '" target="_blank" rel="noopener noreferrer">' + url + "</a>") + tail;
  });
  s = emphasis(s);
  for (let i = 0; i < 4 && s.includes(HOLE); i++) {
    s = s.replace(/\u0000(\d+)\u0000/g, (_, n) => holes[Number(n)]);
  }
  return s;
}

// Emphasis never spans a tag ("<" only appears in tags we added: the text is
// escaped), so the tags it adds always nest properly.
function emphasis(s) {
  return s
    .replace(/\*\*(?=[^\s<])([^<\n]*?[^\s<])\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^\w])__(?=[^\s<])([^<\n]*?[^\s<])__(?!\w)/g, "$1<strong>$2</strong>")
    .replace(/~~(?=[^\s<])([^<\n]*?[^\s<])~~/g, "<del>$1</del>")
    .replace(/(^|[^*\w])\*(?=[^\s*<])([^*<\n]*?[^\s*<])\*(?!\*)/g, "$1<em>$2</em>")
    .replace(/(^|[^\w])_(?=[^\s_<])([^_<\n]*?[^\s_<])_(?!\w)/g, "$1<em>$2</em>");
}

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)[^`]*$/;
const LIST_ITEM = /^( *)([-*+]|\d{1,9}[.)]) +(.*)$/;
const HEADING = /^ {0,3}(#{1,6}) +(.*?)(?: +#+)? *$/;
const RULE = /^ {0,3}([-*_])(?: *\1){2,} *$/;
const QUOTE = /^ {0,3}&gt; ?(.*)$/;
const TABLE_RULE = /^ {0,3}\|? *:?-+:? *(\| *:?-+:? *)*\|? *$/;

function tableCells(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|")) row = row.slice(0, -1);
  return row.split("|").map((c) => c.trim());
}

function renderTable(header, rule, rows) {
  const align = tableCells(rule).map((c) =>
    c.startsWith(":") && c.endsWith(":") ? ' class="al-c"' : c.endsWith(":") ? ' class="al-r"' : "");
  const cols = header.length;
  const row = (cells, tag) => "<tr>" + Array.from({ length: cols }, (_, k) =>
    "<" + tag + (align[k] || "") + ">" + renderInline(cells[k] || "") + "</" + tag + ">").join("") + "</tr>";
  return '<div class="table-wrap"><table><thead>' + row(header, "th") + "</thead><tbody>" +
    rows.map((r) => row(r, "td")).join("") + "</tbody></table></div>";
}

function codeBlock(code, lang) {
  return '<div class="code"><div class="code-head"><span class="code-lang">' + (lang || "text") +
    '</span><button type="button" class="copy-btn" data-copy>Copy</button></div><pre><code>' +
    code + "</code></pre></div>";
}

function renderList(items) {
  let html = "";
  const stack = [];
  for (const it of items) {
    const tag = it.ordered ? "ol" : "ul";
    while (stack.length && it.indent < stack[stack.length - 1].indent) {
      html += "</li></" + stack.pop().tag + ">";
    }
    let top = stack[stack.length - 1];
    if (top && it.indent === top.indent && top.tag !== tag) {
      html += "</li></" + stack.pop().tag + ">";
      top = stack[stack.length - 1];
    }
    if (!top || it.indent > top.indent) {
      const start = it.ordered && it.number !== 1 ? ' start="' + it.number + '"' : "";
      html += "<" + tag + start + ">";
      stack.push({ indent: it.indent, tag });
    } else {
      html += "</li>";
    }
    html += "<li>" + renderInline(it.text).replace(/\n/g, "<br>");
  }
  while (stack.length) html += "</li></" + stack.pop().tag + ">";
  return html;
}

// Block structure of already-escaped lines.
function renderBlocks(lines) {
  const out = [];
  let para = [];
  const flush = () => {
    if (para.length) out.push("<p>" + renderInline(para.join("\n")).replace(/\n/g, "<br>") + "</p>");
    para = [];
  };
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = FENCE.exec(line);
    if (fence) {
      flush();
      const mark = fence[1];
      const close = new RegExp("^ {0,3}" + (mark[0] === "`" ? "`" : "~") + "{" + mark.length + ",} *$");
      const body = [];
      i++;
      while (i < lines.length && !close.test(lines[i])) body.push(lines[i++]);
      i++; // the closing fence (an unclosed fence runs to the end: fine while streaming)
      out.push(codeBlock(body.join("\n"), fence[2]));
      continue;
    }
    if (!line.trim()) { flush(); i++; continue; }
    const heading = HEADING.exec(line);
    if (heading) {
      flush();
      const level = Math.min(heading[1].length + 2, 6);
      out.push("<h" + level + ">" + renderInline(heading[2]) + "</h" + level + ">");
      i++;
      continue;
    }
    if (line.includes("|") && i + 1 < lines.length && TABLE_RULE.test(lines[i + 1]) && lines[i + 1].includes("|") &&
        tableCells(lines[i + 1]).length === tableCells(line).length) {
      flush();
      const header = tableCells(line);
      const rule = lines[i + 1];
      const rows = [];
      i += 2;
      while (i < lines.length && lines[i].includes("|") && lines[i].trim()) rows.push(tableCells(lines[i++]));
      out.push(renderTable(header, rule, rows));
      continue;
    }
    if (RULE.test(line)) { flush(); out.push("<hr>"); i++; continue; }
    if (QUOTE.test(line)) {
      flush();
      const inner = [];
      while (i < lines.length && QUOTE.test(lines[i])) inner.push(QUOTE.exec(lines[i++])[1]);
      out.push("<blockquote>" + renderBlocks(inner) + "</blockquote>");
      continue;
    }
    if (LIST_ITEM.test(line.replace(/\t/g, "    ")) && (para.length === 0 || !/^ /.test(line))) {
      flush();
      const items = [];
      while (i < lines.length) {
        const l = lines[i].replace(/\t/g, "    ");
        const m = LIST_ITEM.exec(l);
        if (m) {
          items.push({ indent: m[1].length, ordered: /\d/.test(m[2]), number: parseInt(m[2], 10), text: m[3] });
        } else if (items.length && /^ +\S/.test(l) && !FENCE.test(l)) {
          items[items.length - 1].text += "\n" + l.trim();
        } else {
          break;
        }
        i++;
      }
      out.push(renderList(items));
      continue;
    }
    para.push(line.trim());
    i++;
  }
  flush();
  return out.join("");
}

/** Markdown to HTML, safe for innerHTML: every character of the input is
 * escaped before any tag is added, and only our own tags are ever added. */
function renderMarkdown(source) {
  const text = String(source == null ? "" : source).replace(/\r\n?/g, "\n").replace(/\u0000/g, "");
  return renderBlocks(escapeHtml(text).split("\n"));
}

// ------------------------------------------------------------------ State --

const KEYS = {
  chats: "ember.chats.v1",
  current: "ember.current",
  settings: "ember.settings.v1",
  model: "ember.model",
};
const DEFAULT_SETTINGS = { system: "", temperature: "", num_ctx: "", num_predict: "", api_key: "" };

const state = {
  chats: [],
  currentId: null,
  settings: { ...DEFAULT_SETTINGS },
  installed: [],
  loaded: [],
  serverUp: null,
  running: null, // {controller, chat, reply}
  attachments: [], // data: URLs of the images going with the next message
};

// Images the models read (what the server accepts), as data: URLs: the only
// form kept, shown (as <img src>, never as markup) and sent (their base64).
const IMAGE_TYPES = ["image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp"];
const MAX_IMAGE_BYTES = 20 * 1024 * 1024;
const IMAGE_URL = /^data:image\/(png|jpeg|webp|gif|bmp);base64,[A-Za-z0-9+/]+=*$/;

const $ = (id) => document.getElementById(id);

function loadJSON(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw == null ? fallback : JSON.parse(raw);
  } catch (_) {
    return fallback;
  }
}

function saveJSON(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch (e) {
    showBanner("Could not save to this browser's storage (" + e.name + "): older conversations may be lost.", false, "storage");
  }
}

// Conversations from storage are data, not code: keep only the fields we know,
// with the types we expect.
function sanitizeChat(c) {
  if (!c || typeof c !== "object" || !Array.isArray(c.messages)) return null;
  const str = (v) => (typeof v === "string" ? v : "");
  const num = (v) => (typeof v === "number" && isFinite(v) ? v : undefined);
  const messages = c.messages
    .filter((m) => m && (m.role === "user" || m.role === "assistant"))
    .map((m) => ({
      role: m.role,
      content: str(m.content),
      images: m.role === "user" && Array.isArray(m.images) && m.images.some((u) => typeof u === "string" && IMAGE_URL.test(u))
        ? m.images.filter((u) => typeof u === "string" && IMAGE_URL.test(u)) : undefined,
      model: str(m.model) || undefined,
      error: str(m.error) || undefined,
      // A reply still streaming when the page went away was cut off.
      stopped: m.stopped === true || m.pending === true || undefined,
      stats: m.stats && typeof m.stats === "object" ? {
        eval_count: num(m.stats.eval_count),
        eval_duration: num(m.stats.eval_duration),
        prompt_eval_count: num(m.stats.prompt_eval_count),
        load_duration: num(m.stats.load_duration),
        ttft_ms: num(m.stats.ttft_ms),
        done_reason: str(m.stats.done_reason) || undefined,
      } : undefined,
    }));
  return {
    id: str(c.id) || newId(),
    title: str(c.title),
    model: str(c.model),
    created: num(c.created) || Date.now(),
    updated: num(c.updated) || Date.now(),
    messages,
  };
}

function newId() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
}

function persist() {
  saveJSON(KEYS.chats, state.chats);
  try { localStorage.setItem(KEYS.current, state.currentId || ""); } catch (_) { /* reported by saveJSON */ }
}

let persistTimer = 0;
function persistSoon() {
  if (!persistTimer) persistTimer = setTimeout(() => { persistTimer = 0; persist(); }, 800);
}

function currentChat() {
  return state.chats.find((c) => c.id === state.currentId) || null;
}

function newChat() {
  const chat = { id: newId(), title: "", model: selectedModel(), created: Date.now(), updated: Date.now(), messages: [] };
  state.chats.unshift(chat);
  state.currentId = chat.id;
  return chat;
}

// ------------------------------------------------------------------- API --

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

class ServerDown extends Error {}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.settings.api_key) h.Authorization = "Bearer " + state.settings.api_key;
  return h;
}

async function errorFrom(res) {
  let message = res.status + " " + (res.statusText || "error");
  try {
    const body = await res.json();
    if (body && typeof body.error === "string") message = body.error;
    else if (body && body.error && typeof body.error.message === "string") message = body.error.message;
  } catch (_) { /* not JSON */ }
  return new ApiError(message, res.status);
}

async function api(path, options) {
  let res;
  try {
    res = await fetch(path, Object.assign({}, options, { headers: headers(options && options.headers) }));
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ServerDown("Failed to reach the server");
  }
  if (!res.ok) throw await errorFrom(res);
  return res;
}

// --------------------------------------------------------- Server status --

let healthTimer = 0;

function setServerUp(up, version, refresh = true) {
  const was = state.serverUp;
  state.serverUp = up;
  if (version) state.version = String(version);
  const el = $("server-status");
  el.classList.toggle("up", up);
  el.classList.toggle("down", !up);
  el.querySelector(".label").textContent = up ? "Ember " + (state.version || "") + " · connected" : "Server unreachable";
  if (!up) {
    showBanner("Can't reach the Ember server at " + location.host +
      ". Is `ember serve` running? Retrying every few seconds…", true, "down");
    clearTimeout(healthTimer);
    healthTimer = setTimeout(checkServer, 3000);
  } else if (was === false) {
    hideBanner("down");
    if (refresh) refreshModels();
  }
}

async function checkServer() {
  try {
    const res = await api("api/version");
    const body = await res.json();
    setServerUp(true, body.version);
    return true;
  } catch (e) {
    if (e instanceof ServerDown) setServerUp(false);
    return false;
  }
}

// kind: "down" (server unreachable), "models" (listing problems: cleared by
// the next good listing) or "storage".
function showBanner(text, retry, kind = "models") {
  state.bannerKind = kind;
  $("banner-text").textContent = text;
  $("banner-retry").hidden = !retry;
  $("banner").hidden = false;
}

function hideBanner(kind) {
  if (kind && state.bannerKind !== kind) return;
  $("banner").hidden = true;
}

// ---------------------------------------------------------------- Models --

function selectedModel() {
  return $("model").value || "";
}

function shortName(name) {
  return name.endsWith(":latest") ? name.slice(0, -7) : name;
}

function sameModel(a, b) {
  return !!a && !!b && (a === b || shortName(a) === shortName(b));
}

async function refreshModels() {
  const btn = $("refresh-models");
  btn.classList.add("spinning");
  try {
    const [tags, ps] = await Promise.all([
      api("api/tags").then((r) => r.json()),
      api("api/ps").then((r) => r.json()),
    ]);
    state.installed = Array.isArray(tags.models) ? tags.models : [];
    state.loaded = Array.isArray(ps.models) ? ps.models : [];
    if (state.serverUp !== true) setServerUp(true, null, false);
    hideBanner("models");
    renderModelSelect();
  } catch (e) {
    if (e instanceof ServerDown) setServerUp(false);
    else if (e instanceof ApiError && e.status === 401) showBanner("The server needs an API key (it was started with EMBER_API_KEY): enter it in Settings.", false);
    else showBanner("Could not list models: " + e.message, true);
  } finally {
    setTimeout(() => btn.classList.remove("spinning"), 300);
  }
}

const narrow = window.matchMedia("(max-width: 820px)");

function modelLabel(m) {
  const d = m.details || {};
  if (narrow.matches) return shortName(String(m.name || m.model || ""));
  const bits = [d.parameter_size, d.quantization_level].filter((x) => typeof x === "string" && x);
  return shortName(String(m.name || m.model || "")) + (bits.length ? "  ·  " + bits.join(" ") : "");
}

function renderModelSelect() {
  const select = $("model");
  const chat = currentChat();
  const wanted = (chat && chat.model) || select.value || localStorage.getItem(KEYS.model) || "";
  select.textContent = "";
  const loadedNames = state.loaded.map((m) => String(m.name || m.model || ""));
  const groups = [
    ["Loaded", state.loaded],
    ["Installed", state.installed.filter((m) => !loadedNames.some((n) => sameModel(n, String(m.name || m.model || ""))))],
  ];
  let count = 0;
  for (const [label, models] of groups) {
    if (!models.length) continue;
    const group = document.createElement("optgroup");
    group.label = label;
    for (const m of models) {
      const opt = document.createElement("option");
      opt.value = String(m.name || m.model || "");
      opt.textContent = (label === "Loaded" ? "● " : "") + modelLabel(m);
      group.appendChild(opt);
      count++;
    }
    select.appendChild(group);
  }
  if (!count) {
    const opt = document.createElement("option");
    opt.value = "";
    opt.textContent = "No models installed";
    select.appendChild(opt);
    select.disabled = true;
    if (state.serverUp) showBanner("No models yet. Create one with `ember create NAME -f Modelfile` or `ember pull`, then press ↻.", false);
  } else {
    select.disabled = false;
    const match = Array.from(select.options).find((o) => sameModel(o.value, wanted));
    if (match) select.value = match.value;
  }
  updateModelState();
}

function updateModelState() {
  const el = $("model-state");
  const name = selectedModel();
  if (!name) { el.hidden = true; return; }
  const loaded = state.loaded.find((m) => sameModel(String(m.name || m.model || ""), name));
  el.hidden = false;
  el.className = "model-state " + (loaded ? "loaded" : "idle");
  const ctx = loaded && Number.isInteger(loaded.context_length) ? " · " + loaded.context_length + " ctx" : "";
  el.textContent = loaded ? "in memory" + ctx : "loads on first message";
  el.title = loaded ? "This model is loaded and ready" : "This model will be loaded when you send a message";
}

// -------------------------------------------------------------- Rendering --

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c != null) el.append(c);
  return el;
}

function icon(path) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("aria-hidden", "true");
  const p = document.createElementNS(ns, "path");
  p.setAttribute("d", path);
  svg.appendChild(p);
  return svg;
}

const ICONS = {
  edit: "M4 20h4L19 9l-4-4L4 16v4zM13.5 6.5l4 4",
  copy: "M9 9h10v10H9zM5 15V5h10",
  retry: "M20 11a8 8 0 1 0-2.3 5.7M20 5v6h-6",
  trash: "M5 7h14M10 7V5h4v2M7 7l1 12h8l1-12",
};

function relativeTime(ts) {
  const s = (Date.now() - ts) / 1000;
  if (s < 60) return "just now";
  if (s < 3600) return Math.floor(s / 60) + " min ago";
  if (s < 86400) return Math.floor(s / 3600) + " h ago";
  return new Date(ts).toLocaleDateString();
}

function renderConversations() {
  const nav = $("conversations");
  nav.textContent = "";
  if (!state.chats.length) {
    nav.append(h("p", { class: "conv-empty", text: "No conversations yet." }));
    return;
  }
  for (const chat of state.chats) {
    const item = h("div", {
      class: "conv-item" + (chat.id === state.currentId ? " active" : ""),
      role: "button",
      tabindex: "0",
      "data-id": chat.id,
      onclick: () => selectChat(chat.id),
      onkeydown: (e) => { if (e.key === "Enter") selectChat(chat.id); },
    },
    h("span", { class: "conv-title", text: chat.title || "New chat" }),
    h("span", { class: "conv-meta", text: (chat.model ? shortName(chat.model) + " · " : "") + relativeTime(chat.updated) }),
    h("button", {
      class: "conv-delete icon-btn",
      type: "button",
      title: "Delete conversation",
      "aria-label": "Delete conversation",
      onclick: (e) => { e.stopPropagation(); deleteChat(chat.id); },
    }, icon(ICONS.trash)));
    nav.append(item);
  }
}

function formatStats(msg) {
  const st = msg.stats || {};
  const parts = [];
  if (st.eval_count != null) parts.push(st.eval_count + " tokens");
  if (st.eval_count && st.eval_duration) parts.push((st.eval_count / (st.eval_duration / 1e9)).toFixed(1) + " tok/s");
  if (st.ttft_ms != null) parts.push("TTFT " + (st.ttft_ms / 1000).toFixed(2) + " s");
  if (st.load_duration && st.load_duration > 5e8) parts.push("load " + (st.load_duration / 1e9).toFixed(1) + " s");
  if (st.done_reason === "length") parts.push("max tokens reached");
  if (msg.stopped) parts.unshift("Stopped");
  return parts.join(" · ");
}

function messageElement(msg, index, chat) {
  const isUser = msg.role === "user";
  const running = state.running && state.running.reply === msg;
  const body = h("div", { class: "md" });
  body.innerHTML = renderMarkdown(msg.content);
  if (running && !msg.content) {
    body.append(h("span", { class: "typing", "aria-label": "waiting for the model" }, h("i"), h("i"), h("i"),
      state.running.loading ? h("span", { class: "typing-label", text: "Loading " + shortName(msg.model || "") + " into memory…" }) : null));
  }
  else if (running) body.classList.add("streaming");

  const bubble = h("div", { class: "bubble" + (!msg.content && !running ? " no-text" : "") },
    msg.images && msg.images.length ? h("div", { class: "msg-images" }, ...msg.images.map((url, i) => thumbnail(url, "Image " + (i + 1)))) : null,
    body);
  if (msg.error) {
    bubble.append(h("div", { class: "msg-error", role: "alert" },
      h("strong", { text: "Error: " }), document.createTextNode(msg.error)));
  }
  const actions = h("div", { class: "actions" });
  if (isUser) {
    actions.append(h("button", { class: "act", type: "button", title: "Edit and resend", "data-action": "edit", onclick: () => startEdit(index) }, icon(ICONS.edit), h("span", { text: "Edit" })));
  } else if (!running) {
    if (msg.content) actions.append(h("button", { class: "act", type: "button", title: "Copy reply", "data-action": "copy", onclick: (e) => copyText(msg.content, e.currentTarget) }, icon(ICONS.copy), h("span", { text: "Copy" })));
    if (index === chat.messages.length - 1) {
      actions.append(h("button", { class: "act", type: "button", title: "Regenerate", "data-action": "retry", onclick: () => regenerate() }, icon(ICONS.retry), h("span", { text: "Retry" })));
    }
  }
  const meta = h("div", { class: "meta" });
  if (!isUser) {
    const stats = formatStats(msg);
    if (msg.model) meta.append(h("span", { class: "meta-model", text: shortName(msg.model) }));
    if (stats) meta.append(h("span", { class: "stats", text: stats }));
  }
  meta.append(actions);
  return h("div", { class: "msg " + (isUser ? "user" : "assistant"), "data-index": String(index) }, bubble, meta);
}

function emptyState() {
  const examples = ["Explain what a GGUF file is.", "Write a haiku about embers.", "Give me three tips for writing clear code."];
  return h("div", { class: "empty" },
    h("div", { class: "empty-logo" }, (() => {
      const ns = "http://www.w3.org/2000/svg";
      const svg = document.createElementNS(ns, "svg");
      svg.setAttribute("viewBox", "0 0 32 32");
      const p = document.createElementNS(ns, "path");
      p.setAttribute("d", "M16 2c2 6 9 9 9 17a9 9 0 0 1-18 0c0-5 3-7 4-11 1 3 2 5 4 6 0-5-1-8 1-12z");
      svg.appendChild(p);
      return svg;
    })()),
    h("h1", { text: "What shall we talk about?" }),
    h("p", { class: "empty-sub", text: "Chat with models running on this machine. Nothing leaves it." }),
    h("div", { class: "examples" }, ...examples.map((t) => h("button", {
      class: "example", type: "button", text: t,
      onclick: () => { $("prompt").value = t; autoGrow(); $("prompt").focus(); },
    }))));
}

function renderMessages() {
  const box = $("messages");
  const chat = currentChat();
  box.textContent = "";
  if (!chat || !chat.messages.length) {
    box.append(emptyState());
    return;
  }
  const list = h("div", { class: "thread" });
  chat.messages.forEach((m, i) => list.append(messageElement(m, i, chat)));
  box.append(list);
}

function render() {
  const chat = currentChat();
  document.title = chat && chat.title ? chat.title + " · Ember" : "Ember";
  renderConversations();
  renderMessages();
  updateComposer();
}

// Re-render just the streaming reply, at most once per frame.
let frame = 0;
function renderReplySoon() {
  if (frame) return;
  frame = requestAnimationFrame(() => {
    frame = 0;
    const run = state.running;
    if (!run || run.chat.id !== state.currentId) return;
    const box = $("messages");
    const stick = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
    const index = run.chat.messages.indexOf(run.reply);
    const old = box.querySelector('.msg[data-index="' + index + '"]');
    const el = messageElement(run.reply, index, run.chat);
    if (old) old.replaceWith(el); else renderMessages();
    if (stick) box.scrollTop = box.scrollHeight;
  });
}

function scrollToBottom() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function updateComposer() {
  const busy = !!state.running;
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("send").disabled = (!$("prompt").value.trim() && !state.attachments.length) || !selectedModel();
}

// ---------------------------------------------------------------- Images --

function thumbnail(url, alt) {
  const img = h("img", { class: "thumb", alt, loading: "lazy" });
  img.src = url; // a checked data: URL (IMAGE_URL), set as a property
  return img;
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// Attach image files (from the file picker, a paste or a drop).
async function attachImages(files) {
  for (const file of Array.from(files || [])) {
    if (!file || !String(file.type).startsWith("image/")) continue;
    const name = file.name || "the image";
    if (!IMAGE_TYPES.includes(file.type)) {
      showBanner("\"" + name + "\" is not an image the models read (PNG, JPEG, WebP, GIF or BMP).", false, "image");
      continue;
    }
    if (file.size > MAX_IMAGE_BYTES) {
      showBanner("\"" + name + "\" is larger than " + MAX_IMAGE_BYTES / 1048576 + " MB; scale it down first.", false, "image");
      continue;
    }
    try {
      const url = await readAsDataURL(file);
      if (IMAGE_URL.test(url)) state.attachments.push(url);
    } catch (e) {
      showBanner("Could not read \"" + name + "\" (" + (e && e.name || e) + ").", false, "image");
    }
  }
  renderAttachments();
}

function renderAttachments() {
  const box = $("attachments");
  box.textContent = "";
  box.hidden = !state.attachments.length;
  state.attachments.forEach((url, i) => box.append(h("span", { class: "attachment" },
    thumbnail(url, "Attached image " + (i + 1)),
    h("button", {
      class: "attachment-remove", type: "button", title: "Remove", "aria-label": "Remove image " + (i + 1), text: "×",
      onclick: () => { state.attachments.splice(i, 1); renderAttachments(); },
    }))));
  updateComposer();
}

// ------------------------------------------------------------------ Chat --

function requestOptions() {
  const s = state.settings;
  const options = {};
  const num = (v) => (v === "" || v == null ? null : Number(v));
  const t = num(s.temperature);
  if (t != null && isFinite(t)) options.temperature = t;
  const ctx = num(s.num_ctx);
  if (ctx != null && isFinite(ctx) && ctx > 0) options.num_ctx = Math.round(ctx);
  const np = num(s.num_predict);
  if (np != null && isFinite(np)) options.num_predict = Math.round(np);
  return options;
}

function titleFrom(text) {
  const t = text.replace(/\s+/g, " ").trim();
  return t.length > 48 ? t.slice(0, 47) + "…" : t;
}

async function send(text, images) {
  if (state.running) return;
  let chat = currentChat();
  if (!chat) chat = newChat();
  chat.messages.push({ role: "user", content: text, images: images && images.length ? images : undefined });
  if (!chat.title) chat.title = titleFrom(text) || "Image";
  await generate(chat);
}

async function generate(chat) {
  const model = selectedModel();
  if (!model) {
    showBanner("Pick a model first (no models are installed, or the server is down).", false);
    return;
  }
  chat.model = model;
  chat.updated = Date.now();
  const history = chat.messages
    .filter((m) => !(m.role === "assistant" && m.error && !m.content))
    .map((m) => (m.images && m.images.length
      ? { role: m.role, content: m.content, images: m.images.map((url) => url.slice(url.indexOf(",") + 1)) }
      : { role: m.role, content: m.content }));
  const system = state.settings.system.trim();
  const messages = system ? [{ role: "system", content: system }, ...history] : history;
  const reply = { role: "assistant", content: "", model, pending: true };
  chat.messages.push(reply);
  // Most recently used conversation first.
  state.chats = [chat, ...state.chats.filter((c) => c !== chat)];
  const controller = new AbortController();
  const loading = !state.loaded.some((m) => sameModel(String(m.name || m.model || ""), model));
  let ended;
  const finished_ = new Promise((resolve) => { ended = resolve; });
  state.running = { controller, chat, reply, loading, finished: finished_ };
  persist();
  render();
  scrollToBottom();

  const started = performance.now();
  let finished = false;
  try {
    const res = await api("api/chat", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, messages, stream: true, options: requestOptions() }),
      signal: controller.signal,
    });
    if (state.serverUp === false) setServerUp(true, null, false);
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    const handle = (line) => {
      if (!line.trim()) return;
      const chunk = JSON.parse(line);
      if (chunk.error) throw new ApiError(typeof chunk.error === "string" ? chunk.error : JSON.stringify(chunk.error), 500);
      const piece = chunk.message && typeof chunk.message.content === "string" ? chunk.message.content : "";
      if (piece) {
        if (reply.content === "" && !reply.stats) reply.stats = { ttft_ms: Math.round(performance.now() - started) };
        reply.content += piece;
      }
      if (chunk.done) {
        finished = true;
        reply.stats = Object.assign(reply.stats || {}, {
          eval_count: chunk.eval_count,
          eval_duration: chunk.eval_duration,
          prompt_eval_count: chunk.prompt_eval_count,
          load_duration: chunk.load_duration,
          done_reason: chunk.done_reason,
        });
      }
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        handle(buffer.slice(0, nl));
        buffer = buffer.slice(nl + 1);
      }
      renderReplySoon();
      persistSoon();
    }
    handle(buffer + decoder.decode());
    if (!finished) reply.error = "The server closed the stream before the reply was complete.";
  } catch (e) {
    if (e.name === "AbortError") {
      reply.stopped = true;
    } else if (e instanceof ServerDown) {
      reply.error = "Can't reach the Ember server. Is `ember serve` still running?";
      setServerUp(false);
    } else if (e instanceof ApiError) {
      reply.error = describeApiError(e, model);
    } else if (e instanceof SyntaxError) {
      reply.error = "The server sent a reply this page could not read (" + e.message + ").";
    } else if (e instanceof TypeError) {
      // The stream broke after it started: the server went away mid-reply.
      reply.error = "The connection to the server was lost mid-reply.";
      checkServer();
    } else {
      reply.error = String(e && e.message || e);
    }
  } finally {
    delete reply.pending;
    state.running = null;
    chat.updated = Date.now();
    persist();
    render();
    scrollToBottom();
    refreshLoaded();
    ended();
  }
}

function describeApiError(e, model) {
  if (e.status === 401) return "The server needs an API key (Settings → API key). " + e.message;
  if (e.status === 404) return "Model \"" + shortName(model) + "\" is not available: " + e.message + ". Press ↻ to refresh the model list.";
  return "Model \"" + shortName(model) + "\" failed: " + e.message;
}

async function refreshLoaded() {
  try {
    const ps = await (await api("api/ps")).json();
    const before = JSON.stringify(state.loaded.map((m) => m.name));
    state.loaded = Array.isArray(ps.models) ? ps.models : [];
    if (JSON.stringify(state.loaded.map((m) => m.name)) !== before) renderModelSelect();
    else updateModelState();
  } catch (e) {
    if (e instanceof ServerDown) setServerUp(false);
  }
}

function stop() {
  if (state.running) state.running.controller.abort();
}

function regenerate() {
  const chat = currentChat();
  if (!chat || state.running) return;
  while (chat.messages.length && chat.messages[chat.messages.length - 1].role === "assistant") chat.messages.pop();
  if (chat.messages.length) generate(chat);
}

function startEdit(index) {
  const chat = currentChat();
  if (!chat) return;
  const msg = chat.messages[index];
  const el = $("messages").querySelector('.msg[data-index="' + index + '"]');
  if (!el || el.classList.contains("editing")) return;
  el.classList.add("editing");
  const area = h("textarea", { class: "edit-area", rows: "3", "aria-label": "Edit message" });
  area.value = msg.content;
  const save = () => {
    const text = area.value.trim();
    if (!text && !(msg.images && msg.images.length)) return;
    // A reply still streaming is stopped first, and its bookkeeping done.
    const previous = state.running ? state.running.finished : Promise.resolve();
    stop();
    previous.then(() => {
      chat.messages = chat.messages.slice(0, index);
      chat.messages.push({ role: "user", content: text, images: msg.images });
      if (index === 0) chat.title = titleFrom(text) || "Image";
      generate(chat);
    });
  };
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); save(); }
    if (e.key === "Escape") renderMessages();
  });
  const editor = h("div", { class: "editor" }, area,
    h("div", { class: "editor-actions" },
      h("button", { class: "btn btn-ghost btn-small", type: "button", text: "Cancel", onclick: () => renderMessages() }),
      h("button", { class: "btn btn-primary btn-small", type: "button", text: "Save & send", "data-action": "save-edit", onclick: save })));
  el.querySelector(".bubble").replaceWith(editor);
  area.focus();
  area.setSelectionRange(area.value.length, area.value.length);
}

function selectChat(id) {
  state.currentId = id;
  const chat = currentChat();
  persist();
  closeSidebar();
  renderModelSelect();
  if (chat && chat.model) {
    const match = Array.from($("model").options).find((o) => sameModel(o.value, chat.model));
    if (match) $("model").value = match.value;
    updateModelState();
  }
  render();
  scrollToBottom();
}

function deleteChat(id) {
  if (state.running && state.running.chat.id === id) stop();
  state.chats = state.chats.filter((c) => c.id !== id);
  if (state.currentId === id) state.currentId = state.chats.length ? state.chats[0].id : null;
  persist();
  render();
}

async function copyText(text, button) {
  let ok = false;
  try {
    await navigator.clipboard.writeText(text);
    ok = true;
  } catch (_) {
    const area = h("textarea", { class: "clip" });
    area.value = text;
    document.body.append(area);
    area.select();
    try { ok = document.execCommand("copy"); } catch (_) { ok = false; }
    area.remove();
  }
  if (button) {
    const label = button.querySelector("span") || button;
    const old = label.textContent;
    label.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => { label.textContent = old; }, 1200);
  }
}

// -------------------------------------------------------------- Settings --

const FIELDS = [
  ["opt-system", "system"],
  ["opt-temperature", "temperature"],
  ["opt-num-ctx", "num_ctx"],
  ["opt-num-predict", "num_predict"],
  ["opt-api-key", "api_key"],
];

function loadSettingsForm() {
  for (const [id, key] of FIELDS) $(id).value = state.settings[key] == null ? "" : String(state.settings[key]);
}

function onSettingsInput() {
  for (const [id, key] of FIELDS) state.settings[key] = $(id).value;
  saveJSON(KEYS.settings, state.settings);
}

function openSettings() {
  $("settings").hidden = false;
  document.body.classList.add("settings-open");
  $("opt-system").focus();
}

function closeSettings() {
  $("settings").hidden = true;
  document.body.classList.remove("settings-open");
}

function openSidebar() { document.body.classList.add("sidebar-open"); }
function closeSidebar() { document.body.classList.remove("sidebar-open"); }

// ------------------------------------------------------------------ Boot --

function autoGrow() {
  const area = $("prompt");
  area.style.height = "auto";
  area.style.height = Math.min(area.scrollHeight, 220) + "px";
  updateComposer();
}

function boot() {
  const stored = loadJSON(KEYS.chats, []);
  state.chats = (Array.isArray(stored) ? stored : []).map(sanitizeChat).filter(Boolean);
  // A reply that was streaming when the page went away is marked as cut off.
  const currentId = localStorage.getItem(KEYS.current);
  state.currentId = state.chats.some((c) => c.id === currentId) ? currentId : (state.chats[0] ? state.chats[0].id : null);
  const settings = loadJSON(KEYS.settings, {});
  for (const key of Object.keys(DEFAULT_SETTINGS)) {
    if (settings && typeof settings[key] === "string") state.settings[key] = settings[key];
  }
  loadSettingsForm();

  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if ((!text && !state.attachments.length) || state.running || !selectedModel()) return;
    const images = state.attachments;
    state.attachments = [];
    renderAttachments();
    $("prompt").value = "";
    autoGrow();
    send(text, images);
  });
  $("attach").addEventListener("click", () => $("file").click());
  $("file").addEventListener("change", () => {
    attachImages($("file").files).then(() => { $("file").value = ""; });
  });
  $("prompt").addEventListener("paste", (e) => {
    const files = Array.from((e.clipboardData && e.clipboardData.files) || []).filter((f) => String(f.type).startsWith("image/"));
    if (files.length) { e.preventDefault(); attachImages(files); }
  });
  // Drop images anywhere on the chat.
  const main = document.querySelector(".main");
  const dragging = (e) => e.dataTransfer && Array.from(e.dataTransfer.types || []).includes("Files");
  main.addEventListener("dragover", (e) => {
    if (!dragging(e)) return;
    e.preventDefault();
    $("composer").classList.add("dropping");
  });
  main.addEventListener("dragleave", (e) => { if (!main.contains(e.relatedTarget)) $("composer").classList.remove("dropping"); });
  main.addEventListener("drop", (e) => {
    $("composer").classList.remove("dropping");
    if (!dragging(e)) return;
    e.preventDefault();
    attachImages(e.dataTransfer.files);
  });
  // On touch screens Enter is a new line (the send button sends), as in messaging apps.
  const touch = window.matchMedia("(pointer: coarse)");
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && !touch.matches) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("prompt").addEventListener("input", autoGrow);
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", () => {
    const chat = currentChat();
    if (!chat || chat.messages.length) newChat();
    persist();
    closeSidebar();
    render();
    $("prompt").focus();
  });
  $("model").addEventListener("change", () => {
    const name = selectedModel();
    try { localStorage.setItem(KEYS.model, name); } catch (_) { /* ignore */ }
    const chat = currentChat();
    if (chat) { chat.model = name; persist(); renderConversations(); }
    updateModelState();
    updateComposer();
  });
  $("refresh-models").addEventListener("click", refreshModels);
  narrow.addEventListener("change", renderModelSelect);
  $("banner-retry").addEventListener("click", () => { checkServer().then((up) => { if (up) refreshModels(); }); });
  $("settings-toggle").addEventListener("click", () => ($("settings").hidden ? openSettings() : closeSettings()));
  $("settings-close").addEventListener("click", closeSettings);
  $("settings-reset").addEventListener("click", () => {
    const key = state.settings.api_key;
    state.settings = { ...DEFAULT_SETTINGS, api_key: key };
    saveJSON(KEYS.settings, state.settings);
    loadSettingsForm();
  });
  for (const [id] of FIELDS) $(id).addEventListener("input", onSettingsInput);
  $("settings-form").addEventListener("submit", (e) => { e.preventDefault(); refreshModels(); });
  $("opt-api-key").addEventListener("change", refreshModels);
  $("menu").addEventListener("click", openSidebar);
  $("scrim").addEventListener("click", () => { closeSidebar(); closeSettings(); });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") { closeSettings(); closeSidebar(); }
  });
  // Copy buttons inside rendered code blocks.
  $("messages").addEventListener("click", (e) => {
    const btn = e.target.closest("[data-copy]");
    if (!btn) return;
    const code = btn.closest(".code").querySelector("code");
    copyText(code.textContent, btn);
  });
  window.addEventListener("storage", (e) => {
    if (e.key === KEYS.chats && !state.running) {
      const chats = loadJSON(KEYS.chats, []);
      state.chats = (Array.isArray(chats) ? chats : []).map(sanitizeChat).filter(Boolean);
      if (!currentChat()) state.currentId = state.chats[0] ? state.chats[0].id : null;
      render();
    }
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && !state.running) refreshLoaded();
  });

  render();
  scrollToBottom();
  checkServer().then((up) => { if (up) refreshModels(); });
  // Notice models loading/unloading (keep_alive) and a server that went away.
  setInterval(() => {
    if (!document.hidden && !state.running && state.serverUp) refreshLoaded();
  }, 15000);
}

// Exposed for tests and the curious: the renderer is a pure function.
window.ember = { renderMarkdown, escapeHtml };

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", boot);
else boot();
