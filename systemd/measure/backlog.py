#!/usr/bin/env python3
"""Accept-queue overflow under a connect burst, in a private network namespace (systemd/README.md,
"Kernel settings for high density"; nothing outside the namespace changes).

Run as root: unshare -n python3 backlog.py SOMAXCONN BACKLOG CONNECTS
A listener with listen(BACKLOG) that does not accept (a shard busy for the burst) receives
CONNECTS non-blocking connects at once; after 0.5 s it reports how many sit in the accept queue,
how many clients are connected, and the kernel's ListenOverflows/ListenDrops counters.
"""
import os, select, socket, subprocess, sys, time

somaxconn, backlog, connects = (int(a) for a in sys.argv[1:4])
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
open("/proc/sys/net/core/somaxconn", "w").write(str(somaxconn))

def counters():
    out = subprocess.run(["nstat", "-az", "TcpExtListenOverflows", "TcpExtListenDrops"],
                         capture_output=True, text=True, check=True).stdout
    values = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0].startswith("TcpExt"):
            values[parts[0]] = int(parts[1])
    return values

server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(backlog)
addr = server.getsockname()
before = counters()
clients = []
started = time.monotonic()
for _ in range(connects):
    c = socket.socket()
    c.setblocking(False)
    try:
        c.connect(addr)
    except BlockingIOError:
        pass
    clients.append(c)
time.sleep(0.5)
poller = select.poll()
for c in clients:
    poller.register(c, select.POLLOUT)
connected = sum(1 for fd, ev in poller.poll(0) if ev & select.POLLOUT and not ev & (select.POLLERR | select.POLLHUP))
after = counters()
ss = subprocess.run(["ss", "-lnt", f"sport = :{addr[1]}"], capture_output=True, text=True).stdout.splitlines()[-1].split()
print(f"somaxconn={somaxconn} listen({backlog}) {connects} connects: accept queue {ss[1]} (limit {ss[2]}), "
      f"clients connected after 0.5 s: {connected}, "
      f"ListenOverflows +{after['TcpExtListenOverflows'] - before['TcpExtListenOverflows']}, "
      f"ListenDrops +{after['TcpExtListenDrops'] - before['TcpExtListenDrops']}")
