// Login and REST calls shared by the console and the admin pages. The account
// API's names live here only (see issue 10's contract), so they change in one place.

export interface Session {
  token: string;
  name: string;
  display: string;
  role: string;
  /** True when the server has no /api/login and the password was used as a static agent token. */
  dev: boolean;
}

export class ApiError extends Error {
  constructor(
    public status: number,
    public code: string,
    message: string,
    /** The body had the API's `{"error":{...}}` shape (false: plain text, e.g. from an older server). */
    public structured = false,
  ) {
    super(message);
  }
}

const STORAGE_KEY = "switchboard.session";

/** Calls `path` with the bearer token; throws ApiError with the server's `{"error":{code,message}}`. */
export async function api<T>(path: string, token: string | null, init: RequestInit = {}): Promise<T> {
  const headers = new Headers(init.headers);
  if (token) headers.set("Authorization", "Bearer " + token);
  if (init.body && typeof init.body === "string" && !headers.has("Content-Type"))
    headers.set("Content-Type", "application/json");
  let response: Response;
  try {
    response = await fetch(path, { ...init, headers });
  } catch (err) {
    throw new ApiError(0, "network", "cannot reach the server: " + String(err));
  }
  const text = await response.text();
  if (!response.ok) {
    let code = "http_" + response.status;
    let message = text.trim() || response.statusText;
    let structured = false;
    try {
      const body = JSON.parse(text) as { error?: { code?: string; message?: string } };
      if (body.error) {
        code = body.error.code || code;
        message = body.error.message || message;
        structured = true;
      }
    } catch {
      // Plain-text error.
    }
    if (!structured)
      message = `${init.method || "GET"} ${path} is not available on this server (HTTP ${response.status}: ${message})`;
    throw new ApiError(response.status, code, message, structured);
  }
  const type = response.headers.get("Content-Type") || "";
  return (type.includes("json") ? JSON.parse(text) : text) as T;
}

/**
 * Logs in with name and password. A server without `/api/login` is a development
 * build with static agent tokens (`[agents.accounts.ID] token`): the password is then
 * used as the token, and the socket's handshake checks it.
 */
export async function login(name: string, password: string): Promise<Session> {
  try {
    const { token } = await api<{ token: string; expires: string }>("/api/login", null, {
      method: "POST",
      body: JSON.stringify({ name, password }),
    });
    let me = { name, display: name, role: "agent" };
    try {
      me = await api<typeof me>("/api/me", token);
    } catch {
      // Older servers: keep the login name.
    }
    return remember({ token, name: me.name, display: me.display || me.name, role: me.role, dev: false });
  } catch (err) {
    // No account API on this server (it answers 404/405, or refuses the body in plain text).
    const noLoginApi =
      err instanceof ApiError && !err.structured && [400, 404, 405, 501].includes(err.status);
    if (noLoginApi) {
      return remember({ token: password, name, display: name, role: "agent", dev: true });
    }
    throw err;
  }
}

/** Swaps the token for a fresh one; keeps the old one on a server without refresh. */
export async function refresh(session: Session): Promise<Session> {
  if (session.dev) return session;
  const { token } = await api<{ token: string }>("/api/refresh", session.token, { method: "POST" });
  return remember({ ...session, token });
}

function remember(session: Session): Session {
  sessionStorage.setItem(STORAGE_KEY, JSON.stringify(session));
  return session;
}

export function restore(): Session | null {
  try {
    const raw = sessionStorage.getItem(STORAGE_KEY);
    return raw ? (JSON.parse(raw) as Session) : null;
  } catch {
    return null;
  }
}

export function logout(): void {
  sessionStorage.removeItem(STORAGE_KEY);
}
