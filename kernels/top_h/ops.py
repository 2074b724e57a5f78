"""Top-H dispatch: the Triton kernel on CUDA tensors, a vectorised torch path on CPU.

Both apply the rule of reference.py to a batch [B, V] with per-row alpha (and optional
per-row temperature, applied inside the rule only: the returned logits are not scaled, since
vLLM applies the temperature itself afterwards).
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")


def top_h_filter_(logits: torch.Tensor, alpha, temperature=None) -> torch.Tensor:
    """In place: set the tokens Top-H drops to -inf in logits [B, V]; returns logits.

    alpha: float or [B] tensor (>= 1 keeps the row as is); temperature: None, float or [B]
    tensor (<= 0 is treated as 1).
    """
    b = logits.shape[0]
    alpha_t = _per_row(alpha, b, logits.device)
    if logits.is_cuda:
        from .triton_top_h import top_h_triton_
        inv_t = None if temperature is None else _inverse_temperature(temperature, b, logits.device)
        if logits.stride(1) == 1:
            return top_h_triton_(logits, alpha_t, inv_t)
        return logits.copy_(top_h_triton_(logits.contiguous(), alpha_t, inv_t))
    inv_t = None if temperature is None else _inverse_temperature(
        temperature, b, logits.device, torch.float64)
    keep = top_h_keep_mask_torch(logits, alpha_t, inv_t)
    return logits.masked_fill_(~keep, NEG_INF)


def top_h_filter(logits: torch.Tensor, alpha, temperature=None) -> torch.Tensor:
    """Logits [B, V] with the dropped tokens set to -inf, as a new tensor."""
    return top_h_filter_(logits.clone(), alpha, temperature)


def top_h_keep_mask_torch(logits: torch.Tensor, alpha: torch.Tensor,
                          inv_temperature: torch.Tensor | None = None,
                          chunk_elems: int = 1 << 18, first_k: int = 1024) -> torch.Tensor:
    """Bool mask [B, V] of kept tokens; alpha [B], inv_temperature [B] (1/T) or None.

    Float64 math (cheap next to the topk / sort on CPU), so it agrees with reference.py
    also where alpha * H(p) falls within fp32 rounding of a prefix entropy. Kept sets are
    usually small: each row first tries its first_k most probable tokens (topk, no full
    sort); rows whose kept set may reach past them are redone with a full sort. Small row
    chunks keep the float64 temporaries in reused heap memory: large fresh allocations are
    page-faulted on every call and cost more than the math (3x at 64 x 152k).
    """
    b, v = logits.shape
    keep = torch.empty(b, v, dtype=torch.bool, device=logits.device)
    rows = max(1, chunk_elems // max(v, 1))
    for r in range(0, b, rows):
        sl = slice(r, r + rows)
        inv_t = None if inv_temperature is None else inv_temperature[sl].double()
        keep[sl] = _keep_chunk(logits[sl].float(), alpha[sl].double(), inv_t, first_k)
    return keep


def _keep_chunk(x, alpha, inv_t, first_k):
    b, v = x.shape
    d = x.double()
    if inv_t is not None:
        d.mul_(inv_t[:, None])
    m = d.amax(-1, keepdim=True)
    keep_all = (alpha >= 1) | torch.isneginf(m[:, 0])
    m = torch.where(torch.isneginf(m), 0.0, m)
    # d = z - max z <= 0, with -inf made finite so that exp gives 0 and w * d stays 0.
    d.sub_(m).clamp_(min=-1e300)
    w = torch.exp(d)
    s = w.sum(-1)
    t = (w * d).sum(-1)
    target = alpha * (torch.log(s) - t / s)  # alpha * H(p)
    del d, w

    k = min(v, first_k)
    cand_x, cand_i = torch.topk(x, k, dim=-1)  # on the logits: T > 0 keeps the order
    # Equal logits in index order, as the reference visits them: sort by index, then stably
    # by value.
    cand_i, perm = torch.sort(cand_i, dim=-1)
    cand_x, perm = torch.sort(cand_x.gather(1, perm), dim=-1, descending=True, stable=True)
    cand_i = cand_i.gather(1, perm)
    n_keep = _prefix_len(cand_x, inv_t, m, target)
    # topk may hold an arbitrary part of the tie group at its end: trust n_keep only if the
    # kept prefix stops before that group (or every token is a candidate).
    n_above_last = (cand_x > cand_x[:, -1:]).sum(-1)
    exact = (n_keep <= n_above_last) if k < v else torch.ones_like(keep_all)
    keep_sorted = torch.arange(k, device=x.device)[None, :] < n_keep[:, None]
    keep = torch.zeros(b, v, dtype=torch.bool, device=x.device).scatter_(1, cand_i, keep_sorted)
    redo = ~exact & ~keep_all
    if redo.any():
        keep[redo] = _keep_sorted(x[redo], None if inv_t is None else inv_t[redo],
                                  m[redo], target[redo])
    keep[keep_all] = True
    return keep


def _keep_sorted(x, inv_t, m, target):
    # Sort the logits themselves (not x / T) so that rounding cannot merge distinct values.
    xs, order = torch.sort(x, dim=-1, descending=True, stable=True)
    n_keep = _prefix_len(xs, inv_t, m, target)
    keep_sorted = torch.arange(x.shape[1], device=x.device)[None, :] < n_keep[:, None]
    return torch.empty_like(keep_sorted).scatter_(1, order, keep_sorted)


def _prefix_len(xs, inv_t, m, target):
    """Length of the longest prefix of xs (sorted, descending) whose renormalised entropy
    stays <= target; at least 1, and only tokens with non-zero probability."""
    d = xs.double() if inv_t is None else xs.double() * inv_t[:, None]
    d = (d - m).clamp_(min=-1e300)  # as in _keep_chunk
    w = torch.exp(d)
    s = torch.cumsum(w, -1)
    t = torch.cumsum(w * d, -1)
    h_prefix = torch.log(s) - t / s  # log S - T/S: both terms >= 0, no cancellation
    ok = (h_prefix <= target[:, None]) & (w > 0)
    ok[:, 0] = True
    return torch.where(ok.all(-1), xs.shape[1], (~ok).int().argmax(-1))


def _per_row(x, b: int, device, dtype=torch.float32) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=dtype).to(device).reshape(-1)
    return (t.expand(b) if t.numel() == 1 else t).contiguous()


def _inverse_temperature(temperature, b: int, device, dtype=torch.float32) -> torch.Tensor:
    t = _per_row(temperature, b, device, dtype)
    return torch.where(t > 0, 1.0 / t, torch.ones_like(t)).contiguous()
