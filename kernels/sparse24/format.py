"""2:4 semi-structured sparse weight format.

A weight W [N, K] is 2:4 sparse when every group of 4 consecutive input columns
(W[n, 4g:4g+4]) has at most 2 nonzeros. It is stored as:

* ``values`` [N, K/2], same dtype as W: the 2 kept values of group g at
  values[n, 2g] and values[n, 2g+1], in increasing column order.
* ``meta`` [N, ceil(K/16)] int16: 4 bits per group, 4 groups per int16. Group g
  lives in word g // 4 at bit offset 4 * (g % 4); its low 2 bits are the
  position (0..3) of the first kept value, the next 2 bits the second one
  (pos0 < pos1). Unused trailing bits of the last word are 0.

So a bf16 weight costs K + K/8 bytes per row instead of 2K (56%).
Groups with fewer than 2 nonzeros keep their nonzero positions and fill up with
the lowest free positions (their stored value is then 0), so packing is
deterministic. K must be a multiple of 4: we do not pad, because padding K
would also require padding every activation (every real model has K % 64 == 0).
"""
from __future__ import annotations

import torch

GROUPS_PER_WORD = 4  # 4 bits per group in an int16


def _check_k(k: int) -> None:
    if k % 4 != 0:
        raise ValueError(
            f"2:4 sparsity needs the input dimension K to be a multiple of 4, got K={k}; "
            "pad the weight and the activations to a multiple of 4 first")


def count_24_violations(w: torch.Tensor) -> int:
    """Number of groups of 4 (along the last dim) with more than 2 nonzeros."""
    _check_k(w.shape[-1])
    nnz = (w.reshape(-1, w.shape[-1] // 4, 4) != 0).sum(-1)
    return int((nnz > 2).sum())


def is_24(w: torch.Tensor) -> bool:
    return w.shape[-1] % 4 == 0 and count_24_violations(w) == 0


def compress_24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a 2:4 sparse weight [N, K] into (values [N, K/2], meta [N, ceil(K/16)] int16)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    _check_k(k)
    bad = count_24_violations(w)
    if bad:
        raise ValueError(
            f"weight is not 2:4 sparse: {bad} of {n * k // 4} groups of 4 have more than 2 nonzeros")
    g = k // 4
    groups = w.reshape(n, g, 4)
    # Sort key: nonzeros first, then by position; the 2 smallest keys are kept.
    idx = torch.arange(4, device=w.device)
    key = (groups == 0).to(torch.int64) * 4 + idx
    pos = key.topk(2, dim=-1, largest=False).indices.sort(dim=-1).values  # [N, G, 2]
    values = groups.gather(-1, pos).reshape(n, k // 2).contiguous()
    nib = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.int32)  # [N, G], 4 bits
    words = -(-g // GROUPS_PER_WORD)
    nib = torch.nn.functional.pad(nib, (0, words * GROUPS_PER_WORD - g))
    shifts = torch.arange(GROUPS_PER_WORD, device=w.device, dtype=torch.int32) * 4
    packed = (nib.reshape(n, words, GROUPS_PER_WORD) << shifts).sum(-1)  # < 2**16
    # Reinterpret as int16 (values >= 2**15 wrap to negative, bits unchanged).
    meta = (packed - ((packed >> 15) << 16)).to(torch.int16).contiguous()
    return values, meta


def unpack_positions(meta: torch.Tensor, k: int) -> torch.Tensor:
    """Positions [N, K/4, 2] (int64) of the kept values, from meta."""
    _check_k(k)
    g = k // 4
    words = meta.to(torch.int32) & 0xFFFF
    shifts = torch.arange(GROUPS_PER_WORD, device=meta.device, dtype=torch.int32) * 4
    nib = ((words.unsqueeze(-1) >> shifts) & 0xF).reshape(meta.shape[0], -1)[:, :g]
    return torch.stack([nib & 3, (nib >> 2) & 3], dim=-1).to(torch.int64)


def decompress_24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Dense weight [N, K] (dtype of values) from the packed form."""
    n, k2 = values.shape
    k = 2 * k2
    if meta.shape != (n, -(-k // 16)):
        raise ValueError(f"meta shape {tuple(meta.shape)} does not match values {tuple(values.shape)}")
    pos = unpack_positions(meta, k)
    dense = torch.zeros(n, k // 4, 4, dtype=values.dtype, device=values.device)
    dense.scatter_(-1, pos, values.reshape(n, k // 4, 2))
    return dense.reshape(n, k)


def compressed_nbytes(n: int, k: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of values + meta for an [N, K] weight."""
    elt = torch.empty((), dtype=dtype).element_size()
    return n * (k // 2) * elt + n * (-(-k // 16)) * 2
