// Support for the end-to-end tests: start the real switchboard binary on loopback
// with a temporary configuration (like tests/common/mod.rs does for the Rust
// tests), a TCP proxy whose connections a test can kill, a tiny host-site server,
// and headless Chromium through playwright-core.

import { spawn, execFileSync } from "node:child_process";
import { createServer } from "node:http";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createConnection, createServer as createTcpServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
export const ARTIFACTS = join(ROOT, "target", "e2e-artifacts");
mkdirSync(ARTIFACTS, { recursive: true });

const require = createRequire(join(ROOT, "web", "package.json"));
const { chromium } = require("playwright-core");

/** The binary under test: $SWITCHBOARD_BIN, else the newest of target/{release,debug}. */
export function binary() {
  if (process.env.SWITCHBOARD_BIN) return process.env.SWITCHBOARD_BIN;
  for (const profile of ["release", "debug"]) {
    const path = join(ROOT, "target", profile, "switchboard");
    if (existsSync(path)) return path;
  }
  throw new Error("no switchboard binary: run `cargo build` first");
}

/**
 * Agent accounts of the test server, created with `switchboard agent add` (the password on
 * stdin), as an operator would; the console and admin pages log in with POST /api/login.
 */
export const AGENTS = {
  alice: { name: "alice", display: "Alice", role: "admin", password: "alice-password-0123" },
  bob: { name: "bob", display: "Bob", role: "agent", password: "bob-password-0123" },
  // One conversation at most, so a second visitor waits in the queue with a position.
  carol: { name: "carol", display: "Carol", role: "agent", password: "carol-password-0123", maxOpen: 1 },
};

function addAgents(config) {
  for (const agent of Object.values(AGENTS)) {
    execFileSync(
      binary(),
      ["agent", "add", agent.name, "--role", agent.role, "--display", agent.display, "--max-open", String(agent.maxOpen ?? 5), "--config", config],
      { cwd: ROOT, input: `${agent.password}\n`, stdio: ["pipe", "pipe", "pipe"] },
    );
  }
}

/**
 * Starts switchboard with the model and a small BANKING77 knowledge base
 * (imported with `switchboard kb import`, as an operator would).
 */
