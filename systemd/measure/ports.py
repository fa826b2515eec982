#!/usr/bin/env python3
"""Ephemeral ports: connects from 127.0.0.1 to one listener until the kernel has no free port, in a
private network namespace (systemd/README.md, "Kernel settings for high density").

Run as root: unshare -n python3 ports.py LOW HIGH"""
import socket, subprocess, sys
low, high = sys.argv[1], sys.argv[2]
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
open("/proc/sys/net/ipv4/ip_local_port_range", "w").write(f"{low} {high}")
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(65535)
open("/proc/sys/net/core/somaxconn", "w").write("65535")
clients = []
try:
    while True:
        c = socket.socket()
        c.connect(server.getsockname())
        clients.append(c)
        server.accept()[0].detach()
except OSError as error:
    print(f"ip_local_port_range {low} {high}: {len(clients)} connections to one address, then {error}")
