"""Retention-gated bounded per-request KV cache inside vLLM (after TRIM-KV), through public extension
points only (README, bounded KV cache):

* config.py — settings carried in --hf-overrides, the start-up refusals, the engine arguments (torch-free);
* spec.py — BoundedRingSpec, a CircularBufferSpec: one ring block of C = M + B slots per request,
  side tables folded into the page;
* plan.py — per step: which tokens go to which ring slots, in which rounds, which rings compact;
* backend.py — attention backend + metadata builder: vLLM's stock CPU attention kernel over the ring,
  batched compaction (kernels/retention/ops.compact_);
* model.py — BoundedLlamaForCausalLM (the gates are loaded with the weights);
* metrics.py — Prometheus gauges: KV tokens held vs unbounded, the budget.
"""


def register() -> None:
    """Called by kernels.vllm_plugin.register in every vLLM process. Cheap: names only, no imports of
    the model code until vLLM resolves the architecture / backend."""
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if "BoundedLlamaForCausalLM" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model("BoundedLlamaForCausalLM",
                                     "kernels.vllm_plugin.bounded_kv.model:BoundedLlamaForCausalLM")
    if "LEANSERVE_BOUNDED_KV" not in AttentionBackendEnum.__members__:
        register_backend("LEANSERVE_BOUNDED_KV", "kernels.vllm_plugin.bounded_kv.backend.BoundedKVBackend")
    from .metrics import declare
    declare()
