"""`leanserve eval kv`: teacher-forced quality of a bounded KV cache against full attention.

Each evaluation sequence is fed through the bounded cache of reference.py (pieces that end where the
cache fills, exact attention inside a piece, the bounded cache before it) and compared, token by
token, with the same model under full attention: perplexity of the text and mean KL(full || bounded)
over every predicted token, per policy and budget.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .gate import GateSet
from .llama import BoundedLM, Parts, forward_full
from .oracle import OraclePolicy, compaction_starts, future_attention, set_future
from .reference import BoundedCache, make_policy


@dataclass
class Row:
    text: str
    method: str
    budget: int
    ppl: float
    kl: float
    tokens: int
    seconds: float


def _nll_kl(full_logp: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    logp = F.log_softmax(logits[:-1].float(), -1)
    nll = float(F.nll_loss(logp, labels, reduction="sum"))
    kl = float((full_logp.exp() * (full_logp - logp)).sum())
    return nll, kl


def evaluate(parts: Parts, gates: GateSet | None, texts: dict[str, list[torch.Tensor]], budgets: list[int],
             buffer: int, methods: list[str], progress: bool = True, sinks: int = 4) -> list[Row]:
    """sinks: first positions the retention and streaming policies always keep. methods may include "oracle"
    (oracle.py: a hindsight reference, not a policy an engine can run)."""
    rows = []
    jobs = [(name, m, b) for name in texts for m in methods for b in budgets]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=sum(len(texts[n]) for n, _, _ in jobs) + sum(len(s) for s in texts.values()),
                   desc="eval kv", unit="seq", dynamic_ncols=True)
    for name, seqs in texts.items():
        full = []
        nll = 0.0
        with torch.no_grad():
            for ids in seqs:
                logp = F.log_softmax(forward_full(parts, ids.unsqueeze(0))[0][0, :-1].float(), -1)
                nll += float(F.nll_loss(logp, ids[1:], reduction="sum"))
                full.append(logp)
                if bar is not None:
                    bar.update(1)
        n_tok = sum(len(s) - 1 for s in seqs)
        rows.append(Row(name, "full", 0, float(torch.tensor(nll / n_tok).exp()), 0.0, n_tok, 0.0))
        if "oracle" in methods:
            starts = sorted({s for b in budgets for ids in seqs for s in compaction_starts(b, buffer, len(ids))})
            futures = [future_attention(parts, ids, starts) for ids in seqs]
        for method in methods:
            for budget in budgets:
                t0 = time.perf_counter()
                nll = kl = 0.0
                for j, (ids, logp) in enumerate(zip(seqs, full)):
                    kw = {"sinks": sinks} if method in ("retention", "streaming") else {}
                    policy = OraclePolicy() if method == "oracle" else make_policy(method, **kw)
                    cache = BoundedCache(parts.num_layers, budget, buffer, policy)
                    if method == "oracle":
                        set_future(cache, futures[j])
                    lm = BoundedLM(parts, cache, gates if method == "retention" else None)
                    a, b = _nll_kl(logp, lm.feed(ids), ids[1:])
                    nll, kl = nll + a, kl + b
                    if bar is not None:
                        bar.update(1)
                rows.append(Row(name, method, budget, float(torch.tensor(nll / n_tok).exp()), kl / n_tok, n_tok,
                                round(time.perf_counter() - t0, 1)))
    if bar is not None:
        bar.close()
    return rows
