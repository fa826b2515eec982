// The admin pages at /admin: agents and roles, knowledge-base search, import and
// try-a-question, live charts from /metrics, and the audit log. Each panel shows
// the API's error (for example a 404 from a server without that endpoint) instead
// of failing silently.

import { ApiError, Session, login, logout, restore } from "../shared/api";
import { $, h, loginForm } from "../shared/dom";
import { Sample, adminApi, histogramQuantile, parseMetrics, total } from "./api";

const app = $("#app");
const saved = restore();
if (saved) start(saved);
else
  app.replaceChildren(
    loginForm("switchboard admin", "", async (name, password) => {
      start(await login(name, password));
    }),
  );

function errorText(err: unknown): string {
  if (err instanceof ApiError) return `${err.code}: ${err.message}`;
  return String(err);
}

function panel(title: string, id: string, ...body: Node[]): { section: HTMLElement; error: HTMLElement } {
  const error = h("p", { class: "error", role: "alert" });
  const section = h("section", { class: "card", id }, h("h2", {}, title), error, ...body);
  return { section, error };
}

function start(me: Session) {
  const client = adminApi(me.token);
  const logoutButton = h("button", { type: "button", class: "link" }, "Log out");
  logoutButton.addEventListener("click", () => {
    logout();
    location.reload();
  });

  // Agents and roles.
  const agentRows = h("tbody");
  const newName = h("input", { placeholder: "name", "aria-label": "New agent name" });
  const newPassword = h("input", { placeholder: "password", type: "password", "aria-label": "New agent password" });
  const newRole = roleSelect("agent");
  const addAgent = h("button", { type: "submit" }, "Add agent");
  const agents = panel(
    "Agents and roles",
    "agents",
    h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Name"), h("th", {}, "Role"), h("th", {}, ""))), agentRows),
    h("form", { class: "row" }, newName, newPassword, newRole, addAgent),
  );
  /** After a change: the list again, and the audit log that recorded it. */
  function changed() {
    void loadAgents();
    void loadAudit();
  }
  async function loadAgents() {
    try {
      const list = await client.agents();
      agentRows.replaceChildren(
        ...list.map((agent) => {
          const select = roleSelect(agent.role);
          select.addEventListener("change", () =>
            client.setRole(agent.name, select.value).then(changed, (e) => (agents.error.textContent = errorText(e))),
          );
          const disable = h("button", { type: "button", class: "danger" }, agent.disabled ? "Disabled" : "Disable");
          disable.toggleAttribute("disabled", !!agent.disabled);
          disable.addEventListener("click", () =>
            client.disable(agent.name).then(changed, (e) => (agents.error.textContent = errorText(e))),
          );
          return h("tr", {}, h("td", {}, agent.display || agent.name), h("td", {}, select), h("td", {}, disable));
        }),
      );
    } catch (err) {
      agents.error.textContent = errorText(err);
    }
  }
  addAgent.parentElement!.addEventListener("submit", (event) => {
    event.preventDefault();
    agents.error.textContent = "";
    client.addAgent({ name: newName.value.trim(), password: newPassword.value, role: newRole.value }).then(
      () => {
        newName.value = "";
        newPassword.value = "";
        changed();
      },
      (e) => (agents.error.textContent = errorText(e)),
    );
  });

  // Knowledge base.
  const search = h("input", { type: "search", placeholder: "search questions and answers", "aria-label": "Search the knowledge base" });
  const results = h("ul", { class: "results" });
  const tryInput = h("input", { placeholder: "ask a question as a visitor would", "aria-label": "Try a question" });
  const tryResult = h("div", { class: "try-result", "aria-live": "polite" });
  const importFile = h("input", { type: "file", accept: ".csv,.json,text/csv,application/json", "aria-label": "Knowledge base file" });
  const importResult = h("div", { class: "import-result", "aria-live": "polite" });
  const kb = panel(
    "Knowledge base",
    "kb",
    h("form", { class: "row try" }, tryInput, h("button", { type: "submit" }, "Try")),
    tryResult,
    h("form", { class: "row search" }, search, h("button", { type: "submit" }, "Search")),
    results,
    h("form", { class: "row import" }, importFile, h("button", { type: "submit" }, "Import")),
    importResult,
  );
  tryInput.parentElement!.addEventListener("submit", async (event) => {
    event.preventDefault();
    kb.error.textContent = "";
    try {
      const r = await client.kbTry(tryInput.value);
      tryResult.replaceChildren(
        h("div", {}, h("strong", {}, "Intent: "), r.intent ?? "(none)"),
        h(
          "div",
          {},
          h("strong", {}, "Confidence: "),
          r.confidence.toFixed(3),
          " ",
          h("meter", { min: "0", max: "1", value: String(r.confidence) }),
        ),
        h("div", {}, h("strong", {}, "Answer: "), r.answer ?? "(the bot would not answer)"),
      );
    } catch (err) {
      kb.error.textContent = errorText(err);
    }
  });
  search.parentElement!.addEventListener("submit", async (event) => {
    event.preventDefault();
    kb.error.textContent = "";
    try {
      const entries = await client.kbSearch(search.value);
      results.replaceChildren(
        ...entries.slice(0, 100).map((e) =>
          h("li", {}, h("span", { class: "intent" }, e.intent || e.category || ""), " ", e.text || e.question || "", e.answer ? h("div", { class: "answer" }, e.answer) : null),
        ),
      );
      if (!entries.length) results.append(h("li", { class: "empty" }, "No match."));
    } catch (err) {
      kb.error.textContent = errorText(err);
    }
  });
  importFile.parentElement!.addEventListener("submit", async (event) => {
    event.preventDefault();
    kb.error.textContent = "";
    const file = importFile.files?.[0];
    if (!file) return;
    try {
      const body = await file.text();
      const type = file.name.endsWith(".json") ? "application/json" : "text/csv";
      const r = (await client.kbImport(body, type)) as Record<string, unknown> | string;
      importResult.textContent =
        typeof r === "string"
          ? "Imported: " + r
          : `Imported version ${r.version}: ${r.entries} entries, ${r.questions} questions` +
            (typeof r.total_ms === "number" ? ` in ${(r.total_ms / 1000).toFixed(1)} s` : "") +
            (Array.isArray(r.warnings) && r.warnings.length ? `; warnings: ${r.warnings.join("; ")}` : "");
      void loadAudit();
    } catch (err) {
      kb.error.textContent = errorText(err);
    }
  });

  // Live charts from /metrics.
  const charts = {
    sessions: chart("Sessions open", ""),
    messages: chart("Messages/s", "/s"),
    latency: chart("Message latency p99 (to commit)", " ms"),
    cache: chart("Bot cache hit ratio", "%"),
  };
  const metrics = panel(
    "Live metrics",
    "metrics",
    h("div", { class: "charts" }, ...Object.values(charts).map((c) => c.node)),
  );
  let previous: { at: number; messages: number } | null = null;
  async function pollMetrics() {
    try {
      const samples = parseMetrics(await client.metrics());
      metrics.error.textContent = "";
      const now = performance.now();
      const messages = (total(samples, "switchboard_messages_received") ?? 0) + (total(samples, "switchboard_messages_sent") ?? 0);
      charts.sessions.push(total(samples, "switchboard_sessions_open"));
      if (previous) charts.messages.push(((messages - previous.messages) * 1000) / (now - previous.at));
      previous = { at: now, messages };
      const latency = latencyP99(samples);
      charts.latency.rename(latency.label);
      charts.latency.push(latency.ms);
      const hits = (total(samples, "switchboard_bot_hot_cache_hits") ?? 0) + (total(samples, "switchboard_bot_embedding_cache_hits") ?? 0);
      const misses = total(samples, "switchboard_bot_cache_misses") ?? 0;
      charts.cache.push(hits + misses ? (100 * hits) / (hits + misses) : null);
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) {
        // `[metrics] listen` serves them on a separate address, for Prometheus; stop asking.
        clearInterval(metricsTimer);
        metrics.error.textContent =
          "Metrics are served on the separate [metrics] listen address (for Prometheus), not on this one.";
        return;
      }
      metrics.error.textContent = errorText(err);
    }
  }

  // Audit log.
  const auditList = h("ol", { class: "audit-list" });
  const audit = panel("Audit log", "audit", auditList);
  async function loadAudit() {
    try {
      audit.error.textContent = "";
      const records = await client.audit(100);
      auditList.replaceChildren(
        ...records.map((r) =>
          h("li", {}, h("code", {}, String(r.ts ?? r.time ?? "")), " ", String(r.event ?? r.action ?? r.kind ?? ""), " ", h("span", { class: "detail" }, JSON.stringify(r))),
        ),
      );
      if (!records.length) auditList.append(h("li", { class: "empty" }, "No records."));
    } catch (err) {
      audit.error.textContent = errorText(err);
    }
  }

  app.replaceChildren(
    h("header", { class: "bar" }, h("strong", {}, "switchboard admin"), h("span", { class: "who" }, me.display + ` (${me.role})`), logoutButton),
    h("main", { class: "admin" }, metrics.section, agents.section, kb.section, audit.section),
  );
  void loadAgents();
  void loadAudit();
  const metricsTimer = setInterval(pollMetrics, 2000);
  void pollMetrics();
  setInterval(loadAudit, 10000);
}

