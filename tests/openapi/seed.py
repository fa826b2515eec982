"""Puts data behind every endpoint before schemathesis runs (tests/openapi/run.sh): a knowledge
base, a canned reply, and conversations in every state, made the way real clients make them
(visitors and an agent over WebSocket), so the responses checked against docs/openapi.yaml
carry real conversations, messages and queue entries, not only empty lists.

Usage: seed.py HOST:PORT ADMIN_TOKEN AGENT_TOKEN KB_CSV
Standard library only (it runs in the test's venv)."""

import base64
import json
import os
import socket
import struct
import sys
import time
import urllib.request


def api(addr, method, path, token, body=None, content_type="application/json"):
    request = urllib.request.Request(f"http://{addr}{path}", method=method, data=body)
    request.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        request.add_header("Content-Type", content_type)
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


class WebSocket:
    """Just enough of a WebSocket client: text frames, masked as a client must."""

    def __init__(self, addr, path):
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=20)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                raise RuntimeError(f"upgrade of {path} refused")
            head += chunk
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"upgrade of {path} refused: {head!r}")

    def send(self, value):
        payload = json.dumps(value).encode()
        mask = os.urandom(4)
        header = bytes([0x81])
        if len(payload) < 126:
            header += bytes([0x80 | len(payload)])
        else:
            header += bytes([0x80 | 126]) + struct.pack(">H", len(payload))
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def _exact(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise RuntimeError("connection closed")
            data += chunk
        return data

    def receive(self):
        first, second = self._exact(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack(">H", self._exact(2))
        elif length == 127:
            (length,) = struct.unpack(">Q", self._exact(8))
        payload = self._exact(length)
        if first & 0x0F != 1:
            return None
        return json.loads(payload)

    def wait_for(self, kind):
        deadline = time.time() + 20
        while time.time() < deadline:
            frame = self.receive()
            if frame is not None and frame.get("type") == kind:
                return frame
        raise RuntimeError(f"no {kind} frame")

    def close(self):
        self.sock.close()


def visitor(addr, name, text, handoff):
    ws = WebSocket(addr, f"/ws/visitor?site=shop&visitor={name}")
    ws.wait_for("hello")
    ws.send({"type": "message", "id": f"{name}-1", "text": text})
    ack = ws.wait_for("ack")
    if handoff:
        ws.send({"type": "handoff"})
    return ws, ack["conversation"]


def main():
    addr, admin, agent_token, kb_csv = sys.argv[1:5]
    with open(kb_csv, "rb") as f:
        api(addr, "POST", "/api/kb/import", admin, f.read(), "text/csv")
    api(addr, "POST", "/api/canned", admin,
        json.dumps({"title": "Greeting", "text": "Hello! How can I help?", "shortcut": "hi",
                    "tags": ["opening"]}).encode())
    sessions = []
    # One the bot handles, two that ask for a human.
    for name, text, handoff in [("ann", "how do I reset my password", False),
                                ("ben", "where is my parcel", True),
                                ("cat", "I want a refund", True)]:
        ws, _ = visitor(addr, name, text, handoff)
        sessions.append(ws)
    # An agent takes the waiting ones, answers, and closes one.
    agent = WebSocket(addr, f"/ws/agent?token={agent_token}")
    first = agent.wait_for("assigned")["conversation"]
    agent.send({"type": "message", "conversation": first, "id": "a-1", "text": "Hello, I am here."})
    agent.wait_for("ack")
    agent.send({"type": "close", "conversation": first})
    time.sleep(0.5)
    agent.close()
    # One more waits in the queue (the agent is gone).
    ws, _ = visitor(addr, "dan", "can I talk to a person", True)
    sessions.append(ws)
    time.sleep(0.5)
    found = api(addr, "GET", "/api/conversations", admin)["conversations"]
    queue = api(addr, "GET", "/api/queue", admin)
    print(f"seeded: {len(found)} conversations "
          f"({', '.join(sorted(c['status'] for c in found))}), {queue['total']} waiting")
    for ws in sessions:
        ws.close()


if __name__ == "__main__":
    main()
