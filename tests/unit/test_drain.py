"""SIGTERM on a real `leanserve serve` process (in front of a fake engine): /ready turns 503 while the
listener is still open, new requests get 503, a short stream in flight completes, a long one ends with an
error event + [DONE] once the grace period is over, no traceback is logged, and the exit code is 0."""
import json
import os
import signal
import subprocess
import sys
import threading

import httpx

from tests.support.fake_upstream import MODEL
from tests.support.probes import wait_for
from tests.support.servers import free_port
from tests.unit.sse import events

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
GRACE = 10  # seconds: long enough for the short stream to finish after the gate opens, even on a busy machine


def start_gateway(engine_url: str, tmp_path, *extra: str):
    port = free_port()
    log = open(tmp_path / "gateway.log", "wb")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--engine", engine_url, "--port", str(port),
                             "--health-interval", "0.2", "--shutdown-grace", str(GRACE), *extra],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"

    def ready():
        try:
            return httpx.get(url + "/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
    assert wait_for(ready, timeout=60), (tmp_path / "gateway.log").read_text()
    return proc, url


def stream_in_thread(url: str, body: dict, out: dict, key: str) -> threading.Thread:
    def run():
        with httpx.Client(timeout=60) as c:
            r = c.post(url + "/v1/chat/completions", json=body)
            out[key] = (r.status_code, r.text)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_sigterm_drains_then_exits_0(upstream, tmp_path):
    proc, url = start_gateway(upstream.url, tmp_path)
    try:
        out: dict = {}
        short = stream_in_thread(url, {**CHAT, "max_tokens": 4, "fake_wait_gate": True}, out, "short")
        long = stream_in_thread(url, {**CHAT, "max_tokens": 1000, "fake_stall_after": 2}, out, "long")
        assert wait_for(lambda: upstream.active == 2, timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: httpx.get(url + "/ready", timeout=5).status_code == 503, timeout=30)
        late = httpx.post(url + "/v1/chat/completions", json=CHAT, timeout=30)
        assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        upstream.gate.set()  # the short stream may finish now, within the grace period
        short.join(60)
        long.join(60)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "gateway.log").read_text()
    assert rc == 0, log
    assert "Traceback" not in log, log
    status, text = out["short"]
    ev = events(text)
    assert status == 200 and [e["choices"][0]["delta"]["content"] for e in ev[:-1]] == [f"tok{i} " for i in range(4)]
    assert ev[-1] == "[DONE]"
    status, text = out["long"]
    ev = events(text)
    assert status == 200 and [e["choices"][0]["delta"]["content"] for e in ev[:2]] == ["tok0 ", "tok1 "]
    assert ev[2]["error"]["code"] == "shutting_down" and ev[3] == "[DONE]" and len(ev) == 4
    assert wait_for(lambda: upstream.active == 0)  # the engine saw the long request closed (vLLM aborts it)


def test_json_logs_without_prompts(upstream, tmp_path):
    proc, url = start_gateway(upstream.url, tmp_path, "--log-format", "json")
    try:
        secret = "my-secret-prompt-text"
        r = httpx.post(url + "/v1/chat/completions", timeout=30, headers={"x-request-id": "rid-1"},
                       json={**CHAT, "messages": [{"role": "user", "content": secret}], "fake_break_after": 1})
        assert r.status_code == 200  # the stream broke: a warning naming the request is logged
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = (tmp_path / "gateway.log").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert any("rid-1" in rec["message"] for rec in records), lines
    assert all(secret not in line for line in lines)
    assert {"time", "level", "logger", "message"} <= set(records[0])
