"""BoundedLlamaForCausalLM: vLLM's Llama with every attention layer on the bounded ring and a retention
gate per layer. Selected with --hf-overrides '{"architectures": ["BoundedLlamaForCausalLM"],
"leanserve_bounded_kv": {...}}' (config.engine_args builds it); registered by the plugin.

Built through vLLM's own hooks: LlamaForCausalLM(layer_type=...) and LlamaDecoderLayer(attn_layer_type=...);
the attention module is vLLM's Attention with attn_backend= our backend and our KV cache spec.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM

from .backend import BoundedKVBackend
from .config import BoundedKVConfig, BoundedKVError
from .spec import SIDE_BYTES, BoundedRingSpec

log = logging.getLogger("vllm.leanserve.bounded_kv")  # inside vLLM's logger namespace: its handler prints it


class BoundedAttention(Attention):
    """vLLM's Attention on the bounded backend; owns the ring's side tables (views into its pages)."""

    def __init__(self, *args, bounded: BoundedKVConfig, **kw):
        super().__init__(*args, attn_backend=BoundedKVBackend, **kw)
        self.budget, self.buffer, self.sinks = bounded.budget, bounded.buffer, bounded.sinks
        self.pending_log_beta: torch.Tensor | None = None  # set by the layer before each call
        self.ring_pos = self.ring_log_beta = None

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> BoundedRingSpec:
        return BoundedRingSpec.make(self.num_kv_heads, self.head_size, self.kv_cache_torch_dtype,
                                    self.budget, self.buffer)

    def bind_kv_cache(self, kv_cache: torch.Tensor) -> None:
        super().bind_kv_cache(kv_cache)
        if kv_cache.numel() == 0:
            return
        nb, h, c, d2 = kv_cache.shape
        es = kv_cache.element_size()
        page, dense = kv_cache.stride(0) * es, h * c * d2 * es
        assert page >= dense + h * c * SIDE_BYTES, "the ring page has no room for its side tables"
        raw = torch.empty(0, dtype=torch.uint8, device=kv_cache.device).set_(kv_cache.untyped_storage())
        base = kv_cache.storage_offset() * es + dense

        def table(offset: int, dtype: torch.dtype) -> torch.Tensor:
            b = raw.as_strided((nb, h * c * 4), (page, 1), base + offset)
            return b.view(dtype).view(nb, h, c)

        self.ring_pos = table(0, torch.int32)
        self.ring_log_beta = table(h * c * 4, torch.float32)


class RetentionGate(nn.Module):
    """kernels/retention/gate.py's gate in float32 (its weights come from the gate checkpoint)."""

    def __init__(self, hidden: int, inner: int, heads: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, inner, bias=True, dtype=torch.float32)
        self.w2 = nn.Linear(inner, heads, bias=False, dtype=torch.float32)
        self.b = nn.Parameter(torch.zeros(heads, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.logsigmoid(self.w2(F.silu(self.w1(x.float()))) + self.b)


class BoundedLlamaAttention(LlamaAttention):
    def __init__(self, config, hidden_size, num_heads, num_kv_heads, *args, prefix: str = "", **kw):
        super().__init__(config, hidden_size, num_heads, num_kv_heads, *args, prefix=prefix, **kw)
        bounded = BoundedKVConfig.from_hf(config)
        name = f"{prefix}.attn"
        vllm_config = get_current_vllm_config()
        # The stock Attention registered itself under this name; duplicates raise.
        del vllm_config.compilation_config.static_forward_context[name]
        self.attn = BoundedAttention(self.num_heads, self.head_dim, self.scaling, num_kv_heads=self.num_kv_heads,
                                     cache_config=vllm_config.cache_config, quant_config=kw.get("quant_config"),
                                     prefix=name, bounded=bounded)
        self.gate = RetentionGate(hidden_size, _gate_inner(bounded), self.num_kv_heads)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        self.attn.pending_log_beta = self.gate(hidden_states)  # the q/k/v input, before RoPE
        return super().forward(positions, hidden_states)


def _gate_inner(bounded: BoundedKVConfig) -> int:
    from .config import read_gate_meta
    return int(read_gate_meta(bounded.gates)["intermediate_size"])


class BoundedLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None):
        super().__init__(vllm_config, prefix, config, attn_layer_type=BoundedLlamaAttention)


def check_engine(vllm_config: VllmConfig) -> None:
    """What the ring cannot serve, refused while the engine starts (one line each)."""
    if vllm_config.cache_config.enable_prefix_caching:
        raise BoundedKVError("the bounded KV cache needs prefix caching off (--no-enable-prefix-caching)")
    if vllm_config.speculative_config is not None:
        raise BoundedKVError("the bounded KV cache does not support speculative decoding")
    pc = vllm_config.parallel_config
    if pc.tensor_parallel_size != 1 or pc.pipeline_parallel_size != 1:
        raise BoundedKVError("the bounded KV cache runs with tensor and pipeline parallel size 1")
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        raise BoundedKVError("the bounded KV cache does not support KV transfer connectors")
    if vllm_config.cache_config.cache_dtype not in ("auto", None):
        raise BoundedKVError("the bounded KV cache needs --kv-cache-dtype auto")


class BoundedLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        check_engine(vllm_config)
        self.bounded = BoundedKVConfig.from_hf(vllm_config.model_config.hf_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=BoundedLlamaDecoderLayer)
        b = self.bounded
        mml = vllm_config.model_config.max_model_len
        log.info("bounded KV cache: budget M=%d, buffer %d, ring C=%d tokens per request, layer and KV head "
                 "(%.1fx fewer than max_model_len %d), %d sinks, gates %s", b.budget, b.buffer, b.capacity,
                 mml / b.capacity, mml, b.sinks, b.gates)

    def load_weights(self, weights) -> set[str]:
        loaded = super().load_weights(weights)
        return loaded | self._load_gates()

    def _load_gates(self) -> set[str]:
        from kernels.retention.gate import GateSet

        cfg = self.config
        gates = GateSet.load(self.bounded.gates)
        gates.meta.check_model(cfg.hidden_size, cfg.num_hidden_layers,
                               getattr(cfg, "num_key_value_heads", cfg.num_attention_heads))
        names = set()
        for i, layer in enumerate(self.model.layers):
            g, src = layer.self_attn.gate, gates[i]
            with torch.no_grad():
                g.w1.weight.copy_(src.w1.weight)
                g.w1.bias.copy_(src.w1.bias)
                g.w2.weight.copy_(src.w2.weight)
                g.b.copy_(src.b)
            names |= {f"model.layers.{i}.self_attn.gate.{p}" for p in ("w1.weight", "w1.bias", "w2.weight", "b")}
        return names
