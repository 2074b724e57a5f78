"""Dispatch for the retention kernels: Triton on CUDA tensors, vectorised torch on CPU.

* `capacity_sum(log_beta)`: S_t = sum_{i<=t} beta_i^(t-i) along the last dim, differentiable, without
  materialising the T x T matrix (tiles of rows on CPU, the Triton kernels on CUDA).
* `compact_(k, v, pos, log_beta, count, t, m)`: in-place compaction of a batch of rings by retention
  score (reference.compact_reference is the specification).
"""
from __future__ import annotations

import torch

from .reference import retention_scores, top_m_slots

CHUNK_ELEMS = 1 << 22  # [rows, tile, T] float32 temporaries of at most ~16 MB on CPU


def _tile(rows: int, t_len: int) -> int:
    return max(1, min(t_len, CHUNK_ELEMS // max(rows * t_len, 1)))


def _capacity_fwd_cpu(lb: torch.Tensor) -> torch.Tensor:
    """lb [R, T] float32 -> S [R, T]."""
    r, t_len = lb.shape
    out = torch.empty_like(lb)
    ar = torch.arange(t_len, device=lb.device, dtype=lb.dtype)
    step = _tile(r, t_len)
    for t0 in range(0, t_len, step):
        t1 = min(t_len, t0 + step)
        dist = ar[t0:t1, None] - ar[None, :t1]                         # [tile, i]
        e = torch.exp(lb[:, None, :t1] * dist.clamp(min=0))             # [R, tile, i]
        e.masked_fill_(dist < 0, 0.0)
        out[:, t0:t1] = e.sum(-1)
    return out


def _capacity_bwd_cpu(lb: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """d/d lb_i of sum_t g_t S_t = sum_{t>=i} g_t (t-i) beta_i^(t-i)."""
    r, t_len = lb.shape
    out = torch.empty_like(lb)
    ar = torch.arange(t_len, device=lb.device, dtype=lb.dtype)
    step = _tile(r, t_len)
    for i0 in range(0, t_len, step):
        i1 = min(t_len, i0 + step)
        dist = ar[None, i0:] - ar[i0:i1, None]                          # [tile_i, t]
        dc = dist.clamp(min=0)
        e = torch.exp(lb[:, i0:i1, None] * dc) * dc                     # [R, tile_i, t]
        e.masked_fill_(dist < 0, 0.0)
        out[:, i0:i1] = (e * g[:, None, i0:]).sum(-1)
    return out


class _CapacitySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lb):
        ctx.save_for_backward(lb)
        if lb.is_cuda:
            from .triton_capacity import capacity_fwd_triton
            return capacity_fwd_triton(lb)
        return _capacity_fwd_cpu(lb)

    @staticmethod
    def backward(ctx, g):
        (lb,) = ctx.saved_tensors
        g = g.contiguous().float()
        if lb.is_cuda:
            from .triton_capacity import capacity_bwd_triton
            return capacity_bwd_triton(lb, g)
        return _capacity_bwd_cpu(lb, g)


def capacity_sum(log_beta: torch.Tensor) -> torch.Tensor:
    """log_beta [..., T] -> S [..., T] (float32), differentiable."""
    shape = log_beta.shape
    s = _CapacitySum.apply(log_beta.float().reshape(-1, shape[-1]).contiguous())
    return s.reshape(shape)


def compact_(k, v, pos, log_beta, count, t, m: int, sinks: int = 0):
    """In place: each head of ring r keeps its top-min(m, count_r) retention scores among slots
    [0, count_r) (positions below `sinks` score +inf), moved to the front in position order.
    k, v [R, H, C, D]; pos, log_beta [R, H, C]; count, t [R] (int). Returns the new counts [R]."""
    if k.is_cuda:
        from .triton_compact import compact_triton_
        return compact_triton_(k, v, pos, log_beta, count, t, m, sinks)
    return compact_torch_(k, v, pos, log_beta, count, t, m, sinks)


def compact_torch_(k, v, pos, log_beta, count, t, m: int, sinks: int = 0):
    """The CPU path: one batched top-k over every ring and head, then gathers (no per-ring loop).
    Slots past count_r score -inf so they are never chosen before valid ones; rings with
    count_r <= m keep everything in place."""
    r, h, c = pos.shape
    slot = torch.arange(c, device=pos.device)
    valid = slot[None, None, :] < count[:, None, None]
    s = retention_scores(log_beta, pos, t, sinks).masked_fill(~valid, float("-inf"))
    keep = top_m_slots(s, m)                                           # [R, H, m] ascending, ties: newer
    kk = keep.shape[-1]
    small = count <= m
    if bool(small.any()):  # leave those rings untouched: keep = identity
        keep[small] = slot[:kk].expand(int(small.sum()), h, kk)
    idx = keep.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
    k[:, :, :kk] = k.gather(2, idx)
    v[:, :, :kk] = v.gather(2, idx)
    pos[:, :, :kk] = pos.gather(2, keep)
    log_beta[:, :, :kk] = log_beta.gather(2, keep)
    return torch.minimum(count, torch.full_like(count, m))
