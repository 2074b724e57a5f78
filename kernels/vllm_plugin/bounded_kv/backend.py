"""Attention backend of the bounded ring: vLLM's stock CPU attention kernel over the ring between
compactions, batched retention compaction when a ring fills.

RoPE is applied before caching and each ring is kept prefix-compact per KV head (slots [0, count) valid),
so the stock kernel attends over a ring as if it were a one-block sequence of `count` tokens: the new
tokens are written at [count, count + L) and the kernel runs causally with seq_lens = count + L and
block_table = [[ring]]. Only compaction needs new code (kernels/retention/ops.compact_: batched torch on
CPU, the Triton kernel on CUDA), once every `buffer` tokens per request, for all full rings at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm import _custom_ops as vops
from vllm import envs
from vllm.config import VllmConfig, get_layers_from_vllm_config
from vllm.v1.attention.backend import (AttentionBackend, AttentionImpl, AttentionMetadataBuilder, AttentionType,
                                       CommonAttentionMetadata, MultipleOf)
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
from vllm.v1.kv_cache_interface import KVCacheLayout

from kernels.retention.ops import compact_

from . import metrics
from .layout import cache_maps
from .plan import Round, plan_step
from .spec import BoundedRingSpec

NAME = "LEANSERVE_BOUNDED_KV"


class BoundedKVBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = True  # the ring write happens inside forward
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return NAME

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(1)]  # the ring is one block of C slots, never split

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)  # the CPU kernel's head-major pages

    @staticmethod
    def get_impl_cls() -> type["BoundedKVImpl"]:
        return BoundedKVImpl

    @staticmethod
    def get_builder_cls() -> type["BoundedKVMetadataBuilder"]:
        return BoundedKVMetadataBuilder


@dataclass
class BoundedKVMetadata:
    num_actual_tokens: int
    rounds: list[Round]
    k_inv: torch.Tensor  # layout.cache_maps: where the kernel keeps (slot, dim) of K / V
    v_inv: torch.Tensor


class BoundedKVMetadataBuilder(AttentionMetadataBuilder[BoundedKVMetadata]):
    """One plan per step for every bounded layer (the ring count depends on the tokens seen only)."""

    def __init__(self, kv_cache_spec: BoundedRingSpec, layer_names, vllm_config: VllmConfig, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        assert isinstance(kv_cache_spec, BoundedRingSpec), kv_cache_spec
        self.m, self.b = kv_cache_spec.budget, kv_cache_spec.buffer
        self.num_kv_heads, self.head_dim = kv_cache_spec.num_kv_heads, kv_cache_spec.head_size
        self.num_heads = vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
        self.dtype = vllm_config.model_config.dtype
        self.isa = _get_attn_isa(self.dtype, kv_cache_spec.block_size, self.head_dim, "auto")
        from vllm.model_executor.layers.attention import Attention
        for layer in get_layers_from_vllm_config(vllm_config, Attention, layer_names).values():
            layer.isa = self.isa
        self.metrics = metrics.RingGauges(self.m, self.b)
        self.k_inv, self.v_inv = cache_maps(self.isa, kv_cache_spec.block_size, self.head_dim, kv_cache_spec.dtype)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> BoundedKVMetadata:
        cm = common_attn_metadata
        n = cm.num_reqs
        seq = cm.seq_lens[:n].cpu()
        rings = cm.block_table_tensor[:n, 0].cpu()
        rounds = plan_step(cm.query_start_loc_cpu[:n + 1], seq, rings, self.m, self.b, cm.num_actual_tokens)
        for r in rounds:
            r.scheduler_metadata = vops.cpu_attn_get_scheduler_metadata(
                num_reqs=r.rings.numel(), num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                head_dim=self.head_dim, seq_lens=r.ring_lens, dtype=self.dtype, query_start_loc=r.query_start_loc,
                causal=True, sliding_window_size=-1, isa=self.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV)
            r.block_table = r.rings.view(-1, 1)
        self.metrics.observe(seq)
        return BoundedKVMetadata(num_actual_tokens=cm.num_actual_tokens, rounds=rounds, k_inv=self.k_inv,
                                 v_inv=self.v_inv)


class BoundedKVImpl(AttentionImpl):
    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 **kw):
        if alibi_slopes is not None or sliding_window is not None or logits_soft_cap or kv_sharing_target_layer_name:
            raise NotImplementedError("the bounded KV backend supports plain causal attention only")
        if attn_type != AttentionType.DECODER or kv_cache_dtype != "auto":
            raise NotImplementedError("the bounded KV backend supports decoder attention with an unquantised cache")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        self.sinks = None

    def forward(self, layer, query, key, value, kv_cache, attn_metadata: BoundedKVMetadata | None, output,
                output_scale=None, output_block_scale=None):
        if attn_metadata is None:  # profiling / warm-up
            return output
        nb, h, c, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(nb, h, 2 * c, -1).chunk(2, dim=2)
        n = attn_metadata.num_actual_tokens
        log_beta = layer.pending_log_beta
        for r in attn_metadata.rounds:
            if r.tokens is None:
                q, k, v, lb, out = query[:n], key[:n], value[:n], log_beta[:n], output[:n]
            else:
                q, k, v, lb = query[r.tokens], key[r.tokens], value[r.tokens], log_beta[r.tokens]
                out = torch.empty_like(q)
            vops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, r.slot_mapping, layer.isa)
            layer.ring_pos[r.token_rings, :, r.slots] = r.positions[:, None]
            layer.ring_log_beta[r.token_rings, :, r.slots] = lb
            vops.cpu_attention_with_kv_cache(
                query=q, key_cache=key_cache, value_cache=value_cache, output=out,
                query_start_loc=r.query_start_loc, seq_lens=r.ring_lens, scale=self.scale, causal=True,
                alibi_slopes=None, sliding_window=-1, block_table=r.block_table, softcap=0,
                scheduler_metadata=r.scheduler_metadata, s_aux=None)
            if r.tokens is not None:
                output[r.tokens] = out
            if r.compact_rings.numel():
                compact_rings(key_cache, value_cache, layer.ring_pos, layer.ring_log_beta, r.compact_rings,
                              r.compact_t, layer.budget, layer.sinks, attn_metadata, layer.isa)
        return output


def compact_rings(key_cache, value_cache, pos, log_beta, rings, t, m: int, sinks: int, md, isa: str) -> None:
    """Keep each full ring's top-M slots per KV head, in position order, at slots [0, M): read the rings
    in the kernel's layout, compact them batched (ops.compact_), write the kept slots back with the
    kernel's own write op."""
    nb, h, c, d = key_cache.shape
    n = rings.numel()
    k = key_cache.flatten(2)[rings][:, :, md.k_inv].view(n, h, c, d)
    v = value_cache.flatten(2)[rings][:, :, md.v_inv].view(n, h, c, d)
    p, lb = pos[rings], log_beta[rings]
    count = torch.full((n,), c, dtype=torch.long, device=k.device)
    compact_(k, v, p, lb, count, t.to(k.device), m, sinks)
    keys = k[:, :, :m].transpose(1, 2).reshape(n * m, h, d)
    vals = v[:, :, :m].transpose(1, 2).reshape(n * m, h, d)
    slots = (rings[:, None] * c + torch.arange(m, device=rings.device)[None, :]).reshape(-1)
    vops.cpu_attn_reshape_and_cache(keys, vals, key_cache, value_cache, slots, isa)
    pos[rings, :, :m] = p[:, :, :m]
    log_beta[rings, :, :m] = lb[:, :, :m]
