"""A hindsight reference for eviction, `leanserve eval kv --methods oracle`: at every compaction keep, per layer
and KV head, the M cached tokens that full attention will give the most attention to from the next query to
the end of the sequence. It reads the future, so no engine can run it; it shows how much of the KL a policy
that scores tokens and keeps the top M can remove at a budget, so a learned policy's gap to a baseline can be
read against the room there is.

The future attention comes from one full-attention pass (this model, no eviction): per layer, the softmax
probabilities summed over the query heads of each KV head and over the queries from a start position on, for
each start where the bounded cache will compact (compaction_starts).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .llama import Parts
from .reference import INF, BoundedCache, Policy


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


@torch.no_grad()
def future_attention(parts: Parts, ids: torch.Tensor, starts: list[int]) -> list[dict[int, torch.Tensor]]:
    """ids [T] -> per layer {start: [Hkv, T] attention that keys receive from queries at positions >= start}
    under full causal attention (probabilities summed over each KV head's query heads)."""
    t_len = ids.shape[0]
    h = parts.embed(ids.unsqueeze(0))
    positions = torch.arange(t_len, device=ids.device).unsqueeze(0)
    cos, sin = parts.rope(h, positions)
    g = parts.hq // parts.hkv
    causal = torch.ones(t_len, t_len, dtype=torch.bool, device=ids.device).tril()
    out = []
    for layer in parts.layers:
        q, k, v = parts.qkv(layer, layer.input_layernorm(h), cos, sin)
        logits = torch.matmul(q[0].float(), k[0].repeat_interleave(g, 0).float().transpose(1, 2)) * parts.scale
        p = torch.softmax(logits.masked_fill(~causal, -INF), -1)                  # [Hq, T, T]
        attn = torch.matmul(p, v[0].repeat_interleave(g, 0).float()).to(q.dtype)
        per_kv = p.view(parts.hkv, g, t_len, t_len).sum(1)                        # [Hkv, T, T]
        out.append({s: per_kv[:, s:].sum(1) for s in starts})
        h = parts.finish(layer, h, attn.unsqueeze(0))
    return out


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
