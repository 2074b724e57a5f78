"""Ring compaction as one Triton program per (ring, KV head): score, top-M selection, in-place gather.

Per program:
  1. score_i = log_beta_i * (t - pos_i) for the valid slots i < count (float32, as reference.py;
     +inf for pos_i < SINKS), mapped to an order-preserving uint32 key;
  2. the M-th largest key by a bitwise search (32 passes, each a count over the row in blocks),
     then the keys above it and, of the keys equal to it, those in the largest slots (ties keep the
     newer token), so the kept set equals reference.top_m_slots;
  3. one pass in increasing slot order, BLOCK slots at a time: destination = kept slots before it
     (position order is slot order), then K, V, pos and log_beta moved down in place. A kept slot
     never moves up, so a block only overwrites slots already read; barriers separate each block's
     loads from its stores.
Rings whose count is <= M keep everything where it is.

Written against the Triton API common to 3.6 and 3.9.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _keys(pos_ptr, lb_ptr, base_p, base_l, sp_c, sl_c, slots, n, t, sinks):
    valid = slots < n
    pos = tl.load(pos_ptr + base_p + slots * sp_c, mask=valid, other=0)
    lb = tl.load(lb_ptr + base_l + slots * sl_c, mask=valid, other=0.0)
    score = lb.to(tl.float32) * (t - pos.to(tl.float32))
    score = tl.where(pos < sinks, float("inf"), score)
    bits = score.to(tl.int32, bitcast=True)
    key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.uint32, bitcast=True) ^ 0x80000000
    return tl.where(valid, key, 0), valid, pos, lb


@triton.jit
def _compact_kernel(k_ptr, v_ptr, pos_ptr, lb_ptr, count_ptr, t_ptr,
                    sk_r, sk_h, sk_c, sk_d, sv_r, sv_h, sv_c, sv_d, sp_r, sp_h, sp_c, sl_r, sl_h, sl_c,
                    H, D, M, sinks, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    r = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    n = tl.load(count_ptr + r).to(tl.int32)
    t = tl.load(t_ptr + r).to(tl.float32)
    base_p = r * sp_r + h * sp_h
    base_l = r * sl_r + h * sl_h
    m_eff = tl.minimum(M, n)
    offs = tl.arange(0, BLOCK)
    # 2. threshold: the largest thr with #(key >= thr) >= m_eff.
    thr = tl.zeros((), dtype=tl.uint32)
    for b in range(31, -1, -1):
        cand = thr | (tl.full((), 1, tl.uint32) << b)
        cnt = tl.zeros((), dtype=tl.int32)
        for c0 in range(0, n, BLOCK):
            key, valid, _, _ = _keys(pos_ptr, lb_ptr, base_p, base_l, sp_c, sl_c, c0 + offs, n, t, sinks)
            cnt += tl.sum((valid & (key >= cand)).to(tl.int32), axis=0)
        thr = tl.where(cnt >= m_eff, cand, thr)
    n_above = tl.zeros((), dtype=tl.int32)
    n_tie = tl.zeros((), dtype=tl.int32)
    for c0 in range(0, n, BLOCK):
        key, valid, _, _ = _keys(pos_ptr, lb_ptr, base_p, base_l, sp_c, sl_c, c0 + offs, n, t, sinks)
        n_above += tl.sum((valid & (key > thr)).to(tl.int32), axis=0)
        n_tie += tl.sum((valid & (key == thr)).to(tl.int32), axis=0)
    need = m_eff - n_above          # ties to keep: those in the `need` largest tie slots
    # 3. move, in increasing slot order.
    kept = tl.zeros((), dtype=tl.int32)
    ties_seen = tl.zeros((), dtype=tl.int32)
    offs_d = tl.arange(0, BLOCK_D)
    for c0 in range(0, n, BLOCK):
        slots = c0 + offs
        key, valid, pos, lb = _keys(pos_ptr, lb_ptr, base_p, base_l, sp_c, sl_c, slots, n, t, sinks)
        tie = (valid & (key == thr)).to(tl.int32)
        ties_after = n_tie - ties_seen - tl.cumsum(tie, axis=0)      # ties in larger slots
        keep_i = ((valid & (key > thr)).to(tl.int32) | ((tie > 0) & (ties_after < need)).to(tl.int32)
                  | (valid & (n <= M)).to(tl.int32))
        keep = keep_i != 0
        dst = kept + tl.cumsum(keep_i, axis=0) - keep_i
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            m2 = keep[:, None] & (dd[None, :] < D)
            ks = tl.load(k_ptr + r * sk_r + h * sk_h + slots[:, None] * sk_c + dd[None, :] * sk_d, mask=m2)
            vs = tl.load(v_ptr + r * sv_r + h * sv_h + slots[:, None] * sv_c + dd[None, :] * sv_d, mask=m2)
            tl.debug_barrier()
            tl.store(k_ptr + r * sk_r + h * sk_h + dst[:, None] * sk_c + dd[None, :] * sk_d, ks, mask=m2)
            tl.store(v_ptr + r * sv_r + h * sv_h + dst[:, None] * sv_c + dd[None, :] * sv_d, vs, mask=m2)
            tl.debug_barrier()
        tl.store(pos_ptr + base_p + dst * sp_c, pos, mask=keep)
        tl.store(lb_ptr + base_l + dst * sl_c, lb, mask=keep)
        tl.debug_barrier()
        kept += tl.sum(keep_i, axis=0)
        ties_seen += tl.sum(tie, axis=0)


def compact_triton_(k, v, pos, log_beta, count, t, m: int, sinks: int = 0):
    """See ops.compact_. k, v [R, H, C, D] (any strides); pos, log_beta [R, H, C]; count, t [R]."""
    r, h, c, d = k.shape
    block = min(256, triton.next_power_of_2(max(c, 16)))
    block_d = min(64, triton.next_power_of_2(d))
    _compact_kernel[(r * h,)](k, v, pos, log_beta, count, t,
                              *k.stride(), *v.stride(), *pos.stride(), *log_beta.stride(),
                              h, d, m, sinks, BLOCK=block, BLOCK_D=block_d, num_warps=4)
    return torch.minimum(count, torch.full_like(count, m))
