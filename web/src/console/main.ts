// The agent console at /console: login, the queue with waiting times, the agent's
// open conversations with unread counts, a chat panel (history, bot answers
// marked, typing and read state), canned replies searchable with "/" (the team's, from
// GET /api/canned, then the agent's own from localStorage), transfer,
// close, presence, and a beep plus a browser notification on a new conversation.

import { Session, api, login, logout, refresh, restore } from "../shared/api";
import { $, clock, h, loginForm } from "../shared/dom";
import { AgentClientFrame, AgentServerFrame, agentSocketUrl, newId } from "./protocol";

interface Conversation {
  id: number;
  site: string;
  visitor: string;
  log: HTMLElement;
  unread: number;
  /** Up to this seq an agent has read the conversation (from `assigned`): the history the
   * server replays up to here is not unread. */
  readMark: number;
  lastSeq: number;
  closed: boolean;
  typing: boolean;
  seen: Set<number>;
}

const app = $("#app");
let session: Session | null = null;

function showLogin(problem = "") {
  app.replaceChildren(
    loginForm("Agent console", problem, async (name, password) => {
      // Asking here, inside the click, is what browsers allow.
      if ("Notification" in window && Notification.permission === "default") void Notification.requestPermission();
      session = await login(name, password);
      start(session);
    }),
  );
}

