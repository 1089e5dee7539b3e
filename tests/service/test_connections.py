"""The connection layer under abuse (issue 26), over raw sockets against a real uvicorn server with the
service's own options: idle-connection floods, connections past the cap, pipelining floods, a pipelined
oversized head, h11's protocol errors, and /metrics totals against what the clients received.

Throughout each attack `/health` must answer within 100 ms (the issue's figure), and every refusal must be
a counted JSON error."""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from service.settings import Settings
from tests.service.conftest import frozen_heap, live_server

PROBE_S = 0.1  # the bound on /health while under attack


def need_open_files(n: int) -> None:
    """Raise RLIMIT_NOFILE to `n` (client and server ends live in this process), or skip saying why."""
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= n:
        return
    if hard != resource.RLIM_INFINITY and hard < n:
        pytest.skip(f"needs {n} open files; the hard limit (ulimit -Hn) is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def connect(url: str, timeout: float = 5.0) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port_of(url)))
    s.settimeout(timeout)
    return s


def read_answer(s: socket.socket, buf: bytearray | None = None) -> tuple[int, dict[str, str], bytes]:
    """One whole answer (status, headers, body); `buf` carries bytes read past it between calls."""
    data = buf if buf is not None else bytearray()
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"closed without an answer after {bytes(data)!r}"
        data += chunk
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    size = int(headers.get("content-length", "0"))
    while len(rest) < size:
        chunk = s.recv(65536)
        assert chunk, "closed mid-body"
        rest += chunk
    data[:] = rest[size:]
    return int(lines[0].split()[1]), headers, rest[:size]


def is_closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except (TimeoutError, ConnectionResetError):
        return False


_PROBER = r"""
import socket, sys, time
port = int(sys.argv[1])
for _ in sys.stdin:
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = data.split(b" ", 2)[1].decode() if data else "closed"
    print(status, time.perf_counter() - t, flush=True)
"""


class Prober:
    """GET /health from another process (a probe timed in this one would wait for the server thread's
    GIL), on a fresh connection each time, as a liveness probe does."""

    def __init__(self, url: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _PROBER, str(port_of(url))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def __call__(self) -> float:
        """Seconds for one /health (asserting its 200)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        status, seconds = self.proc.stdout.readline().split()
        assert status == "200", status
        return float(seconds)

    def bound(self) -> float:
        """The bound on /health under attack: the issue's 100 ms, or on a machine so busy that /health alone
        is slow (the suite runs on 2 shared cores), 3 x its median there before the attack."""
        self()  # the first request of a fresh server pays for lazy imports
        alone = sorted(self() for _ in range(5))[2]
        return max(PROBE_S, 3 * alone)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(10)


@contextmanager
def prober(url: str) -> Iterator[Prober]:
    p = Prober(url)
    try:
        yield p
    finally:
        p.close()


def json_error(body: bytes) -> dict[str, object]:
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return dict(err)


def metric_values(url: str, name: str) -> dict[str, float]:
    """{label string: value} of one counter from /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {m[1]: float(m[2]) for m in re.finditer(rf"^{name}\{{(.*)\}} (\S+)$", text, re.M)}


def failures(url: str) -> dict[str, float]:
    return {k.split('"')[1]: v for k, v in metric_values(url, "rmserve_failures_total").items()}


def requests_by_status(url: str) -> Counter[int]:
    """rmserve_requests_total summed by status, /metrics itself left out."""
    out: Counter[int] = Counter()
    for labels, v in metric_values(url, "rmserve_requests_total").items():
        route, status = re.findall(r'"([^"]*)"', labels)
        if route != "/metrics":
            out[int(status)] += int(v)
    return out


@pytest.fixture(scope="module")
def url(rm_dir: Path) -> Iterator[str]:
    with live_server(Settings(model=str(rm_dir), header_timeout_s=30, keep_alive_timeout_s=30)) as u:
        yield u


def test_2000_idle_connections_never_lock_out_probes_or_work(rm_dir: Path) -> None:
    """2,000 idle connections against RMSERVE_MAX_CONNECTIONS=1024: the oldest idle ones are closed as new
    ones come, /health answers within 100 ms all along, and a score is still served (before: uvicorn's
    plain-text 503 to everything, /health included, past ~1,030)."""
    need_open_files(2 * 2000 + 512)
    settings = Settings(model=str(rm_dir), header_timeout_s=60, keep_alive_timeout_s=60)
    with live_server(settings) as u, prober(u) as probe, frozen_heap():
        held: list[socket.socket] = []
        slowest = 0.0
        times: list[float] = []
        bound = probe.bound()
        try:
            for i in range(2000):
                held.append(connect(u))
                if i % 100 == 99:
                    times.append(probe())
                    slowest = max(slowest, times[-1])
            r = httpx.post(u + "/v1/score", json={"prompt": "q", "responses": ["a"]}, timeout=10)
            assert r.status_code == 200
            slowest = max(slowest, probe())
            text = httpx.get(u + "/metrics", timeout=10).text
            evicted = float(re.findall(r"^rmserve_connections_evicted_total (\S+)$", text, re.M)[0])
            print(
                f"idle flood: /health max {slowest * 1000:.0f} ms (bound {bound * 1000:.0f} ms), {evicted:.0f} evicted"
            )
            assert slowest < bound, f"/health took {slowest * 1000:.0f} ms under the flood {times}"
            assert held[0].recv(1) == b""  # the oldest were closed without a word
            assert is_closed(held[-1]) is False  # the newest are still open
        finally:
            for s in held:
                s.close()
    assert evicted >= 2000 - 1024  # one per connection past the cap (probes' own connections too)


def test_partial_head_flood_never_locks_out_probes(rm_dir: Path) -> None:
    """600 connections that each send part of a request head and never finish it, against
    RMSERVE_MAX_CONNECTIONS=200: the oldest are evicted (a counted JSON 503) as new ones come, /health and
    /metrics answer all along, and a score is still served (before: a connection left the eviction order on
    its first byte, and past the cap every request but the probes got the JSON 503 too_many_connections)."""
    n, cap = 600, 200
    need_open_files(2 * n + 512)
    settings = Settings(model=str(rm_dir), max_connections=cap, header_timeout_s=60, keep_alive_timeout_s=60)
    with live_server(settings) as u, prober(u) as probe, frozen_heap():
        held: list[socket.socket] = []
        times: list[float] = []
        bound = probe.bound()
        try:
            for i in range(n):
                held.append(connect(u))
                held[-1].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: b")  # never finished
                if i % 50 == 49:
                    times.append(probe())
            time.sleep(0.2)
            r = httpx.post(u + "/v1/score", json={"prompt": "q", "responses": ["a"]}, timeout=10)
            assert r.status_code == 200, r.text
            assert httpx.get(u + "/metrics", timeout=10).status_code == 200
            times.append(probe())
            print(f"partial-head flood: /health max {max(times) * 1000:.0f} ms (bound {bound * 1000:.0f} ms)")
            assert max(times) < bound, f"/health took {max(times) * 1000:.0f} ms under the flood {times}"
            status, headers, body = read_answer(held[0])  # the oldest: evicted with an answer
            assert status == 503 and json_error(body)["code"] == "evicted" and headers["connection"] == "close"
            assert is_closed(held[-1]) is False  # the newest are still open
        finally:
            for s in held:
                s.close()
        time.sleep(0.3)
        evicted = failures(u).get("evicted", 0)
    assert evicted >= n - cap  # one per connection past the cap


def test_idle_keep_alive_is_evicted_before_a_partial_head(rm_dir: Path) -> None:
    """At the cap, an idle keep-alive connection is closed before a connection with part of a head, even a
    newer one; and the partial heads go oldest first."""
    with live_server(Settings(model=str(rm_dir), max_connections=3, header_timeout_s=30)) as u:
        partial_old = connect(u)
        partial_old.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        kept = connect(u)
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_answer(kept)[0] == 200  # answered: now an idle keep-alive connection
        partial_new = connect(u)
        partial_new.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        time.sleep(0.2)
        try:
            with connect(u) as s:  # the 4th: the idle keep-alive one is closed, without a word
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert read_answer(s)[0] == 200
            assert kept.recv(1) == b""
            assert is_closed(partial_old) is False and is_closed(partial_new) is False
            partial_newest = connect(u)  # the cap again
            partial_newest.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            time.sleep(0.1)
            with connect(u) as s:  # the next: the oldest partial head
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert read_answer(s)[0] == 200
            status, _, body = read_answer(partial_old)
            assert status == 503 and json_error(body)["code"] == "evicted"
            assert is_closed(partial_new) is False and is_closed(partial_newest) is False
            partial_newest.close()
        finally:
            for s in (partial_old, kept, partial_new):
                s.close()


MID_BODY = b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"


def test_past_the_cap_with_nothing_evictable_probes_are_served_and_the_rest_refused(
    rm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every slot held by a request in flight (a body being read: nothing to evict): probes and /metrics
    are still served, a score request gets the JSON 503 with Retry-After; and past the probe reserve a new
    connection gets the JSON 503 at once; each refusal counted."""
    settings = Settings(model=str(rm_dir), max_connections=4, header_timeout_s=30, body_timeout_s=30)
    with live_server(settings) as u, prober(u) as probe:
        bound = probe.bound()
        held = [connect(u) for _ in range(4)]
        for s in held:
            s.sendall(MID_BODY)  # a body that never ends
        time.sleep(0.2)
        try:
            assert probe() < bound
            assert httpx.get(u + "/metrics", timeout=10).status_code == 200
            with connect(u) as s:
                s.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
                status, headers, body = read_answer(s)
            assert status == 503 and headers["retry-after"] == "1" and headers["connection"] == "close"
            assert json_error(body)["code"] == "too_many_connections"
            assert all(is_closed(s) is False for s in held)  # requests in flight are never evicted
        finally:
            for s in held:
                s.close()
        time.sleep(0.3)
        assert failures(u)["too_many_connections"] == 1
        by_route = metric_values(u, "rmserve_requests_total")
        assert by_route['route="/v1/score",status="503"'] == 1
    monkeypatch.setattr("service.server.PROBE_RESERVE", 0)  # past the reserve at once
    with live_server(Settings(model=str(rm_dir), max_connections=2, body_timeout_s=30)) as u:
        held = [connect(u) for _ in range(2)]
        for s in held:
            s.sendall(MID_BODY)
        time.sleep(0.2)
        try:
            with connect(u) as s:  # nothing sent: refused at once
                status, headers, body = read_answer(s)
            assert status == 503 and json_error(body)["code"] == "too_many_connections"
            assert headers["retry-after"] == "1"
        finally:
            for s in held:
                s.close()
        time.sleep(0.3)
        assert failures(u)["too_many_connections"] == 1
        assert metric_values(u, "rmserve_requests_total")['route="connection",status="503"'] == 1


def test_pipelining_flood_is_bounded_and_probes_stay_fast(url: str) -> None:
    """40 connections each write 60 GET /openapi.json in one write and never read: /health stays under
    100 ms; each connection is served RMSERVE_MAX_PIPELINED (16) answers, the 17th request gets a counted JSON
    429 and the connection closes (before the fix: 17 answers) (before: 8,100 renders of a 39 KB body, /health 10 s)."""
    before = failures(url).get("too_many_pipelined", 0)
    with prober(url) as probe:
        bound = probe.bound()
        flood = [connect(url, timeout=10) for _ in range(40)]
        time.sleep(0.2)  # the attacker's keep-alive connections are open first, as in the issue
        for s in flood:
            s.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 60)
        times = [probe() for _ in range(10)]
    try:
        print(f"pipelining flood: /health max {max(times) * 1000:.0f} ms (bound {bound * 1000:.0f} ms)")
        assert max(times) < bound, f"/health took {max(times) * 1000:.0f} ms under the pipelining flood: {times}"
        for s in flood:
            buf = bytearray()
            statuses = [read_answer(s, buf)[0] for _ in range(16)]
            status, headers, body = read_answer(s, buf)
            assert statuses == [200] * 16 and status == 429, (statuses, status)
            assert json_error(body)["code"] == "too_many_pipelined" and headers["connection"] == "close"
            assert not buf and is_closed(s)
    finally:
        for s in flood:
            s.close()
    assert failures(url)["too_many_pipelined"] - before == 40


def test_pipelined_100kb_header_is_431_as_it_is_alone(url: str) -> None:
    with connect(url) as s:
        s.sendall(
            b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
            + b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: "
            + b"a" * 100_000
            + b"\r\n\r\n"
        )
        buf = bytearray()
        first, _, _ = read_answer(s, buf)
        second, headers, body = read_answer(s, buf)
        assert (first, second) == (200, 431) and json_error(body)["code"] == "headers_too_large"
        assert headers["connection"] == "close"


@pytest.mark.parametrize(
    "raw",
    [
        b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",  # bad Content-Length
        b"POST /v1/score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",  # chunk size
        b"GET /health HTTP/1.1\r\n\r\n",  # no Host
        b"GET /health\r\n\r\n",  # HTTP/0.9
        b"POST /v1/score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n{}",  # h11 hints 501
    ],
    ids=["content-length", "chunk-size", "no-host", "http-0.9", "te-gzip"],
)
def test_protocol_errors_answer_the_json_error_and_are_counted(url: str, raw: bytes) -> None:
    before = failures(url).get("bad_http", 0)
    with connect(url) as s:
        s.sendall(raw)
        status, headers, body = read_answer(s)
        assert status == 400 and json_error(body)["code"] == "bad_http", body
        assert "bytearray" not in str(json_error(body)["message"]) and "\\r" not in str(json_error(body)["message"])
        assert headers["connection"] == "close" and is_closed(s)
    time.sleep(0.1)
    assert failures(url)["bad_http"] - before == 1


def test_metrics_totals_equal_what_the_clients_received(rm_dir: Path) -> None:
    """A mixed run of good, bad, aborted and refused requests: rmserve_requests_total by status equals the
    statuses the clients received, plus 499 for each client that left mid-body (no answer sent)."""
    settings = Settings(model=str(rm_dir), api_key="k", max_header_bytes=4096, max_body_bytes=4096)
    auth = {"Authorization": "Bearer k"}
    with live_server(settings) as u:
        before = requests_by_status(u)
        seen: Counter[int] = Counter()
        with httpx.Client(base_url=u, timeout=10) as c:
            for _ in range(3):
                seen[c.post("/v1/score", json={"prompt": "q", "responses": ["a", "b"]}, headers=auth).status_code] += 1
            seen[c.post("/v1/score", json={"prompt": "q"}, headers=auth).status_code] += 1  # 422
            seen[c.post("/v1/score", json={"prompt": "q", "responses": ["a"]}).status_code] += 1  # 401
            seen[c.get("/nowhere", headers=auth).status_code] += 1  # 404
            seen[c.post("/v1/score", content=b"x" * 5000, headers=auth).status_code] += 1  # 413
            seen[c.get("/health").status_code] += 1
        for raw in (
            b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n",  # 431
            b"GET /health HTTP/1.1\r\n\r\n",  # 400, no Host
        ):
            with connect(u) as s:
                s.sendall(raw)
                seen[read_answer(s)[0]] += 1
        for _ in range(2):  # aborted mid-body
            with connect(u) as s:
                s.sendall(
                    b"POST /v1/score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                    b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"prompt": '
                )
                time.sleep(0.1)
        seen[499] += 2
        deadline = time.monotonic() + 10
        while True:
            after = requests_by_status(u)
            got = after - before
            if got == seen or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert set(seen) == {200, 401, 404, 413, 422, 431, 400, 499}
        assert got == seen, (got, seen)
        f = failures(u)
        assert f["client_gone"] == 2 and f["bad_http"] == 1 and f["headers_too_large"] == 1
        labels = metric_values(u, "rmserve_requests_total")
        assert labels['route="/v1/score",status="413"'] == 1  # refused before routing, labelled with its route
        assert labels['route="/v1/score",status="401"'] == 1


@pytest.mark.parametrize(
    "raw",
    [
        b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
        b"POST /v1/rank HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
        b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    ],
    ids=["v1-score", "v1-rank", "score"],
)
def test_abort_mid_body_is_client_gone_only_and_logs_no_error(
    url: str, raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that closes mid-body is counted once, as requests{499} + failures{client_gone}: not as an
    internal failure, and with no ERROR traceback (before: Starlette's ClientDisconnect escaped the route
    as an unexpected error: failures{internal} + a 40-line ERROR log)."""
    before = failures(url)
    statuses_before = requests_by_status(url)
    with caplog.at_level(logging.DEBUG):
        with connect(url) as s:
            s.sendall(raw)
            time.sleep(0.1)
        time.sleep(0.3)
        after = failures(url)
    assert after.get("internal", 0) == before.get("internal", 0)
    assert after["client_gone"] - before.get("client_gone", 0) == 1
    assert (requests_by_status(url) - statuses_before) == Counter({499: 1})
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert len([r for r in caplog.records if "client left" in r.getMessage()]) <= 1


def test_bad_chunk_size_is_bad_http_only_and_logs_no_error(url: str, caplog: pytest.LogCaptureFixture) -> None:
    before = failures(url)
    with caplog.at_level(logging.DEBUG):
        with connect(url) as s:
            s.sendall(
                b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\nzz\r\n"
            )
            status, _, body = read_answer(s)
        time.sleep(0.3)
        after = failures(url)
    assert status == 400 and json_error(body)["code"] == "bad_http"
    assert after.get("internal", 0) == before.get("internal", 0)
    assert after["bad_http"] - before.get("bad_http", 0) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text  # uvicorn's one WARNING line
