#!/usr/bin/env bash
# Side-by-side standing of switchboard against the peers of ../shared/peers (Go gorilla, tokio-ws, and
# the durable Go gorilla + MariaDB): builds them, starts each in turn on loopback, runs `density` and
# `sweep` with the same settings against each, and prints ratio tables (switchboard-bench compare) plus
# a latency plot. Before each sweep, one step at FIXED_RATE (a rate every system sustains) measures the
# server's CPU time per round trip (utime+stime from /proc/PID/stat; mariadbd's counted with its peer),
# shown next to the sweep's highest rate.
#
# Usage: bench/compare.sh            (from anywhere; settings through the environment below)
#   SESSIONS=10000 RAMP=2000 HOLD=5s          density settings
#   CONVERSATIONS=100 START_RATE=5000 FACTOR=1.5 STEP=5s WARMUP=1s P99=50ms REFINE=3   sweep settings
#   FIXED_RATE=1000 FIXED_DURATION=10s         the fixed-rate step before each sweep (server CPU per round
#                                              trip); FIXED_RATE=0 skips it. 1,000/s: the MariaDB
#                                              peer fell behind at 1,500/s on a busy 2-core machine
#   MARIADB_START_RATE=1000                    first sweep rate of the MariaDB peer (it saturates near
#                                              2,000/s; starting at START_RATE only bisects down)
#   BENCH_CORES=LIST                           pin the load generator to these cores (switchboard-bench
#                                              --cores; default: every core, one shard each)
#   SETTLE=10                                  seconds between starting a fresh server and its sweep
#   SB_PROTOCOL=auto|switchboard|echo          how switchboard is relayed: auto uses the conversation
#                                              protocol when a probe run passes, else /ws/echo (said in the table)
#   SWITCHBOARD_CONFIG_EXTRA="..."             TOML appended to switchboard's config
#   SB_LOG_BYTES=0                             [storage] log_bytes of the switchboard column only (0: no
#                                              write-ahead log; e.g. to compare with a build that has none)
#   AGENTS=4                                   agent accounts/sessions for --protocol switchboard (tokens
#                                              switchboard-bench-agent-0.., written into switchboard's config)
#   SWITCHBOARD_PEERS=/path/to/peers           default: ../shared/peers beside the repository
#   OUT=dir                                    results (default: target/bench-compare/<time>)
#   ONLY="go tokio switchboard"                systems to run, in this order (go, tokio, mariadb,
#                                              switchboard, before, batch); mariadb is the durable peer
#                                              go-gorilla-mariadb, its MariaDB started (and stopped right
#                                              after that column, if this run started it) with its
#                                              start-mariadb.sh
#   ONLY="... batch"                           adds a column "switchboard-batch": the same binary and config
#                                              with [storage] durability = "batch" (acked once written to
#                                              the write-ahead log, synced every sync_interval; see
#                                              tuning/default.toml), against the column's default "fsync"
#   AT_RATE=20000 AT_DURATION=10s              after each sweep but the MariaDB peer's (it saturates near
#                                              2,000/s), one relay run at AT_RATE on a fresh server
#                                              (SETTLE seconds after its start): p50/p99/lost and CPU per
#                                              round trip at that rate, in a table of their own
#                                              (at-rate-*.json). AT_RATE=0 skips it
#   SB_BEFORE=/path/to/switchboard             adds a column "switchboard-before": another switchboard
#                                              binary (e.g. a release build of an older commit), run
#                                              with the same config, to show a change before and after
#                                              in the same run
#   HARNESS_ROUNDS=3 HARNESS_RATE=20000 HARNESS_DURATION=8s
#                                              the harness check (when go is in ONLY): the independent Go
#                                              generator of ../shared/referee and switchboard-bench relay
#                                              take turns against the Go peer at HARNESS_RATE, each round
#                                              both; their p50/p99 side by side with medians and ratios
#                                              (harness-check.txt). Both get the same cores (BENCH_CORES,
#                                              through taskset for the referee). HARNESS_ROUNDS=0 skips it
#   SWITCHBOARD_REFEREE=/path/to/referee       default: ../shared/referee beside the repository
# Peers listen on 127.0.0.1:9100 (go), 127.0.0.1:9101 (tokio) and 127.0.0.1:9103 (mariadb); switchboard
# on 127.0.0.1:9102, switchboard-before on 127.0.0.1:9104, switchboard-batch on 127.0.0.1:9105. Every
# report says which cores the server and the load generator had.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=bench/switchboard-config.sh
. "$REPO/bench/switchboard-config.sh"
PEERS="${SWITCHBOARD_PEERS:-$REPO/../shared/peers}"
SESSIONS="${SESSIONS:-10000}"
RAMP="${RAMP:-2000}"
HOLD="${HOLD:-5s}"
CONVERSATIONS="${CONVERSATIONS:-100}"
START_RATE="${START_RATE:-5000}"
FACTOR="${FACTOR:-1.5}"
STEP="${STEP:-5s}"
WARMUP="${WARMUP:-1s}"
P99="${P99:-50ms}"
REFINE="${REFINE:-3}"
SETTLE="${SETTLE:-10}"
FIXED_RATE="${FIXED_RATE:-1000}"
FIXED_DURATION="${FIXED_DURATION:-10s}"
MARIADB_START_RATE="${MARIADB_START_RATE:-1000}"
BENCH_CORES="${BENCH_CORES:-}"
SB_PROTOCOL="${SB_PROTOCOL:-auto}"
AGENTS="${AGENTS:-4}"
SB_BEFORE="${SB_BEFORE:-}"
ONLY="${ONLY:-go tokio switchboard}"
HARNESS_ROUNDS="${HARNESS_ROUNDS:-3}"
AT_RATE="${AT_RATE:-20000}"
AT_DURATION="${AT_DURATION:-10s}"
HARNESS_RATE="${HARNESS_RATE:-20000}"
HARNESS_DURATION="${HARNESS_DURATION:-8s}"
[[ "$HARNESS_ROUNDS" =~ ^[0-9]+$ ]] || { echo "compare.sh: HARNESS_ROUNDS=$HARNESS_ROUNDS is not a number of rounds" >&2; exit 1; }
HARNESS_ROUNDS=$((10#$HARNESS_ROUNDS))
REFEREE="${SWITCHBOARD_REFEREE:-$REPO/../shared/referee}"
REFEREE_BIN="${REFEREE_BIN:-/tmp/referee-loadgen}"
if [ -n "$SB_BEFORE" ]; then
  [ -x "$SB_BEFORE" ] || { echo "compare.sh: SB_BEFORE=$SB_BEFORE is not an executable" >&2; exit 1; }
  [[ " $ONLY " == *" before "* ]] || ONLY="$ONLY before"
fi
OUT="${OUT:-$REPO/target/bench-compare/$(date +%Y%m%d-%H%M%S)}"
PEER_TARGET="${PEER_TARGET:-/tmp/peer-target}"
GO_BIN="${GO_BIN:-/tmp/peer-go}"
GO_MARIADB_BIN="${GO_MARIADB_BIN:-/tmp/peer-go-mariadb}"
mkdir -p "$OUT"

log() { printf '\n### %s\n' "$*" >&2; }
die() { printf 'compare.sh: %s\n' "$*" >&2; exit 1; }
wants() { [[ " $ONLY " == *" $1 "* ]]; }

[ -d "$PEERS" ] || die "peers not found at $PEERS (set SWITCHBOARD_PEERS)"

SERVER_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
MARIADB_STARTED=""
cleanup() {
  stop_server
  if [ -n "$MARIADB_STARTED" ]; then
    "$PEERS/go-gorilla-mariadb/start-mariadb.sh" stop >&2 || true
  fi
}
trap cleanup EXIT

log "building switchboard and switchboard-bench (release)"
cargo build --release --quiet --manifest-path "$REPO/Cargo.toml" -p switchboard -p switchboard-bench
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps --manifest-path "$REPO/Cargo.toml" | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
SB="$TARGET_DIR/release/switchboard"
BENCH="$TARGET_DIR/release/switchboard-bench"

if wants go; then
  log "building the Go peer"
  if ! command -v go >/dev/null || [ ! -d /usr/share/gocode/src/github.com/gorilla/websocket ]; then
    [ "$(id -u)" = 0 ] || die "install golang-go and golang-github-gorilla-websocket-dev"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go golang-github-gorilla-websocket-dev >/dev/null
  fi
  (cd "$PEERS" && GO111MODULE=off GOPATH=/usr/share/gocode go build -o "$GO_BIN" ./go-gorilla)
fi
if wants go && [ "$HARNESS_ROUNDS" != 0 ]; then
  [ -d "$REFEREE/loadgen" ] || die "the referee generator is not at $REFEREE/loadgen (set SWITCHBOARD_REFEREE, or HARNESS_ROUNDS=0)"
  log "building the referee load generator"
  (cd "$REFEREE/loadgen" && GO111MODULE=off GOPATH=/usr/share/gocode go build -o "$REFEREE_BIN" .)
fi
if wants mariadb; then
  log "building the Go + MariaDB peer"
  if ! command -v go >/dev/null || [ ! -d /usr/share/gocode/src/github.com/gorilla/websocket ] \
     || [ ! -d /usr/share/gocode/src/github.com/go-sql-driver/mysql ]; then
    [ "$(id -u)" = 0 ] || die "install golang-go golang-github-gorilla-websocket-dev golang-github-go-sql-driver-mysql-dev"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go \
      golang-github-gorilla-websocket-dev golang-github-go-sql-driver-mysql-dev >/dev/null
  fi
  (cd "$PEERS" && GO111MODULE=off GOPATH=/usr/share/gocode go build -o "$GO_MARIADB_BIN" ./go-gorilla-mariadb)
  [ "$(id -u)" = 0 ] || die "the MariaDB peer's start-mariadb.sh runs as root"
  log "starting MariaDB for the durable peer"
  mariadb_out="$("$PEERS/go-gorilla-mariadb/start-mariadb.sh")" || die "start-mariadb.sh failed: $mariadb_out"
  echo "$mariadb_out" >&2
  # Stop it at the end only if this run started it.
  case "$mariadb_out" in started:*) MARIADB_STARTED=1 ;; *) MARIADB_STARTED="" ;; esac
  MARIADB_PID="$(cat "${PEER_MARIADB_DIR:-/tmp/peer-mariadb}/mariadbd.pid" 2>/dev/null || true)"
  [ -n "$MARIADB_PID" ] && kill -0 "$MARIADB_PID" 2>/dev/null || die "cannot find mariadbd's pid (for its CPU time)"
