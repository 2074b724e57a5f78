"""The KV cache spec of a bounded layer: one ring of C = M + B slots per request (a CircularBufferSpec,
so vLLM's CircularBufferManager claims exactly one block at admission and frees it at the end, and
vLLM's capacity and max-concurrency figures count one page per request).

The page also holds the ring's side tables, int32 logical position and float32 log beta per
(KV head, slot), after the K and V rows (page_size_padded), so vLLM's memory accounting is true.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.utils.math_utils import cdiv
from vllm.v1.kv_cache_interface import CircularBufferSpec

SIDE_BYTES = 8  # int32 position + float32 log beta per (KV head, slot)


@dataclass(frozen=True, kw_only=True)
class BoundedRingSpec(CircularBufferSpec):
    budget: int
    buffer: int

    @classmethod
    def make(cls, num_kv_heads: int, head_size: int, dtype: torch.dtype, budget: int, buffer: int):
        c = budget + buffer
        dense = num_kv_heads * c * 2 * head_size * dtype.itemsize
        return cls(block_size=c, num_kv_heads=num_kv_heads, head_size=head_size, dtype=dtype,
                   budget=budget, buffer=buffer, page_size_padded=dense + num_kv_heads * c * SIDE_BYTES)

    def max_num_blocks_per_req(self, vllm_config, max_len: int) -> int:
        # The CPU runner's generic slot-mapping code (vLLM csrc/cpu/utils.cpp) reads block-table rows this
        # wide without a bounds check: keep them as wide as an unbounded request would need. Only entry 0
        # (the ring) is ever set; the rest stay the null block.
        del max_len
        return cdiv(vllm_config.model_config.max_model_len, self.block_size)
