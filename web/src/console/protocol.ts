// The agent side of the wire protocol (docs/protocol.md): frame shapes and the
// socket URL, in one module so names can follow the server.

export type AgentServerFrame =
  | {
      type: "hello";
      agent: string;
      id: string;
      conversations: number[];
      queue: number[];
      /** How long each of `queue` has waited, in ms (older servers: absent). */
      queue_waited_ms?: number[];
      status: string;
    }
  | { type: "queue"; conversations: number[]; waited_ms?: number[] }
  | { type: "assigned"; conversation: number; site?: string; visitor?: string; seq?: number; read?: number }
  | { type: "transferred"; conversation: number; to: string }
  | { type: "requeued"; conversation: number }
  | {
      type: "message";
      conversation: number;
      seq: number;
      from: "visitor" | "bot" | "agent";
      name?: string;
      text: string;
      ts?: string;
    }
  | { type: "ack"; id: string; conversation: number; seq: number }
  | { type: "typing"; conversation: number; from: string; on: boolean }
  | { type: "read"; conversation: number; from: string; seq: number }
  | { type: "closed"; conversation: number }
  | { type: "error"; code: string; message?: string; conversation?: number };

export type AgentClientFrame =
  | { type: "accept"; conversation: number }
  | { type: "message"; conversation: number; id: string; text: string }
  | { type: "typing"; conversation: number; on: boolean }
  | { type: "read"; conversation: number; seq: number }
  | { type: "transfer"; conversation: number; to: string }
  | { type: "close"; conversation: number }
  | { type: "status"; status: "online" | "away" };

export function agentSocketUrl(token: string): string {
  const url = new URL("/ws/agent", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.searchParams.set("token", token);
  return url.toString();
}

export function newId(): string {
  return "c-" + Date.now().toString(36) + "-" + Math.random().toString(36).slice(2, 10);
}
