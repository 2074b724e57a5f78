"""A third training objective for retention gates (`train-gates --objective evict`; ours, not TRIM-KV's):
minimise the KL of the served eviction itself, relaxed so that it has a gradient.

The authors' objective trains a soft form of forgetting (log beta * age in every attention logit) and the
rank objective (rank.py) a proxy of the served rule (agreement with a hindsight set). Neither is the quantity
evaluated: KL(full || bounded) when the cache keeps the top M by log beta_i * (t - i) at every compaction.
This objective runs that schedule inside the training forward pass:
* compactions happen where the bounded cache has them (after M + B tokens, then every B), t = tokens seen + 1;
  the candidates of a compaction are what the previous one kept plus the B tokens since, as served;
* which tokens survive is decided hard, on the gates' current scores (no gradient), exactly like the cache;
* every candidate's survival is also given a soft weight, logsigmoid((log(-tau) - log(-s_i)) / temperature),
  where tau is the midpoint of the (M - sinks)-th and the next candidate score (with gradient, so raising every
  score does not help) and log(-s) makes it invariant to a common scale of the rates. The weights of all
  compactions a token took part in add up; the queries between two compactions see the tokens before the
  compaction through that additive bias, the tokens since at full weight.
The loss is the mean KL(full || relaxed) over the queries that follow the first compaction. As the temperature
goes to 0 the relaxed attention becomes the cache's. The model is frozen; the gradient reaches the gates of
every layer through the later layers, as in the authors' objective, at about its cost per step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .gate import GateSet
from .llama import Parts, forward_full
from .oracle import compaction_starts
from .reference import INF


def compaction_points(t_len: int, budget: int, buffer: int) -> list[int]:
    """Tokens seen at each compaction of a sequence of t_len tokens that some query follows (the cache's rule)."""
    return [n for n in compaction_starts(budget, buffer, t_len) if n < t_len]


def eviction_bias(log_beta: torch.Tensor, budget: int, buffer: int, sinks: int, temperature: float) -> torch.Tensor:
    """log_beta [B, H, T] (sinks included, any value there) -> additive attention bias [B, H, T, T] (query, key):
    0 for keys at or after the query's last compaction, the key's accumulated log survival weight before it,
    -inf above the diagonal."""
    b, h, t_len = log_beta.shape
    dev = log_beta.device
    pos = torch.arange(t_len, device=dev)
    points = compaction_points(t_len, budget, buffer)
    k = budget - sinks
    if k < 1:
        raise ValueError(f"budget {budget} leaves no room beside {sinks} sinks")
    causal = torch.zeros(t_len, t_len, device=dev).masked_fill(pos[None, :] > pos[:, None], -INF)
    if not points:
        return causal.expand(b, h, -1, -1)
    sink = pos < sinks
    kept = torch.zeros(b, h, t_len, dtype=torch.bool, device=dev)
    logkeep = log_beta.new_zeros(b, h, t_len)
    per_point, prev = [], 0
    for n in points:
        cand = kept | ((pos >= prev) & (pos < n))                                  # [B, H, T]
        lneg = torch.log((-log_beta.float() * (n + 1 - pos).float()).clamp_min(1e-30))  # lower = kept first
        comp = cand & ~sink
        ranked = lneg.detach().masked_fill(~comp, INF)
        idx = ranked.topk(k + 1, -1, largest=False).indices                       # k + 1 <= M + B - sinks
        tau = (lneg.gather(-1, idx[..., k - 1:k]) + lneg.gather(-1, idx[..., k:k + 1])) / 2
        term = F.logsigmoid((tau - lneg) / temperature)
        logkeep = logkeep + torch.where(comp, term, torch.zeros_like(term))
        kept = torch.zeros_like(kept).scatter_(-1, idx[..., :k], True) | (cand & sink)
        per_point.append(logkeep)
        prev = n
    rows = torch.stack(per_point, 2)                                               # [B, H, P, T]
    at = torch.tensor(points, device=dev)
    which = (torch.searchsorted(at, pos, right=True) - 1).clamp_min(0)             # query -> its last compaction
    bias = rows[:, :, which]                                                       # [B, H, T(q), T(k)]
    last = at[which]                                                               # [T(q)]
    before = (pos[None, :] < last[:, None]) & (pos[:, None] >= points[0])          # keys the compaction judged
    return torch.where(before, bias, causal)


def losses(parts: Parts, gates: GateSet, ids: torch.Tensor, budget: int, buffer: int, sinks: int,
           temperature: float, recompute: bool = False) -> dict[str, torch.Tensor]:
    """{"kl": mean KL(full || relaxed bounded) over the queries after the first compaction (the loss)}."""
    start = budget + buffer
    if ids.shape[1] <= start:
        raise ValueError(f"--seq-len {ids.shape[1]} must exceed budget + buffer ({start})")
    with torch.no_grad():
        teacher, _ = forward_full(parts, ids)
        t_logp = F.log_softmax(teacher[:, start:].float(), -1)
        del teacher

    def bias_fn(lb):
        return eviction_bias(lb, budget, buffer, sinks, temperature)

    student, _ = forward_full(parts, ids, gates, bias=True, checkpoint=recompute, sinks=sinks, bias_fn=bias_fn)
    s_logp = F.log_softmax(student[:, start:].float(), -1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    return {"kl": kl}
