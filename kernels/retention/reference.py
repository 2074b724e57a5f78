"""The specification of retention-gated KV eviction (after TRIM-KV), in plain torch, float32.

Bounded cache. Per layer and KV head the cache holds at most C = M + B tokens (budget M,
buffer B). Tokens are appended in order; every token attends (plain softmax) to the cache as it
stands when it is appended, itself and the tokens appended with it before it included. Whenever the
cache reaches C tokens it is compacted: each KV head keeps its own top-M tokens by the policy's
score, re-sorted by position. A run of new tokens (a prompt, a prefill chunk, a decode step) is split
at the points where the cache reaches C, so the result depends only on the token sequence, never on
how the tokens were batched.

Policies at the same budget:
* retention (TRIM-KV): score_i = log beta_i * (t - i), t = tokens seen + 1 (the authors' q_idx); the first
  `sinks` positions (default 4) score +inf. The authors' rule is sinks = 0; on the default model the
  trained gates let the first tokens decay (log beta ~ -2e-4, enough for the soft training objective)
  and the hard top-M then drops them at a few thousand tokens, which costs far more than the same
  gates with the sinks kept (BENCHMARKS.md, retention);
* streaming (StreamingLLM): the first `sinks` positions, then the most recent;
* h2o: attention received, summed over every query since the token arrived (and over the query
  heads sharing the KV head); the `recent` newest tokens are always kept;
* snapkv: attention from the newest `window` queries, max-pooled over `kernel` neighbouring keys;
  the newest `window` tokens are always kept.
Ties keep the newer token (the larger slot: slots are in position order).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

INF = float("inf")


# ----------------------------------------------------------------------------- scores and selection

DEFAULT_SINKS = 4


def retention_scores(log_beta: torch.Tensor, pos: torch.Tensor, t, sinks: int = 0) -> torch.Tensor:
    """log beta_i * (t - pos_i), float32, and +inf for pos_i < sinks; t broadcasts against the leading dims."""
    t = torch.as_tensor(t, device=log_beta.device)
    if t.dim():
        t = t.reshape(t.shape + (1,) * (log_beta.dim() - t.dim()))
    s = log_beta.float() * (t - pos).float()
    return s.masked_fill(pos < sinks, INF) if sinks > 0 else s


def top_m_slots(scores: torch.Tensor, m: int, count: int | None = None) -> torch.Tensor:
    """Slots of the top-m scores along the last dim among the first `count` (ties: larger slot first),
    sorted ascending. Returns int64 [..., min(m, count)]."""
    n = scores.shape[-1] if count is None else count
    s = scores[..., :n]
    k = min(m, n)
    # Stable descending sort of the reversed row: equal scores come out larger-slot first.
    order = torch.argsort(s.flip(-1), dim=-1, descending=True, stable=True)[..., :k]
    return torch.sort(n - 1 - order, dim=-1).values


def compact_reference(k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, log_beta: torch.Tensor,
                      count: torch.Tensor, t: torch.Tensor, m: int, sinks: int = 0):
    """Compaction of a batch of rings by retention score (what the Triton kernel does in place).

    k, v [R, H, C, D]; pos [R, H, C] (int); log_beta [R, H, C]; count [R] valid slots per ring
    (the same for every head); t [R]; positions below `sinks` always stay. Each head of ring r keeps its
    top-min(m, count_r) slots of
    [0, count_r), moved to the front in position order; slots after them are left as they were.
    Returns new (k, v, pos, log_beta, new_count).
    """
    k, v, pos, log_beta = k.clone(), v.clone(), pos.clone(), log_beta.clone()
    new_count = torch.minimum(count, torch.full_like(count, m))
    for r in range(k.shape[0]):
        n = int(count[r])
        keep = top_m_slots(retention_scores(log_beta[r], pos[r], t[r], sinks), m, n)  # [H, k]
        kk = keep.shape[-1]
        idx = keep.unsqueeze(-1).expand(-1, -1, k.shape[-1])
        k[r, :, :kk] = k[r].gather(1, idx)
        v[r, :, :kk] = v[r].gather(1, idx)
        pos[r, :, :kk] = pos[r].gather(1, keep)
        log_beta[r, :, :kk] = log_beta[r].gather(1, keep)
    return k, v, pos, log_beta, new_count


# ----------------------------------------------------------------------------- training-time capacity

def capacity_sum_reference(log_beta: torch.Tensor) -> torch.Tensor:
    """S_t = sum_{i <= t} beta_i^(t - i) along the last dim, materialising the T x T matrix."""
    t_len = log_beta.shape[-1]
    ar = torch.arange(t_len, device=log_beta.device)
    dist = (ar[:, None] - ar[None, :]).float()                  # [t, i]
    e = log_beta.float().unsqueeze(-2) * dist.clamp(min=0)      # [..., t, i]
    e = e.masked_fill(dist < 0, -INF)
    return e.exp().sum(-1)


def capacity_loss(s: torch.Tensor, m: int) -> torch.Tensor:
    """Mean over the steps t that can exceed the budget (t >= m, 0-based) of
    max(0, (S_t - m) / max(t - m, 1)); s [..., T]."""
    t_len = s.shape[-1]
    if t_len <= m:
        return s.new_zeros(())
    t = torch.arange(m, t_len, device=s.device, dtype=s.dtype)
    return F.relu((s[..., m:] - m) / (t - m).clamp(min=1)).mean()


def retention_bias(log_beta: torch.Tensor, q_len: int | None = None) -> torch.Tensor:
    """Additive attention bias of the training path: log beta_k * (q - k) for k <= q, -inf above the
    diagonal. log_beta [..., T] -> [..., T, T] (query, key)."""
    t_len = log_beta.shape[-1]
    ar = torch.arange(t_len, device=log_beta.device)
    dist = (ar[:, None] - ar[None, :]).to(log_beta.dtype)
    bias = log_beta.unsqueeze(-2) * dist.clamp(min=0)
    return bias.masked_fill(dist < 0, -INF)


# ----------------------------------------------------------------------------- the bounded cache

@dataclass
class Policy:
    """How a bounded cache chooses what to keep. Subclasses set `name` and `score`."""
    name = "policy"
    needs_attention = False

    def score(self, layer: "LayerCache", t: int) -> torch.Tensor:  # [H, n]
        raise NotImplementedError

    def observe(self, layer: "LayerCache", probs: torch.Tensor) -> None:
        """probs [H_kv, L, n]: attention the L new queries gave the n cached keys (summed over the
        query heads of each KV head). Called only when needs_attention."""

    def select(self, layer: "LayerCache", keep: torch.Tensor) -> None:
        """Reorder the policy's own per-slot state after compaction."""