/**
 * p99 in ms of `switchboard_commit_latency_seconds`: how long a message (or any stored
 * change) waits from reaching its shard to being committed, i.e. the server's part of the
 * time before it is acked and relayed. Older servers without the histogram show n/a.
 */
function latencyP99(samples: Sample[]): { label: string; ms: number | null } {
  const p99 = histogramQuantile(samples, "switchboard_commit_latency_seconds", 0.99);
  return { label: "Message latency p99 (to commit)", ms: p99 === null ? null : p99 * 1000 };
}

function roleSelect(value: string): HTMLSelectElement {
  const select = h("select", { "aria-label": "Role" }, ...["agent", "supervisor", "admin"].map((r) => h("option", { value: r }, r)));
  select.value = value;
  return select;
}

/** A sparkline of the last 60 values as inline SVG. */
function chart(title: string, unit: string) {
  const values: (number | null)[] = [];
  const current = h("span", { class: "value" }, "–");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 240 60");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", title);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#1558d6");
  line.setAttribute("stroke-width", "2");
  svg.append(line);
  const caption = h("span", {}, title);
  const node = h("figure", { class: "chart" }, h("figcaption", {}, caption, " ", current), svg);
  return {
    node,
    rename(text: string) {
      caption.textContent = text;
    },
    push(value: number | null) {
      values.push(value);
      if (values.length > 60) values.shift();
      current.textContent = value === null || !isFinite(value) ? "n/a" : (Math.round(value * 100) / 100).toString() + unit;
      const known = values.filter((v): v is number => v !== null && isFinite(v));
      const max = Math.max(1, ...known);
      line.setAttribute(
        "points",
        values
          .map((v, i) => (v === null || !isFinite(v) ? null : `${(i * 240) / 59},${58 - (v / max) * 54}`))
          .filter(Boolean)
          .join(" "),
      );
    },
  };
}
