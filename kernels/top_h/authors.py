"""The rule as the authors' public code applies it (TopH_LogitsProcessor in
github.com/ErfanBaghaei/Top-H-Decoding, logit_processor.py), for comparison only.

It differs from the paper's rule (reference.py) in two ways:
* it only looks at the top_n = 100 most probable tokens (everything else is dropped);
* it stops at the first prefix whose *unnormalised* partial entropy
  E_k = sum_{i<=k} -q_i log q_i (q = the raw probabilities) exceeds alpha * E_N, the same
  unnormalised sum over all top_n tokens, instead of comparing the renormalised prefix
  entropy with alpha * H(p).
Their loop keeps token i (0-based) while E over tokens 0..i stays <= alpha * E_N, and always
keeps token 0; with alpha = 1 it would index past the top_n tokens, read here as "keep all
top_n". They use log2; the base cancels in the comparison. Zero probabilities give 0 here
(their code would produce NaN).
"""
from __future__ import annotations

import torch


def top_h_keep_mask_authors(logits: torch.Tensor, alpha=0.4, temperature=None,
                            top_n: int = 100) -> torch.Tensor:
    """Bool mask [B, V]; alpha, temperature: scalar or per-row [B]."""
    b, v = logits.shape
    z = logits.double()
    if temperature is not None:
        t = torch.as_tensor(temperature, dtype=torch.float64).reshape(-1, 1).to(z.device)
        z = z / torch.where(t > 0, t, torch.ones_like(t))
    p = torch.softmax(z, dim=-1)
    # They use torch.topk, whose order among equal probabilities is unspecified; a stable
    # sort makes ties deterministic (index order, as in reference.py).
    q, idx = torch.sort(p, dim=-1, descending=True, stable=True)
    q, idx = q[:, :top_n], idx[:, :top_n]
    e = torch.cumsum(torch.special.entr(q), dim=-1)  # unnormalised partial entropy E_k
    a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1)
    a = a.to(e.device)
    n_keep = ((e <= a * e[:, -1:]) & (q > 0)).sum(-1).clamp(min=1)  # E_k is non-decreasing
    keep_top = torch.arange(q.shape[1], device=q.device)[None, :] < n_keep[:, None]
    return torch.zeros(b, v, dtype=torch.bool, device=q.device).scatter_(1, idx, keep_top)