fi
if wants tokio; then
  log "building the tokio peer"
  cargo build --release --quiet --manifest-path "$PEERS/tokio-ws/Cargo.toml" --target-dir "$PEER_TARGET"
fi

wait_port() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  die "nothing listens on 127.0.0.1:$1"
}

start_server() { # name
  case "$1" in
    go) "$GO_BIN" -addr 127.0.0.1:9100 >"$OUT/go.log" 2>&1 & SERVER_PID=$!; PORT=9100 ;;
    tokio) "$PEER_TARGET/release/peer-tokio-ws" 127.0.0.1:9101 >"$OUT/tokio.log" 2>&1 & SERVER_PID=$!; PORT=9101 ;;
    mariadb) "$GO_MARIADB_BIN" -addr 127.0.0.1:9103 >"$OUT/mariadb.log" 2>&1 & SERVER_PID=$!; PORT=9103 ;;
    switchboard|before|batch)
      case "$1" in
        switchboard) PORT=9102; binary="$SB" ;;
        before) PORT=9104; binary="$SB_BEFORE" ;;
        batch) PORT=9105; binary="$SB" ;;
      esac
      rm -rf "$OUT/$1-data"
      storage_lines=""
      [ "$1" = switchboard ] && [ -n "${SB_LOG_BYTES:-}" ] && storage_lines="log_bytes = $SB_LOG_BYTES"
      [ "$1" = batch ] && storage_lines='durability = "batch"'
      write_switchboard_config "$OUT/$1.toml" "$PORT" "$OUT/$1-data" "$AGENTS" "$storage_lines" \
        "${SWITCHBOARD_CONFIG_EXTRA:-}"
      "$binary" serve --config "$OUT/$1.toml" >"$OUT/$1.log" 2>&1 & SERVER_PID=$! ;;
  esac
  wait_port "$PORT"
  sleep 0.5
}

