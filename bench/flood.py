#!/usr/bin/env python3
"""Cheap-frame flooder for overload runs (issue 10): one visitor at a time sends
`{"type":"read","seq":0}` frames as fast as TCP takes them while reading its own socket, and
reconnects at once whenever the server closes it. Prints what the server answered: error frames
by code, close codes, HTTP refusals (429/503), and frames written.

    bench/flood.py --target 127.0.0.1:9102 --duration 30

Standard library only; the frames are masked as a conforming client's must be.
"""
import argparse
import collections
import json
import socket
import struct
import threading
import time


def frame(payload: bytes) -> bytes:
    key = b"\x37\xfa\x21\x3d"
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + key + masked


def connect(host, port):
    sock = socket.create_connection((host, port), timeout=5)
    sock.sendall(
        b"GET /ws/visitor?site=flood HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            return None, buf.split(b" ")[1].decode() if b" " in buf else "eof"
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    status = head.split(b" ")[1].decode()
    if status != "101":
        return None, status
    return (sock, rest), status


def read_frames(sock, rest, tally, lock):
    buf = rest
    sock.settimeout(10)
    while True:
        while len(buf) >= 2:
            length = buf[1] & 0x7F
            at = 2
            if length == 126:
                if len(buf) < 4:
                    break
                length = struct.unpack(">H", buf[2:4])[0]
                at = 4
            elif length == 127:
                if len(buf) < 10:
                    break
                length = struct.unpack(">Q", buf[2:10])[0]
                at = 10
            if len(buf) < at + length:
                break
            opcode, payload = buf[0] & 0x0F, buf[at : at + length]
            buf = buf[at + length :]
            with lock:
                if opcode == 1:
                    try:
                        v = json.loads(payload)
                    except ValueError:
                        tally["malformed"] += 1
                        continue
                    if v.get("type") == "error":
                        tally["error " + v.get("code", "?")] += 1
                        if v.get("code") == "rate_limited" and "retry_after" not in v:
                            tally["rate_limited WITHOUT retry_after"] += 1
                elif opcode == 8:
                    code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
                    tally[f"close {code}"] += 1
                    return
        try:
            chunk = sock.recv(65536)
        except OSError as err:
            with lock:
                tally[f"read error {type(err).__name__}"] += 1
            chunk = b""
        if not chunk:
            with lock:
                tally["ended without close"] += 1
            return
        buf += chunk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="127.0.0.1:9102")
    ap.add_argument("--duration", type=float, default=30)
    args = ap.parse_args()
    host, port = args.target.rsplit(":", 1)
    port = int(port)
    chunk = frame(b'{"type":"read","seq":0}') * 5000
    tally = collections.Counter()
    lock = threading.Lock()
    end = time.time() + args.duration
    while time.time() < end:
        try:
            conn, status = connect(host, port)
        except OSError as err:
            tally[f"connect error {type(err).__name__}"] += 1
            time.sleep(0.01)
            continue
        if conn is None:
            tally[f"http {status}"] += 1
            continue
        sock, rest = conn
        tally["sessions"] += 1
        reader = threading.Thread(target=read_frames, args=(sock, rest, tally, lock))
        reader.start()
        try:
            while time.time() < end and reader.is_alive():
                sock.sendall(chunk)
                tally["frames written"] += 5000
        except OSError:
            pass
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        reader.join(timeout=15)
        sock.close()
    for key, value in sorted(tally.items()):
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
