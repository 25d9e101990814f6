// nanoinfer playground: a chat that shows each token's probability and alternatives, the prompt
// as the chat template renders it and as token ids, and what the prefix cache held.
//
// It talks only to this server's own API, the one any client calls: streaming
// /v1/chat/completions with logprobs, /tokenize and /detokenize, /v1/completions (to force a
// token), /v1/models, /health and /metrics. No library, no build step.
"use strict";

const KEY_STORAGE = "nanoinfer.apiKey";
const SETTINGS_STORAGE = "nanoinfer.settings";
const METRICS_EVERY_MS = 2000;
const TOP_K_SHOWN = 5;
// The sampling controls: input id -> how its text becomes a request field (an empty input is not sent).
const SAMPLING_FIELDS = {
  temperature: Number, top_p: Number, top_k: parseInt, min_p: Number, max_tokens: parseInt, seed: parseInt,
};

const $ = (id) => document.getElementById(id);

// ---- state --------------------------------------------------------------------------------

const state = {
  apiKey: readStorage(KEY_STORAGE) || "",
  model: null, // what requests name; null: the server's own
  // {role, content} and, for an answer, tokens: [{id, bytes, logprob, alts, forced, special}],
  // prompt: the ids it was generated from, and note: how it ended.
  messages: [],
  controller: null, // the AbortController of the request in flight
  byteLevel: true, // how vocabulary pieces spell bytes (GPT-2 byte-level BPE, or SentencePiece)
  tokenBytes: new Map(), // token id -> its bytes, from every response that told us
  stopIds: new Set(), // tokens seen ending an answer (end of turn): forcing one ends the answer there
  polling: false, // a /metrics request is in flight
};

function readStorage(key) {
  try { return localStorage.getItem(key); } catch { return null; } // storage may be disabled
}

function writeStorage(key, value) {
  try {
    if (value === null) localStorage.removeItem(key);
    else localStorage.setItem(key, value);
  } catch { /* private mode: the value lives in memory only */ }
}

// ---- bytes and text -------------------------------------------------------------------------
// Token ids map to bytes, not text: a byte-level BPE token may hold part of a UTF-8 character
// (明 is e6 98 8e, and SmolLM2 splits it e6 98 | 8e). So tokens carry bytes, and text is made from them.

const utf8 = new TextEncoder();
const utf8Strict = new TextDecoder("utf-8", { fatal: false });

// GPT-2's byte-level alphabet: bytes that are printable stand for themselves, the others
// (space, newline, ...) are moved to U+0100 and up, in order ("Ġ" is a space, "Ċ" a newline).
const BYTE_OF_CHAR = (() => {
  const table = new Map();
  let shift = 0;
  for (let b = 0; b < 256; b++) {
    const printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    table.set(String.fromCharCode(printable ? b : 256 + shift++), b);
  }
  return table;
})();

// Byte-level BPE writes every piece in the alphabet above; SentencePiece writes "▁" for a space
// and raw characters. A rendered chat prompt always has spaces or newlines, so it tells which.
function looksByteLevel(pieces) {
  return pieces.every((p) => !p.includes("\u2581") && [...p].every((c) => BYTE_OF_CHAR.has(c)));
}

// The bytes a vocabulary piece stands for (what the server's token_strs spell).
function pieceBytes(piece) {
  if (state.byteLevel && [...piece].every((c) => BYTE_OF_CHAR.has(c))) {
    return Uint8Array.from([...piece], (c) => BYTE_OF_CHAR.get(c));
  }
  const byte = /^<0x([0-9A-Fa-f]{2})>$/.exec(piece); // SentencePiece's byte fallback
  if (byte) return Uint8Array.of(parseInt(byte[1], 16));
  return utf8.encode(piece.replaceAll("\u2581", " "));
}

// The UTF-8 characters in `bytes`, each with its byte span; text null marks a byte that is no
// valid character. Unless `final`, an unfinished character at the end is left out: it starts at `rest`.
function utf8Chars(bytes, final) {
  const chars = [];
  let i = 0;
  while (i < bytes.length) {
    const b = bytes[i];
    const need = b < 0x80 ? 1 : b >> 5 === 6 ? 2 : b >> 4 === 14 ? 3 : b >> 3 === 30 ? 4 : 0;
    let end = i + 1;
    while (end < Math.min(i + need, bytes.length) && (bytes[end] & 0xc0) === 0x80) end++;
    if (need && end === i + need) {
      chars.push({ text: utf8Strict.decode(bytes.subarray(i, end)), start: i, end });
      i = end;
    } else if (need && end === bytes.length && !final) {
      return { chars, rest: i }; // may be finished by the next token
    } else {
      chars.push({ text: null, start: i, end: i + 1 });
      i += 1;
    }
  }
  return { chars, rest: bytes.length };
}

