// The visitor widget: one <script src=".../widget.js" data-site="SITE" async> tag
// adds a floating button and a chat panel inside a shadow root, so the host's CSS
// cannot reach it and its CSS cannot reach the host.
//
// Delivery (docs/protocol.md): every sent message stays in `stored.pending`
// (persisted) until its ack; after a reconnect the widget resumes from the
// highest seq it shows and re-sends the pending ones with their ids, so the
// server stores each once. A fresh page shows nothing yet, so it resumes from 0
// and the open conversation's history appears again.

import { fill, strings } from "./i18n";
import { STYLE } from "./style";
import { ClientFrame, ServerFrame, Stored, load, meansNobodyOnline, newId, save, socketUrl } from "./protocol";

const script = (document.currentScript ||
  document.querySelector("script[data-site][src*='widget.js']")) as HTMLScriptElement | null;

if (script && !(window as unknown as { __switchboard?: boolean }).__switchboard) {
  (window as unknown as { __switchboard?: boolean }).__switchboard = true;
  const start = () => mount(script);
  if (document.body) start();
  else document.addEventListener("DOMContentLoaded", start);
}

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Record<string, string> = {},
  text?: string,
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function mount(script: HTMLScriptElement): void {
  const site = script.dataset.site || "default";
  const base = new URL(script.src, location.href).origin;
  const { lang, t } = strings(script.dataset.lang);
  const stored: Stored = load(site);

  // Host element: inline !important styles beat a host page's `* { all: unset }`.
  const host = el("div", { id: "switchboard-widget" });
  host.setAttribute(
    "style",
    "all:initial !important;position:fixed !important;z-index:2147483647 !important;" +
      "right:0 !important;bottom:0 !important;width:0 !important;height:0 !important;display:block !important;",
  );
  const root = host.attachShadow({ mode: "open" });
  const style = el("style");
  style.textContent = STYLE;
  const wrap = el("div", { class: "sb", lang });
  const button = el("button", { class: "fab", type: "button", "aria-expanded": "false", "aria-label": t.open });
  button.innerHTML =
    '<svg viewBox="0 0 24 24" width="26" height="26" aria-hidden="true"><path fill="currentColor" d="M4 4h16a2 2 0 0 1 2 2v10a2 2 0 0 1-2 2H8l-4 4V6a2 2 0 0 1 2-2z"/></svg>';
  const panel = el("div", { class: "panel", role: "dialog", "aria-label": t.title, hidden: "" });
  const header = el("div", { class: "head" });
  header.append(el("span", { class: "title" }, t.title));
  const closeButton = el("button", { class: "x", type: "button", "aria-label": t.close }, "×");
  header.append(closeButton);
  const status = el("div", { class: "status", role: "status", "aria-live": "polite" });
  const log = el("div", { class: "log", role: "log", "aria-label": t.log, tabindex: "0" });
  const typing = el("div", { class: "typing", "aria-live": "polite", hidden: "" });
  const humanButton = el("button", { class: "human", type: "button" }, t.human);
  const form = el("form", { class: "compose" });
  const input = el("textarea", { rows: "1", placeholder: t.placeholder, "aria-label": t.placeholder, maxlength: "4000" });
  const sendButton = el("button", { class: "send", type: "submit" }, t.send);
  form.append(input, sendButton);
  panel.append(header, status, log, typing, humanButton, form);
  wrap.append(panel, button);
  root.append(style, wrap);
  document.body.appendChild(host);

  log.append(el("div", { class: "m sys" }, t.welcome));

  // Bubbles by seq (stored messages) and by client id (own messages not acked yet).
  const bySeq = new Map<number, HTMLElement>();
  const byId = new Map<string, HTMLElement>();
  let socket: WebSocket | null = null;
  let connected = false;
  let attempts = 0;
  let readUpTo = 0;
  let typingTimer = 0;
  let typingSentAt = 0;
  let stopTypingTimer = 0;
  /** `typing on` was sent and no `off` since: the agent sees "typing" until we say stop. */
  let typingOn = false;
  /** The server said no agent is online: the visitor is invited to leave a message until an
   * agent takes the conversation (a later queue position does not hide the invitation). */
  let nobodyOnline = false;

  const persist = () => save(site, stored);

  function showStatus(text: string, kind = "") {
    status.textContent = text;
    status.className = "status" + (kind ? " " + kind : "");
  }

  function scroll() {
    log.scrollTop = log.scrollHeight;
  }

  function bubble(kind: string, text: string, name?: string): HTMLElement {
    const node = el("div", { class: "m " + kind });
    if (name) node.append(el("div", { class: "who" }, name));
    node.append(el("div", { class: "b" }, text));
    if (kind === "me") node.append(el("div", { class: "st" }));
    log.append(node);
    scroll();
    return node;
  }

  function setState(node: HTMLElement, state: "sending" | "sent" | "read") {
    node.dataset.state = state;
    const label = node.querySelector(".st");
    if (label) label.textContent = state === "sending" ? t.sending : state === "sent" ? t.sent : t.read;
  }

  function send(frame: ClientFrame): boolean {
    if (!socket || !connected) return false;
    socket.send(JSON.stringify(frame));
    return true;
  }

  function markRead() {
    if (panel.hidden || !connected || stored.seq <= readUpTo) return;
    readUpTo = stored.seq;
    send({ type: "read", seq: readUpTo });
  }

  /** Seqs count per conversation: a new one (after `closed`) starts again from 1. */
  function enter(id: number | null | undefined) {
    if (id === null || id === undefined || id === stored.conversation) return;
    if (stored.conversation !== null && stored.conversation !== undefined) {
      stored.seq = 0;
      readUpTo = 0;
      bySeq.clear();
    }
    stored.conversation = id;
    persist();
  }

  function onFrame(frame: ServerFrame) {
    if ("conversation" in frame) enter(frame.conversation);
    if (meansNobodyOnline(frame)) {
      nobodyOnline = true;
      showStatus(t.nobody, "info leave");
      return;
    }
    switch (frame.type) {
      case "hello": {
        if (frame.visitor !== stored.visitor) {
          // A new visitor (first visit, or the server refused our secret): old seqs mean nothing.
          stored.seq = 0;
          stored.conversation = frame.conversation;
          for (const node of bySeq.values()) node.remove();
          bySeq.clear();
        }
        stored.visitor = frame.visitor;
        if (frame.secret) stored.secret = frame.secret;
        connected = true;
        attempts = 0;
        persist();
        // The server says again after the greeting if nobody is online still.
        nobodyOnline = false;
        showStatus("");
        for (const pending of stored.pending) send({ type: "message", id: pending.id, text: pending.text });
        break;
      }
      case "ack": {
        const node = byId.get(frame.id);
        stored.pending = stored.pending.filter((p) => p.id !== frame.id);
        byId.delete(frame.id);
        if (frame.seq > stored.seq) stored.seq = frame.seq;
        persist();
        if (node) {
          const replayed = bySeq.get(frame.seq);
          if (replayed && replayed !== node) node.remove();
          else {
            bySeq.set(frame.seq, node);
            node.dataset.seq = String(frame.seq);
            if (node.dataset.state !== "read") setState(node, "sent");
          }
        }
        break;
      }
      case "message": {
        if (bySeq.has(frame.seq)) break;
        if (frame.seq > stored.seq) stored.seq = frame.seq;
        persist();
        let node: HTMLElement | undefined;
        if (frame.from === "visitor") {
          // Our own message replayed by resume (its ack was lost): attach it to the pending bubble.
          const pending = stored.pending.find((p) => p.text === frame.text && !byId.get(p.id)?.dataset.seq);
          node = pending && byId.get(pending.id);
          if (node) {
            node.dataset.seq = String(frame.seq);
            setState(node, "sent");
          } else {
            node = bubble("me", frame.text);
            setState(node, "sent");
          }
        } else {
          node = bubble(frame.from, frame.text, frame.from === "bot" ? t.bot : frame.name || t.agent);
          typing.hidden = true;
        }
        node.dataset.seq = String(frame.seq);
        bySeq.set(frame.seq, node);
        markRead();
        break;
      }
      case "typing":
        if (frame.from === "visitor") break;
        typing.textContent = fill(t.typing, { name: t.agent });
        typing.hidden = !frame.on;
        clearTimeout(typingTimer);
        if (frame.on) typingTimer = window.setTimeout(() => (typing.hidden = true), 6000);
        break;
      case "read":
        if (frame.from === "visitor") break;
        for (const [seq, node] of bySeq) if (seq <= frame.seq && node.classList.contains("me")) setState(node, "read");
        break;
      case "queued":
        if (!nobodyOnline) showStatus(fill(t.queued, { n: frame.position }), "info");
        break;
      case "assigned":
        nobodyOnline = false;
        showStatus("");
        log.append(el("div", { class: "m sys" }, fill(t.assigned, { name: frame.agent })));
        scroll();
        break;
      case "closed":
        nobodyOnline = false;
        showStatus("");
        log.append(el("div", { class: "m sys" }, t.closed));
        scroll();
        break;
      case "error":
        if (frame.code === "rate_limited" || frame.code === "overloaded") {
          // Not stored: re-send the unacked messages (same ids) once the server says to.
          showStatus(t.rateLimited, "info");
          setTimeout(() => {
            showStatus("");
            for (const pending of stored.pending) send({ type: "message", id: pending.id, text: pending.text });
          }, frame.retry_after ?? 1000);
        }
        break;
      default:
        // Unknown frame types are ignorable (the server may be newer).
        break;
    }
  }

  function connect() {
    const ws = new WebSocket(socketUrl(base, site, stored, Math.max(0, ...bySeq.keys())));
    socket = ws;
    ws.onmessage = (event) => {
      try {
        onFrame(JSON.parse(String(event.data)) as ServerFrame);
      } catch {
        // Not JSON: ignore.
      }
    };
    ws.onclose = () => {
      if (socket !== ws) return;
      connected = false;
      socket = null;
      showStatus(t.offline, "warn");
      // Exponential backoff with jitter: 0.3 s, 0.6 s, ... up to 15 s.
      const delay = Math.min(15000, 300 * 2 ** attempts) * (0.75 + Math.random() * 0.5);
      attempts++;
      setTimeout(connect, delay);
    };
  }

  function submit() {
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    const id = newId();
    stored.pending.push({ id, text });
    persist();
    const node = bubble("me", text);
    node.dataset.id = id;
    byId.set(id, node);
    setState(node, "sending");
    send({ type: "message", id, text });
    clearTimeout(stopTypingTimer);
    typingSentAt = 0;
    // Sent: no longer typing (else the next keystroke's `on` is no change to relay).
    if (typingOn) {
      typingOn = false;
      send({ type: "typing", on: false });
    }
  }

  function open(focus = true) {
    panel.hidden = false;
    button.setAttribute("aria-expanded", "true");
    wrap.classList.add("open");
    if (focus) input.focus();
    scroll();
    markRead();
  }

  function close() {
    panel.hidden = true;
    button.setAttribute("aria-expanded", "false");
    wrap.classList.remove("open");
    button.focus();
  }

  button.addEventListener("click", () => (panel.hidden ? open() : close()));
  closeButton.addEventListener("click", close);
  wrap.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && !panel.hidden) {
      event.preventDefault();
      close();
    }
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit();
    input.focus();
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submit();
    }
  });
  input.addEventListener("input", () => {
    const now = Date.now();
    if (now - typingSentAt > 1000) {
      typingSentAt = now;
      typingOn = send({ type: "typing", on: true }) || typingOn;
    }
    clearTimeout(stopTypingTimer);
    stopTypingTimer = window.setTimeout(() => {
      typingSentAt = 0;
      typingOn = false;
      send({ type: "typing", on: false });
    }, 3000);
  });
  humanButton.addEventListener("click", () => {
    send({ type: "handoff" });
    input.focus();
  });

  // Messages left pending by an earlier page: show them again as "sending".
  for (const pending of stored.pending) {
    const node = bubble("me", pending.text);
    node.dataset.id = pending.id;
    byId.set(pending.id, node);
    setState(node, "sending");
  }
  connect();
  if (script.dataset.open === "true") open(false);
}
