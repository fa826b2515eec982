#!/usr/bin/env bash
# Autobahn|Testsuite conformance run against switchboard's /ws/echo.
#
# 1. Installs the Autobahn|Testsuite (wstest) if missing: a virtualenv on
#    pyenv's CPython 2.7.18 with the pins of requirements-autobahn.txt. The venv
#    is stamped with the hash of that file, so a second run costs nothing and a
#    changed pin set rebuilds it.
# 2. Starts `switchboard serve --config <overlay>` on a free loopback port with
#    [diagnostics] echo = true and a 16 MiB message limit (cases 9.* send
#    16 MiB messages), waits for /healthz.
# 3. Runs `wstest -m fuzzingclient` for cases 1.*-7.*, 9.*, 10.* (12.* and 13.*
#    are permessage-deflate, which switchboard does not offer).
# 4. Reads reports/index.json: every case's behavior and behaviorClose must be
#    OK, NON-STRICT or INFORMATIONAL. Prints the counts per behaviour, lists any
#    other case, and exits non-zero if there is one.
# The server is always stopped on exit.
#
# Usage: tests/conformance/autobahn.sh [--install-only]
#
# Environment:
#   SWITCHBOARD_BIN     server binary (default target/release/switchboard,
#                       built with `cargo build --release` when missing)
#   AUTOBAHN_TARGET     ws:// URL of an echo endpoint that is already running;
#                       when set no switchboard is started (e.g. to test the
#                       script itself against another echo server)
#   AUTOBAHN_CASES      space-separated case patterns (default: the list above)
#   AUTOBAHN_OUT        report directory (default target/autobahn)
#   AUTOBAHN_VENV       virtualenv (default ~/.cache/switchboard/autobahn-venv)
#   AUTOBAHN_TIMEOUT    seconds allowed for the whole wstest run (default 1800)
#   AUTOBAHN_EXTRA_CONFIG  TOML file appended to the generated server overlay
#   PYTHON27            Python 2.7 interpreter (default: pyenv's 2.7.18)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
REQUIREMENTS="$HERE/requirements-autobahn.txt"
SUMMARY="$HERE/autobahn_summary.py"

# virtualenv 16.x is a single module that still creates Python 2 environments
# and carries pip 20.3.4 / setuptools 44 inside it: no download besides itself.
VIRTUALENV_PIN="virtualenv==16.7.12"

CACHE_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/switchboard"
VENV="${AUTOBAHN_VENV:-$CACHE_DIR/autobahn-venv}"
OUT="${AUTOBAHN_OUT:-$ROOT/target/autobahn}"
TIMEOUT="${AUTOBAHN_TIMEOUT:-1800}"
CASES="${AUTOBAHN_CASES:-1.* 2.* 3.* 4.* 5.* 6.* 7.* 9.* 10.*}"
EXCLUDED_CASES="12.* 13.*"

log() { printf '[autobahn] %s\n' "$*" >&2; }
die() { printf '[autobahn] error: %s\n' "$*" >&2; exit 1; }

find_python27() {
    if [[ -n "${PYTHON27:-}" ]]; then
        [[ -x "$PYTHON27" ]] || die "PYTHON27=$PYTHON27 is not an executable"
        echo "$PYTHON27"
        return
    fi
    local pyenv_root="${PYENV_ROOT:-}"
    if [[ -z "$pyenv_root" ]] && command -v pyenv >/dev/null 2>&1; then
        pyenv_root="$(pyenv root)"
    fi
    pyenv_root="${pyenv_root:-$HOME/.pyenv}"
    local candidate="$pyenv_root/versions/2.7.18/bin/python"
    [[ -x "$candidate" ]] || die "Python 2.7.18 not found at $candidate.
  The Autobahn|Testsuite needs Python 2.7: install it with 'pyenv install 2.7.18'
  or point PYTHON27 at a Python 2.7 interpreter."
    echo "$candidate"
}

install_failed() {
    tail -n 40 "$2" >&2 || true
    die "$1 (full log: $2)"
}

