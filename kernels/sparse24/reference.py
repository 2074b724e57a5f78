"""Specification of the 2:4 sparse linear: y = x @ W^T (+ bias), W given packed."""
from __future__ import annotations

import torch

from .format import decompress_24


def sparse24_linear_reference(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                              bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K], values [N, K/2], meta [N, ceil(K/16)] -> y [..., N] in x.dtype (fp32 math)."""
    w = decompress_24(values, meta).float()
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
