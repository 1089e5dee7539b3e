"""The bounded edge, attacked over raw sockets against a real uvicorn server with the service's own
options: the key before the body, the header cap, header and body deadlines, the body limit for chunked
bodies, and the connection cap."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from tests.service.conftest import live_server

KEY = "edge-key"


@pytest.fixture(scope="module")
def edge_url(rm_dir: Path) -> Iterator[str]:
    settings = Settings(
        model=str(rm_dir),
        api_key=KEY,
        max_header_bytes=4096,
        header_timeout_s=0.5,
        body_timeout_s=0.5,
        max_body_bytes=2048,
    )
    with live_server(settings) as url:
        yield url


def connect(url: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    s.settimeout(5)
    return s


def read_answer(s: socket.socket) -> tuple[int, dict[str, str], bytes, bool]:
    """(status, headers, body, closed): one whole answer, then whether the server closed the connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"closed without an answer after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", "0")):
        body += s.recv(65536)
    try:
        closed = s.recv(1) == b""
    except (TimeoutError, ConnectionResetError):
        closed = False
    return status, headers, body, closed


def error_code(body: bytes) -> str:
    return str(json.loads(body)["error"]["code"])


def test_keyless_8mb_upload_is_refused_before_its_body(edge_url: str) -> None:
    s = connect(edge_url)
    s.sendall(
        b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(8 * 1024 * 1024).encode() + b"\r\n\r\n"
    )  # the headers only: not a byte of the body
    t = time.perf_counter()
    status, headers, body, closed = read_answer(s)
    assert time.perf_counter() - t < 1.0
    assert status == 401 and headers["www-authenticate"] == "Bearer" and error_code(body) == "invalid_api_key"
    assert headers["connection"] == "close" and closed
    s.close()


def test_wrong_key_gets_www_authenticate(edge_url: str) -> None:
    r = httpx.post(
        edge_url + "/v1/score", json={"prompt": "x", "responses": ["a"]}, headers={"Authorization": "Bearer no"}
    )
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_100kb_header_is_431_and_closed(edge_url: str) -> None:
    s = connect(edge_url)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
    status, _, body, closed = read_answer(s)
    assert status == 431 and error_code(body) == "headers_too_large" and closed
    s.close()
    # a header under the cap still works on a fresh connection
    assert httpx.get(edge_url + "/health", headers={"X-Small": "a" * 1000}).status_code == 200


def test_stalled_headers_get_408_and_idle_connections_close(edge_url: str) -> None:
    s = connect(edge_url)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # never finished
    t = time.perf_counter()
    status, _headers, body, closed = read_answer(s)
    assert 0.4 < time.perf_counter() - t < 2.0
    assert status == 408 and error_code(body) == "header_timeout" and closed
    s.close()
    idle = connect(edge_url)  # sends nothing at all
    t = time.perf_counter()
    assert idle.recv(1) == b""  # closed without a word
    assert 0.4 < time.perf_counter() - t < 2.0
    idle.close()


def test_slow_header_drip_is_cut_at_the_deadline(edge_url: str) -> None:
    s = connect(edge_url)
    s.sendall(b"GET /health HTTP/1.1\r\n")
    t = time.perf_counter()
    try:
        for _ in range(20):  # one header every 0.2 s keeps a keep-alive timer busy, not this deadline
            s.sendall(b"X-Drip: a\r\n")
            time.sleep(0.2)
    except (BrokenPipeError, ConnectionResetError):
        pass
    data = s.recv(65536)
    assert data.startswith(b"HTTP/1.1 408"), data
    assert time.perf_counter() - t < 2.0
    s.close()


def test_stalled_body_gets_408_and_closed(edge_url: str) -> None:
    s = connect(edge_url)
    s.sendall(
        b"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n" + b'{"prompt": "x'
    )
    t = time.perf_counter()
    status, _headers, body, closed = read_answer(s)
    assert 0.4 < time.perf_counter() - t < 2.0
    assert status == 408 and error_code(body) == "body_timeout" and closed
    s.close()
    metrics = httpx.get(edge_url + "/metrics").text
    assert 'rmserve_failures_total{cause="body_timeout"}' in metrics


def test_chunked_body_past_the_limit_is_413(edge_url: str) -> None:
    s = connect(edge_url)
    s.sendall(
        b"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
        b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"a" * 1024
    try:
        for _ in range(4):  # 4 KB against a 2 KB limit
            s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    status, _headers, body, closed = read_answer(s)
    assert status == 413 and error_code(body) == "body_too_large" and closed
    s.close()


def test_connection_cap_evicts_the_oldest_idle_connection(rm_dir: Path) -> None:
    """At RMSERVE_MAX_CONNECTIONS idle connections, a new one is still served: the oldest idle one is
    closed to make room (uvicorn's limit_concurrency answered a plain-text 503 to everything here)."""
    with live_server(Settings(model=str(rm_dir), max_connections=4, header_timeout_s=30)) as url:
        idle = [connect(url) for _ in range(4)]  # hold every slot without a request
        time.sleep(0.2)
        t = time.perf_counter()
        r = httpx.get(url + "/health", timeout=5)
        assert r.status_code == 200 and time.perf_counter() - t < 1.0
        assert idle[0].recv(1) == b""  # the oldest idle connection was closed, without a word
        r = httpx.post(url + "/v1/score", json={"prompt": "q", "responses": ["a"]}, timeout=5)
        assert r.status_code == 200
        m = httpx.get(url + "/metrics", timeout=5).text
        assert "rmserve_connections_evicted_total 1.0" in m, [x for x in m.splitlines() if "evicted" in x]
        for s in idle:
            s.close()


def test_requests_in_flight_are_capped_but_probes_never_are(rm_dir: Path) -> None:
    """Two stalled uploads fill RMSERVE_MAX_IN_FLIGHT=2: the next request gets a counted JSON 503 with
    Retry-After at once, while /health, /ready and /metrics still answer."""
    with live_server(Settings(model=str(rm_dir), max_in_flight=2, body_timeout_s=30)) as url:
        stalled = []
        for _ in range(2):
            s = connect(url)
            s.sendall(
                b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
            )
            stalled.append(s)
        time.sleep(0.3)
        t = time.perf_counter()
        r = httpx.post(url + "/v1/score", json={"prompt": "q", "responses": ["a"]}, timeout=5)
        assert r.status_code == 503 and time.perf_counter() - t < 1.0
        assert r.json()["error"]["type"] == "busy" and r.headers["retry-after"] == "1"
        for probe in ("/health", "/ready", "/metrics"):
            assert httpx.get(url + probe, timeout=5).status_code == 200, probe
        metrics = httpx.get(url + "/metrics", timeout=5).text
        assert 'rmserve_failures_total{cause="busy"} 1.0' in metrics
        for s in stalled:
            s.close()
        time.sleep(0.3)
        assert httpx.post(url + "/v1/score", json={"prompt": "q", "responses": ["a"]}, timeout=5).status_code == 200


def test_content_length_with_chunked_is_refused(edge_url: str) -> None:
    s = connect(edge_url)
    s.sendall(
        b"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    status, _headers, body, _closed = read_answer(s)
    s.close()
    assert status == 400 and error_code(body) == "ambiguous_length", body
