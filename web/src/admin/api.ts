// The admin REST API as the pages use it (issue 10/operations contract): paths
// and shapes live here only.

import { api } from "../shared/api";

export interface Agent {
  name: string;
  display?: string;
  role: string;
  disabled?: boolean;
}

export interface KbEntry {
  text?: string;
  question?: string;
  intent?: string;
  category?: string;
  answer?: string;
}

export const adminApi = (token: string) => ({
  agents: () => api<{ agents: Agent[] } | Agent[]>("/api/agents", token).then((r) => (Array.isArray(r) ? r : r.agents)),
  addAgent: (agent: { name: string; password: string; role: string; display?: string }) =>
    api("/api/agents", token, { method: "POST", body: JSON.stringify(agent) }),
  setRole: (name: string, role: string) =>
    api(`/api/agents/${encodeURIComponent(name)}`, token, { method: "PATCH", body: JSON.stringify({ role }) }),
  disable: (name: string) =>
    api(`/api/agents/${encodeURIComponent(name)}`, token, { method: "PATCH", body: JSON.stringify({ disabled: true }) }),
  kbSearch: (q: string) =>
    api<{ entries: KbEntry[] } | KbEntry[]>(`/api/kb/entries?q=${encodeURIComponent(q)}`, token).then((r) =>
      Array.isArray(r) ? r : r.entries,
    ),
  kbTry: (text: string) =>
    api<{ intent: string | null; confidence: number; answer: string | null }>("/api/kb/try", token, {
      method: "POST",
      body: JSON.stringify({ text }),
    }),
  kbImport: (body: string, type: string) =>
    api<unknown>("/api/kb/import", token, { method: "POST", body, headers: { "Content-Type": type } }),
  audit: (limit: number) =>
    api<{ records: Record<string, unknown>[] }>(`/api/audit?limit=${limit}`, token).then((r) => r.records),
  /** `/metrics` needs a supervisor's or admin's token; it answers 404 when `[metrics] listen` serves it elsewhere. */
  metrics: () => api<string>("/metrics", token),
});

/** One Prometheus text sample: name, labels and value. */
export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** Parses the Prometheus text exposition format (comments skipped). */
export function parseMetrics(text: string): Sample[] {
  const samples: Sample[] = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = /^([a-zA-Z_:][\w:]*)(\{([^}]*)\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const labels: Record<string, string> = {};
    for (const pair of (match[3] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
    samples.push({ name: match[1], labels, value: Number(match[4]) });
  }
  return samples;
}

/**
 * The samples of `name` summed over shards: the server's `shard="all"` series when it has
 * them, else (older servers) the shard series themselves.
 */
function summed(samples: Sample[], name: string): Sample[] {
  const found = samples.filter((s) => s.name === name);
  const all = found.filter((s) => s.labels.shard === "all");
  return all.length ? all : found;
}

/** A metric summed over all shards (and over its other labels). */
export function total(samples: Sample[], name: string): number | null {
  const found = summed(samples, name);
  return found.length ? found.reduce((sum, s) => sum + s.value, 0) : null;
}

/** p99 from a Prometheus histogram's cumulative `_bucket` series (summed over shards). */
export function histogramQuantile(samples: Sample[], name: string, q: number): number | null {
  const buckets = new Map<number, number>();
  for (const s of summed(samples, name + "_bucket")) {
    if (s.labels.le === undefined) continue;
    const le = s.labels.le === "+Inf" ? Infinity : Number(s.labels.le);
    buckets.set(le, (buckets.get(le) || 0) + s.value);
  }
  const sorted = [...buckets].sort((a, b) => a[0] - b[0]);
  const count = sorted.length ? sorted[sorted.length - 1][1] : 0;
  if (!count) return null;
  const rank = q * count;
  for (const [le, cumulative] of sorted) if (cumulative >= rank) return le;
  return null;
}
