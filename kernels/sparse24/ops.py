"""Dispatch for the 2:4 sparse linear, the one rule every caller uses (the vLLM method's custom op, the
benchmark): the Triton kernel where Triton runs, for fewer than `dense_min_m` rows; otherwise the packed
weight is decompressed into a transient dense tensor for a dense GEMM."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .format import decompress_24

# Rows from which a dense GEMM on the decompressed weight beats the kernel (large M is compute bound, and
# stock Triton has no sparse tensor-core instruction). An unmeasured placeholder until an H200 run of
# `python -m kernels.sparse24.bench` sets it; LEANSERVE_SPARSE24_DENSE_MIN_M overrides it (0 = always dense).
DENSE_MIN_M = int(os.environ.get("LEANSERVE_SPARSE24_DENSE_MIN_M", "1024"))


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: torch.Tensor | None = None, *, triton: bool | None = None,
                    dense_min_m: int | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W^T (+ bias), W [N, K] packed as (values, meta); y in x.dtype.

    triton: None = where Triton has a backend (CUDA tensors); True forces the kernel (on CPU tensors it
    then needs TRITON_INTERPRET=1: for tests); False never uses it (a CPU has no 2:4 instructions, so
    decompressing is the best it can do).
    """
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    use_triton = x.is_cuda if triton is None else triton
    if use_triton and m < (DENSE_MIN_M if dense_min_m is None else dense_min_m):
        from .triton_gemm import sparse24_linear_triton
        return sparse24_linear_triton(x, values, meta, bias)
    w = decompress_24(values, meta).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
