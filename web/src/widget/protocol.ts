// The visitor side of the wire protocol (docs/protocol.md), kept in one place so
// that names can change with the server without touching the widget's UI code.

/** What the widget remembers per site in localStorage. */
export interface Stored {
  visitor?: string;
  secret?: string;
  /** The conversation `seq` belongs to (seqs restart in a new conversation). */
  conversation?: number | null;
  /** Highest seq seen; sent as `resume` on reconnect. */
  seq: number;
  /** Messages sent but not acked yet, re-sent with the same id after a reconnect. */
  pending: { id: string; text: string }[];
}

export type ServerFrame =
  | { type: "hello"; visitor: string; secret?: string; site: string; conversation: number | null; seq: number }
  | { type: "ack"; id: string; conversation: number; seq: number }
  | {
      type: "message";
      conversation: number;
      seq: number;
      from: "visitor" | "bot" | "agent";
      name?: string;
      text: string;
      ts?: string;
      id?: string;
    }
  | { type: "typing"; conversation: number; from: string; on: boolean }
  | { type: "read"; conversation: number; from: string; seq: number }
  | { type: "queued"; conversation: number; position: number }
  | { type: "assigned"; conversation: number; agent: string }
  | { type: "closed"; conversation: number }
  | { type: "no_agents"; conversation: number }
  | { type: "error"; code: string; message?: string; retry_after?: number };

export type ClientFrame =
  | { type: "message"; id: string; text: string }
  | { type: "typing"; on: boolean }
  | { type: "read"; seq: number }
  | { type: "handoff" };

const KEY_PREFIX = "switchboard.visitor.";

export function load(site: string): Stored {
  try {
    const raw = localStorage.getItem(KEY_PREFIX + site);
    if (raw) {
      const parsed = JSON.parse(raw) as Stored;
      if (typeof parsed.seq === "number" && Array.isArray(parsed.pending)) return parsed;
    }
  } catch {
    // Storage blocked (private mode, sandboxed frame): run without persistence.
  }
  return { seq: 0, pending: [] };
}

export function save(site: string, stored: Stored): void {
  try {
    localStorage.setItem(KEY_PREFIX + site, JSON.stringify(stored));
  } catch {
    // See load().
  }
}

/**
 * The visitor socket's URL: `base` is the origin the widget script came from; the server
 * replays the stored messages after `resume` (the highest seq this page shows: 0 on a fresh
 * page, so the conversation's history appears again after a reload or on the host's next page).
 */
export function socketUrl(base: string, site: string, stored: Stored, resume: number): string {
  const url = new URL("/ws/visitor", base);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  url.searchParams.set("site", site);
  if (stored.visitor) {
    url.searchParams.set("visitor", stored.visitor);
    if (stored.secret) url.searchParams.set("secret", stored.secret);
    if (stored.conversation !== null && stored.conversation !== undefined)
      url.searchParams.set("resume", String(resume));
  }
  return url.toString();
}

/** A client message id, unique within the conversation. */
export function newId(): string {
  const bytes = new Uint8Array(12);
  crypto.getRandomValues(bytes);
  return "w-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** Error codes and frames that say no agent is online: the widget offers to leave a message. */
export function meansNobodyOnline(frame: ServerFrame): boolean {
  return frame.type === "no_agents" || (frame.type === "error" && frame.code === "no_agent_available");
}
