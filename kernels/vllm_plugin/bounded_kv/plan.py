"""Per-step plan of the bounded ring: which new tokens go to which ring slots, in which rounds, and which
rings are compacted after each round. Plain torch on the host, vectorised over requests; shared by every
layer of the step (the ring count is a function of the tokens seen, config.BoundedKVConfig.ring_count).

A request's new tokens are split where its ring reaches C = M + B, as reference.BoundedCache.pieces
does; round j holds every request's j-th piece. Almost every step is one round (decode: one token per
request; C - count >= B tokens always fit), which keeps the stock attention kernel's inputs unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Round:
    req: torch.Tensor | None       # [n] request rows in this round (None: all, in order)
    tokens: torch.Tensor | None    # [k] token indices in the step's flat batch (None: 0..k-1, all of them)
    query_start_loc: torch.Tensor  # [n+1] int32, into this round's tokens
    ring_lens: torch.Tensor        # [n] int32: valid ring slots after writing the piece (the kernel's seq_lens)
    rings: torch.Tensor            # [n] int32: ring block of each request
    slot_mapping: torch.Tensor     # [k] int64: ring * C + slot of each token
    slots: torch.Tensor            # [k] int64: slot of each token
    token_rings: torch.Tensor      # [k] int64: ring of each token
    positions: torch.Tensor        # [k] int32: logical position of each token
    max_query_len: int
    compact_rings: torch.Tensor    # [r] int64: rings full after this round
    compact_t: torch.Tensor        # [r] int64: t = tokens seen + 1 (the reference's q_idx)
    scheduler_metadata: object = None


def ring_count(n: torch.Tensor, m: int, b: int) -> torch.Tensor:
    c = m + b
    return torch.where(n < c, n, m + (n - m) % b)


def plan_step(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, rings: torch.Tensor,
              m: int, b: int, num_tokens: int) -> list[Round]:
    """query_start_loc [R+1], seq_lens [R] (tokens after this step), rings [R]: host tensors."""
    c = m + b
    qsl = query_start_loc.long()
    seq = seq_lens.long()
    qlen = qsl[1:] - qsl[:-1]
    ctx = seq - qlen
    cnt = ring_count(ctx, m, b)
    rings = rings.long()
    if bool((qlen <= c - cnt).all()):  # the common case: one round over the whole batch, in order
        return [_round(None, qsl, qlen, qsl[:-1], cnt, ctx, rings, c, m, b, num_tokens, whole=True)]
    out = []
    done = torch.zeros_like(qlen)
    seen = ctx.clone()
    while True:
        rem = qlen - done
        active = rem > 0
        if not bool(active.any()):
            return out
        req = active.nonzero().squeeze(1)
        take = torch.minimum(rem[req], c - cnt[req])
        sub_qsl = torch.zeros(req.numel() + 1, dtype=torch.long)
        torch.cumsum(take, 0, out=sub_qsl[1:])
        starts = qsl[req] + done[req]
        out.append(_round(req, sub_qsl, take, starts, cnt[req], seen[req], rings[req], c, m, b, num_tokens))
        after = cnt[req] + take
        cnt[req] = torch.where(after >= c, torch.full_like(after, m), after)
        done[req] += take
        seen[req] += take


def _round(req, sub_qsl, take, starts, cnt, seen, rings, c, m, b, num_tokens, whole=False) -> Round:
    k = int(sub_qsl[-1])
    per_tok_req = torch.repeat_interleave(torch.arange(take.numel()), take)
    offset = torch.arange(k) - sub_qsl[:-1][per_tok_req]
    tokens = None if whole and k == num_tokens else starts[per_tok_req] + offset
    slots = cnt[per_tok_req] + offset
    tok_rings = rings[per_tok_req]
    after = cnt + take
    full = after >= c
    return Round(
        req=req, tokens=tokens, query_start_loc=sub_qsl.to(torch.int32), ring_lens=after.to(torch.int32),
        rings=rings.to(torch.int32), slot_mapping=tok_rings * c + slots, slots=slots, token_rings=tok_rings,
        positions=(seen[per_tok_req] + offset).to(torch.int32), max_query_len=int(take.max()) if take.numel() else 0,
        compact_rings=rings[full], compact_t=(seen + take)[full] + 1)
