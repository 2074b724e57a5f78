"""Start the default model on a real vLLM engine for a benchmark, the way `leanserve serve` does."""
from __future__ import annotations

import contextlib
import signal
from pathlib import Path

from kernels.model_prep import DEFAULT_MODEL_NAME, default_model_dir, validate_model_dir, verify
from server.supervisor import EngineProcess, cpu_engine, engine_command, engine_env
from tests.support.servers import free_port


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def default_engine(extra_args: str = "", model_dir: str | Path | None = None):
    """Yields the engine's base URL; the engine is stopped on exit.

    model_dir: serve this HF directory instead of the prepared default model (e.g. a pruned copy of it),
    under the same served name, MODEL, so request bodies do not change.
    """
    if model_dir is None:
        model_dir = default_model_dir()
        if not verify(model_dir):
            raise SystemExit("prepare the default model first: leanserve prepare-model")
    else:
        validate_model_dir(Path(model_dir))
    port = free_port()
    cpu = cpu_engine()
    eng = EngineProcess(engine_command(str(model_dir), DEFAULT_MODEL_NAME, port, "float32", extra_args, cpu),
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