requirements_hash() {
    # The stamp covers the pins and the bootstrap, so changing either rebuilds.
    { cat "$REQUIREMENTS"; echo "$VIRTUALENV_PIN"; } | sha256sum | cut -d' ' -f1
}

install_autobahn() {
    local stamp="$VENV/.switchboard-requirements.sha256"
    local want
    want="$(requirements_hash)"
    if [[ -x "$VENV/bin/wstest" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        log "Autobahn|Testsuite already installed in $VENV"
        return
    fi
    local python27
    python27="$(find_python27)"
    log "installing Autobahn|Testsuite into $VENV (Python: $python27)"
    local started=$SECONDS
    # pip's output goes to the install log, shown only on failure.
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_PYTHON_VERSION_WARNING=1
    # A venv holds absolute paths, so it is rebuilt in place rather than moved;
    # the stamp is written last, so an interrupted install is redone next time.
    rm -rf "$VENV"
    mkdir -p "$CACHE_DIR"
    local install_log="$CACHE_DIR/autobahn-install.log"
    : >"$install_log"
    local bootstrap="$CACHE_DIR/virtualenv-bootstrap"
    if [[ ! -f "$bootstrap/virtualenv.py" ]]; then
        rm -rf "$bootstrap"
        "$python27" -m pip install --target "$bootstrap" "$VIRTUALENV_PIN" >>"$install_log" 2>&1 \
            || install_failed "could not install $VIRTUALENV_PIN for $python27" "$install_log"
    fi
    PYTHONPATH="$bootstrap" "$python27" -m virtualenv --no-download "$VENV" >>"$install_log" 2>&1 \
        || install_failed "could not create the virtualenv $VENV" "$install_log"
    "$VENV/bin/pip" install -r "$REQUIREMENTS" >>"$install_log" 2>&1 \
        || install_failed "pip install -r $REQUIREMENTS failed" "$install_log"
    "$VENV/bin/wstest" --autobahnversion >>"$install_log" 2>&1 \
        || install_failed "wstest was installed but does not start" "$install_log"
    echo "$want" >"$stamp"
    log "installed in $((SECONDS - started)) s: $("$VENV/bin/wstest" --autobahnversion 2>&1 | tr '\n' ' ')"
}

free_port() {
    "$VENV/bin/python" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

json_list() {
    # "1.* 2.*" -> ["1.*", "2.*"]
    local out="" item
    for item in $1; do
        out+="${out:+, }\"$item\""
    done
    printf '[%s]' "$out"
}

WSTEST_PID=""
SERVER_PID=""
cleanup() {
    if [[ -n "$WSTEST_PID" ]]; then
        # timeout(1) passes the TERM on to wstest.
        kill -TERM "$WSTEST_PID" 2>/dev/null || true
        wait "$WSTEST_PID" 2>/dev/null || true
    fi
    stop_server
}
stop_server() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        local i
        for ((i = 0; i < 50; i++)); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$SERVER_PID" 2>/dev/null; then
            log "server did not stop within 5 s of SIGTERM; killing it"
            kill -KILL "$SERVER_PID" 2>/dev/null || true
        fi
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

start_switchboard() {
    local bin="${SWITCHBOARD_BIN:-}"
    if [[ -z "$bin" ]]; then
        bin="$ROOT/target/release/switchboard"
        if [[ ! -x "$bin" ]]; then
            log "building $bin (cargo build --release)"
            (cd "$ROOT" && cargo build --release --bin switchboard) || die "cargo build failed"
        fi
    fi
    [[ -x "$bin" ]] || die "switchboard binary not found: $bin (set SWITCHBOARD_BIN)"

    local port
    port="$(free_port)"
    local config="$OUT/switchboard-autobahn.toml"
    mkdir -p "$OUT/storage"
    cat >"$config" <<EOF
# Generated by tests/conformance/autobahn.sh: an overlay on the embedded defaults.
[server]
listen = "127.0.0.1:$port"

[diagnostics]
echo = true

[websocket]
# Autobahn 9.1.6 / 9.2.6 send 16 MiB messages.
max_message_bytes = 16777216

[storage]
dir = "$OUT/storage"

[inference]
# The echo endpoint needs no sentence encoder; do not depend on installed model files.
enabled = false

[limits]
# The fuzzing client opens hundreds of connections from one address in quick succession.
connections_per_ip = 0
EOF
    if [[ -n "${AUTOBAHN_EXTRA_CONFIG:-}" ]]; then
        cat "$AUTOBAHN_EXTRA_CONFIG" >>"$config"
    fi
    if ! "$bin" config check "$config" >"$OUT/config-check.log" 2>&1; then
        cat "$OUT/config-check.log" >&2
        die "switchboard rejected the generated config $config"
    fi

    log "starting $bin serve --config $config"
    "$bin" serve --config "$config" >"$OUT/server.log" 2>&1 &
    SERVER_PID=$!

    local deadline=$((SECONDS + 30))
    until curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$port/healthz" 2>/dev/null; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            tail -n 30 "$OUT/server.log" >&2 || true
            SERVER_PID=""
            die "switchboard exited before /healthz answered (log: $OUT/server.log)"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 30 "$OUT/server.log" >&2 || true
            die "switchboard did not answer /healthz within 30 s (log: $OUT/server.log)"
        fi
        sleep 0.1
    done
    TARGET="ws://127.0.0.1:$port/ws/echo"
    log "server ready (pid $SERVER_PID) at $TARGET"
}

main() {
    case "${1:-}" in
        "") ;;
        --install-only) install_autobahn; exit 0 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (try --help)" ;;
    esac

    install_autobahn
    command -v curl >/dev/null 2>&1 || die "curl is needed to wait for /healthz"
    mkdir -p "$OUT"
    rm -rf "$OUT/reports"

    TARGET="${AUTOBAHN_TARGET:-}"
    if [[ -n "$TARGET" ]]; then
        log "AUTOBAHN_TARGET set: testing $TARGET, not starting switchboard"
    else
        start_switchboard
    fi

    local spec="$OUT/fuzzingclient.json"
    cat >"$spec" <<EOF
{
    "outdir": "$OUT/reports",
    "servers": [{"agent": "switchboard", "url": "$TARGET"}],
    "cases": $(json_list "$CASES"),
    "exclude-cases": $(json_list "$EXCLUDED_CASES"),
    "exclude-agent-cases": {}
}
EOF

    log "running wstest -m fuzzingclient -s $spec (cases: $CASES; log: $OUT/wstest.log)"
    local started=$SECONDS rc=0
    # In the background and waited for, so that a SIGTERM/SIGINT to this script
    # interrupts the wait at once and the EXIT trap stops wstest and the server.
    (cd "$OUT" && exec timeout --kill-after=10 "$TIMEOUT" "$VENV/bin/wstest" -m fuzzingclient -s "$spec") \
        >"$OUT/wstest.log" 2>&1 &
    WSTEST_PID=$!
    wait "$WSTEST_PID" || rc=$?
    WSTEST_PID=""
    log "wstest finished in $((SECONDS - started)) s (exit $rc)"
    if ((rc == 124)); then
        die "wstest did not finish within $TIMEOUT s (log: $OUT/wstest.log)"
    fi
    if [[ ! -f "$OUT/reports/index.json" ]]; then
        tail -n 30 "$OUT/wstest.log" >&2 || true
        die "wstest wrote no $OUT/reports/index.json (exit $rc)"
    fi

    local prefixes=() pattern
    for pattern in $CASES; do
        prefixes+=("${pattern%\*}")
    done
    local verdict=0
    "$VENV/bin/python" "$SUMMARY" "$OUT/reports/index.json" "${prefixes[@]}" || verdict=$?
    log "HTML report: $OUT/reports/index.html"
    if ((rc != 0 && verdict == 0)); then
        die "wstest exited with $rc although every case passed (log: $OUT/wstest.log)"
    fi
    return "$verdict"
}

main "$@"