@dataclass
class RetentionPolicy(Policy):
    sinks: int = DEFAULT_SINKS
    name = "retention"

    def score(self, layer, t):
        return retention_scores(layer.log_beta, layer.pos, t, self.sinks)


@dataclass
class StreamingPolicy(Policy):
    sinks: int = 4
    name = "streaming"

    def score(self, layer, t):
        p = layer.pos.float()
        return torch.where(layer.pos < self.sinks, torch.full_like(p, INF), p)


@dataclass
class H2OPolicy(Policy):
    recent: int | None = None  # None: half the budget, as in H2O
    name = "h2o"
    needs_attention = True

    def observe(self, layer, probs):
        acc = layer.state.get("acc")
        n = probs.shape[-1]
        add = probs.sum(1)
        if acc is None:
            acc = add
        else:
            acc = torch.cat([acc, add.new_zeros(add.shape[0], n - acc.shape[1])], 1) + add
        layer.state["acc"] = acc

    def score(self, layer, t):
        s = layer.state["acc"].clone()
        recent = layer.budget // 2 if self.recent is None else self.recent
        if recent:
            s[:, -recent:] = INF
        return s

    def select(self, layer, keep):
        layer.state["acc"] = layer.state["acc"].gather(1, keep)


@dataclass
class SnapKVPolicy(Policy):
    window: int = 32
    kernel: int = 7
    name = "snapkv"
    needs_attention = True

    def observe(self, layer, probs):
        rows = layer.state.get("rows")  # [H, w', n_old]
        n = probs.shape[-1]
        if rows is not None:
            rows = torch.cat([rows, rows.new_zeros(rows.shape[0], rows.shape[1], n - rows.shape[2])], 2)
            probs = torch.cat([rows, probs], 1)
        layer.state["rows"] = probs[:, -self.window:]

    def score(self, layer, t):
        s = layer.state["rows"].sum(1)
        if self.kernel > 1:
            s = F.max_pool1d(s.unsqueeze(1), self.kernel, stride=1, padding=self.kernel // 2).squeeze(1)
        s = s.clone()
        s[:, -self.window:] = INF
        return s

    def select(self, layer, keep):
        rows = layer.state["rows"]
        layer.state["rows"] = rows.gather(2, keep.unsqueeze(1).expand(-1, rows.shape[1], -1))


POLICIES = {"retention": RetentionPolicy, "streaming": StreamingPolicy, "h2o": H2OPolicy, "snapkv": SnapKVPolicy}


@dataclass
class LayerCache:
    """One layer's cache: K, V [H, n, D] (RoPE applied), positions and log beta [H, n]."""
    budget: int
    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    log_beta: torch.Tensor | None = None
    state: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return 0 if self.k is None else self.k.shape[1]

    def append(self, k, v, pos, log_beta) -> None:
        if self.k is None:
            self.k, self.v, self.pos, self.log_beta = k, v, pos, log_beta
        else:
            self.k = torch.cat([self.k, k], 1)
            self.v = torch.cat([self.v, v], 1)
            self.pos = torch.cat([self.pos, pos], 1)
            self.log_beta = torch.cat([self.log_beta, log_beta], 1)

    def compact(self, policy: Policy, t: int) -> None:
        keep = top_m_slots(policy.score(self, t), self.budget)  # [H, M]
        idx = keep.unsqueeze(-1).expand(-1, -1, self.k.shape[-1])
        self.k, self.v = self.k.gather(1, idx), self.v.gather(1, idx)
        self.pos, self.log_beta = self.pos.gather(1, keep), self.log_beta.gather(1, keep)
        policy.select(self, keep)


def attend(q: torch.Tensor, layer: LayerCache, n_new: int, scale: float, want_probs: bool):
    """q [Hq, L, D] for the L newest cached tokens; keys/values = the whole layer cache [Hkv, n, D].
    Causal among the new tokens. Returns (out [Hq, L, D], probs summed per KV head [Hkv, L, n] or None)."""
    hq, L, d = q.shape
    hkv, n = layer.k.shape[0], layer.k.shape[1]
    g = hq // hkv
    k = layer.k.repeat_interleave(g, 0)
    v = layer.v.repeat_interleave(g, 0)
    logits = torch.matmul(q.float(), k.float().transpose(1, 2)) * scale     # [Hq, L, n]
    qi = torch.arange(L, device=q.device)[:, None] + (n - n_new)
    ki = torch.arange(n, device=q.device)[None, :]
    logits = logits.masked_fill(ki > qi, -INF)
    p = torch.softmax(logits, -1)
    out = torch.matmul(p, v.float()).to(q.dtype)
    probs = p.view(hkv, g, L, n).sum(1) if want_probs else None
    return out, probs


class BoundedCache:
    """The bounded cache for every layer of one sequence; see the module docstring."""

    def __init__(self, num_layers: int, budget: int, buffer: int, policy: Policy):
        if budget < 1 or buffer < 1:
            raise ValueError("budget and buffer must be >= 1")
        self.budget, self.buffer, self.policy = budget, buffer, policy
        self.capacity = budget + buffer
        self.layers = [LayerCache(budget) for _ in range(num_layers)]
        self.seen = 0  # tokens appended so far

    def pieces(self, n_tokens: int) -> list[int]:
        """Split a run of n new tokens where the cache reaches capacity."""
        out, cnt = [], self.layers[0].n
        while n_tokens:
            take = min(n_tokens, self.capacity - cnt)
            out.append(take)
            n_tokens -= take
            cnt = self.budget if cnt + take >= self.capacity else cnt + take
        return out

    def after_piece(self, n_new: int) -> None:
        """Account the piece; compact every layer when the cache is full."""
        self.seen += n_new
        if self.layers[0].n >= self.capacity:
            t = self.seen + 1
            for layer in self.layers:
                layer.compact(self.policy, t)

    def held_tokens(self) -> int:
        return self.layers[0].n


def make_policy(name: str, **kw) -> Policy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {sorted(POLICIES)}") from None
    return cls(**kw)


def unbounded(num_layers: int) -> BoundedCache:
    """A cache that never compacts (full attention through the same code path)."""
    return BoundedCache(num_layers, budget=1 << 40, buffer=1, policy=RetentionPolicy(sinks=0))


__all__ = ["retention_scores", "top_m_slots", "compact_reference", "capacity_sum_reference", "capacity_loss",
           "retention_bias", "BoundedCache", "LayerCache", "attend", "make_policy", "unbounded", "POLICIES"]
