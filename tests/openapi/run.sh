#!/usr/bin/env bash
# The admin API against its description, docs/openapi.yaml, with tools from PyPI:
#
# 1. A virtualenv with the pins of requirements.txt (schemathesis, openapi-spec-validator and
#    everything they pull in), stamped with the file's hash: a second run installs nothing, a
#    changed pin set rebuilds it.
# 2. `openapi-spec-validator docs/openapi.yaml`: the document is valid OpenAPI.
# 3. A real server (the debug binary by default) on a free loopback port with a fresh storage
#    directory and the model, an admin and an agent made with `switchboard agent add`, and
#    data behind every endpoint (seed.py: a knowledge base, a canned reply, conversations made
#    by visitors and an agent over WebSocket).
# 4. `schemathesis run` with every check as the admin, with a fixed seed and a bounded number
#    of examples per operation, and the settings of schemathesis.toml: every check is on by
#    default in schemathesis 4 and the file turns none off; it exempts two operations from one
#    check, which `--checks all` would override (CLI options win over per-operation settings).
#    Its output goes to target/openapi/schemathesis.txt; any failure fails the script.
# The server is always stopped on exit.
#
# Usage: tests/openapi/run.sh
#
# Environment:
#   SWITCHBOARD_BIN     server binary (default target/debug/switchboard, built first)
#   API_VENV            virtualenv (default target/api-venv)
#   API_MAX_EXAMPLES    examples per operation and phase (default 25: about a minute)
#   API_SEED            hypothesis seed (default 1)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
REQUIREMENTS="$HERE/requirements.txt"
VENV="${API_VENV:-$ROOT/target/api-venv}"
OUT="$ROOT/target/openapi"
MAX_EXAMPLES="${API_MAX_EXAMPLES:-25}"
SEED="${API_SEED:-1}"
PASSWORD="schemathesis admin password"

log() { printf '[openapi] %s\n' "$*" >&2; }
die() { printf '[openapi] error: %s\n' "$*" >&2; exit 1; }

install_venv() {
    local want stamp
    want="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
    stamp="$VENV/.switchboard-requirements.sha256"
    if [[ -x "$VENV/bin/schemathesis" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return
    fi
    log "installing the pinned tools into $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    PIP_DISABLE_PIP_VERSION_CHECK=1 "$VENV/bin/pip" install -q -r "$REQUIREMENTS"
    # Last, so an interrupted install is redone next time.
    echo "$want" >"$stamp"
}

install_venv
mkdir -p "$OUT"

log "openapi-spec-validator docs/openapi.yaml"
"$VENV/bin/openapi-spec-validator" "$ROOT/docs/openapi.yaml"

BIN="${SWITCHBOARD_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/switchboard}"
if [[ -z "${SWITCHBOARD_BIN:-}" ]]; then
    (cd "$ROOT" && cargo build --locked --bin switchboard)
fi
[[ -x "$BIN" ]] || die "no server binary at $BIN"

WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() {
    if [[ -n "$SERVER_PID" ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

PORT="$("$VENV/bin/python" -c 'import socket
s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
ADDR="127.0.0.1:$PORT"
# The model for the knowledge-base endpoints; no per-IP connection and login limits (the run
# makes thousands of requests from one address; the limits have tests of their own).
cat >"$WORK/config.toml" <<EOF
[server]
listen = "$ADDR"
shutdown_grace = "2s"

[storage]
dir = "$WORK/data"

[inference]
enabled = true

[auth]
lockout_failures = 1000
login_per_ip_per_minute = 0
login_per_account_per_minute = 0

[limits]
connections_per_ip = 0

[log]
format = "text"
level = "warn"
EOF

echo "$PASSWORD" | "$BIN" agent add root --role admin --config "$WORK/config.toml" >/dev/null
echo "$PASSWORD" | "$BIN" agent add al --role agent --config "$WORK/config.toml" >/dev/null
(cd "$ROOT" && exec "$BIN" serve --config "$WORK/config.toml") >"$OUT/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 200); do
    curl -fsS "http://$ADDR/readyz" >/dev/null 2>&1 && break
    kill -0 "$SERVER_PID" 2>/dev/null || die "the server stopped; see $OUT/server.log"
    sleep 0.1
done

token_of() {
    curl -fsS -H 'Content-Type: application/json' \
        -d "{\"name\":\"$1\",\"password\":\"$PASSWORD\"}" "http://$ADDR/api/login" |
        "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["token"])'
}
ADMIN="$(token_of root)"
AGENT="$(token_of al)"
"$VENV/bin/python" "$HERE/seed.py" "$ADDR" "$ADMIN" "$AGENT" "$ROOT/examples/kb/starter.csv"

log "schemathesis: every check, $MAX_EXAMPLES examples per operation, seed $SEED"
set +e
# From target/openapi, where schemathesis keeps its cache (.schemathesis/), not in the tree.
(cd "$OUT" && "$VENV/bin/schemathesis" --config-file "$HERE/schemathesis.toml" \
    --no-color run "$ROOT/docs/openapi.yaml" \
    --url "http://$ADDR" \
    --header "Authorization: Bearer $ADMIN" \
    --max-examples "$MAX_EXAMPLES" \
    --seed "$SEED") >"$OUT/schemathesis.txt" 2>&1
status=$?
set -e
sed -n '/= SUMMARY =/,$p' "$OUT/schemathesis.txt"
if [[ $status -ne 0 ]]; then
    die "schemathesis found failures (exit $status); the whole report: $OUT/schemathesis.txt"
fi
log "no failures; the report: $OUT/schemathesis.txt"
