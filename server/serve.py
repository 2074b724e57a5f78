"""`leanserve serve`: the gateway, plus (without --engine) an embedded vLLM engine it supervises."""
from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
import sys
from pathlib import Path

import uvicorn

from .app import create_app
from .config import Settings
from .drain import DrainingServer
from .redact import redact_url
from .supervisor import EngineError, EngineProcess, cpu_engine, engine_command, engine_env

log = logging.getLogger("leanserve")


class ServeError(RuntimeError):
    pass


def resolve_model(settings: Settings) -> tuple[str, str]:
    """(model directory, served name) for the embedded engine; prepares the default model if needed."""
    # model_prep imports torch lazily, so verify() is cheap; conversion runs in a child process so the
    # gateway never holds torch in memory.
    from kernels import model_prep

    if settings.model:
        path = Path(settings.model).expanduser()
        try:
            model_prep.validate_model_dir(path)
        except model_prep.PrepareError as e:
            raise ServeError(str(e))
        return str(path), settings.served_model_name or path.name
    path = model_prep.default_model_dir()
    if not model_prep.verify(path):
        log.info("preparing the default model %s under %s", model_prep.DEFAULT_MODEL_NAME, path)
        rc = subprocess.call([sys.executable, "-m", "server.cli", "prepare-model"])
        if rc != 0:
            raise ServeError("could not prepare the default model (see above)")
    return str(path), settings.served_model_name or model_prep.DEFAULT_MODEL_NAME


def bounded_kv_args(settings: Settings, model_dir: str) -> tuple[str, dict[str, str]]:
    """Extra vLLM arguments and environment for --kv-budget (none without it); refusals as ServeError."""
    if not settings.kv_budget:
        if settings.kv_buffer or settings.retention_gates:
            raise ServeError("--kv-buffer and --retention-gates need --kv-budget")
        return settings.engine_args, {}
    import shlex
    import tempfile

    from kernels.vllm_plugin.bounded_kv.config import METRICS_DIR_ENV, BoundedKVError, engine_args
    try:
        extra = engine_args(model_dir, settings.kv_budget, settings.kv_buffer or None,
                            settings.retention_gates or None, settings.engine_args)
    except BoundedKVError as e:
        raise ServeError(str(e))
    # vLLM's /metrics then aggregates the worker's bounded-cache gauges (bounded_kv/metrics.py).
    d = tempfile.mkdtemp(prefix="leanserve-metrics-")
    env = {METRICS_DIR_ENV: d, "LEANSERVE_METRICS_DIR_OWNED": d}  # removed when the engine stops
    return " ".join(filter(None, [settings.engine_args, shlex.join(extra)])), env


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(settings: Settings) -> int:
    engine: EngineProcess | None = None
    if settings.kv_budget and (settings.engines or settings.engine_dns):
        raise ServeError("--kv-budget configures the embedded engine; start external engines with "
                         "kernels.vllm_plugin.bounded_kv.config.engine_args (README, bounded KV cache)")
    if not settings.engines and not settings.engine_dns:
        model_dir, name = resolve_model(settings)
        extra, env = bounded_kv_args(settings, model_dir)
        cpu = cpu_engine()
        engine = EngineProcess(
            engine_command(model_dir, name, settings.engine_port, settings.engine_dtype, extra, cpu),
            {**engine_env(cpu), **env}, settings.engine_port)
        prev = signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM during start-up: same as Ctrl-C
        try:
            engine.start()
            took = engine.wait_healthy(settings.engine_start_timeout)
            log.info("engine healthy after %.1fs at %s", took, engine.url)
        except KeyboardInterrupt:
            log.info("interrupted while the engine was starting")
            engine.stop()
            return 130
        except EngineError as e:
            engine.stop()
            raise ServeError(str(e))
        finally:
            signal.signal(signal.SIGTERM, prev)
        settings = settings.model_copy(update={"engines": [engine.url]})

    app = create_app(settings)
    # The drain (server/drain.py) has already let requests finish or ended them: uvicorn's own graceful
    # phase only has to close connections.
    # log_config=None: uvicorn's loggers go through ours (JSON when asked) instead of its own handlers.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False, timeout_graceful_shutdown=5, http=app.state.http_protocol,
                            log_config=None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG)
    server = DrainingServer(config, app.state.drain, settings.shutdown_grace)
    died: list[int] = []

    async def watch_engine():
        while engine is not None:
            rc = engine.returncode()
            if rc is not None:
                log.error("the engine exited with code %s; shutting the gateway down", rc)
                died.append(rc)
                server.should_exit = True
                return
            await asyncio.sleep(0.5)

    async def main():
        watcher = asyncio.create_task(watch_engine())
        try:
            await server.serve()
        finally:
            watcher.cancel()

    log.info("gateway on http://%s:%d → %s", settings.host, settings.port,
             ", ".join([redact_url(u) for u in settings.engines] + [f"dns:{t}" for t in settings.engine_dns]))
    # uvicorn re-raises the signal it caught once it has shut down; ours turns SIGTERM into
    # KeyboardInterrupt too, so the engine below is always stopped rather than orphaned.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        log.info("shut down")
    finally:
        if engine is not None:
            engine.stop()
            metrics_dir = engine.env.get("LEANSERVE_METRICS_DIR_OWNED")
            if metrics_dir:
                import shutil
                shutil.rmtree(metrics_dir, ignore_errors=True)
    if died:
        return 1
    return 0
