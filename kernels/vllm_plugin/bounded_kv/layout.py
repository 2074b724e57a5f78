"""Where vLLM's CPU attention kernel keeps each (slot, dim) of a block's K and V.

The kernel stores K in an ISA-specific tiled/transposed order inside each (block, head) region (V is
plain [slot, dim] today); compaction must read the cache in that order. Rather than copying the C++
layout rules (which change with the ISA, block size, head size and dtype), the map is measured once per
shape with the kernel's own write op (cpu_attn_reshape_and_cache): each probe writes every token's
logical index, 7 bits at a time so that the values are exact in bf16/fp16, and reads where they land.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def cache_maps(isa: str, c: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_inv, v_inv): int64 [c * d]; element (slot s, dim j) of a head's K region sits at k_inv[s * d + j]."""
    from vllm import _custom_ops as vops

    h = 2
    n = c * d
    found_k = torch.zeros(h, n, dtype=torch.long)
    found_v = torch.zeros(h, n, dtype=torch.long)
    logical = torch.arange(n).view(c, 1, d).expand(c, h, d)
    for shift in range(0, max(n - 1, 1).bit_length(), 7):
        kv = torch.zeros(1, h, c, 2 * d, dtype=dtype)
        kc, vc = kv.view(1, h, 2 * c, d).chunk(2, dim=2)
        val = (((logical >> shift) & 127) + 1).to(dtype).contiguous()
        vops.cpu_attn_reshape_and_cache(val, val.clone(), kc, vc, torch.arange(c), isa)
        for found, region in ((found_k, kc), (found_v, vc)):
            got = region[0].reshape(h, n).float().long() - 1
            if bool((got < 0).any()):
                raise RuntimeError(f"CPU attention cache layout probe: unwritten cells ({isa}, {c}, {d}, {dtype})")
            found |= got << shift
    maps = []
    for found in (found_k, found_v):
        if not bool((found[0] == found[1]).all()) or not bool((found[0].sort().values == torch.arange(n)).all()):
            raise RuntimeError(f"CPU attention cache layout probe: not a per-head permutation ({isa}, {c}, {d})")
        inv = torch.empty(n, dtype=torch.long)
        inv[found[0]] = torch.arange(n)
        maps.append(inv)
    return maps[0], maps[1]
