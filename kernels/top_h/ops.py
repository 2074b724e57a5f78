"""Top-H dispatch: the Triton kernel on CUDA tensors, a vectorised torch path on CPU.

Both apply the rule of reference.py to a batch [B, V] with per-row alpha (and optional
per-row temperature, applied inside the rule only: the returned logits are not scaled, since
vLLM applies the temperature itself afterwards).
"""
from __future__ import annotations

import threading

import torch

NEG_INF = float("-inf")


def top_h_filter_(logits: torch.Tensor, alpha, temperature=None) -> torch.Tensor:
    """In place: set the tokens Top-H drops to -inf in logits [B, V]; returns logits.

    alpha: float or [B] tensor (>= 1 keeps the row as is); temperature: None, float or [B]
    tensor (<= 0 is treated as 1).
    """
    b = logits.shape[0]
    alpha_t = _per_row(alpha, b, logits.device)
    inv_t = None if temperature is None else _inverse_temperature(temperature, b, logits.device)
    if logits.is_cuda:
        from .triton_top_h import top_h_triton_
        if logits.stride(1) == 1:
            return top_h_triton_(logits, alpha_t, inv_t)
        return logits.copy_(top_h_triton_(logits.contiguous(), alpha_t, inv_t))
    for r, sl in _row_chunks(logits):
        x = logits[sl]
        for rows, idx, kept in _kept_in_order(x, alpha_t[sl], None if inv_t is None else inv_t[sl]):
            # Gather the kept values, fill, scatter back: ~10x cheaper than masked_fill_ over
            # the whole row on CPU.
            sub = x if rows is None else x[rows]
            vals = sub.gather(1, idx).masked_fill_(~kept, NEG_INF)
            sub.fill_(NEG_INF).scatter_(1, idx, vals)
            if rows is not None:
                x[rows] = sub
    return logits


def top_h_filter(logits: torch.Tensor, alpha, temperature=None) -> torch.Tensor:
    """Logits [B, V] with the dropped tokens set to -inf, as a new tensor."""
    return top_h_filter_(logits.clone(), alpha, temperature)


