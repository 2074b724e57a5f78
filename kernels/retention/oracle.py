"""A hindsight reference for eviction, `leanserve eval kv --methods oracle`: at every compaction keep, per layer
and KV head, the M cached tokens that full attention will give the most attention to from the next query to
the end of the sequence. It reads the future, so no engine can run it; it shows how much of the KL a policy
that scores tokens and keeps the top M can remove at a budget, so a learned policy's gap to a baseline can be
read against the room there is.

The future attention comes from one full-attention pass (this model, no eviction; rank.py computes it, the
same target the rank training objective uses): per layer, the softmax probabilities summed over the query
heads of each KV head and over the queries from a start position on, for each start where the bounded cache
will compact (compaction_starts).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .llama import Parts
from .rank import layer_inputs_and_future
from .reference import BoundedCache, Policy


def compaction_starts(budget: int, buffer: int, n_tokens: int) -> list[int]:
    """Token counts `seen` after which a bounded cache fed n_tokens at once compacts (BoundedCache's rule):
    the first query that the kept set serves is at position `seen`."""
    cache = BoundedCache(1, budget, buffer, OraclePolicy())
    starts, held, seen = [], 0, 0
    for take in cache.pieces(n_tokens):
        seen, held = seen + take, held + take
        if held >= cache.capacity:
            starts.append(seen)
            held = budget
    return starts


def future_attention(parts: Parts, ids: torch.Tensor, starts: list[int]) -> list[dict[int, torch.Tensor]]:
    """ids [T] -> per layer {start: [Hkv, T] attention that keys receive from queries at positions >= start}
    under full causal attention (probabilities summed over each KV head's query heads)."""
    starts = sorted(set(starts))
    return [dict(zip(starts, future)) for _, future in layer_inputs_and_future(parts, ids, starts)]


@dataclass
class OraclePolicy(Policy):
    """Keeps the tokens with the most future attention. Each LayerCache's state["future"] must hold that
    layer's future_attention dict before the sequence is fed (set_future)."""
    name = "oracle"

    def score(self, layer, t):
        return layer.state["future"][t - 1].gather(1, layer.pos)


def set_future(cache: BoundedCache, future: list[dict[int, torch.Tensor]]) -> None:
    for layer, f in zip(cache.layers, future):
        layer.state["future"] = f