function start(me: Session) {
  const conversations = new Map<number, Conversation>();
  const queueSince = new Map<number, number>();
  const pending = new Map<string, { frame: AgentClientFrame; node: HTMLElement }>();
  let queue: number[] = [];
  let active: number | null = null;
  let socket: WebSocket | null = null;
  let attempts = 0;
  let presence: "online" | "away" = "online";
  let typingSentAt = 0;
  let lastAccepted: number | null = null;
  let everConnected = false;

  const presenceSelect = h(
    "select",
    { "aria-label": "Presence", class: "presence" },
    h("option", { value: "online" }, "Online"),
    h("option", { value: "away" }, "Away"),
  );
  const connection = h("span", { class: "conn" }, "connecting…");
  const who = h("span", { class: "who" }, me.display + (me.dev ? " (dev token)" : ""));
  const logoutButton = h("button", { type: "button", class: "link" }, "Log out");
  const queueList = h("ul", { class: "list queue", "aria-label": "Queue" });
  const mineList = h("ul", { class: "list mine", "aria-label": "My conversations" });
  const chatTitle = h("h2", { class: "chat-title" }, "No conversation selected");
  const transferInput = h("input", { placeholder: "agent id", "aria-label": "Transfer to agent", class: "transfer-to" });
  const transferButton = h("button", { type: "button", class: "transfer" }, "Transfer");
  const closeButton = h("button", { type: "button", class: "close-conv danger" }, "Close");
  const logHolder = h("div", { class: "chat-log-holder" });
  const typingLine = h("div", { class: "typing", hidden: true }, "Visitor is typing…");
  const input = h("textarea", {
    class: "reply",
    rows: "2",
    placeholder: "Reply… (type / for canned replies, Enter to send)",
    "aria-label": "Reply",
  });
  const sendButton = h("button", { type: "submit" }, "Send");
  const canned = h("ul", { class: "canned", role: "listbox", hidden: true });
  const compose = h("form", { class: "compose" }, canned, input, sendButton);
  const errorLine = h("div", { class: "error", role: "alert" });
  const cannedEditor = cannedManager();

  app.replaceChildren(
    h("header", { class: "bar" }, h("strong", {}, "switchboard console"), who, presenceSelect, connection, logoutButton),
    h(
      "main",
      { class: "console" },
      h(
        "aside",
        {},
        h("h2", {}, "Queue"),
        queueList,
        h("h2", {}, "My conversations"),
        mineList,
        cannedEditor,
      ),
      h(
        "section",
        { class: "chat" },
        h("div", { class: "chat-head" }, chatTitle, transferInput, transferButton, closeButton),
        logHolder,
        typingLine,
        compose,
        errorLine,
      ),
    ),
  );

  function send(frame: AgentClientFrame): boolean {
    if (!socket || socket.readyState !== WebSocket.OPEN) return false;
    socket.send(JSON.stringify(frame));
    return true;
  }

  function alertNew(text: string) {
    beep();
    if ("Notification" in window && Notification.permission === "granted" && document.hidden) {
      try {
        new Notification("switchboard", { body: text, tag: "switchboard-new" });
      } catch {
        // Some browsers only allow notifications from a service worker.
      }
    }
  }

  function conversation(id: number, site = "", visitor = ""): Conversation {
    let conv = conversations.get(id);
    if (!conv) {
      conv = {
        id,
        site,
        visitor,
        log: h("div", { class: "chat-log", role: "log", "aria-label": `Conversation ${id}`, tabindex: "0" }),
        unread: 0,
        readMark: 0,
        lastSeq: 0,
        closed: false,
        typing: false,
        seen: new Set(),
      };
      conversations.set(id, conv);
    }
    if (site) conv.site = site;
    if (visitor) conv.visitor = visitor;
    return conv;
  }

  function renderLists() {
    queueList.replaceChildren(
      ...queue.map((id) =>
        h(
          "li",
          { "data-conversation": String(id) },
          h("span", {}, `#${id}`),
          h("span", { class: "wait", "data-since": String(queueSince.get(id) ?? Date.now()) }, "0:00"),
          h("button", { type: "button", class: "accept", onclick: () => accept(id) }, "Accept"),
        ),
      ),
    );
    if (!queue.length) queueList.append(h("li", { class: "empty" }, "Nobody is waiting."));
    tickWaits();
    const mine = [...conversations.values()].filter((c) => !c.closed);
    mineList.replaceChildren(
      ...mine.map((c) =>
        h(
          "li",
          { "data-conversation": String(c.id), class: c.id === active ? "active" : "" },
          h(
            "button",
            { type: "button", class: "open-conv", onclick: () => select(c.id) },
            `#${c.id} ${c.visitor ? c.visitor.slice(0, 14) : ""}`,
            c.unread ? h("span", { class: "unread", "aria-label": `${c.unread} unread` }, String(c.unread)) : null,
          ),
        ),
      ),
    );
    if (!mine.length) mineList.append(h("li", { class: "empty" }, "No open conversations."));
  }

  /** Waiting times come from the server (since entering the queue, not since this page saw
   * it); a server that does not send them leaves the time this page first saw each. */
  function noteWaits(ids: number[], waitedMs: number[] | undefined) {
    const now = Date.now();
    ids.forEach((id, i) => {
      const waited = waitedMs?.[i];
      if (typeof waited === "number") queueSince.set(id, now - waited);
      else if (!queueSince.has(id)) queueSince.set(id, now);
    });
  }

  function tickWaits() {
    for (const node of queueList.querySelectorAll<HTMLElement>(".wait"))
      node.textContent = "waiting " + clock(Date.now() - Number(node.dataset.since));
  }
  setInterval(tickWaits, 1000);

  function select(id: number) {
    const conv = conversations.get(id);
    if (!conv) return;
    active = id;
    conv.unread = 0;
    chatTitle.textContent = `#${id} · ${conv.site || "site"} · ${conv.visitor || "visitor"}`;
    logHolder.replaceChildren(conv.log);
    typingLine.hidden = !conv.typing;
    conv.log.scrollTop = conv.log.scrollHeight;
    markRead(conv);
    renderLists();
    input.focus();
  }

  function markRead(conv: Conversation) {
    if (conv.id === active && !document.hidden && conv.lastSeq > 0) send({ type: "read", conversation: conv.id, seq: conv.lastSeq });
  }

  function accept(id: number) {
    lastAccepted = id;
    // An away agent is not offered conversations; accepting means being back (and the
    // server's automatic assignment may then hand this conversation over before `accept`).
    if (presence === "away") setPresence("online");
    send({ type: "accept", conversation: id });
  }

  function setPresence(status: "online" | "away") {
    presence = status;
    presenceSelect.value = status;
    send({ type: "status", status });
  }

  function bubble(conv: Conversation, kind: string, text: string, label: string): HTMLElement {
    const node = h(
      "div",
      { class: "msg " + kind },
      h("div", { class: "meta" }, label),
      h("div", { class: "text" }, text),
      kind === "mine" ? h("div", { class: "state" }, "sending…") : null,
    );
    conv.log.append(node);
    if (conv.id === active) conv.log.scrollTop = conv.log.scrollHeight;
    return node;
  }

  function onFrame(frame: AgentServerFrame) {
    switch (frame.type) {
      case "hello":
        attempts = 0;
        everConnected = true;
        if (me.dev) who.textContent = frame.agent + " (dev token)";
        me = { ...me, display: frame.agent };
        connection.textContent = "connected";
        connection.className = "conn ok";
        if (presence !== frame.status) send({ type: "status", status: presence });
        queue = frame.queue;
        noteWaits(queue, frame.queue_waited_ms);
        for (const id of frame.conversations) conversation(id);
        for (const { frame: again } of pending.values()) send(again);
        renderLists();
        break;
      case "queue": {
        const fresh = frame.conversations.filter((id) => !queueSince.has(id));
        noteWaits(frame.conversations, frame.waited_ms);
        for (const id of queueSince.keys()) if (!frame.conversations.includes(id)) queueSince.delete(id);
        queue = frame.conversations;
        if (fresh.length) alertNew(`A visitor is waiting (#${fresh[0]})`);
        renderLists();
        break;
      }
      case "assigned": {
        const isNew = !conversations.has(frame.conversation) || conversations.get(frame.conversation)!.closed;
        const conv = conversation(frame.conversation, frame.site, frame.visitor);
        conv.closed = false;
        conv.readMark = Math.max(conv.readMark, frame.read ?? 0);
        if (isNew) alertNew(`New conversation #${conv.id}`);
        if (active === null) select(conv.id);
        renderLists();
        break;
      }
      case "message": {
        const conv = conversation(frame.conversation);
        if (conv.seen.has(frame.seq)) break;
        conv.seen.add(frame.seq);
        conv.lastSeq = Math.max(conv.lastSeq, frame.seq);
        const kind = frame.from === "bot" ? "bot" : frame.from === "agent" ? "agent" : "visitor";
        const label = frame.from === "bot" ? "Bot answer" : frame.from === "agent" ? frame.name || "Agent" : "Visitor";
        const node = bubble(conv, kind, frame.text, label + (frame.ts ? " · " + frame.ts.slice(11, 19) : ""));
        node.dataset.seq = String(frame.seq);
        if (frame.from === "visitor") conv.typing = false;
        if (conv.id === active && !document.hidden) {
          markRead(conv);
          typingLine.hidden = true;
        } else if (frame.from !== "agent" && frame.seq > conv.readMark) conv.unread++;
        renderLists();
        break;
      }
      case "ack": {
        const entry = pending.get(frame.id);
        pending.delete(frame.id);
        if (entry) {
          const conv = conversation(frame.conversation);
          conv.seen.add(frame.seq);
          conv.lastSeq = Math.max(conv.lastSeq, frame.seq);
          entry.node.dataset.seq = String(frame.seq);
          entry.node.dataset.state = "sent";
          entry.node.querySelector(".state")!.textContent = "sent";
        }
        break;
      }
      case "typing": {
        if (frame.from !== "visitor") break;
        const conv = conversation(frame.conversation);
        conv.typing = frame.on;
        if (conv.id === active) typingLine.hidden = !frame.on;
        break;
      }
      case "read": {
        if (frame.from !== "visitor") break;
        const conv = conversation(frame.conversation);
        for (const node of conv.log.querySelectorAll<HTMLElement>(".msg.mine")) {
          if (Number(node.dataset.seq) <= frame.seq && node.dataset.seq) {
            node.dataset.state = "read";
            node.querySelector(".state")!.textContent = "read";
          }
        }
        break;
      }
      case "transferred":
      case "requeued":
      case "closed": {
        const conv = conversations.get(frame.conversation);
        if (conv) {
          conv.closed = true;
          conv.log.append(
            h(
              "div",
              { class: "msg system" },
              frame.type === "transferred"
                ? `Transferred to ${frame.to}.`
                : frame.type === "requeued"
                  ? "Back in the queue."
                  : "Conversation closed.",
            ),
          );
        }
        renderLists();
        break;
      }
      case "error": {
        const show = () => {
          errorLine.textContent = `${frame.code}: ${frame.message ?? ""}`;
          setTimeout(() => (errorLine.textContent = ""), 6000);
        };
        // `accept` may lose the race to automatic assignment, which gives the conversation
        // to us anyway: report it only if it did not arrive.
        const accepted = frame.code === "not_queued" ? lastAccepted : null;
        if (accepted !== null) setTimeout(() => conversations.get(accepted)?.closed === false || show(), 1000);
        else show();
        break;
      }
      default:
        break;
    }
  }

  function connect() {
    connection.textContent = "connecting…";
    connection.className = "conn";
    const ws = new WebSocket(agentSocketUrl(me.token));
    socket = ws;
    ws.onmessage = (event) => {
      try {
        onFrame(JSON.parse(String(event.data)) as AgentServerFrame);
      } catch (err) {
        console.error(err);
      }
    };
    ws.onclose = (event) => {
      if (socket !== ws) return;
      socket = null;
      if (!everConnected && attempts >= 1) {
        // Refused twice before any hello: the token is not (or no longer) valid.
        logout();
        showLogin("The server refused this login for the agent console.");
        return;
      }
      connection.textContent = "offline, reconnecting…";
      connection.className = "conn bad";
      if (event.code === 1006 && attempts === 0 && me.dev === false) void refresh(me).then((s) => (me = s), () => {});
      const delay = Math.min(15000, 300 * 2 ** attempts++);
      setTimeout(connect, delay);
    };
  }

  function submit() {
    const text = input.value.trim();
    const conv = active === null ? null : conversations.get(active);
    if (!text || !conv || conv.closed) return;
    input.value = "";
    canned.hidden = true;
    const frame: AgentClientFrame = { type: "message", conversation: conv.id, id: newId(), text };
    const node = bubble(conv, "mine", text, me.display);
    node.dataset.state = "sending";
    pending.set(frame.id, { frame, node });
    send(frame);
    send({ type: "typing", conversation: conv.id, on: false });
    typingSentAt = 0;
  }

  // Canned replies: "/" at the start of the reply opens the list, filtered by what follows.
  function updateCanned() {
    const value = input.value;
    if (!value.startsWith("/")) {
      canned.hidden = true;
      return;
    }
    const query = value.slice(1).toLowerCase();
    const own = loadCanned().map((text) => ({ text, search: text.toLowerCase() }));
    const matches = [...teamCanned, ...own].filter((c) => c.search.includes(query)).map((c) => c.text);
    canned.replaceChildren(
      ...matches.map((text, i) =>
        h(
          "li",
          {
            role: "option",
            "aria-selected": i === 0 ? "true" : "false",
            onmousedown: (event: Event) => {
              event.preventDefault();
              pickCanned(text);
            },
          },
          text,
        ),
      ),
    );
    canned.hidden = matches.length === 0;
  }
  function pickCanned(text: string) {
    input.value = text;
    canned.hidden = true;
    input.focus();
  }
  function moveCanned(step: number) {
    const items = [...canned.querySelectorAll("li")];
    const at = items.findIndex((li) => li.getAttribute("aria-selected") === "true");
    const next = (at + step + items.length) % items.length;
    items.forEach((li, i) => li.setAttribute("aria-selected", i === next ? "true" : "false"));
  }

  input.addEventListener("input", () => {
    updateCanned();
    if (active !== null && Date.now() - typingSentAt > 1000) {
      typingSentAt = Date.now();
      send({ type: "typing", conversation: active, on: true });
    }
  });
  input.addEventListener("keydown", (event) => {
    if (!canned.hidden) {
      if (event.key === "ArrowDown" || event.key === "ArrowUp") {
        event.preventDefault();
        moveCanned(event.key === "ArrowDown" ? 1 : -1);
        return;
      }
      if (event.key === "Enter" || event.key === "Tab") {
        const chosen = canned.querySelector("li[aria-selected=true]");
        if (chosen) {
          event.preventDefault();
          pickCanned(chosen.textContent || "");
          return;
        }
      }
      if (event.key === "Escape") {
        canned.hidden = true;
        return;
      }
    }
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submit();
    }
  });
  compose.addEventListener("submit", (event) => {
    event.preventDefault();
    submit();
  });
  transferButton.addEventListener("click", () => {
    const to = transferInput.value.trim();
    if (active !== null && to) send({ type: "transfer", conversation: active, to });
  });
  closeButton.addEventListener("click", () => {
    if (active !== null) send({ type: "close", conversation: active });
  });
  presenceSelect.addEventListener("change", () => setPresence(presenceSelect.value as "online" | "away"));
  logoutButton.addEventListener("click", () => {
    logout();
    location.reload();
  });
  document.addEventListener("visibilitychange", () => {
    const conv = active === null ? null : conversations.get(active);
    if (conv) markRead(conv);
  });

  renderLists();
  connect();
  if (!me.dev) void loadTeamCanned(me.token);
}

