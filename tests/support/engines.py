"""A vLLM CPU engine of leanserve's own supervisor (server/supervisor.py) for integration tests that start their
own: float32, the whole log kept (tests look for lines in it), and an engine that must refuse to start."""
from __future__ import annotations

import collections

import pytest

from server.supervisor import EngineError, EngineProcess, cpu_engine, engine_command, engine_env
from tests.support.servers import free_port


def start_engine(model_dir, name: str, extra: str, env: dict[str, str] | None = None) -> EngineProcess:
    port, cpu = free_port(), cpu_engine()
    eng = EngineProcess(engine_command(str(model_dir), name, port, "float32", extra, cpu),
                        {**engine_env(cpu), **(env or {})}, port)
    eng.tail = collections.deque(maxlen=5000)
    eng.start()
    return eng


def refused_start_log(eng: EngineProcess, timeout: float = 300) -> str:
    """Waits for an engine that must stop during start-up (EngineError), stops it, returns its whole log."""
    try:
        with pytest.raises(EngineError):
            eng.wait_healthy(timeout)
    finally:
        eng.stop()
    return "\n".join(eng.tail)
