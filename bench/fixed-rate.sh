#!/usr/bin/env bash
# One fixed-rate relay run against a fresh switchboard server, configured as bench/compare.sh's
# switchboard column (a shard per core, durability "fsync", 4 agents, 100 conversations, no model).
# Prints one summary line: offered rate, p50 and p99 round-trip latency, the server's CPU time per
# round trip (utime+stime from /proc/PID/stat), lost messages and the machine's steal (the share of
# the cores the hypervisor took; read it as time: 0.4% of a 13 s run on 2 cores is one ~100 ms
# pause, enough to lift a p99).
# bench/README.md's fixed-rate figures since 2026-12-05 come from it (earlier sections call it
# /tmp/fixed.sh).
#
# Usage: bench/fixed-rate.sh SWITCHBOARD_BIN RATE [DURATION]       (DURATION default 8s, after 2s warm-up)
#   EXTRA='commit_interval = "10ms"'   lines appended to the server's [storage] table
#   BENCH=/path/to/switchboard-bench   default: beside SWITCHBOARD_BIN
#   PORT=9102 METRICS_PORT=9199        the server's listener and its /metrics listener
#   KEEP=1                             keep the run's directory (config, log, JSON report)
# The server and the generator share the machine's cores, as in compare.sh. The script sources
# bench/switchboard-config.sh beside it (a symlink to it works; a copy elsewhere does not).
set -euo pipefail

[ $# -ge 2 ] || { sed -n '2,17p' "$0" >&2; exit 2; }
BIN=$1; RATE=$2; DURATION=${3:-8s}
BENCH=${BENCH:-$(dirname "$BIN")/switchboard-bench}
PORT=${PORT:-9102}; METRICS_PORT=${METRICS_PORT:-9199}
[ -x "$BIN" ] || { echo "fixed-rate: $BIN is not an executable" >&2; exit 2; }
[ -x "$BENCH" ] || { echo "fixed-rate: $BENCH is not an executable (set BENCH)" >&2; exit 2; }

DIR=$(mktemp -d "${TMPDIR:-/tmp}/fixed-rate.XXXXXX")
SERVER=""
cleanup() {
  if [ -n "$SERVER" ]; then
    kill -INT "$SERVER" 2>/dev/null || true
    # A clean stop drains in well under 10 s; a hung one is killed.
    for _ in $(seq 100); do kill -0 "$SERVER" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
  fi
  if [ "${KEEP:-0}" = 1 ]; then echo "fixed-rate: kept $DIR" >&2; else rm -rf "$DIR"; fi
}
trap cleanup EXIT

# shellcheck source=bench/switchboard-config.sh
. "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/switchboard-config.sh"
write_switchboard_config "$DIR/server.toml" "$PORT" "$DIR/data" 4 "${EXTRA:-}" \
  "$(printf '[metrics]\nlisten = "127.0.0.1:%s"' "$METRICS_PORT")"

"$BIN" serve --config "$DIR/server.toml" >"$DIR/server.log" 2>&1 & SERVER=$!
for _ in $(seq 100); do
  (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
  kill -0 "$SERVER" 2>/dev/null || { cat "$DIR/server.log" >&2; echo "fixed-rate: the server exited" >&2; exit 1; }
  sleep 0.1
done
(echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null || { echo "fixed-rate: nothing listens on port $PORT after 10 s" >&2; exit 1; }
sleep 2
AGENT_ARGS=(--agents 4)
for i in 0 1 2 3; do AGENT_ARGS+=(--agent-token "switchboard-bench-agent-$i"); done
if ! "$BENCH" relay --target "ws://127.0.0.1:$PORT" --protocol switchboard "${AGENT_ARGS[@]}" --pid "$SERVER" \
  --conversations 100 --rate "$RATE" --duration "$DURATION" --warmup 2s --json "$DIR/report.json" >"$DIR/bench.txt" 2>&1; then
  cat "$DIR/bench.txt" >&2
  echo "fixed-rate: the relay run failed (its output is above)" >&2
  exit 1
fi
python3 - "$DIR/report.json" <<'PY'
import json, sys
f = dict(json.load(open(sys.argv[1]))["figures"])
print("rate %d p50 %.2f ms p99 %.2f ms cpu %s us/round trip lost %d steal %s%%"
      % (f["rate_offered_per_s"], f["p50_ms"], f["p99_ms"], f.get("server_cpu_us_per_round_trip", "?"),
         f["lost"], f.get("machine_steal_percent", "?")))
PY
