#!/usr/bin/env bash
# Installs (or removes) switchboard as a systemd service. Idempotent: running it again upgrades the
# binary, the unit and the models, keeps /etc/switchboard/switchboard.toml and the data, and restarts
# the service if it was running.
#
# Usage: systemd/install.sh [--dry-run] [--no-start] [--no-models]
#        systemd/install.sh --uninstall [--purge] [--dry-run]
#
#   --dry-run    print every action instead of doing it (needs no root)
#   --no-start   install and enable, but do not start or restart the service
#   --no-models  do not run models/fetch
#   --uninstall  stop and disable the service, remove the binary, unit, models and docs; keep the
#                config, the data in /var/lib/switchboard and the system user
#   --purge      with --uninstall: also remove /etc/switchboard, /var/lib/switchboard and the user
#
# Environment:
#   SWITCHBOARD_BIN  a prebuilt switchboard binary to install (default: `cargo build --release`)
#   DESTDIR          stage the files under this directory instead of / (packaging and tests): no
#                    user is created, nothing is chown'd, systemctl is not called
#   PREFIX           where the binary and shared files go (default /usr/local)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"

DESTDIR="${DESTDIR:-}"
DESTDIR="${DESTDIR%/}"
PREFIX="${PREFIX:-/usr/local}"
PREFIX="${PREFIX%/}"
SERVICE=switchboard
SERVICE_USER=switchboard
BIN_PATH="$PREFIX/bin/switchboard"
SHARE_DIR="$PREFIX/share/switchboard"
MODELS_DIR="$SHARE_DIR/models"
DOC_DIR="$PREFIX/share/doc/switchboard"
CONFIG_DIR=/etc/switchboard
CONFIG_PATH="$CONFIG_DIR/switchboard.toml"
STATE_DIR=/var/lib/switchboard
UNIT_PATH=/etc/systemd/system/switchboard.service

DRY_RUN=0
UNINSTALL=0
PURGE=0
START=1
MODELS=1

say() { printf '==> %s\n' "$*"; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Runs a command, or only prints it with --dry-run.
run() {
    if ((DRY_RUN)); then
        printf '    [dry-run]'
    else
        printf '   '
    fi
    printf ' %q' "$@"
    printf '\n'
    ((DRY_RUN)) || "$@"
}

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

while (($#)); do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --uninstall) UNINSTALL=1 ;;
        --purge) PURGE=1 ;;
        --no-start) START=0 ;;
        --no-models) MODELS=0 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option: $1 (try --help)" ;;
    esac
    shift
done
((PURGE && !UNINSTALL)) && die "--purge only goes with --uninstall"

if [[ -z "$DESTDIR" && $DRY_RUN -eq 0 && $EUID -ne 0 ]]; then
    die "installing into / needs root (or use --dry-run, or DESTDIR=/some/dir)"
fi

# systemd is usable when it is PID 1 (the check sd_booted(3) makes) and the files go to the real root.
systemd_running() {
    [[ -z "$DESTDIR" && -d /run/systemd/system ]] && [[ "$(ps -p 1 -o comm= 2>/dev/null)" == systemd ]]
}

# Same content already at the destination?
same_file() { [[ -f "$2" ]] && cmp -s "$1" "$2"; }

# install_file MODE SRC DEST: copies SRC to DEST through a temporary file and a rename, so a running
# binary is never overwritten in place ("text file busy") and a reader never sees half a file.
install_file() {
    local mode="$1" src="$2" dest="$3"
    if same_file "$src" "$dest"; then
        say "$dest is up to date"
        return
    fi
    run install -d -m 0755 "$(dirname "$dest")"
    run install -m "$mode" "$src" "$dest.new"
    run mv -f "$dest.new" "$dest"
}

# The unit names /usr/local; rewrite it for another PREFIX.
render_unit() {
    sed "s#/usr/local/#$PREFIX/#g" "$HERE/switchboard.service"
}
render_config() {
    sed "s#/usr/local/share/switchboard#$SHARE_DIR#g" "$HERE/switchboard.toml"
}

