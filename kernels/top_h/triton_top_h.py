"""Top-H as one Triton program per row, without sorting.

The kept set is {key >= thr} where key is an order-preserving int32 image of the logit
(T > 0 keeps the order) and thr is found by a radix select on the key bits, RADIX bits per
pass (MSB first). For a candidate threshold k, the set {key >= k} is "ok" when its
renormalised entropy log S - T/S is <= alpha * H, where, with w = exp(z - max z),
S = sum w and T = sum w (z - max z) over the set (both terms >= 0: no cancellation).
ok is monotone in k, so each pass evaluates the NB = 2**RADIX bucket edges of the current
bracket at once and keeps the bucket where ok flips.

Passes over the row:
  1. online max + sum w + sum w*d  -> H(p)   (one pass, rescaled as the max grows)
  2. radix passes: sums of w and w*d over {key >= edge_j} for the NB edges. Tokens above the
     bracket add to every edge (one 1-D sum); only blocks that hold bracket tokens pay the
     NB-wide sum. Stops early once the bracket holds a single distinct key (usually after
     2-4 passes; at most ceil(32/RADIX)).
  3. write -inf where key < thr (or the probability underflows to 0 in fp32).
Ties are kept or dropped as whole groups (keys are equal); the top group is always kept.
Rows with alpha >= 1 or all -inf are left untouched. The math is fp32, so the kept set can
also differ from reference.py where alpha * H lies within fp32 rounding (~1e-6 relative) of a
prefix entropy, and tokens whose fp32 probability underflows are never kept.

Written against the Triton API common to 3.6 and 3.9. Under TRITON_INTERPRET=1 there is a
single config so nothing is autotuned on CPU.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs():
    # RADIX: bits per radix pass (2**RADIX bucket edges per pass).
    if _INTERPRET:
        return [triton.Config({"BLOCK": 512, "RADIX": 4}, num_warps=4)]
    # Hopper: the [BLOCK, 2**RADIX] bucket sums set the register budget (ptxas sm_90 with
    # triton 3.9, RADIX 4: ~140 registers at 512/4 and 1024/8, ~185 at 1024/4 and 2048/8).
    return [triton.Config({"BLOCK": b, "RADIX": r}, num_warps=w)
            for b, w, r in ((512, 4, 4), (1024, 4, 4), (1024, 8, 4), (2048, 8, 4),
                            (1024, 4, 3), (2048, 8, 3))]


@triton.autotune(configs=_configs(), key=["V"], restore_value=["x_ptr"])
@triton.jit
def _top_h_kernel(x_ptr, stride_row, V, alpha_ptr, inv_t_ptr,
                  HAS_T: tl.constexpr, RADIX: tl.constexpr, BLOCK: tl.constexpr):
    NB: tl.constexpr = 1 << RADIX
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_row
    offs = tl.arange(0, BLOCK)
    alpha = tl.load(alpha_ptr + row).to(tl.float32)
    if HAS_T:
        inv_t = tl.load(inv_t_ptr + row).to(tl.float32)
    else:
        inv_t = 1.0

    # Pass 1: per lane, online: m = max z, s = sum exp(z - m), t = sum exp(z - m) (z - m).
    # Lanes are combined once at the end (no cross-lane reduction per block).
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    t = tl.zeros([BLOCK], dtype=tl.float32)
    x_max = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, V, BLOCK):
        idx = start + offs
        x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        z = x * inv_t
        x_max = tl.maximum(x_max, x)
        m_new = tl.maximum(m, z)
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # finite while the lane is all -inf
        d = z - ref
        w = tl.exp(d)
        c = tl.exp(m - ref)
        t = c * (t + tl.where(m == float("-inf"), 0.0, m - ref) * s) + tl.where(w > 0, w * d, 0.0)
        s = c * s + w
        m = m_new
    m_row = tl.max(m, 0)
    ref = tl.where(m_row == float("-inf"), 0.0, m_row)
    c = tl.exp(m - ref)
    t = tl.sum(c * (t + tl.where(m == float("-inf"), 0.0, m - ref) * s), 0)
    s = tl.sum(c * s, 0)
    m = m_row
    x_max = tl.max(x_max, 0)
    work = (alpha < 1.0) & (m > float("-inf"))
    target = alpha * (tl.log(s) - t / s)  # alpha * H(p)
    # Sortable key: fp32 bits -> int32 with the same order (flip the magnitude bits of
    # negatives); -0.0 folded into +0.0. Inlined below (nested jit calls are slow to interpret).
    top_bits = tl.where(x_max == 0.0, 0.0, x_max).to(tl.int32, bitcast=True)
    k_max = top_bits ^ ((top_bits >> 31) & 0x7FFFFFFF)

    # Pass 2: radix select of thr over the key bits. Invariant: {key > hi} is ok (the empty
    # set counts as ok) and {key >= lo} is not.
    j = tl.arange(0, NB)
    lo = tl.full([], -2147483648, tl.int64)
    thr = k_max.to(tl.int64)
    active = work
    for level in range(0, (32 + RADIX - 1) // RADIX):
        if active:
            # If RADIX does not divide 32 the last pass has step 1 and edges past the bracket:
            # harmless, {key >= edge} is still summed right (inside + above).
            shift = tl.maximum(32 - RADIX * (level + 1), 0)
            step = tl.full([], 1, tl.int64) << shift
            hi32 = (lo + step * NB - 1).to(tl.int32)
            lo32 = lo.to(tl.int32)
            edges = (lo + j.to(tl.int64) * step).to(tl.int32)  # lower edge of each bucket
            acc_s = tl.zeros([NB], dtype=tl.float32)
            acc_t = tl.zeros([NB], dtype=tl.float32)
            s_above = tl.zeros([BLOCK], dtype=tl.float32)
            t_above = tl.zeros([BLOCK], dtype=tl.float32)
            in_min = 2147483647  # smallest / largest key inside the bracket
            in_max = -2147483648
            for start in range(0, V, BLOCK):
                idx = start + offs
                valid = idx < V
                x = tl.load(base + idx, mask=valid, other=float("-inf")).to(tl.float32)
                bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
                key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
                d = x * inv_t - m
                w = tl.exp(d)
                wd = tl.where(w > 0, w * d, 0.0)
                above = key > hi32
                s_above += tl.where(above, w, 0.0)
                t_above += tl.where(above, wd, 0.0)
                inside = valid & (key >= lo32) & (key <= hi32)
                if tl.max(inside.to(tl.int32), 0) > 0:
                    in_min = tl.minimum(in_min, tl.min(tl.where(inside, key, 2147483647), 0))
                    in_max = tl.maximum(in_max, tl.max(tl.where(inside, key, -2147483648), 0))
                    ge = inside[:, None] & (key[:, None] >= edges[None, :])
                    acc_s += tl.sum(tl.where(ge, w[:, None], 0.0), 0)
                    acc_t += tl.sum(tl.where(ge, wd[:, None], 0.0), 0)
            s_ge = tl.sum(s_above, 0) + acc_s
            t_ge = tl.sum(t_above, 0) + acc_t
            ok = (s_ge == 0.0) | (tl.log(s_ge) - t_ge / s_ge <= target)
            first_ok = tl.min(tl.where(ok, j, NB), 0)  # NB: only {key > hi} is ok
            # {key >= lo + first_ok*step} is ok and the bucket below it is not: the threshold
            # is exact once the bucket is one key wide or the bracket holds one distinct key.
            thr = lo + first_ok.to(tl.int64) * step
            active = (first_ok > 0) & (shift > 0) & (in_min < in_max)
            lo = lo + (first_ok.to(tl.int64) - 1) * step
    thr32 = tl.minimum(thr, k_max.to(tl.int64)).to(tl.int32)  # the top group is always kept

    # Pass 3: drop what is below the threshold (or has zero probability in fp32).
    if work:
        neg_inf = tl.full([BLOCK], float("-inf"), tl.float32).to(x_ptr.dtype.element_ty)
        for start in range(0, V, BLOCK):
            idx = start + offs
            valid = idx < V
            x = tl.load(base + idx, mask=valid, other=float("-inf")).to(tl.float32)
            w = tl.exp(x * inv_t - m)
            bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
            drop = valid & (((bits ^ ((bits >> 31) & 0x7FFFFFFF)) < thr32) | (w == 0.0))
            tl.store(base + idx, neg_inf, mask=drop)


def top_h_triton_(logits: torch.Tensor, alpha: torch.Tensor,
                  inv_temperature: torch.Tensor | None = None, **config) -> torch.Tensor:
    """In place on logits [B, V] (fp32/bf16/fp16, unit stride along V).

    alpha: float32 [B]; inv_temperature: float32 [B] of 1/T (> 0) or None for T = 1.
    config (BLOCK, RADIX, num_warps) bypasses the autotuner, for tests. Returns logits.
    """
    assert logits.ndim == 2 and logits.stride(1) == 1, "need [B, V] with contiguous rows"
    b, v = logits.shape
    if b == 0:
        return logits
    has_t = inv_temperature is not None
    kernel = _top_h_kernel.fn if config else _top_h_kernel
    kernel[(b,)](logits, logits.stride(0), v, alpha, inv_temperature if has_t else alpha,
                 HAS_T=has_t, **config)
    return logits
