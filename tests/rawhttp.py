"""HTTP/1.1 by hand over a socket, for the server tests that an HTTP client library would hide:
several requests on one known connection, half-sent bodies, clients that trickle or go silent."""
from __future__ import annotations

import dataclasses
import json
import select
import socket
import time


@dataclasses.dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]          # names lower-cased
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def connect(url: str, timeout: float = 30.0) -> socket.socket:
    """A connection to `url`'s host and port (http://HOST:PORT...)."""
    host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
            length: int | None = None) -> bytes:
    """A request's bytes; `length` claims another Content-Length than the body's."""
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or length is not None:
        head.append(f"Content-Length: {len(body) if length is None else length}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def read_answer(sock: socket.socket) -> Answer:
    """One whole answer (with a Content-Length) from `sock`; ConnectionError if it closes first."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += _recv(sock)
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in
               (line.split(":", 1) for line in lines[1:])}
    size = int(headers.get("content-length", "0"))
    while len(rest) < size:
        rest += _recv(sock)
    return Answer(int(lines[0].split()[1]), headers, rest[:size])


def exchange(sock: socket.socket, data: bytes) -> Answer:
    sock.sendall(data)
    return read_answer(sock)


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionError("the server closed the connection")
    return chunk


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server has closed `sock` (end of file or reset), without waiting; any bytes
    it sent meanwhile are read and dropped."""
    while select.select([sock], [], [], 0)[0]:
        try:
            if not sock.recv(65536):
                return True
        except OSError:
            return True
    return False


def trickle(sock: socket.socket, data: bytes, every: float, limit: float) -> float | None:
    """Send `data` a byte every `every` seconds (again from its start when all sent, as a
    slow-loris client does; nothing if `data` is empty); the seconds until the server closed the
    connection, or None if it is still open after `limit` seconds."""
    start, i = time.monotonic(), 0
    while time.monotonic() - start < limit:
        try:
            if data:
                sock.sendall(data[i % len(data):i % len(data) + 1])
        except OSError:
            return time.monotonic() - start
        i += 1
        time.sleep(every)
        if closed_by_server(sock):
            return time.monotonic() - start
    return None
