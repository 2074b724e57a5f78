"""leanserve's vLLM plugin (entry point group vllm.general_plugins). vLLM calls register() in every
process it starts (API server, engine core, workers) before the model is built."""
from __future__ import annotations

import logging

log = logging.getLogger("leanserve.vllm_plugin")
_done = False


def register() -> None:
    global _done
    if _done:
        return
    _done = True
    log.info("leanserve vLLM plugin loaded")
