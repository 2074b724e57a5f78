"""Retention-gated KV eviction (after TRIM-KV, Bui et al. 2025): learned per-token retention gates and
a bounded per-layer, per-KV-head cache that keeps the top-M tokens by log beta_i * (t - i).

reference.py is the specification (eviction, baselines, capacity sum); ops.py dispatches to the
Triton kernels (triton_compact.py, triton_capacity.py) on CUDA and to vectorised torch on CPU;
gate.py holds the gates and their checkpoint format; llama.py the gated forward passes;
train.py / evaluate.py / cli.py are `leanserve train-gates` and `leanserve eval kv`; rank.py is train-gates'
second objective (against hindsight) and oracle.py eval kv's hindsight reference, both on the same
future-attention pass; evict.py the third objective (the KL of the served eviction schedule, relaxed).
"""
from .gate import GateError, GateMeta, GateSet
from .ops import capacity_sum, compact_
from .reference import BoundedCache, capacity_sum_reference, compact_reference, make_policy

__all__ = ["GateError", "GateMeta", "GateSet", "capacity_sum", "compact_", "BoundedCache",
           "capacity_sum_reference", "compact_reference", "make_policy"]
