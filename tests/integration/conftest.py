"""The real vLLM CPU engine for the integration tests: one `leanserve serve` (embedded engine + gateway,
started the way users start it, as a child process) shared by every module that asks for `served`.

One vLLM server at a time (2 cores): modules that start engines of their own are marked `own_engine`,
run after all the others (tests/conftest.py orders them) and ask for `exclusive_engine`, which stops the
shared server first. The engine is started with --logprobs-mode processed_logprobs so that the logprobs a
request gets back are those it was sampled from (after Top-H), which the Top-H tests check."""
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.support.servers import free_port

MODEL = "SmolLM2-135M-Instruct"
ENGINE_ARGS = "--logprobs-mode processed_logprobs"


class Served:
    def __init__(self, url: str, engine_url: str, proc: subprocess.Popen, log):
        self.url, self.engine_url, self.proc, self.log = url, engine_url, proc, log


class SharedServe:
    def __init__(self, tmp_path_factory):
        self.tmp = tmp_path_factory
        self.current: Served | None = None

    def get(self) -> Served:
        if self.current is None:
            self.current = self._start()
        return self.current

    def _start(self) -> Served:
        port, engine_port = free_port(), free_port()
        log = self.tmp.mktemp("serve") / "serve.log"
        cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--engine-port", str(engine_port),
               "--health-interval", "0.5", "--log-level", "warning", "--engine-args", ENGINE_ARGS]
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
        url = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                pytest.fail(f"leanserve serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    return Served(url, f"http://127.0.0.1:{engine_port}", proc, log)
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > 600:
                proc.kill()
                pytest.fail("leanserve serve was not ready within 600 s:\n" + log.read_text()[-4000:])
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM must stop the gateway and its engine, leaving nothing behind."""
        s, self.current = self.current, None
        if s is None:
            return
        s.proc.send_signal(signal.SIGTERM)
        rc = s.proc.wait(60)
        assert rc == 0, s.log.read_text()[-4000:]
        with pytest.raises(httpx.ConnectError):
            httpx.get(s.engine_url + "/health", timeout=2)


@pytest.fixture(scope="session")
def shared_serve(tmp_path_factory):
    mgr = SharedServe(tmp_path_factory)
    yield mgr
    mgr.stop()


@pytest.fixture(scope="module")
def served(shared_serve) -> Served:
    return shared_serve.get()


@pytest.fixture(scope="module")
def exclusive_engine(shared_serve):
    """For modules marked own_engine: no other vLLM server runs while theirs do."""
    shared_serve.stop()
