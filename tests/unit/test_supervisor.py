"""The engine supervisor and `leanserve serve --engine`, with the fake engine standing in for vLLM."""
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from server.supervisor import EngineError, EngineProcess, engine_command, engine_env
from tests.support.servers import free_port

FAKE_ENGINE = ("import uvicorn, sys; from tests.support.fake_upstream import FakeUpstream; "
               "uvicorn.run(FakeUpstream(), host='127.0.0.1', port=int(sys.argv[1]), log_level='info')")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_engine_command_cpu_settings():
    cmd = engine_command("/m", "name", 9000, "float32", "--max-model-len 2048", cpu=True)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert "--enforce-eager" in cmd and cmd[-2:] == ["--max-model-len", "2048"]
    assert "--enforce-eager" not in engine_command("/m", "n", 1, "auto", "", cpu=False)
    env = engine_env(cpu=True)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")


def test_waits_for_health_and_stops(capfd):
    port = free_port()
    eng = EngineProcess([sys.executable, "-c", FAKE_ENGINE, str(port)], {**os.environ, "PYTHONPATH": ROOT}, port)
    eng.start()
    try:
        eng.wait_healthy(30)
        assert httpx.get(eng.url + "/health").status_code == 200
    finally:
        eng.stop()
    assert eng.returncode() is not None
    with pytest.raises(httpx.ConnectError):
        httpx.get(eng.url + "/health")
    assert "[engine] " in capfd.readouterr().err  # logs are forwarded with a prefix


def test_engine_dying_is_reported_with_its_last_lines():
    eng = EngineProcess([sys.executable, "-c", "print('boom: no GPU'); raise SystemExit(3)"], dict(os.environ),
                        free_port())
    eng.start()
    with pytest.raises(EngineError) as e:
        eng.wait_healthy(30)
    assert "code 3" in str(e.value) and "boom: no GPU" in str(e.value)


def test_engine_start_timeout():
    eng = EngineProcess([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ), free_port())
    eng.start()
    try:
        with pytest.raises(EngineError, match="did not become healthy within 1s"):
            eng.wait_healthy(1, interval=0.1)
    finally:
        eng.stop(grace=5)


def test_serve_in_front_of_existing_engine_and_sigterm(upstream):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--engine", upstream.url,
                             "--port", str(port), "--log-level", "warning"], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            try:
                if httpx.get(url + "/ready").status_code == 200:
                    break
            except httpx.ConnectError:
                pass
            assert time.monotonic() - t0 < 30 and proc.poll() is None
            time.sleep(0.1)
        r = httpx.post(url + "/v1/chat/completions", json={"model": "fake-model", "max_tokens": 2,
                                                           "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_invalid_configuration_exits_2():
    r = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--engine", "ftp://x"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "engine URL must start with http" in r.stderr