label() {
  case "$1" in
    go) echo "go-gorilla" ;; tokio) echo "tokio-ws" ;; switchboard) echo "switchboard" ;;
    mariadb) echo "go-gorilla-mariadb" ;;
    before) echo "switchboard-before" ;;
    batch) echo "switchboard-batch" ;;
  esac
}

CORE_ARGS=()
[ -n "$BENCH_CORES" ] && CORE_ARGS=(--cores "$BENCH_CORES")
AGENT_ARGS=(--agents "$AGENTS")
for i in $(seq 0 $((AGENTS - 1))); do AGENT_ARGS+=(--agent-token "switchboard-bench-agent-$i"); done

echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); results in $OUT" >&2
RELAY_NOTE=""
for sys in $ONLY; do  # in the order ONLY gives
  case "$sys" in go|tokio|mariadb|switchboard|before|batch) ;; *) die "unknown system \"$sys\" in ONLY (go, tokio, mariadb, switchboard, before, batch)" ;; esac
  name="$(label "$sys")"
  start_server "$sys"
  target="ws://127.0.0.1:$PORT"
  if [ "$sys" = switchboard ] || [ "$sys" = before ] || [ "$sys" = batch ]; then
    density_proto=switchboard
    relay_proto="$SB_PROTOCOL"
    if [ "$relay_proto" = auto ]; then
      if "$BENCH" relay --target "$target" --protocol switchboard "${AGENT_ARGS[@]}" --conversations 2 \
           --rate 20 --duration 1s --warmup 0s --drain 2s --handshake-timeout 3s --no-progress --json "$OUT/probe.json" \
           >"$OUT/probe.txt" 2>&1 && [ "$("$BENCH" get "$OUT/probe.json" received)" = "$("$BENCH" get "$OUT/probe.json" sent)" ] \
         && [ "$("$BENCH" get "$OUT/probe.json" conversations_up)" = 2 ]; then
        relay_proto=switchboard
      else
        relay_proto=echo
      fi
    fi
    if [ "$relay_proto" = echo ]; then
      RELAY_NOTE="switchboard relay measured on /ws/echo (visitor round trip, no agent hop): conversations are not served yet"
      name_relay="$name (echo)"
    else
      name_relay="$name"
    fi
  else
    density_proto=relay
    relay_proto=relay
    name_relay="$name"
  fi
  log "$name: density, $SESSIONS idle sessions at $RAMP/s"
  # mariadbd's CPU is the durable peer's too.
  CPU_ARGS=()
  [ "$sys" = mariadb ] && CPU_ARGS=(--cpu-pid "$MARIADB_PID")
  start_rate="$START_RATE"
  [ "$sys" = mariadb ] && start_rate="$MARIADB_START_RATE"
  FIXED_ARGS=()
  [ "$FIXED_RATE" != 0 ] && FIXED_ARGS=(--fixed-rate "$FIXED_RATE" --fixed-duration "$FIXED_DURATION")
  "$BENCH" density --target "$target" --protocol "$density_proto" --pid "$SERVER_PID" --label "$name" "${CORE_ARGS[@]}" \
    --sessions "$SESSIONS" --ramp "$RAMP" --hold "$HOLD" --json "$OUT/density-$sys.json"
  # A fresh process for the sweep, so density leftovers do not weigh on it.
  stop_server; start_server "$sys"
  # Let the density run's closed sockets and the fresh process settle before measuring: without
  # this pause the first sweep step (5,000/s) failed once on noise, and a sweep that fails its
  # first step only bisects downwards. Same pause for every system.
  sleep "$SETTLE"
  log "$name_relay: relay sweep, $CONVERSATIONS conversations, p99 <= $P99"
  "$BENCH" sweep --target "$target" --protocol "$relay_proto" "${AGENT_ARGS[@]}" --pid "$SERVER_PID" \
    "${CPU_ARGS[@]}" "${CORE_ARGS[@]}" "${FIXED_ARGS[@]}" \
    --label "$name_relay" --conversations "$CONVERSATIONS" --start-rate "$start_rate" --factor "$FACTOR" \
    --step-duration "$STEP" --warmup "$WARMUP" --p99-limit "$P99" --refine "$REFINE" \
    --json "$OUT/sweep-$sys.json" --plot "$OUT/sweep-$sys.svg"
  rm -f "$OUT/at-rate-$sys.json"
  if [ "$AT_RATE" != 0 ] && [ "$sys" != mariadb ]; then
    # A fresh process, as for the sweep: the sweep ended on rates it failed.
    stop_server; start_server "$sys"
    sleep "$SETTLE"
    log "$name_relay: relay at $AT_RATE/s for $AT_DURATION"
    "$BENCH" relay --target "$target" --protocol "$relay_proto" "${AGENT_ARGS[@]}" --pid "$SERVER_PID" \
      "${CORE_ARGS[@]}" --label "$name_relay" --conversations "$CONVERSATIONS" --rate "$AT_RATE" \
      --duration "$AT_DURATION" --warmup "$WARMUP" --no-progress --json "$OUT/at-rate-$sys.json" \
      >"$OUT/at-rate-$sys.txt" 2>&1 || echo "$name_relay: the relay at $AT_RATE/s failed (see $OUT/at-rate-$sys.txt)" >&2
  fi
  stop_server
  if [ "$sys" = mariadb ] && [ -n "$MARIADB_STARTED" ]; then
    # InnoDB flushes and purges in the background for a while after a load: stopped now, it
    # takes no CPU or disk from the systems measured after it.
    "$PEERS/go-gorilla-mariadb/start-mariadb.sh" stop >&2 || true
    MARIADB_STARTED=""
  fi
