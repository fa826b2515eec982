# Sourced by bench/compare.sh and bench/fixed-rate.sh: the server configuration both give switchboard,
# so a fixed-rate run measures what compare.sh's switchboard column measures.
#
# write_switchboard_config FILE PORT DATA_DIR AGENTS [STORAGE_LINES] [EXTRA_TOML]
#   STORAGE_LINES  lines added to [storage] (e.g. durability = "batch")
#   EXTRA_TOML     TOML appended at the end (whole tables, e.g. [metrics])
write_switchboard_config() {
  local file=$1 port=$2 data=$3 agents=$4 storage=${5:-} extra=${6:-}
  cat >"$file" <<TOML
[server]
listen = "127.0.0.1:$port"

[diagnostics]
echo = true

[storage]
dir = "$data"
$storage

[log]
format = "text"
level = "warn"

[inference]
# The relay measures the conversation path; visitors ask for a human explicitly.
enabled = false

[risk_control]
# A load generator sends far faster than a person; keep the flood guard out of the way.
flood_messages = 10000
flood_window = "100ms"

[agents]
# The load generator authenticates with static tokens: development mode only.
dev_static_tokens = true
[limits]
# Every client of a benchmark comes from 127.0.0.1 and sends far faster than a person: lift the
# per-IP connection rate and the per-session rates (back-pressure and degradation stay on).
connections_per_ip = 0
visitor_messages_per_second = 0
visitor_frames_per_second = 0
agent_messages_per_second = 0
agent_frames_per_second = 0
$(for i in $(seq 0 $((agents - 1))); do printf '\n[agents.accounts.bench%s]\ntoken = "switchboard-bench-agent-%s"\nmax_open = 1000\n' "$i" "$i"; done)
$extra
TOML
}
