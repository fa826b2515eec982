#!/usr/bin/env bash
# Locked memory a shard needs (systemd/README.md, "Kernel settings for high density").
# As an unprivileged user (no CAP_IPC_LOCK, like the unit's user: io_uring then accounts registered
# buffers against RLIMIT_MEMLOCK), starts switchboard for 3 s and counts glommio's
# buffer-registration warnings.  Run as root: memlock.sh BIN LIMIT_BYTES "0, 1" 256KiB
set -u
bin=$1; limit=$2; cores=$3; io=$4
dir=$(mktemp -d); chmod 777 $dir
cat > $dir/c.toml <<EOC
[server]
listen = "127.0.0.1:0"
[shards]
cores = [$cores]
io_memory = "$io"
[inference]
enabled = false
[storage]
dir = "$dir/data"
[audit]
file = "$dir/audit.log"
[log]
format = "text"
level = "info"
EOC
chmod 644 $dir/c.toml
prlimit --memlock=$limit:$limit setpriv --reuid=65534 --regid=65534 --clear-groups $bin serve --config $dir/c.toml 2>$dir/log &
pid=$!
sleep 3
kill -TERM $pid 2>/dev/null; wait $pid
echo "memlock=$limit shards=[$cores] io_memory=$io: started=$(grep -c 'listening on' $dir/log) shards_started=$(grep -c 'shard started' $dir/log) warnings=$(grep -c 'registering buffers' $dir/log) failed=$(grep -c 'failed' $dir/log)"
[ -n "${KEEP:-}" ] && grep -m2 "registering buffers\|ERROR" $dir/log | cut -c1-250
rm -rf $dir