def top_h_keep_mask_torch(logits: torch.Tensor, alpha: torch.Tensor,
                          inv_temperature: torch.Tensor | None = None, *,
                          entropy_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Bool mask [B, V] of kept tokens (CPU path); alpha [B], inv_temperature [B] (1/T) or None.

    entropy_dtype: see _kept_in_order; float64 makes the mask agree with reference.py also
    where alpha * H(p) falls within float32 rounding of a prefix entropy.
    """
    keep = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
    for r, sl in _row_chunks(logits):
        it = None if inv_temperature is None else inv_temperature[sl]
        for rows, idx, kept in _kept_in_order(logits[sl], alpha[sl], it, entropy_dtype):
            m = torch.zeros(idx.shape[0], logits.shape[1], dtype=torch.bool, device=logits.device)
            m.scatter_(1, idx, kept)
            if rows is None:
                keep[sl] = m
            else:
                keep[r + rows] = m
    return keep


CHUNK_ELEMS = 1 << 20
_SCRATCH = threading.local()  # per thread: concurrent callers must not share buffers


def _scratch(n: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two flat buffers of >= n elements, kept between calls: a fresh multi-MB tensor is
    page-faulted on every call here, which made the full-vocabulary pass 2-3x slower than its
    math. Bounded by CHUNK_ELEMS (or one row) per dtype and device."""
    cache = _SCRATCH.__dict__.setdefault("bufs", {})
    key = (dtype, str(device))
    bufs = cache.get(key)
    if bufs is None or bufs[0].numel() < n:
        bufs = cache[key] = (torch.empty(n, dtype=dtype, device=device),
                             torch.empty(n, dtype=dtype, device=device))
    return bufs[0][:n], bufs[1][:n]


def _row_chunks(x, chunk_elems: int = CHUNK_ELEMS):
    # Row chunks bound the scratch memory and keep the temporaries cache-friendly.
    rows = max(1, chunk_elems // max(x.shape[1], 1))
    for r in range(0, x.shape[0], rows):
        yield r, slice(r, r + rows)


def _kept_in_order(x, alpha, inv_t, entropy_dtype=torch.float32, first_k=(32, 1024)):
    """The kept sets of the rows of x [b, V] that Top-H filters (alpha < 1, some finite logit),
    as groups (rows, idx [n, k], kept [n, k]): row rows[j] (rows None: all b rows) keeps
    idx[j][kept[j]]. Rows outside every group keep everything.

    The full-vocabulary pass (max, H(p)) runs in entropy_dtype: float32 is what decoding
    needs (the Triton kernel works in float32 too). Kept sets are usually small, so each row
    looks only at its first_k[0] most probable tokens (topk, no sort of the vocabulary); rows
    whose kept set may reach past them try the next first_k, and finally a full sort. The
    prefix entropies, over those few candidates, are float64.
    """
    b, v = x.shape
    alpha = alpha.double()
    inv_t = None if inv_t is None else inv_t.double()
    d, w = _scratch(b * v, entropy_dtype, x.device)
    d, w = d.view(b, v).copy_(x), w.view(b, v)
    if inv_t is not None:
        d.mul_(inv_t.to(entropy_dtype)[:, None])
    m = d.amax(-1, keepdim=True)
    keep_all = (alpha >= 1) | torch.isneginf(m[:, 0])
    m = torch.where(torch.isneginf(m), 0.0, m)
    # d = z - max z <= 0, with -inf made finite so that exp gives 0 and w * d stays 0.
    d.sub_(m).clamp_(min=torch.finfo(entropy_dtype).min)
    torch.exp(d, out=w)
    s = w.sum(-1).double()  # float32 sums are cascaded: relative error ~1e-7 at V = 256k
    t = w.mul_(d).sum(-1).double()
    target = alpha * (torch.log(s) - t / s)  # alpha * H(p)
    m = m.double()
    del d, w

    x = x.float()
    todo = None if not bool(keep_all.any()) else torch.nonzero(~keep_all).flatten()
    for k in first_k:
        if k >= v or (todo is not None and todo.numel() == 0):
            break
        sel = (lambda y: y) if todo is None else (lambda y: y[todo])
        cand_x, cand_i = _topk(sel(x), k)  # on the logits: T > 0 keeps the order
        # Equal logits in index order, as the reference visits them: sort by index, then
        # stably by value.
        cand_i, perm = torch.sort(cand_i, dim=-1)
        cand_x, perm = torch.sort(cand_x.gather(1, perm), dim=-1, descending=True, stable=True)
        cand_i = cand_i.gather(1, perm)
        n_keep = _prefix_len(cand_x, None if inv_t is None else sel(inv_t), sel(m), sel(target))
        # topk may hold an arbitrary part of the tie group at its end: trust n_keep only if
        # the kept prefix stops before that group.
        exact = n_keep <= (cand_x > cand_x[:, -1:]).sum(-1)
        kept = torch.arange(k, device=x.device)[None, :] < n_keep[:, None]
        if bool(exact.all()):
            yield todo, cand_i, kept
            return
        if bool(exact.any()):
            rows = torch.nonzero(exact).flatten() if todo is None else todo[exact]
            yield rows, cand_i[exact], kept[exact]
        todo = torch.nonzero(~exact).flatten() if todo is None else todo[~exact]
    if todo is None or todo.numel():
        sel = (lambda y: y) if todo is None else (lambda y: y[todo])
        # Sort the logits themselves (not x / T) so that rounding cannot merge distinct values.
        xs, order = torch.sort(sel(x), dim=-1, descending=True, stable=True)
        n_keep = _prefix_len(xs, None if inv_t is None else sel(inv_t), sel(m), sel(target))
        yield todo, order, torch.arange(v, device=x.device)[None, :] < n_keep[:, None]


def _topk(x, k: int):
    """torch.topk(x, k, dim=-1), values and indices, cheaper for small k over a long row: the k
    largest lie in the k blocks with the largest maxima (a block left out has k selected blocks
    whose maxima are >= its own, so every element above the k-th value is in a selected block;
    equal values at the k-th are a tie group, which the caller checks). 2x faster at
    16 x 49k, k = 32."""
    b, v = x.shape
    for block in (128, 64, 32):
        if v % block == 0 and v // block >= 4 * k:
            break
    else:
        return torch.topk(x, k, dim=-1)
    block_max = x.reshape(b, v // block, block).amax(-1)
    blk = torch.topk(block_max, k, dim=-1).indices
    idx = (blk[:, :, None] * block + torch.arange(block, device=x.device)).view(b, k * block)
    vals, j = torch.topk(x.gather(1, idx), k, dim=-1)
    return vals, idx.gather(1, j)


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