done

# The harness check: does switchboard-bench report what an independent generator reports against the
# same server? The two take turns (the first alternates by round), so both see the same machine. A
# failed round is reported and skipped: it never costs the run its other results.
harness_referee_round() { # round -> "p50 p99" or nothing
  local out="$OUT/harness-referee-$1.txt" p50 p99
  "${REFEREE_CPU[@]}" "$REFEREE_BIN" -mode relay -rooms "$CONVERSATIONS" -rate "$HARNESS_RATE" \
    -dur "$HARNESS_DURATION" -size 64 -url "ws://127.0.0.1:9100/ws" >"$out" 2>&1 || return 0
  p50="$(sed -n 's/.*p50_ms=\([0-9.]*\).*/\1/p' "$out" | tail -n 1)"
  p99="$(sed -n 's/.*p99_ms=\([0-9.]*\).*/\1/p' "$out" | tail -n 1)"
  [ -n "$p50" ] && [ -n "$p99" ] && echo "$p50 $p99"
  return 0
}
harness_bench_round() { # round -> "p50 p99 lag_p99" or nothing
  local json="$OUT/harness-bench-$1.json" p50 p99 lag
  "$BENCH" relay --target ws://127.0.0.1:9100 --protocol relay --pid "$SERVER_PID" "${CORE_ARGS[@]}" \
    --conversations "$CONVERSATIONS" --rate "$HARNESS_RATE" --duration "$HARNESS_DURATION" --warmup 1s \
    --no-progress --json "$json" >"$OUT/harness-bench-$1.txt" 2>&1 || return 0
  p50="$("$BENCH" get "$json" p50_ms 2>/dev/null)" || return 0
  p99="$("$BENCH" get "$json" p99_ms 2>/dev/null)" || return 0
  lag="$("$BENCH" get "$json" generator_lag_p99_ms 2>/dev/null)" || return 0
  echo "$p50 $p99 $lag"
}
harness_check() {
  local rounds=() i referee bench
  REFEREE_CPU=()
  [ -n "$BENCH_CORES" ] && REFEREE_CPU=(taskset -c "$BENCH_CORES")
  start_server go
  sleep "$SETTLE"
  for i in $(seq 1 "$HARNESS_ROUNDS"); do
    if (( i % 2 )); then
      referee="$(harness_referee_round "$i")"; bench="$(harness_bench_round "$i")"
    else
      bench="$(harness_bench_round "$i")"; referee="$(harness_referee_round "$i")"
    fi
    [ -n "$referee" ] || { echo "harness round $i: the referee gave no figures (see $OUT/harness-referee-$i.txt)" >&2; continue; }
    [ -n "$bench" ] || { echo "harness round $i: switchboard-bench gave no figures (see $OUT/harness-bench-$i.txt)" >&2; continue; }
    rounds+=("$i $referee $bench")
  done
  stop_server
  if [ "${#rounds[@]}" = 0 ]; then
    echo "harness check: no round gave figures from both generators" | tee "$OUT/harness-check.txt"
    return 0
  fi
  {
    echo "harness check: go-gorilla at $HARNESS_RATE msgs/s, $CONVERSATIONS rooms, $HARNESS_DURATION per run (bench: +1 s warm-up), rounds alternate which goes first"
    echo "cores: generators ${BENCH_CORES:-any (bench: one pinned shard per core)}, server unpinned; load average $(cut -d' ' -f1-3 /proc/loadavg)"
    printf '%s\n' "${rounds[@]}" | awk '
      BEGIN { printf "%-7s %12s %12s %12s %12s %14s\n", "round", "referee p50", "bench p50", "referee p99", "bench p99", "bench lag p99" }
      { n++; rp50[n]=$2; rp99[n]=$3; bp50[n]=$4; bp99[n]=$5
        printf "%-7s %12.2f %12.2f %12.2f %12.2f %14.2f\n", $1, $2, $4, $3, $5, $6 }
      function median(a, n,   i, j, t) {
        for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j+1] = a[j]; a[j+1] = t }
        return (n % 2) ? a[(n+1)/2] : (a[n/2] + a[n/2+1]) / 2 }
      END { r50 = median(rp50, n); b50 = median(bp50, n); r99 = median(rp99, n); b99 = median(bp99, n)
        printf "%-7s %12.2f %12.2f %12.2f %12.2f\n", "median", r50, b50, r99, b99
        if (r50 > 0 && r99 > 0)
          printf "bench / referee: p50 %.2fx, p99 %.2fx (the issue asks for at most 1.5x)\n", b50 / r50, b99 / r99 }'
  } | tee "$OUT/harness-check.txt"
}
if wants go && [ "$HARNESS_ROUNDS" != 0 ]; then
  log "harness check: switchboard-bench against the referee generator on go-gorilla, $HARNESS_ROUNDS rounds"
  harness_check