find_binary() {
    if [[ -n "${SWITCHBOARD_BIN:-}" ]]; then
        [[ -x "$SWITCHBOARD_BIN" ]] || die "SWITCHBOARD_BIN=$SWITCHBOARD_BIN is not an executable file"
        SOURCE_BIN="$SWITCHBOARD_BIN"
        return
    fi
    SOURCE_BIN="$ROOT/target/release/switchboard"
    say "building switchboard (cargo build --release)"
    if ((DRY_RUN)); then
        printf '    [dry-run] cd %s && cargo build --release --bin switchboard\n' "$ROOT"
        return
    fi
    command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust, or pass SWITCHBOARD_BIN=/path/to/switchboard"
    (cd "$ROOT" && cargo build --release --bin switchboard) || die "cargo build failed"
    [[ -x "$SOURCE_BIN" ]] || die "the build did not produce $SOURCE_BIN"
}

create_user() {
    if [[ -n "$DESTDIR" ]]; then
        say "DESTDIR set: not creating the system user $SERVICE_USER"
        return
    fi
    if getent group "$SERVICE_USER" >/dev/null; then
        say "group $SERVICE_USER exists"
    else
        run groupadd --system "$SERVICE_USER"
    fi
    if id -u "$SERVICE_USER" >/dev/null 2>&1; then
        say "user $SERVICE_USER exists"
    else
        local nologin=/usr/sbin/nologin
        [[ -x "$nologin" ]] || nologin=/bin/false
        run useradd --system --gid "$SERVICE_USER" --home-dir "$STATE_DIR" --no-create-home \
            --shell "$nologin" --comment "switchboard service" "$SERVICE_USER"
    fi
}

# chown only on a real install; with DESTDIR the files stay owned by whoever runs the script.
owned_dir() {
    local mode="$1" owner="$2" dir="$3"
    run install -d -m "$mode" "$DESTDIR$dir"
    if [[ -z "$DESTDIR" ]]; then
        run chown "$owner" "$dir"
    fi
}

check_config() {
    local config="$1"
    say "checking $config with the new binary"
    if ((DRY_RUN)) && [[ ! -x "$SOURCE_BIN" ]]; then
        printf '    [dry-run] %s config check %s\n' "$SOURCE_BIN" "$config"
        return
    fi
    # Run even with --dry-run: it changes nothing and tells whether the real run would pass.
    printf '    %s config check %s\n' "$SOURCE_BIN" "$config"
    "$SOURCE_BIN" config check "$config" || die "config check failed for $config: nothing was changed"
}

