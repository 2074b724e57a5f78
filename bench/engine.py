"""Start the default model on a real vLLM engine for a benchmark, the way `leanserve serve` does."""
from __future__ import annotations

import contextlib
import signal

from kernels.model_prep import DEFAULT_MODEL_NAME, default_model_dir, verify
from server.supervisor import EngineProcess, cpu_engine, engine_command, engine_env
from tests.support.servers import free_port


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def default_engine(extra_args: str = ""):
    """Yields the engine's base URL; the engine is stopped on exit."""
    if not verify(default_model_dir()):
        raise SystemExit("prepare the default model first: leanserve prepare-model")
    port = free_port()
    cpu = cpu_engine()
    eng = EngineProcess(engine_command(str(default_model_dir()), DEFAULT_MODEL_NAME, port, "float32", extra_args, cpu),
                        engine_env(cpu), port)
    # SIGTERM must still stop the engine (it runs in its own session and would be orphaned).
    signal.signal(signal.SIGTERM, _interrupt)
    eng.start()
    try:
        eng.wait_healthy(900)
        yield eng.url
    finally:
        eng.stop()


MODEL = DEFAULT_MODEL_NAME
