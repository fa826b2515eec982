#!/usr/bin/env python3
"""A connect burst while one of two switchboard shards is busy (POST /debug/stall), in a private
network namespace (systemd/README.md, "Kernel settings for high density").

Run as root: unshare -n python3 shard_burst.py BIN SOMAXCONN BACKLOG CONNECTS
"""
import os, select, socket, subprocess, sys, tempfile, time

bin_path, somaxconn, backlog, connects = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
open("/proc/sys/net/core/somaxconn", "w").write(str(somaxconn))
dir = tempfile.mkdtemp()
config = os.path.join(dir, "c.toml")
open(config, "w").write(f"""[server]
listen = "127.0.0.1:18080"
backlog = {backlog}
[shards]
cores = [0, 1]
[diagnostics]
stall_endpoint = true
[inference]
enabled = false
[storage]
dir = "{dir}/data"
[log]
format = "text"
level = "warn"
""")
server = subprocess.Popen([bin_path, "serve", "--config", config], stderr=subprocess.DEVNULL)
time.sleep(2)

def counters():
    out = subprocess.run(["nstat", "-az", "TcpExtListenOverflows"], capture_output=True, text=True).stdout
    return sum(int(l.split()[1]) for l in out.splitlines() if l.startswith("TcpExt"))

s = socket.create_connection(("127.0.0.1", 18080))
s.sendall(b"POST /debug/stall?shard=0&ms=3000 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
print("stall:", s.recv(100).split(b"\r\n")[0].decode())
time.sleep(0.2)
before = counters()
clients = []
for _ in range(connects):
    c = socket.socket()
    c.setblocking(False)
    try:
        c.connect(("127.0.0.1", 18080))
    except BlockingIOError:
        pass
    clients.append(c)
time.sleep(1.0)
poller = select.poll()
for c in clients:
    poller.register(c, select.POLLOUT)
connected = sum(1 for fd, ev in poller.poll(0) if ev & select.POLLOUT and not ev & (select.POLLERR | select.POLLHUP))
print(f"somaxconn={somaxconn} [server] backlog={backlog}, one of 2 shards busy, {connects} connects: "
      f"connected within 1 s {connected}, ListenOverflows +{counters() - before}")
server.terminate()
server.wait()
