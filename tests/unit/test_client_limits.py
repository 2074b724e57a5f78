"""Hostile or slow clients: header floods and oversized headers are refused (431), slow-loris headers and
bodies are cut at their deadline (408), connections beyond the cap are refused (503), and many unfinished
bodies cannot make the gateway hold more than max_pending_body_bytes. Every refusal is OpenAI-shaped."""
import json
import socket
import time

import httpx

from server.client_limits import ClientLimits

from tests.support.fake_upstream import MODEL
from tests.support.probes import metric, wait_for

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
GUARD = 20  # socket timeout: only there so that a regression fails instead of hanging


def connect(gw) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", gw.port), timeout=GUARD)
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def status_and_error(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


def request_head(path: str = "/v1/chat/completions", extra: bytes = b"", length: int | None = None) -> bytes:
    cl = b"content-length: %d\r\n" % length if length is not None else b""
    return b"POST " + path.encode() + b" HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n" + cl + extra


def test_oversized_header_is_431(upstream, make_gateway):
    gw = make_gateway([upstream.url], max_header_bytes=4096)
    r = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, headers={"x-big": "a" * 8000})
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
    assert httpx.post(gw.url + "/v1/chat/completions", json=CHAT, headers={"x-ok": "a" * 1000}).status_code == 200


def test_a_16mb_header_is_cut_before_it_is_buffered(upstream, make_gateway):
    gw = make_gateway([upstream.url], max_header_bytes=4096)
    s = connect(gw)
    s.sendall(request_head(extra=b"x-big: "))
    try:
        for _ in range(16 * 16):  # 16 MB in 64 KB pieces; the server closes long before
            s.sendall(b"a" * 65536)
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        raw = read_all(s)
    except ConnectionResetError:
        raw = b""
    if raw:
        assert status_and_error(raw)[0] == 431
    assert metric(gw.url, "leanserve_client_limit_hits_total", limit="headers_too_large") == 1


def test_header_flood_is_431(upstream, make_gateway):
    gw = make_gateway([upstream.url], max_headers=50)
    headers = {f"x-h{i}": "v" for i in range(200)}
    r = httpx.post(gw.url + "/v1/chat/completions", json=CHAT, headers=headers)
    assert r.status_code == 431 and r.json()["error"]["code"] == "too_many_headers"


def test_slow_loris_headers_are_cut_at_the_deadline(upstream, make_gateway):
    gw = make_gateway([upstream.url], header_timeout=0.3)
    trickling = connect(gw)
    trickling.sendall(request_head()[:20])  # and never the rest
    silent = connect(gw)  # connects and sends nothing at all
    for s in (trickling, silent):
        status, err = status_and_error(read_all(s))
        assert status == 408 and err["code"] == "header_timeout"
    assert metric(gw.url, "leanserve_client_limit_hits_total", limit="header_timeout") == 2
    assert httpx.post(gw.url + "/v1/chat/completions", json=CHAT).status_code == 200


def test_slow_body_is_cut_at_the_deadline(upstream, make_gateway):
    gw = make_gateway([upstream.url], body_timeout=0.3)
    s = connect(gw)
    s.sendall(request_head(length=1000) + b"\r\n" + b'{"model": ')  # 10 of 1000 bytes, then silence
    status, err = status_and_error(read_all(s))
    assert status == 408 and err["code"] == "body_timeout"
    assert len(upstream.requests) == 0
    assert wait_for(lambda: metric(gw.url, "leanserve_request_body_bytes_reserved") == 0)


def test_connections_beyond_the_cap_are_refused(upstream, make_gateway):
    gw = make_gateway([upstream.url], max_connections=3, header_timeout=60)
    held = [connect(gw) for _ in range(3)]
    assert wait_for(lambda: len(gw.server.server_state.connections) == 3)
    extra = connect(gw)
    status, err = status_and_error(read_all(extra))
    assert status == 503 and err["code"] == "too_many_connections"
    for s in held:
        s.close()
    assert wait_for(lambda: len(gw.server.server_state.connections) == 0)
    assert httpx.post(gw.url + "/v1/chat/completions", json=CHAT).status_code == 200


def test_unfinished_bodies_stay_within_the_budget(upstream, make_gateway):
    budget, size = 16 * 1024 * 1024, 7 * 1024 * 1024
    gw = make_gateway([upstream.url], max_pending_body_bytes=budget, body_timeout=60)
    held = []

    def seen() -> int:  # bodies reserved + bodies refused: each request, once the gateway has decided on it
        return (metric(gw.url, "leanserve_request_body_bytes_reserved") // size
                + metric(gw.url, "leanserve_rejections_total", reason="body_budget"))
    for i in range(30):
        s = connect(gw)
        s.sendall(request_head(length=size) + b"\r\n" + b"x" * 65536)  # 64 KB of 7 MB, then nothing
        held.append(s)
        assert wait_for(lambda: seen() == i + 1)  # one at a time, so the first two are the ones admitted
    # The first two fit the budget and wait for the rest of their bodies; every other one is refused at once,
    # and its connection is closed at once (its unread body would otherwise hold it open).
    for s in held[2:]:
        raw = read_all(s)
        status, err = status_and_error(raw)
        assert status == 429 and err["code"] == "body_budget" and b"connection: close" in raw.lower()
    assert metric(gw.url, "leanserve_request_body_bytes_reserved") == 2 * size <= budget
    for s in held:
        s.close()
    assert wait_for(lambda: metric(gw.url, "leanserve_request_body_bytes_reserved") == 0)
    assert httpx.post(gw.url + "/v1/chat/completions", json=CHAT).status_code == 200


def test_a_refused_body_still_arriving_gets_its_answer_not_a_reset(upstream, make_gateway):
    gw = make_gateway([upstream.url], max_pending_body_bytes=1024 * 1024)
    s = connect(gw)
    s.sendall(request_head(length=8 * 1024 * 1024) + b"\r\n" + b"x" * 65536)
    time.sleep(0.3)  # refused by now; the client goes on sending, as clients that write the body first do
    for _ in range(16):
        s.sendall(b"x" * 65536)
    status, err = status_and_error(read_all(s))  # the answer, then the server's FIN; no reset
    assert status == 429 and err["code"] == "body_budget"
    # The server half-closed and discards input until the client closes or the linger time is over.
    assert wait_for(lambda: len(gw.server.server_state.connections) == 0, timeout=ClientLimits.linger + 5)
    s.close()
    assert httpx.post(gw.url + "/v1/chat/completions", json=CHAT).status_code == 200