const hex = (b) => b.toString(16).padStart(2, "0");

// How one token reads on its own: its characters, and \xNN for bytes of a character it holds only part of.
function tokenLabel(bytes) {
  return utf8Chars(bytes, true).chars.map((c) => c.text ?? `\\x${hex(bytes[c.start])}`).join("");
}

// Whitespace made visible, for token chips and the alternatives list.
function visible(text) {
  return text.replace(/ /g, "␣").replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, "␍");
}

function concatBytes(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

function decodeAll(parts) {
  return utf8Strict.decode(concatBytes(parts));
}

const percent = (logprob) => {
  const p = Math.exp(logprob);
  return p < 0.001 ? "<0.1%" : `${(100 * p).toFixed(1)}%`;
};

// Probability bands for colour (the legend in index.html lists them).
function band(logprob) {
  const p = Math.exp(logprob);
  return p >= 0.9 ? "p4" : p >= 0.5 ? "p3" : p >= 0.2 ? "p2" : p >= 0.05 ? "p1" : "p0";
}

// ---- talking to the server ------------------------------------------------------------------

class HttpError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

const UNREACHABLE = () =>
  `Cannot reach the server at ${location.origin}: is \`nanoinfer serve\` still running?`;

// fetch with the API key; an HTTP error becomes an HttpError carrying the server's own message,
// a network failure a plain Error saying the server cannot be reached.
async function api(path, { body, signal, method } = {}) {
  const headers = {};
  if (state.apiKey) headers.Authorization = `Bearer ${state.apiKey}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(path, {
      method: method || (body === undefined ? "GET" : "POST"),
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new Error(UNREACHABLE());
  }
  if (!response.ok) throw new HttpError(response.status, await errorMessage(response));
  return response;
}

async function errorMessage(response) {
  const text = await response.text().catch(() => "");
  try {
    const message = JSON.parse(text).error?.message;
    if (message) return message;
  } catch { /* not JSON */ }
  return text.trim() || response.statusText || "no message";
}

// Server-sent events of a streamed answer, as parsed JSON payloads; an in-band {"error"} throws.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new Error(`The connection to the server was lost. ${UNREACHABLE()}`);
    }
    if (chunk.done) return;
    buffer += decoder.decode(chunk.value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (!data || data === "[DONE]") continue;
      const payload = JSON.parse(data);
      if (payload.error) throw new HttpError(payload.error.code, payload.error.message);
      yield payload;
    }
  }
}

// The sampling fields the person set; untouched controls are left out, so the model's defaults hold.
function samplingFields() {
  const fields = {};
  for (const [id, parse] of Object.entries(SAMPLING_FIELDS)) {
    const raw = $(id).value.trim();
    if (raw === "") continue;
    const value = parse(raw);
    if (!Number.isFinite(value)) throw new HttpError(400, `${id} must be a number, got "${raw}"`);
    fields[id] = value;
  }
  if (state.model) fields.model = state.model;
  return fields;
}

// "token_id:N" (return_tokens_as_token_ids) -> N.
function tokenId(text) {
  const match = /^token_id:(\d+)$/.exec(text);
  if (!match) throw new Error(`unexpected token name ${JSON.stringify(text)}`);
  return Number(match[1]);
}

// Bytes of tokens we have not seen yet, from /detokenize's pieces (one request for all of them).
async function learnTokens(ids, signal) {
  const unknown = [...new Set(ids)].filter((id) => !state.tokenBytes.has(id));
  if (!unknown.length) return;
  const body = { tokens: unknown, return_token_strs: true };
  const answer = await (await api("/detokenize", { body, signal })).json();
  unknown.forEach((id, i) => state.tokenBytes.set(id, pieceBytes(answer.token_strs[i])));
}

// ---- errors -----------------------------------------------------------------------------------

function showError(error) {
  if (error instanceof HttpError && error.status === 401) {
    askForKey(error.message);
    showBanner(`The server refused the request (401): ${error.message}`);
    return;
  }
  const status = error instanceof HttpError && error.status ? ` (${error.status})` : "";
  showBanner(`${error.message}${status}`);
}

function showBanner(text, kind = "error") {
  $("banner-text").textContent = text;
  $("banner").dataset.kind = kind;
  $("banner").hidden = false;
}

function hideBanner(kind) {
  if (!kind || $("banner").dataset.kind === kind) $("banner").hidden = true;
}

function askForKey(reason) {
  $("key-reason").textContent = state.apiKey
    ? `The server did not accept this key: ${reason}`
    : "This server needs an API key (it was started with --api-key).";
  $("key-form").hidden = false;
  $("key-input").focus();
}

// ---- the conversation -----------------------------------------------------------------------

// The messages a chat request sends: the system prompt as it is now, then every turn.
function history() {
  const system = $("system").value.trim();
  const turns = state.messages.map((m) => ({ role: m.role, content: m.content }));
  return system ? [{ role: "system", content: system }, ...turns] : turns;
}

function renderMessages() {
  closeAlts();
  const list = $("messages");
  list.replaceChildren(...state.messages.map((m, i) => messageItem(m, i)));
  updateButtons();
}

function messageItem(message, index) {
  const item = document.createElement("li");
  item.className = `msg ${message.role}`;
  item.dataset.index = String(index);
  const role = document.createElement("span");
  role.className = "role";
  role.textContent = message.role;
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  const meta = document.createElement("span");
  meta.className = "meta";
  item.append(role, bubble, meta);
  // pending: bytes of a character not yet whole; fragments: the token spans holding them.
  message.view = { item, bubble, meta, pending: new Uint8Array(), fragments: [] };
  if (message.tokens) message.tokens.forEach((t, k) => appendToken(message, t, k));
  else bubble.textContent = message.content;
  showNote(message);
  return item;
}

function showNote(message) {
  const { meta } = message.view;
  meta.textContent = message.note || "";
  meta.classList.toggle("failed", Boolean(message.failed));
}

// Adds token k to an answer's bubble. Its text is the characters it completes: a token holding
// only part of a character is drawn as a small box and named by the character once it is whole.
function appendToken(message, token, k) {
  const view = message.view;
  const span = document.createElement("span");
  span.className = `tok ${band(token.logprob)}`;
  span.tabIndex = 0;
  span.dataset.k = String(k);
  span.setAttribute("role", "button");
  span.setAttribute("aria-haspopup", "dialog");
  if (token.forced) span.classList.add("forced");
  if (token.special) {
    span.classList.add("special");
    span.textContent = tokenLabel(token.bytes);
    view.pending = new Uint8Array();
  } else {
    const bytes = concatBytes([view.pending, token.bytes]);
    const { chars, rest } = utf8Chars(bytes, false);
    const text = chars.map((c) => c.text ?? "\uFFFD").join("");
    span.textContent = text;
    if (text === "\n") span.classList.add("nl");
    view.pending = bytes.slice(rest);
    if (rest < bytes.length) {
      if (!text) {
        span.classList.add("frag");
        view.fragments.push(span);
      }
    } else {
      // The earlier fragments were parts of this token's first character: name it on them.
      for (const frag of view.fragments) frag.dataset.partOf = [...text][0] ?? "";
      view.fragments = [];
    }
  }
  span.setAttribute("aria-label", tokenAria(token, span));
  view.bubble.append(span);
  return span;
}

function tokenAria(token, span) {
  const what = span.classList.contains("frag")
    ? `part of a character, bytes ${[...token.bytes].map(hex).join(" ")}`
    : JSON.stringify(tokenLabel(token.bytes));
  return `token ${what}, ${percent(token.logprob)}${token.forced ? ", forced" : ""}`;
}

function updateButtons() {
  const busy = state.controller !== null;
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  const last = state.messages[state.messages.length - 1];
  $("regenerate").disabled = busy || !last || (last.role !== "assistant" && last.role !== "user");
  $("messages").setAttribute("aria-busy", String(busy)); // screen readers read the answer once whole
  for (const m of state.messages) m.view?.item.classList.toggle("busy", busy && m === last && m.role === "assistant");
  document.querySelectorAll(".alt").forEach((b) => { b.disabled = busy; });
}

// ---- sending ---------------------------------------------------------------------------------

async function send() {
  const text = $("input").value;
  if (!text.trim() || state.controller) return;
  $("input").value = "";
  state.messages.push({ role: "user", content: text });
  await generate(() => { // on an error before any answer: take the turn back, text and all
    state.messages.pop();
    $("input").value = text;
  });
}

async function regenerate() {
  if (state.controller) return;
  while (state.messages.length && state.messages[state.messages.length - 1].role === "assistant") {
    state.messages.pop();
  }
  if (state.messages.length) await generate(() => {});
}

// One answer to the conversation as it stands: /tokenize renders the prompt (shown in the prompt
// view, kept for forcing tokens later), then the chat stream fills a new assistant message.
async function generate(undo) {
  const answer = { role: "assistant", content: "", tokens: [], prompt: null, note: "" };
  const started = begin();
  renderMessages(); // the person's turn shows at once
  try {
    const messages = history();
    const sampling = samplingFields();
    const rendered = await (await api("/tokenize", {
      body: { messages, return_token_strs: true, ...(state.model ? { model: state.model } : {}) },
      signal: started.signal,
    })).json();
    state.byteLevel = looksByteLevel(rendered.token_strs);
    rendered.tokens.forEach((id, i) => state.tokenBytes.set(id, pieceBytes(rendered.token_strs[i])));
    answer.prompt = rendered.tokens;
    showPrompt(rendered.tokens, null);
    answer.note = "waiting for the first token…"; // a long prompt's prefill can take a while
    state.messages.push(answer);
    renderMessages();
    const body = {
      messages, stream: true, stream_options: { include_usage: true },
      logprobs: true, top_logprobs: TOP_K_SHOWN, return_tokens_as_token_ids: true, ...sampling,
    };
    await streamChat(answer, body, started);
  } catch (error) {
    if (!answer.tokens.length && error.name !== "AbortError") {
      // Nothing was generated: the turn goes back as it was, and the error is shown.
      if (state.messages[state.messages.length - 1] === answer) state.messages.pop();
      undo();
    }
    finishWithError(answer, error);
  } finally {
    end();
  }
}

function begin() {
  hideBanner();
  closeAlts();
  state.controller = new AbortController();
  updateButtons();
  return { signal: state.controller.signal };
}

function end() {
  state.controller = null;
  renderMessages();
  scrollToEnd();
  pollMetrics(); // the server's load now, not as it was up to 2 s ago
}

function finishWithError(answer, error) {
  if (error.name === "AbortError") {
    answer.note = "stopped";
    return;
  }
  if (answer.tokens.length) {
    answer.note = `interrupted: ${error.message}`;
    answer.failed = true;
  }
  showError(error);
}

async function streamChat(answer, body, started) {
  const timing = newTiming(performance.now()); // from sending the request: prefill and all
  const response = await api("/v1/chat/completions", { body, signal: started.signal });
  for await (const chunk of events(response)) {
    if (chunk.usage) showUsage(chunk.usage, answer.prompt);
    const choice = chunk.choices[0];
    if (!choice) continue;
    answer.content += choice.delta?.content || "";
    const entries = choice.logprobs?.content || [];
    entries.forEach((entry, i) => {
      const token = chatToken(entry);
      token.special = endsTurn(token, choice, i === entries.length - 1, choice.delta?.content);
      addToken(answer, token, timing);
    });
    if (choice.finish_reason) answer.note = finishNote(choice.finish_reason);
  }
}

// The stop token (end of turn) is the last one of a "stop" chunk that brought no text: it is
// shown apart, and is no part of the answer's text.
function endsTurn(token, choice, last, text) {
  return last && choice.finish_reason === "stop" && !text && tokenLabel(token.bytes).length > 1;
}

function chatToken(entry) {
  const id = tokenId(entry.token);
  const bytes = Uint8Array.from(entry.bytes || []);
  state.tokenBytes.set(id, bytes);
  const alts = entry.top_logprobs.map((t) => {
    const altBytes = Uint8Array.from(t.bytes || []);
    state.tokenBytes.set(tokenId(t.token), altBytes);
    return { id: tokenId(t.token), bytes: altBytes, logprob: t.logprob };
  });
  return { id, bytes, logprob: entry.logprob, alts };
}

function addToken(answer, token, timing) {
  if (token.special) state.stopIds.add(token.id);
  if (timing.count === 0 && answer.note) {
    answer.note = "";
    showNote(answer);
  }
  answer.tokens.push(token);
  appendToken(answer, token, answer.tokens.length - 1);
  timing.tick();
  showTiming(timing);
  scrollToEnd();
}

function finishNote(reason) {
  return { stop: "", length: "stopped at max tokens" }[reason] ?? `finish: ${reason}`;
}

// ---- forcing a token ---------------------------------------------------------------------------

// Regenerate answer `index` from token k on, with `alt` forced there: /v1/completions continues
// from the exact ids (the chat prompt, the answer's tokens before k, then the forced one).
async function force(index, k, alt) {
  const answer = state.messages[index];
  if (state.controller || !answer?.prompt) return;
  const original = answer.tokens[k];
  const forced = { id: alt.id, bytes: alt.bytes, logprob: alt.logprob, alts: original.alts, forced: true };
  forced.special = state.stopIds.has(alt.id);
  state.messages.length = index + 1; // later turns answered another text
  answer.tokens = [...answer.tokens.slice(0, k), forced];
  answer.note = "";
  answer.failed = false;
  answer.content = decodeAll(answer.tokens.filter((t) => !t.special).map((t) => t.bytes));
  const started = begin();
  renderMessages();
  try {
    const sampling = samplingFields();
    if (sampling.max_tokens !== undefined) sampling.max_tokens -= k + 1; // the answer's budget, not the continuation's
    if (forced.special || (sampling.max_tokens !== undefined && sampling.max_tokens < 1)) {
      answer.note = forced.special ? "ended by the forced end-of-turn token" : "stopped at max tokens";
      return;
    }
    const prompt = [...answer.prompt, ...answer.tokens.map((t) => t.id)];
    showPrompt(prompt, null);
    const body = {
      prompt, stream: true, stream_options: { include_usage: true },
      logprobs: TOP_K_SHOWN, return_tokens_as_token_ids: true, ...sampling,
    };
    await streamCompletion(answer, body, started, prompt);
  } catch (error) {
    finishWithError(answer, error);
  } finally {
    end();
  }
}

async function streamCompletion(answer, body, started, prompt) {
  const timing = newTiming(performance.now());
  const response = await api("/v1/completions", { body, signal: started.signal });
  for await (const chunk of events(response)) {
    if (chunk.usage) showUsage(chunk.usage, prompt);
    const choice = chunk.choices[0];
    if (!choice) continue;
    const lp = choice.logprobs;
    if (lp?.tokens?.length) {
      const ids = lp.tokens.map(tokenId);
      const alternatives = lp.top_logprobs.map((top) => Object.entries(top || {}).map(([t, v]) => [tokenId(t), v]));
      await learnTokens([...ids, ...alternatives.flat().map(([id]) => id)], started.signal);
      ids.forEach((id, i) => {
        // The legacy format lists the chosen token beside the top ones: keep the best five.
        const alts = alternatives[i].sort((a, b) => b[1] - a[1]).slice(0, TOP_K_SHOWN)
          .map(([altId, logprob]) => ({ id: altId, bytes: state.tokenBytes.get(altId), logprob }));
        const token = { id, bytes: state.tokenBytes.get(id), logprob: lp.token_logprobs[i], alts };
        token.special = endsTurn(token, choice, i === ids.length - 1, choice.text);
        addToken(answer, token, timing);
      });
    }
    answer.content = decodeAll(answer.tokens.filter((t) => !t.special).map((t) => t.bytes));
    if (choice.finish_reason) answer.note = finishNote(choice.finish_reason);
  }
}

// ---- the alternatives popup ----------------------------------------------------------------------

let altsFor = null; // the token span the popup describes
let closeTimer = 0;
let refocusing = false; // Escape hands focus back to the token: that must not reopen the popup

function tokenAt(span) {
  const item = span.closest(".msg");
  const message = state.messages[Number(item?.dataset.index)];
  return message?.tokens ? { message, index: Number(item.dataset.index), k: Number(span.dataset.k) } : null;
}

function openAlts(span) {
  clearTimeout(closeTimer);
  if (altsFor === span) return;
  const found = tokenAt(span);
  if (!found) return;
  const token = found.message.tokens[found.k];
  closeAlts();
  altsFor = span;
  span.classList.add("open");
  span.setAttribute("aria-expanded", "true");
  const popup = $("alts");
  const label = tokenLabel(token.bytes);
  const partOf = span.dataset.partOf ? ` (part of “${span.dataset.partOf}”)` : "";
  $("alts-head").textContent =
    `“${visible(label)}”${partOf} · id ${token.id} · ${percent(token.logprob)}${token.forced ? " · forced" : ""}`;
  const rows = [...token.alts];
  if (!rows.some((a) => a.id === token.id) && !token.forced) rows.push(token); // the pick, if outside the top 5
  $("alts-list").replaceChildren(...rows.map((alt) => altRow(alt, token, found)));
  popup.setAttribute("aria-label", `Alternatives to token ${label}`);
  span.after(popup); // right after the token: Tab goes from it into the list
  popup.hidden = false;
  placeAlts(span, popup);
}

function altRow(alt, token, found) {
  const item = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "alt";
  button.disabled = state.controller !== null;
  const chosen = alt.id === token.id;
  if (chosen) button.classList.add("chosen");
  const text = document.createElement("span");
  text.className = "alt-text";
  text.textContent = visible(tokenLabel(alt.bytes));
  const bar = document.createElement("span");
  bar.className = "bar";
  const fill = document.createElement("span");
  fill.style.width = `${Math.max(Math.exp(alt.logprob) * 100, 0.5)}%`;
  bar.append(fill);
  const pct = document.createElement("span");
  pct.className = "pct";
  pct.textContent = percent(alt.logprob);
  button.append(text, bar, pct);
  button.setAttribute(
    "aria-label",
    `${chosen ? "chosen: " : ""}${JSON.stringify(tokenLabel(alt.bytes))}, ${percent(alt.logprob)}; regenerate from here with it`,
  );
  button.addEventListener("click", () => force(found.index, found.k, alt));
  item.append(button);
  return item;
}

// Under the token, inside its bubble (the popup's offset parent), never past the bubble's right edge.
function placeAlts(span, popup) {
  const bubble = span.closest(".bubble");
  const box = bubble.getBoundingClientRect();
  const rects = span.getClientRects();
  const at = rects[rects.length - 1] || span.getBoundingClientRect();
  const width = popup.offsetWidth;
  let left = at.left - box.left;
  left = Math.max(0, Math.min(left, box.width - width));
  popup.style.left = `${left}px`;
  popup.style.top = `${at.bottom - box.top + 4}px`;
}

function closeAlts() {
  clearTimeout(closeTimer);
  const popup = $("alts");
  if (altsFor) {
    altsFor.classList.remove("open");
    altsFor.setAttribute("aria-expanded", "false");
  }
  altsFor = null;
  popup.hidden = true;
  document.body.append(popup); // out of the bubble, so re-rendering a message never loses it
}

function closeAltsSoon() {
  clearTimeout(closeTimer);
  closeTimer = setTimeout(closeAlts, 250);
}

function wireAlts() {
  const list = $("messages");
  const popup = $("alts");
  // Pointer and keyboard alike: entering a token opens its alternatives, leaving both it and
  // the popup closes them.
  const enter = (e) => {
    const span = e.target.closest(".tok");
    if (span) openAlts(span);
    else if (popup.contains(e.target)) clearTimeout(closeTimer);
  };
  const leave = (e) => {
    const to = e.relatedTarget;
    if (altsFor && !(to && (to === altsFor || popup.contains(to)))) closeAltsSoon();
  };
  list.addEventListener("mouseover", enter);
  list.addEventListener("mouseout", leave);
  list.addEventListener("focusin", (e) => {
    if (!refocusing) enter(e);
  });
  list.addEventListener("focusout", leave);
  list.addEventListener("click", (e) => { // a tap on a phone: no hover there
    const span = e.target.closest(".tok");
    if (span) openAlts(span);
  });
  list.addEventListener("keydown", (e) => {
    const span = e.target.closest(".tok");
    if (span && (e.key === "Enter" || e.key === " ")) {
      e.preventDefault();
      openAlts(span);
      popup.querySelector(".alt")?.focus();
    }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Escape" || !altsFor) return;
    const span = altsFor;
    closeAlts();
    refocusing = true;
    span.focus({ preventScroll: true });
    refocusing = false;
  });
  document.addEventListener("pointerdown", (e) => {
    if (altsFor && !popup.contains(e.target) && !e.target.closest(".tok")) closeAlts();
  });
}

// ---- prompt view and stats ------------------------------------------------------------------------

// The prompt's rendered text and its tokens (piece, id); the first `cached` of them marked.
function showPrompt(ids, cached) {
  const parts = ids.map((id) => state.tokenBytes.get(id) || new Uint8Array());
  const partOf = sharedCharacters(parts);
  const chips = ids.map((id, i) => {
    const chip = document.createElement("span");
    chip.className = "chip";
    const label = tokenLabel(parts[i]);
    const piece = document.createElement("span");
    piece.className = "piece";
    piece.textContent = visible(label);
    if (utf8Chars(parts[i], true).chars.some((c) => c.text === null)) chip.classList.add("frag");
    const idText = document.createElement("span");
    idText.className = "id";
    idText.textContent = String(id);
    chip.append(piece, idText);
    chip.title = `id ${id} · bytes ${[...parts[i]].map(hex).join(" ")}${partOf[i] ? ` · part of “${partOf[i]}”` : ""}`;
    if (cached !== null && i < cached) chip.classList.add("cached");
    return chip;
  });
  $("prompt-tokens").replaceChildren(...chips);
  showPromptText(parts, cached ?? 0);
  $("prompt-summary").textContent = cached === null
    ? `${ids.length} tokens.`
    : cached === 0
      ? `${ids.length} tokens; none came from the prefix cache.`
      : `${ids.length} tokens; the prefix cache held the first ${cached} (marked).`;
  $("prompt-box").dataset.cached = String(cached ?? "");
}

// For each token, the characters it holds only part of ("" when none): 明 for both halves of e6 98 | 8e.
function sharedCharacters(parts) {
  const { chars } = utf8Chars(concatBytes(parts), true);
  let c = 0; // the first character not wholly before this token: one pass over both lists
  let start = 0;
  return parts.map((bytes) => {
    const end = start + bytes.length;
    while (c < chars.length && chars[c].end <= start) c++;
    let shared = "";
    for (let j = c; j < chars.length && chars[j].start < end; j++) {
      if (chars[j].text && (chars[j].start < start || chars[j].end > end)) shared += chars[j].text;
    }
    start = end;
    return shared;
  });
}

function showPromptText(parts, cached) {
  const all = concatBytes(parts);
  const cachedBytes = parts.slice(0, cached).reduce((n, p) => n + p.length, 0);
  const { chars } = utf8Chars(all, true);
  const text = (list) => list.map((c) => c.text ?? "\uFFFD").join("");
  const mark = document.createElement("mark");
  mark.textContent = text(chars.filter((c) => c.end <= cachedBytes));
  mark.title = "held by the prefix cache";
  const rest = document.createTextNode(text(chars.filter((c) => c.end > cachedBytes)));
  $("prompt-text").replaceChildren(...(mark.textContent ? [mark] : []), rest);
}

function showUsage(usage, prompt) {
  const cached = usage.prompt_tokens_details?.cached_tokens ?? 0;
  $("stat-prompt").textContent = String(usage.prompt_tokens);
  $("stat-cached").textContent = `${cached} of ${usage.prompt_tokens}`;
  $("stat-generated").textContent = String(usage.completion_tokens);
  if (prompt) showPrompt(prompt, cached);
}

function newTiming(t0) {
  return {
    t0, first: null, last: null, count: 0,
    tick() {
      const now = performance.now();
      if (this.first === null) this.first = now;
      this.last = now;
      this.count += 1;
    },
  };
}

function showTiming(timing) {
  $("stat-ttft").textContent = `${Math.round(timing.first - timing.t0)} ms`;
  const seconds = (timing.last - timing.first) / 1000;
  $("stat-tps").textContent = timing.count > 1 && seconds > 0 ? `${((timing.count - 1) / seconds).toFixed(1)} tok/s` : "–";
  $("stat-generated").textContent = String(timing.count);
}

function scrollToEnd() {
  const list = $("messages");
  const last = list.lastElementChild;
  if (last && !altsFor) last.scrollIntoView({ block: "nearest" });
}

// ---- the server: model, health, metrics ------------------------------------------------------------

// The unlabelled series: one engine's value, or with data parallelism the total of all replicas.
function metricValue(text, name) {
  const match = new RegExp(`^${name} (\\S+)$`, "m").exec(text); // names are [a-z_:] only
  return match ? Number(match[1]) : null;
}

async function pollMetrics() {
  if (document.visibilityState !== "visible" || state.polling) return;
  state.polling = true;
  const stats = $("server-stats");
  try {
    const response = await fetch("/metrics", { cache: "no-store" });
    if (response.status === 503) {
      stats.classList.remove("offline");
      $("stat-running").textContent = "loading";
      return;
    }
    if (!response.ok) return;
    const text = await response.text();
    const running = metricValue(text, "nanoinfer:num_requests_running");
    const waiting = metricValue(text, "nanoinfer:num_requests_waiting");
    const kv = metricValue(text, "nanoinfer:kv_cache_usage_perc");
    $("stat-running").textContent = running === null ? "–" : String(running);
    $("stat-waiting").textContent = waiting === null ? "–" : String(waiting);
    $("stat-kv").textContent = kv === null ? "–" : `${(kv * 100).toFixed(1)}%`;
    if (stats.classList.contains("offline")) {
      stats.classList.remove("offline");
      hideBanner("offline");
      loadModels();
    }
  } catch {
    stats.classList.add("offline");
    for (const id of ["stat-running", "stat-waiting", "stat-kv"]) $(id).textContent = "offline";
    showBanner(UNREACHABLE(), "offline");
  } finally {
    state.polling = false;
  }
}

async function loadModels() {
  try {
    const { data } = await (await api("/v1/models")).json();
    const select = $("model");
    select.replaceChildren(...data.map((card) => {
      const option = document.createElement("option");
      option.value = card.id;
      option.textContent = card.parent ? `${card.id} (adapter of ${card.parent})` : card.id;
      return option;
    }));
    state.model = data.length > 1 ? select.value : null; // one model: leave `model` out of requests
    select.disabled = data.length < 2;
    $("model-pick").hidden = false;
    $("key-form").hidden = true;
    hideBanner();
  } catch (error) {
    showError(error);
  }
}

// ---- settings kept in the browser ----------------------------------------------------------------

function saveSettings() {
  const settings = { system: $("system").value };
  for (const id of Object.keys(SAMPLING_FIELDS)) settings[id] = $(id).value;
  writeStorage(SETTINGS_STORAGE, JSON.stringify(settings));
}

function loadSettings() {
  try {
    const settings = JSON.parse(readStorage(SETTINGS_STORAGE) || "{}");
    if (typeof settings.system === "string") $("system").value = settings.system;
    for (const id of Object.keys(SAMPLING_FIELDS)) if (typeof settings[id] === "string") $(id).value = settings[id];
  } catch { /* unreadable settings: start from the defaults */ }
}

// ---- wiring ---------------------------------------------------------------------------------------

function wire() {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("input").addEventListener("keydown", (e) => {
    // Enter sends; Shift+Enter is a new line; Enter that ends an IME composition (CJK input) is not a send.
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("regenerate").addEventListener("click", regenerate);
  $("clear").addEventListener("click", () => {
    state.controller?.abort();
    state.messages = [];
    renderMessages();
    $("input").focus();
  });
  $("model").addEventListener("change", (e) => { state.model = e.target.value; });
  $("reset-sampling").addEventListener("click", () => {
    for (const id of Object.keys(SAMPLING_FIELDS)) $(id).value = "";
    saveSettings();
  });
  for (const id of ["system", ...Object.keys(SAMPLING_FIELDS)]) $(id).addEventListener("change", saveSettings);
  $("banner-close").addEventListener("click", () => hideBanner());
  $("key-button").addEventListener("click", () => {
    $("key-form").hidden = !$("key-form").hidden;
    if (!$("key-form").hidden) $("key-input").focus();
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.apiKey = $("key-input").value.trim();
    writeStorage(KEY_STORAGE, state.apiKey || null);
    $("key-input").value = "";
    loadModels();
  });
  $("key-forget").addEventListener("click", () => {
    state.apiKey = "";
    writeStorage(KEY_STORAGE, null);
    $("key-input").value = "";
  });
  document.addEventListener("visibilitychange", pollMetrics);
  wireAlts();
}

function init() {
  loadSettings();
  wire();
  if (matchMedia("(max-width: 700px)").matches) {
    // A phone: the conversation first; the panels stay one tap away.
    $("prompt-box").open = false;
    $("stats-box").open = false;
  }
  renderMessages();
  loadModels();
  pollMetrics();
  setInterval(pollMetrics, METRICS_EVERY_MS);
  $("input").focus();
}

init();
