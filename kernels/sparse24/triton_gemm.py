"""Triton GEMM y = x @ W^T (+ bias) with W 2:4-compressed (see format.py).

Stock Triton has no sparse tensor-core instruction, so the gain is bytes: W is
read as values [N, K/2] + 4 bits of metadata per group of 4 (56% of dense bf16).

Two kernels:
* ``_sp24_gemv_kernel`` (small M, decode): "gather x". For each kept value v at
  column 4g+pos we load x[m, 4g+pos] (x is tiny and stays in L1) and reduce
  v * x with tl.sum, so only the K/2 kept values are multiplied.
* ``_sp24_mm_kernel`` (larger M): tensor cores via tl.dot. The tile is split by
  position p in 0..3: y += x[:, p::4] @ W_p^T where W_p[n, g] is the kept value
  of group g whose position is p (else 0). Each value/meta element is loaded once
  and no reshape/scatter of the W tile is needed.

Written against the Triton API common to 3.6 and 3.9. Under TRITON_INTERPRET=1
each kernel has a single config so nothing is autotuned on CPU; `config=` runs one
given config instead (the tests run every GPU config that way, under the interpreter).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
GEMV_MAX_M = 16  # M <= this uses the gather-x GEMV kernel (tune on the GPU with bench.py)


GPU_GEMV_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_V": bv}, num_warps=w, num_stages=3)
                    for bn in (8, 16, 32, 64) for bv in (64, 128, 256) for w in (4, 8)]
INTERPRET_GEMV_CONFIG = triton.Config({"BLOCK_N": 16, "BLOCK_V": 32}, num_warps=4, num_stages=1)


def _prune_gemv(configs, named_args, **kwargs):
    # Keep the [BLOCK_M, BLOCK_N, BLOCK_V] gather tile within a register budget.
    bm = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 1))
    keep = [c for c in configs
            if bm * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_V"] <= 64 * c.num_warps * 32]
    return keep or configs[:1]


# Hopper (H100/H200): 228 KB smem, wgmma wants BLOCK_M multiple of 64 for large M.
GPU_MM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [  # BM, BN, BK, warps, stages
        (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 128, 8, 3), (64, 256, 64, 4, 4),
        (64, 128, 128, 4, 4), (128, 64, 128, 4, 4), (64, 64, 128, 4, 4), (32, 128, 128, 4, 4),
        (16, 128, 128, 4, 4), (16, 64, 256, 4, 4), (32, 64, 256, 4, 3),
        (16, 32, 256, 4, 4),  # more programs along N when M is small
    ]]
INTERPRET_MM_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 8},
                                    num_warps=4, num_stages=1)


@triton.autotune(configs=[INTERPRET_GEMV_CONFIG] if _INTERPRET else GPU_GEMV_CONFIGS, key=["M_BUCKET", "N", "K"],
                 prune_configs_by={"early_config_prune": _prune_gemv})
@triton.jit
def _sp24_gemv_kernel(x_ptr, v_ptr, meta_ptr, b_ptr, y_ptr, M, N, K, M_BUCKET,
                      stride_xm, stride_xk, stride_vn, stride_mn, stride_ym, stride_yn,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    KV = K // 2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for v0 in range(0, KV, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)  # index of the kept value; its group is offs_v // 2
        mask_nv = mask_n[:, None] & (offs_v < KV)[None, :]
        vals = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_v[None, :],
                       mask=mask_nv, other=0.0).to(tl.float32)
        g = offs_v // 2
        word = tl.load(meta_ptr + offs_n[:, None] * stride_mn + (g // 4)[None, :],
                       mask=mask_nv, other=0).to(tl.int32)
        shift = (g % 4) * 4 + (offs_v % 2) * 2
        kidx = 4 * g[None, :] + ((word >> shift[None, :]) & 3)  # [BN, BV] input column
        xg = tl.load(x_ptr + offs_m[:, None, None] * stride_xm + kidx[None, :, :] * stride_xk,
                     mask=mask_m[:, None, None] & mask_nv[None, :, :], other=0.0).to(tl.float32)
        acc += tl.sum(xg * vals[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.autotune(configs=[INTERPRET_MM_CONFIG] if _INTERPRET else GPU_MM_CONFIGS, key=["M_BUCKET", "N", "K"])
@triton.jit
def _sp24_mm_kernel(x_ptr, v_ptr, meta_ptr, b_ptr, y_ptr, M, N, K, M_BUCKET,
                    stride_xm, stride_xk, stride_vn, stride_mn, stride_ym, stride_yn,
                    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                    BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped program order so neighbouring programs share W tiles in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    G = K // 4
    BG: tl.constexpr = BLOCK_K // 4
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        g = k0 // 4 + tl.arange(0, BG)
        mask_ng = mask_n[:, None] & (g < G)[None, :]
        word = tl.load(meta_ptr + offs_n[:, None] * stride_mn + (g // 4)[None, :],
                       mask=mask_ng, other=0).to(tl.int32)
        nib = (word >> ((g % 4) * 4)[None, :]) & 15
        p0 = nib & 3
        p1 = nib >> 2
        vrow = v_ptr + offs_n[:, None] * stride_vn + 2 * g[None, :]
        w0 = tl.load(vrow, mask=mask_ng, other=0.0)
        w1 = tl.load(vrow + 1, mask=mask_ng, other=0.0)
        zero = tl.zeros_like(w0)
        xrow = x_ptr + offs_m[:, None] * stride_xm + (4 * g)[None, :] * stride_xk
        mask_mg = mask_m[:, None] & (g < G)[None, :]
        for p in tl.static_range(4):
            wp = tl.where(p0 == p, w0, tl.where(p1 == p, w1, zero))  # [BN, BG]
            xp = tl.load(xrow + p * stride_xk, mask=mask_mg, other=0.0)  # [BM, BG]
            if UPCAST:  # the interpreter's tl.dot multiplies bf16 as raw uint16 bits
                xp = xp.to(tl.float32)
                wp = wp.to(tl.float32)
            acc = tl.dot(xp, tl.trans(wp), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _launch(kernel, grid, config, *args, **kw):
    if config is None:
        return kernel[grid](*args, **kw)
    meta = {**config.kwargs, **kw}
    # The autotuner's own kernel (.fn), bypassing the search; the grid sees the config's block sizes.
    return kernel.fn[lambda _: grid(meta)](*args, **meta, num_warps=config.num_warps,
                                            num_stages=config.num_stages)


def _m_bucket(m: int) -> int:
    return min(triton.next_power_of_2(max(m, 1)), 4096)


def sparse24_linear_triton(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                           bias: torch.Tensor | None = None, path: str = "auto",
                           config: triton.Config | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W^T (+ bias) with W packed as (values, meta).

    path: "auto" (gemv for M <= GEMV_MAX_M, else mm), "gemv" or "mm".
    config: run the kernel with this config instead of autotuning (one of GPU_*_CONFIGS).
    """
    n, k2 = values.shape
    k = 2 * k2
    if x.shape[-1] != k:
        raise ValueError(f"x has K={x.shape[-1]} but the weight has K={k}")
    if values.dtype != x.dtype:
        raise ValueError(f"dtype mismatch: x {x.dtype}, values {values.dtype}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    values = values.contiguous()
    meta = meta.contiguous()
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0:
        return y.reshape(*lead, n)
    has_bias = bias is not None
    b = bias.contiguous() if has_bias else values  # dummy pointer when no bias
    common = (x2, values, meta, b, y, m, n, k, _m_bucket(m),
              x2.stride(0), x2.stride(1), values.stride(0), meta.stride(0), y.stride(0), y.stride(1))
    if path == "auto":
        path = "gemv" if m <= GEMV_MAX_M else "mm"
    if path == "gemv":
        bm = min(triton.next_power_of_2(m), 16)
        grid = lambda meta_: (triton.cdiv(n, meta_["BLOCK_N"]), triton.cdiv(m, bm))
        _launch(_sp24_gemv_kernel, grid, config, *common, HAS_BIAS=has_bias, BLOCK_M=bm)
    elif path == "mm":
        prec = "ieee" if x.dtype == torch.float32 else "tf32"
        grid = lambda meta_: (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(n, meta_["BLOCK_N"]),)
        _launch(_sp24_mm_kernel, grid, config, *common, HAS_BIAS=has_bias, PRECISION=prec, UPCAST=_INTERPRET)
    else:
        raise ValueError(f"unknown path {path!r}")
    return y.reshape(*lead, n)
