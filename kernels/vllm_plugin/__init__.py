"""leanserve inside vLLM. Each module binds one kernel to one vLLM interface:

* top_h.py — Top-H logits processors (loaded with vLLM's --logits-processors).
* sparse24.py — 2:4 sparse linear layers: a QuantizationConfig named "leanserve-2of4"
  (select with vLLM's --quantization leanserve-2of4 on a checkpoint from `leanserve prune`).
* armor.py — the same method on an ARMOR checkpoint (`--method armor`): the 2:4 core between block-diagonal wrappers.
* bounded_kv/ — the retention-gated bounded KV cache (BoundedLlamaForCausalLM, selected with
  --hf-overrides; `leanserve serve --kv-budget M` sets it up).

`register()` is leanserve's vLLM general plugin (entry point group "vllm.general_plugins",
declared in pyproject.toml). vLLM calls it in every process it starts (API server, engine
core, workers) before it parses arguments or builds the model, so the quantization config is
registered wherever it is looked up. It must stay cheap and safe to call more than once.
"""


def register() -> None:
    """Register leanserve's vLLM extensions (importing sparse24 registers "leanserve-2of4")."""
    from . import sparse24  # noqa: F401  (registration happens at import, once per process)
    from .bounded_kv import register as register_bounded_kv
    register_bounded_kv()
