"""Dispatch for the 2:4 sparse linear: Triton on CUDA, torch on CPU."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .format import decompress_24


def sparse24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ W^T (+ bias), W [N, K] packed as (values, meta); y in x.dtype."""
    if x.is_cuda:
        from .triton_gemm import sparse24_linear_triton
        return sparse24_linear_triton(x, values, meta, bias)
    return sparse24_linear_torch(x, values, meta, bias)


def sparse24_linear_torch(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """CPU path: decompress and use the dense GEMM (no sparse speed-up on CPU).

    Callers that run many steps should cache decompress_24(values, meta) instead.
    """
    w = decompress_24(values, meta).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
