#!/usr/bin/env python3
"""File descriptors and kernel memory per idle WebSocket session of a real switchboard
(systemd/README.md, "Kernel settings for high density"). Slab is machine-wide: run it on a quiet host.

python3 fds.py BIN SESSIONS: starts switchboard (2 shards, echo on), counts its open fds and the
kernel's Slab + socket memory idle, then with SESSIONS idle /ws/echo sessions open.
"""
import os, socket, subprocess, sys, tempfile, time, re

bin_path, sessions = sys.argv[1], int(sys.argv[2])
dir = tempfile.mkdtemp()
config = os.path.join(dir, "c.toml")
open(config, "w").write(f"""[server]
listen = "127.0.0.1:0"
[shards]
cores = [0, 1]
[diagnostics]
echo = true
[inference]
enabled = false
[limits]
connections_per_ip = 0
[storage]
dir = "{dir}/data"
[log]
format = "text"
level = "info"
""")
log = open(os.path.join(dir, "log"), "w+")
server = subprocess.Popen([bin_path, "serve", "--config", config], stderr=log)
port = None
for _ in range(100):
    time.sleep(0.1)
    m = re.search(r"listening on 127\.0\.0\.1:(\d+)", open(os.path.join(dir, "log")).read())
    if m:
        port = int(m.group(1)); break
time.sleep(1)

def fds():
    return len(os.listdir(f"/proc/{server.pid}/fd"))

def meminfo():
    values = {}
    for line in open("/proc/meminfo"):
        k, v = line.split(":")
        values[k] = int(v.split()[0])
    return values

def sockstat_pages():
    for line in open("/proc/net/sockstat"):
        if line.startswith("TCP:"):
            return int(line.split("mem")[1].split()[0])

idle_fds = fds()
m0, s0 = meminfo(), sockstat_pages()
clients = []
for i in range(sessions):
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(b"GET /ws/echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    reply = c.recv(1024)
    assert reply.startswith(b"HTTP/1.1 101"), reply[:80]
    clients.append(c)
time.sleep(2)
busy_fds = fds()
m1, s1 = meminfo(), sockstat_pages()
print(f"switchboard, 2 shards: {idle_fds} fds idle, {busy_fds} with {sessions} sessions: "
      f"{(busy_fds - idle_fds) / sessions:.3f} fd per session")
slab = (m1["Slab"] - m0["Slab"]) * 1024 / sessions
print(f"kernel Slab +{(m1['Slab'] - m0['Slab']) / 1024:.1f} MiB for {sessions} loopback connections "
      f"(both ends): {slab:.0f} B per connection pair; TCP socket buffers +{(s1 - s0) * 4096 / sessions:.0f} B per pair")
server.terminate(); server.wait()
