"""A second training objective for retention gates (`train-gates --objective rank`; ours, not TRIM-KV's):
teach the gates to rank cached tokens the way hindsight would.

The authors' objective trains the soft form of forgetting (a log beta * age bias in every attention logit)
and hopes that the hard rule served — keep the top M by log beta_i * (t - i) — follows. On the default model
that leaves most of the room unused: keeping what full attention *will* attend to most (oracle.py) reaches a
KL at M = 256 about 4x lower than the gates'. This objective trains the served rule against that target
directly. For a sampled start s (the first query a compaction serves) and budget M, the target set is the
top (M - sinks) of the tokens before s by the attention full attention gives them from s to the end of the
sequence; the gates' scores log beta_i * (s + 1 - i) (reference.retention_scores at t = s + 1) should put
that set above the rest. The loss is a logistic one around the gates' own (M - sinks)-th score, each token
weighted by how far its future attention is from the target set's threshold (a token on the boundary costs
little to misplace, a heavy hitter a lot). The model is frozen and runs without gradients, so a step costs one
forward pass and the small gate networks' backward: far cheaper than the authors' objective.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .gate import GateSet
from .llama import Parts
from .reference import INF


@torch.no_grad()
def layer_inputs_and_future(parts: Parts, ids: torch.Tensor, starts: list[int]):
    """One full-attention pass over ids [T]. Returns per layer (x [T, hidden], the attention input the gate
    reads, and future [len(starts), Hkv, T]: the attention each key receives from queries >= start).
    starts: ascending, distinct, at most T (a start at T, after the last token, gets zeros)."""
    t_len = ids.shape[0]
    if list(starts) != sorted(set(starts)) or not 0 <= starts[0] <= starts[-1] <= t_len:
        raise ValueError(f"starts must be ascending, distinct and inside the {t_len} tokens: {starts}")
    h = parts.embed(ids.unsqueeze(0))
    cos, sin = parts.rope(h, torch.arange(t_len, device=ids.device).unsqueeze(0))
    g = parts.hq // parts.hkv
    lo = min(starts)
    # Only the queries from the first start on need their probabilities: [T - lo, T], causal.
    masked = torch.arange(t_len, device=ids.device)[None, :] > torch.arange(lo, t_len, device=ids.device)[:, None]
    bounds = list(starts) + [t_len]
    out = []
    for layer in parts.layers:
        x = layer.input_layernorm(h)
        q, k, v = parts.qkv(layer, x, cos, sin)
        logits = torch.matmul(q[0, :, lo:].float(), k[0].repeat_interleave(g, 0).float().transpose(1, 2))
        p = torch.softmax(logits.mul_(parts.scale).masked_fill_(masked, -INF), -1)   # [Hq, T - lo, T]
        per_kv = p.view(parts.hkv, g, t_len - lo, t_len).sum(1)
        # Attention received from each block of queries between consecutive starts, then summed from the end.
        blocks = torch.stack([per_kv[:, a - lo:b - lo].sum(1) for a, b in zip(bounds[:-1], bounds[1:])])
        out.append((x[0], blocks.flip(0).cumsum(0).flip(0)))                      # [S, Hkv, T]
        del p, per_kv
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=parts.scale, enable_gqa=True)
        h = parts.finish(layer, h, attn)
    return out


def rank_loss(log_beta: torch.Tensor, future: torch.Tensor, starts: list[int], budgets: list[int],
              sinks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log_beta [Hkv, T] (with grad), future [S, Hkv, T] for `starts`. Returns (loss, agreement): the weighted
    logistic loss above, averaged over starts and budgets, and the fraction of the target set the gates' own
    top (M - sinks) recovers (1.0: the gates keep what hindsight would)."""
    losses, agree = [], []
    for si, s in enumerate(starts):
        pos = torch.arange(sinks, s, device=log_beta.device)
        score = log_beta[:, sinks:s].float() * (s + 1 - pos).float()              # [Hkv, n]
        fut = future[si][:, sinks:s]
        f_sorted, order = fut.sort(1, descending=True)
        s_sorted = score.detach().sort(1, descending=True).values
        for m in budgets:
            k = m - sinks
            if k < 1 or k >= score.shape[1]:
                continue
            target = torch.zeros_like(fut, dtype=torch.bool).scatter_(1, order[:, :k], True)  # exactly k, ties too
            theta = (f_sorted[:, k - 1:k] + f_sorted[:, k:k + 1]) / 2
            tau = (s_sorted[:, k - 1:k] + s_sorted[:, k:k + 1]) / 2
            margin = torch.where(target, score - tau, tau - score)
            w = (fut - theta).abs()
            w = w / w.sum(1, keepdim=True).clamp_min(1e-12)
            losses.append((w * F.softplus(-margin)).sum(1).mean())
            kept = score.detach() >= s_sorted[:, k - 1:k]
            agree.append((kept & target).sum(1).float().div(k).mean())
    if not losses:
        raise ValueError("no start leaves room for a budget: lengthen --seq-len or lower the budgets")
    return torch.stack(losses).mean(), torch.stack(agree).mean()


def sample_starts(rng, seq_len: int, budgets: list[int], buffer: int, count: int) -> list[int]:
    """Compaction starts to train on: after the smallest budget's first compaction (min budget + buffer), and
    at least a buffer before the end so the future attention covers some queries."""
    lo, hi = min(budgets) + buffer, seq_len - buffer
    if hi <= lo:
        raise ValueError(f"--seq-len {seq_len} leaves no compaction start between {lo} and {hi}")
    return sorted(int(x) for x in rng.choice(range(lo, hi), size=min(count, hi - lo), replace=False))


def losses(parts: Parts, gates: GateSet, ids: torch.Tensor, budgets: list[int], buffer: int, sinks: int,
           starts: list[int]) -> dict[str, torch.Tensor]:
    """The rank objective over a batch ids [B, T] (each row on its own): {"rank", "agree"}."""
    total, agree = [], []
    for row in ids:
        for i, (x, future) in enumerate(layer_inputs_and_future(parts, row, starts)):
            lb = gates[i](x.unsqueeze(0))[0].transpose(0, 1)                        # [Hkv, T]
            loss, a = rank_loss(lb, future, starts, budgets, sinks)
            total.append(loss)
            agree.append(a)
    return {"rank": torch.stack(total).mean(), "agree": torch.stack(agree).mean()}