export async function startServer() {
  const dir = mkdtempSync(join(tmpdir(), "switchboard-e2e-"));
  const config = join(dir, "test.toml");
  writeFileSync(
    config,
    `[server]
listen = "127.0.0.1:0"
shutdown_grace = "2s"

[storage]
dir = ${JSON.stringify(join(dir, "data"))}

[log]
format = "text"
level = "info"

[inference]
enabled = true

[bot]
confidence_threshold = 0.45
margin_threshold = 0.0

[risk_control]
# The latency test sends many messages quickly.
flood_messages = 10000
flood_window = "100ms"

[limits]
# One browser on one address sends far faster than a person: lift the per-session and per-IP
# rates (they have their own tests in tests/admission.rs).
connections_per_ip = 0
visitor_messages_per_second = 0
visitor_frames_per_second = 0
# A debug build beside a browser on a shared test machine lags more than a production box:
# shed typing relays (which the tests check) only past a lag no healthy run reaches.
shed_lag = "2s"
refuse_lag = "10s"
`,
  );
  addAgents(config);
  const kb = join(dir, "kb.csv");
  writeFileSync(kb, smallKb());
  execFileSync(binary(), ["kb", "import", "--config", config, kb], { cwd: ROOT, stdio: "pipe" });

  const child = spawn(binary(), ["serve", "--config", config], { cwd: ROOT, stdio: ["ignore", "ignore", "pipe"] });
  const logs = [];
  const addr = await new Promise((resolveAddr, reject) => {
    const timer = setTimeout(() => reject(new Error("switchboard did not start:\n" + logs.join(""))), 60000);
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (chunk) => {
      logs.push(chunk);
      const match = /listening on ([0-9.]+:\d+)/.exec(logs.join(""));
      if (match) {
        clearTimeout(timer);
        resolveAddr(match[1]);
      }
    });
    child.on("exit", (code) => reject(new Error(`switchboard exited with ${code}:\n${logs.join("")}`)));
  });
  return {
    base: `http://${addr}`,
    port: Number(addr.split(":")[1]),
    logs: () => logs.join(""),
    async stop() {
      child.kill("SIGTERM");
      await new Promise((r) => (child.exitCode !== null ? r() : child.once("exit", r)));
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** The answers of the test knowledge base, by intent. */
export const ANSWERS = {
  card_arrival: "Cards arrive within 5 working days; track yours under Cards > Delivery.",
  lost_or_stolen_card: "Freeze your card in the app right away, then order a new one.",
  exchange_rate: "We use the interbank rate plus a small margin shown before you pay.",
  age_limit: "You must be 18 or older to open an account.",
  pin_blocked: "Unblock your PIN at any of our ATMs with your card.",
};

/** Twelve questions per intent from the committed BANKING77 split, with the answers above. */
export function smallKb() {
  const rows = readFileSync(join(ROOT, "tests", "data", "banking77", "kb.csv"), "utf8").split("\n").slice(1);
  const quote = (s) => `"${s.replaceAll('"', '""')}"`;
  let csv = "text,category,answer\n";
  for (const [intent, answer] of Object.entries(ANSWERS)) {
    const questions = rows
      .map((line) => {
        const at = line.lastIndexOf(",");
        return [line.slice(0, at).replace(/^"|"$/g, "").replaceAll('""', '"'), line.slice(at + 1).trim()];
      })
      .filter(([, category]) => category === intent)
      .slice(0, 12);
    if (questions.length !== 12) throw new Error(`${intent}: not enough questions`);
    for (const [text] of questions) csv += `${quote(text)},${intent},${quote(answer)}\n`;
  }
  return csv;
}

/** Headless Debian Chromium (a fresh profile per launch; playwright creates it). */
export async function launchBrowser() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
}

/** Logs `agent` in to the console on `page` with its account's password. */
export async function agentLogin(page, base, agent = "alice") {
  await page.goto(`${base}/console`);
  await page.getByLabel("Name").fill(agent);
  await page.getByLabel("Password").fill(AGENTS[agent].password);
  await page.getByRole("button", { name: "Log in" }).click();
  await page.locator(".conn.ok").waitFor();
}

/** Same login for the admin pages. */
export async function adminLogin(page, base, agent = "alice") {
  await page.goto(`${base}/admin`);
  await page.getByLabel("Name").fill(agent);
  await page.getByLabel("Password").fill(AGENTS[agent].password);
  await page.getByRole("button", { name: "Log in" }).click();
  await page.locator("#metrics").waitFor();
}

/**
 * A TCP proxy to `port`. `drop()` kills every connection and refuses new ones
 * until `restore()`; `swallowDown()` stops forwarding server → client bytes (an
 * ack lost in flight).
 */
export async function startProxy(port) {
  const sockets = new Set();
  let refusing = false;
  let swallowing = false;
  const server = createTcpServer((client) => {
    if (refusing) return client.destroy();
    const upstream = createConnection({ host: "127.0.0.1", port });
    sockets.add(client).add(upstream);
    client.on("data", (data) => upstream.write(data));
    upstream.on("data", (data) => {
      if (!swallowing) client.write(data);
    });
    const end = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on("close", end).on("error", end);
    upstream.on("close", end).on("error", end);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return {
    origin: `http://127.0.0.1:${server.address().port}`,
    drop() {
      refusing = true;
      swallowing = false;
      for (const socket of sockets) socket.destroy();
    },
    swallowDown() {
      swallowing = true;
    },
    restore() {
      refusing = false;
      swallowing = false;
    },
    close: () => new Promise((r) => (server.close(r), [...sockets].forEach((s) => s.destroy()))),
  };
}

/** A host site on its own origin embedding the widget from `widgetOrigin` (one tag). */
export async function startHostSite() {
  const server = createServer((req, res) => {
    const url = new URL(req.url, "http://host");
    const origin = url.searchParams.get("widget");
    const lang = url.searchParams.get("lang");
    const site = url.searchParams.get("site") || "host-site";
    const hostile = url.pathname === "/hostile.html";
    const tag = `<script src="${origin}/widget.js" data-site="${site}"${lang ? ` data-lang="${lang}"` : ""} async></script>`;
    const css = hostile
      ? `<style>
* { all: unset !important; }
html { font-size: 72px !important; }
body, div, button, textarea, span { font-size: 90px !important; line-height: 3 !important; color: #f0f !important;
  font-family: "Comic Sans MS", cursive !important; letter-spacing: 8px !important; }
div { display: none !important; }
button, textarea { transform: rotate(8deg) !important; }
style, script { display: none !important; }
</style>`
      : "";
    res.writeHead(200, { "Content-Type": "text/html; charset=utf-8" });
    res.end(
      `<!doctype html><html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">${css}</head>` +
        `<body><h1>A host page</h1><p>${hostile ? "Hostile CSS everywhere." : "Nothing special."}</p>${tag}</body></html>`,
    );
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return { origin: `http://127.0.0.1:${server.address().port}`, close: () => new Promise((r) => server.close(r)) };
}

/** The widget's shadow root, pierced by playwright locators. */
export function widget(page) {
  return page.locator("#switchboard-widget");
}

/** Sends `text` from the widget with the keyboard (the panel must be open). */
export async function widgetSend(page, text) {
  const input = widget(page).locator("textarea");
  await input.fill(text);
  await input.press("Enter");
}

export function percentile(values, p) {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(p * sorted.length))];
}
