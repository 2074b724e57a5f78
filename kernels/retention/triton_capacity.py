"""Training-time capacity sum S_t = sum_{i<=t} beta_i^(t-i) and its gradient, tiled in Triton so the
T x T matrix of retentions is never stored (each program keeps one BLOCK x BLOCK tile in registers).

Forward: program (row, block of t) loops over the blocks of i <= t.
Backward: program (row, block of i) loops over the blocks of t >= i:
    dS/d log_beta_i = sum_{t>=i} g_t (t - i) beta_i^(t-i).
Written against the Triton API common to 3.6 and 3.9.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _cap_fwd(lb_ptr, out_ptr, T, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1)
    ts = tb * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i0 in range(0, (tb + 1) * BLOCK, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        lb = tl.load(lb_ptr + row * T + i, mask=i < T, other=0.0)
        dist = (ts[:, None] - i[None, :]).to(tl.float32)
        ok = (dist >= 0) & (i[None, :] < T)
        e = tl.exp(lb[None, :] * tl.maximum(dist, 0.0))
        acc += tl.sum(tl.where(ok, e, 0.0), axis=1)
    tl.store(out_ptr + row * T + ts, acc, mask=ts < T)


@triton.jit
def _cap_bwd(lb_ptr, g_ptr, out_ptr, T, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ib = tl.program_id(1)
    i = ib * BLOCK + tl.arange(0, BLOCK)
    lb = tl.load(lb_ptr + row * T + i, mask=i < T, other=0.0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for t0 in range(ib * BLOCK, T, BLOCK):
        ts = t0 + tl.arange(0, BLOCK)
        g = tl.load(g_ptr + row * T + ts, mask=ts < T, other=0.0)
        dist = (ts[None, :] - i[:, None]).to(tl.float32)
        ok = (dist >= 0) & (ts[None, :] < T)
        dc = tl.maximum(dist, 0.0)
        e = tl.exp(lb[:, None] * dc) * dc * g[None, :]
        acc += tl.sum(tl.where(ok, e, 0.0), axis=1)
    tl.store(out_ptr + row * T + i, acc, mask=i < T)


def _block(t_len: int) -> int:
    return min(128, triton.next_power_of_2(max(t_len, 16)))


def capacity_fwd_triton(lb: torch.Tensor) -> torch.Tensor:
    """lb [R, T] float32 contiguous -> S [R, T]."""
    r, t_len = lb.shape
    out = torch.empty_like(lb)
    b = _block(t_len)
    _cap_fwd[(r, triton.cdiv(t_len, b))](lb, out, t_len, BLOCK=b, num_warps=4)
    return out


def capacity_bwd_triton(lb: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    r, t_len = lb.shape
    out = torch.empty_like(lb)
    b = _block(t_len)
    _cap_bwd[(r, triton.cdiv(t_len, b))](lb, g, out, t_len, BLOCK=b, num_warps=4)
    return out
