"""A body the service refuses before reading it is not received either: the connection is closed."""

from __future__ import annotations

import socket
import time

import httpx


def test_an_unauthenticated_endless_upload_is_cut_off(api_url: str) -> None:
    url = httpx.URL(api_url)
    assert url.host and url.port
    chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
    sent, answer, closed = 0, b"", False
    with socket.create_connection((url.host, url.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/files HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")
        sock.settimeout(0.01)
        deadline = time.monotonic() + 20
        while not closed and time.monotonic() < deadline:
            try:
                sock.sendall(chunk)
                sent += len(chunk)
                data = sock.recv(65536)
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                closed = True
                continue
            closed = not data
            answer += data
    assert closed, f"the server was still receiving after {sent} bytes"
    assert answer.startswith(b"HTTP/1.1 401"), answer[:100]
    assert b"connection: close" in answer.lower()
    # Far below the upload cap: the server stopped reading once it had answered.
    assert sent < 32 * 1024 * 1024