install_models() {
    local fetch="$ROOT/models/fetch"
    if ((!MODELS)); then
        say "--no-models: not fetching models"
    elif [[ -x "$fetch" ]]; then
        say "fetching models into $DESTDIR$MODELS_DIR"
        run install -d -m 0755 "$DESTDIR$MODELS_DIR"
        run "$fetch" "$DESTDIR$MODELS_DIR"
    else
        say "no models/fetch in this tree: models not installed"
    fi
    if ((!DRY_RUN)); then
        local file missing=()
        for file in model.split.onnx model.fp32.safetensors tokenizer.json libonnxruntime.so; do
            [[ -f "$DESTDIR$MODELS_DIR/$file" ]] || missing+=("$file")
        done
        if ((${#missing[@]})); then
            warn "missing in $DESTDIR$MODELS_DIR: ${missing[*]}. The bot cannot answer without them:
  install them (models/fetch $MODELS_DIR), or set [inference] enabled = false in $CONFIG_PATH."
        fi
    fi
}

print_manual_start() {
    cat <<EOF
systemd is not running as PID 1 here (PID 1 is '$(ps -p 1 -o comm= 2>/dev/null || echo unknown)'), so the
service was installed but not enabled or started. On a systemd host:
    systemctl daemon-reload && systemctl enable --now $SERVICE
Without systemd, start it by hand as the service user:
    cd $STATE_DIR && runuser -u $SERVICE_USER -- $BIN_PATH serve --config $CONFIG_PATH
EOF
}

do_install() {
    find_binary

    # Validate before touching anything: the config that will be in effect after the install is
    # the existing one if there is one, else the example.
    RENDERED_CONFIG="$(mktemp)"
    RENDERED_UNIT="$(mktemp)"
    trap 'rm -f "$RENDERED_CONFIG" "$RENDERED_UNIT"' EXIT
    local rendered_config="$RENDERED_CONFIG" rendered_unit="$RENDERED_UNIT"
    render_config >"$rendered_config"
    render_unit >"$rendered_unit"
    if [[ -f "$DESTDIR$CONFIG_PATH" ]]; then
        check_config "$DESTDIR$CONFIG_PATH"
    else
        check_config "$rendered_config"
    fi

    say "installing files${DESTDIR:+ under DESTDIR=$DESTDIR}"
    create_user
    install_file 0755 "$SOURCE_BIN" "$DESTDIR$BIN_PATH"
    install_file 0644 "$rendered_unit" "$DESTDIR$UNIT_PATH"
    install_file 0644 "$HERE/README.md" "$DESTDIR$DOC_DIR/README.md"
    install_file 0644 "$rendered_config" "$DESTDIR$SHARE_DIR/switchboard.toml.example"
    owned_dir 0755 root:root "$CONFIG_DIR"
    if [[ -f "$DESTDIR$CONFIG_PATH" ]]; then
        say "keeping the existing $DESTDIR$CONFIG_PATH (the shipped example is $SHARE_DIR/switchboard.toml.example)"
    else
        run install -m 0640 "$rendered_config" "$DESTDIR$CONFIG_PATH"
        if [[ -z "$DESTDIR" ]]; then
            run chown "root:$SERVICE_USER" "$CONFIG_PATH"
        fi
    fi
    owned_dir 0750 "$SERVICE_USER:$SERVICE_USER" "$STATE_DIR"
    install_models

    if ! systemd_running; then
        if [[ -n "$DESTDIR" ]]; then
            say "DESTDIR set: not calling systemctl"
        else
            print_manual_start
        fi
        say "done"
        return
    fi
    run systemctl daemon-reload
    run systemctl enable "$SERVICE"
    if ((!START)); then
        say "--no-start: enabled, not started (systemctl start $SERVICE)"
    elif systemctl is-active --quiet "$SERVICE"; then
        run systemctl restart "$SERVICE"
    else
        run systemctl start "$SERVICE"
    fi
    ((DRY_RUN)) || systemctl --no-pager --lines=5 status "$SERVICE" || true
    say "done: journalctl -u $SERVICE -f to follow the logs"
}

remove_path() {
    if [[ -e "$1" || -L "$1" ]]; then
        run rm -rf "$1"
    fi
}

do_uninstall() {
    if systemd_running; then
        if systemctl list-unit-files "$SERVICE.service" >/dev/null 2>&1; then
            run systemctl disable --now "$SERVICE" || true
        fi
    elif [[ -z "$DESTDIR" ]]; then
        say "systemd is not PID 1: stop a hand-started switchboard yourself"
    fi
    remove_path "$DESTDIR$UNIT_PATH"
    if systemd_running; then
        run systemctl daemon-reload
    fi
    remove_path "$DESTDIR$BIN_PATH"
    remove_path "$DESTDIR$SHARE_DIR"
    remove_path "$DESTDIR$DOC_DIR"
    if ((PURGE)); then
        remove_path "$DESTDIR$CONFIG_DIR"
        remove_path "$DESTDIR$STATE_DIR"
        if [[ -z "$DESTDIR" ]]; then
            if id -u "$SERVICE_USER" >/dev/null 2>&1; then run userdel "$SERVICE_USER"; fi
            if getent group "$SERVICE_USER" >/dev/null; then run groupdel "$SERVICE_USER"; fi
        fi
    else
        say "kept $CONFIG_DIR, $STATE_DIR and the user $SERVICE_USER (--purge removes them)"
    fi
    say "done"
}

if ((UNINSTALL)); then
    do_uninstall
else
    do_install
fi