/** The team's canned replies (GET /api/canned), searched by shortcut, title, tags and text. */
let teamCanned: { text: string; search: string }[] = [];

interface CannedReply {
  title: string;
  text: string;
  shortcut: string | null;
  tags: string[];
}

async function loadTeamCanned(token: string) {
  try {
    const page = await api<{ replies: CannedReply[] }>("/api/canned?limit=1000", token);
    teamCanned = page.replies.map((r) => ({
      text: r.text,
      search: [r.shortcut ?? "", r.title, ...r.tags, r.text].join("\n").toLowerCase(),
    }));
  } catch {
    // A server without canned replies: the agent's own ones only.
  }
}

const CANNED_KEY = "switchboard.canned";
const DEFAULT_CANNED = [
  "Hello! How can I help you today?",
  "Let me check that for you, one moment please.",
  "Could you tell me the last four digits of your card?",
  "Is there anything else I can help you with?",
  "Thank you for contacting us. Have a great day!",
];

function loadCanned(): string[] {
  try {
    const raw = localStorage.getItem(CANNED_KEY);
    if (raw) return JSON.parse(raw) as string[];
  } catch {
    // Fall through to the defaults.
  }
  return DEFAULT_CANNED;
}

/** The canned-reply editor: one reply per line, kept in localStorage. */
function cannedManager(): HTMLElement {
  const area = h("textarea", { rows: "6", "aria-label": "Canned replies, one per line" });
  area.value = loadCanned().join("\n");
  const save = h("button", { type: "button" }, "Save");
  save.addEventListener("click", () => {
    const lines = area.value
      .split("\n")
      .map((line) => line.trim())
      .filter(Boolean);
    localStorage.setItem(CANNED_KEY, JSON.stringify(lines));
  });
  return h("details", { class: "canned-editor" }, h("summary", {}, "Canned replies"), area, save);
}

let audio: AudioContext | null = null;

/** A short two-tone beep through WebAudio (no sound file to ship). */
function beep() {
  try {
    audio ??= new AudioContext();
    const now = audio.currentTime;
    for (const [offset, freq] of [
      [0, 880],
      [0.15, 1320],
    ]) {
      const osc = audio.createOscillator();
      const gain = audio.createGain();
      osc.frequency.value = freq;
      gain.gain.setValueAtTime(0.15, now + offset);
      gain.gain.exponentialRampToValueAtTime(0.001, now + offset + 0.12);
      osc.connect(gain).connect(audio.destination);
      osc.start(now + offset);
      osc.stop(now + offset + 0.13);
    }
  } catch {
    // No audio device: stay silent.
  }
}

// Last, once every module-level constant above is initialised (a session restored from
// an earlier visit starts the console at once, and it reads the canned replies).
session = restore();
if (session) start(session);
else showLogin();