fi

densities=(); sweeps=(); at_rates=()
for sys in go tokio mariadb switchboard before batch; do
  [ -f "$OUT/density-$sys.json" ] && densities+=("$OUT/density-$sys.json")
  [ -f "$OUT/sweep-$sys.json" ] && sweeps+=("$OUT/sweep-$sys.json")
  [ -f "$OUT/at-rate-$sys.json" ] && at_rates+=("$OUT/at-rate-$sys.json")
done

echo
echo "================ standing (ratios against the first column) ================"
echo "load average now: $(cut -d' ' -f1-3 /proc/loadavg)"
[ -n "$RELAY_NOTE" ] && echo "NOTE: $RELAY_NOTE"
echo
"$BENCH" compare "${densities[@]}" --figure rss_per_session_kib --figure rss_per_session_bytes \
  --figure sessions_established --figure handshakes_failed --figure handshake_rate_per_s --figure handshake_p99_ms
echo
"$BENCH" compare "${sweeps[@]}" --figure max_sustained_rate_per_s --figure lowest_failing_rate_per_s \
  --figure p50_ms --figure p99_ms --figure p999_ms --figure lost \
  --figure fixed_rate_per_s --figure fixed_server_cpu_us_per_round_trip --figure fixed_server_cpu_percent \
  --figure fixed_p50_ms --figure fixed_p99_ms --figure fixed_passed --figure max_step_steal_percent \
  --plot "$OUT/relay-latency.svg"
if [ "${#at_rates[@]}" != 0 ]; then
  echo
  echo "relay at $AT_RATE msgs/s for $AT_DURATION, on a fresh server (the MariaDB peer is not run at it)"
  "$BENCH" compare "${at_rates[@]}" --figure throughput_per_s --figure p50_ms --figure p99_ms --figure lost \
    --figure server_cpu_us_per_round_trip --figure generator_lag_p99_ms --figure machine_steal_percent
fi
if [ -f "$OUT/harness-check.txt" ]; then
  echo
  cat "$OUT/harness-check.txt"
fi
echo
echo "full reports: $OUT/*.json; plots: $OUT/relay-latency.svg, $OUT/sweep-*.svg"
