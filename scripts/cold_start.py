#!/usr/bin/env python3
"""Cold start of `switchboard serve`, measured from outside (standard library only).

Starts the binary, polls a visitor WebSocket upgrade until one is accepted, sends a question
at once, and reports, from the moment the process was started:
  accept   first accepted WebSocket (101);
  answer   the bot's answer to the question sent right after the accept (lexical, degraded,
           while the model is still loading);
  primary  the log line "primary model ready" (the primary model answers from then on);
  companion the log line "companion model ready" (if a companion is configured);
  model    the answer to the same question asked once every model is ready.
The config must listen on a fixed address ([server] listen) and hold an imported knowledge base.

Usage: scripts/cold_start.py BINARY CONFIG [--runs 3] [--question TEXT] [--site demo] [--legacy]
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import threading
import time
import tomllib


def listen_address(config):
    with open(config, "rb") as f:
        listen = tomllib.load(f)["server"]["listen"]
    host, port = listen.rsplit(":", 1)
    return host, int(port)


def upgrade(address, path):
    """A connected, upgraded socket, or None if refused / not 101."""
    try:
        sock = socket.create_connection(address, timeout=2)
    except OSError:
        return None
    request = (
        f"GET {path} HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    try:
        sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                sock.close()
                return None
            head += chunk
    except OSError:
        sock.close()
        return None
    if not head.startswith(b"HTTP/1.1 101"):
        sock.close()
        return None
    return sock, head.split(b"\r\n\r\n", 1)[1]


def send_text(sock, text):
    payload = text.encode()
    mask = os.urandom(4)
    header = bytes([0x81])
    if len(payload) < 126:
        header += bytes([0x80 | len(payload)])
    else:
        header += bytes([0x80 | 126]) + len(payload).to_bytes(2, "big")
    sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


class Reader:
    def __init__(self, sock, buffered):
        self.sock, self.buffer = sock, buffered

    def need(self, n):
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buffer += chunk
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def message(self):
        b0, b1 = self.need(2)
        length = b1 & 0x7F
        if length == 126:
            length = int.from_bytes(self.need(2), "big")
        elif length == 127:
            length = int.from_bytes(self.need(8), "big")
        payload = self.need(length)
        return b0 & 0x0F, payload


def bot_answer(reader):
    while True:
        opcode, payload = reader.message()
        if opcode != 1:
            continue
        value = json.loads(payload)
        if value.get("type") == "message" and value.get("from") == "bot":
            return value
        if value.get("type") in ("error", "queued"):
            return value


def run_once(binary, config, question, site, companion, legacy):
    address = listen_address(config)
    lines = []
    started = time.monotonic()
    process = subprocess.Popen([binary, "serve", "--config", config], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def collect():
        for line in process.stderr:
            lines.append((time.monotonic() - started, line))

    threading.Thread(target=collect, daemon=True).start()
    result = {}
    try:
        while True:
            connected = upgrade(address, f"/ws/visitor?site={site}&visitor=cold{int(started * 1000)}")
            if connected:
                break
            if process.poll() is not None or time.monotonic() - started > 60:
                raise RuntimeError("no WebSocket accepted:\n" + "".join(l for _, l in lines))
            time.sleep(0.005)
        result["accept"] = time.monotonic() - started
        sock, rest = connected
        sock.settimeout(60)
        reader = Reader(sock, rest)
        send_text(sock, json.dumps({"type": "message", "id": "q1", "text": question}))
        first = bot_answer(reader)
        result["answer"] = time.monotonic() - started
        result["answer_text"] = first.get("text", first)
        if legacy:
            return result
        wanted = ["primary model ready"] + (["companion model ready"] if companion else [])
        while not all(any(w in l for _, l in lines) for w in wanted):
            if time.monotonic() - started > 120:
                raise RuntimeError("models never ready:\n" + "".join(l for _, l in lines))
            time.sleep(0.005)
        result["primary"] = next(t for t, l in lines if "primary model ready" in l)
        if companion:
            result["companion"] = next(t for t, l in lines if "companion model ready" in l)
        send_text(sock, json.dumps({"type": "message", "id": "q2", "text": question}))
        second = bot_answer(reader)
        result["model"] = time.monotonic() - started
        result["model_text"] = second.get("text", second)
        sock.close()
    finally:
        process.terminate()
        process.wait(10)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binary")
    parser.add_argument("config")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--question", default="How long does a card take to arrive?")
    parser.add_argument("--site", default="demo")
    parser.add_argument("--legacy", action="store_true", help="a build that loads the models before it listens (accept and answer only)")
    args = parser.parse_args()
    with open(args.config, "rb") as f:
        companion = bool(tomllib.load(f).get("inference", {}).get("companion_model"))
    runs = [run_once(args.binary, args.config, args.question, args.site, companion, args.legacy) for _ in range(args.runs)]
    for r in runs:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}, ensure_ascii=False))
    keys = ["accept", "answer", "primary"] + (["companion"] if companion else []) + ["model"]
    if args.legacy:
        keys = ["accept", "answer"]
    print("median over %d runs: " % len(runs) + ", ".join(f"{k} {statistics.median(r[k] for r in runs):.3f} s" for k in keys))


if __name__ == "__main__":
    main()
