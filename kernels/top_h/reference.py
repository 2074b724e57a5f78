"""Top-H truncation, the specification: plain torch, float64, one row at a time.

p = softmax(logits / T). Visit tokens in descending probability (stable sort, so equal
probabilities are visited in index order). With prefix sums S_k = sum_{i<=k} p_i and
E_k = sum_{i<=k} -p_i log p_i, the renormalised entropy of the first k tokens is

    H_k = E_k / S_k + log S_k.

The kept set is the longest prefix with H_k <= alpha * H(p); the top token is always kept.
H_k never decreases as k grows, so the kept set is also {p >= tau*} for some threshold
(that is what the Triton kernel searches for, without sorting).

Conventions: tokens with zero probability (logit -inf) are never kept, except that the top
token always is; alpha >= 1 keeps everything; temperature None or <= 0 means T = 1 (greedy
rows do not care which tokens survive as long as the top one does); a row of all -inf is
left as it is. Sampling then draws from p restricted to the kept set, renormalised.
"""
from __future__ import annotations

import torch


def top_h_keep_row(logits: torch.Tensor, alpha: float, temperature: float | None = None
                   ) -> torch.Tensor:
    """Bool mask [V] of the tokens that Top-H keeps for one row of logits [V]."""
    v = logits.shape[-1]
    z = logits.double()
    if alpha >= 1 or bool(torch.isneginf(z).all()):
        return torch.ones(v, dtype=torch.bool)
    if temperature is not None and temperature > 0:
        z = z / temperature
    p = torch.softmax(z, dim=0)
    h = torch.special.entr(p).sum()  # entr(p) = -p log p, and 0 where p == 0

    p_sorted, order = torch.sort(p, descending=True, stable=True)
    s = torch.cumsum(p_sorted, 0)
    e = torch.cumsum(torch.special.entr(p_sorted), 0)
    h_prefix = e / s + torch.log(s)

    ok = (h_prefix <= alpha * h) & (p_sorted > 0)
    ok[0] = True
    n_keep = int(torch.cumprod(ok.long(), 0).sum())  # length of the leading run of True
    keep = torch.zeros(v, dtype=torch.bool)
    keep[order[:n_keep]] = True
    return keep


def top_h_keep_mask(logits: torch.Tensor, alpha, temperature=None) -> torch.Tensor:
    """Bool mask [B, V] for logits [B, V]; alpha and temperature: scalar or per-row [B]."""
    b = logits.shape[0]
    alphas = _per_row(alpha, b)
    temps = [None] * b if temperature is None else _per_row(temperature, b)
    rows = [top_h_keep_row(logits[i].cpu(), alphas[i], temps[i]) for i in range(b)]
    return torch.stack(rows).to(logits.device)


def top_h_filter_reference(logits: torch.Tensor, alpha, temperature=None) -> torch.Tensor:
    """Logits [B, V] with the dropped tokens set to -inf (a new tensor)."""
    keep = top_h_keep_mask(logits, alpha, temperature)
    return logits.masked_fill(~keep, float("-inf"))


def _per_row(x, b: int) -> list[float]:
    if isinstance(x, torch.Tensor):
        x = x.reshape(-1).tolist()
        return x * b if len(x) == 1 else x
    return [float(x)] * b
