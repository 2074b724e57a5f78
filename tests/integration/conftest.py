"""One real vLLM CPU engine with the default model for the whole test session, started the way users
start it: `leanserve serve` (embedded engine + gateway) as a child process."""
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.support.servers import free_port

MODEL = "SmolLM2-135M-Instruct"


class Served:
    def __init__(self, url: str, engine_url: str, proc: subprocess.Popen):
        self.url, self.engine_url, self.proc = url, engine_url, proc


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    port, engine_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--engine-port", str(engine_port),
           "--health-interval", "0.5", "--log-level", "warning"]
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            pytest.fail(f"leanserve serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > 600:
            proc.kill()
            pytest.fail("leanserve serve was not ready within 600 s:\n" + log.read_text()[-4000:])
        time.sleep(0.5)
    yield Served(url, f"http://127.0.0.1:{engine_port}", proc)
    # SIGTERM must stop the gateway and its engine, leaving nothing behind.
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(60)
    assert rc == 0, log.read_text()[-4000:]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{engine_port}/health", timeout=2)
