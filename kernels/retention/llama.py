"""Llama-family forward passes with retention gates, over the weights of a HF transformers model.

Two modes, both built from the HF model's own modules (norms, projections, rotary embedding, MLP):
* `forward_full`: causal attention over whole sequences, optionally with the training-time
  retention bias log beta_k * (q - k) added to the attention logits (TRIM-KV's training path);
* `BoundedLM`: token-by-token semantics of the bounded cache of reference.py (prefill, decode,
  teacher-forced scoring), for evaluation and as the reference the engine must match.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .gate import GateError, GateSet
from .reference import BoundedCache, attend, retention_bias

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def check_supported(config) -> None:
    mt = getattr(config, "model_type", None)
    if mt not in SUPPORTED:
        raise GateError(f"retention gates support the {', '.join(SUPPORTED)} architectures, not {mt!r}")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", False):
        raise GateError("models with sliding-window attention are not supported")


class Parts:
    """The pieces of a HF causal LM that the forward passes use."""

    def __init__(self, model):
        check_supported(model.config)
        self.model = model
        inner = model.model
        self.embed, self.layers, self.norm, self.rotary = inner.embed_tokens, inner.layers, inner.norm, inner.rotary_emb
        self.lm_head = model.lm_head
        cfg = model.config
        self.hq, self.hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.d ** -0.5
        self.num_layers = cfg.num_hidden_layers

    def rope(self, h: torch.Tensor, positions: torch.Tensor):
        return self.rotary(h, positions)

    def qkv(self, layer, x: torch.Tensor, cos, sin):
        """x [B, L, hidden] (normed) -> q [B, Hq, L, D], k, v [B, Hkv, L, D] with RoPE on q, k."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        a = layer.self_attn
        b, L, _ = x.shape
        q = a.q_proj(x).view(b, L, -1, self.d)
        k = a.k_proj(x).view(b, L, -1, self.d)
        v = a.v_proj(x).view(b, L, -1, self.d).transpose(1, 2)
        if hasattr(a, "q_norm"):  # qwen3
            q, k = a.q_norm(q), a.k_norm(k)
        q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q, k, v

    def finish(self, layer, h, attn):
        """attn [B, Hq, L, D] -> the layer's output hidden state."""
        b, _, L, _ = attn.shape
        h = h + layer.self_attn.o_proj(attn.transpose(1, 2).reshape(b, L, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def logits(self, h):
        return self.lm_head(self.norm(h))


def forward_full(parts: Parts, ids: torch.Tensor, gates: GateSet | None = None, bias: bool = False,
                 want_logits: bool = True, checkpoint: bool = False, sinks: int = 0, bias_fn=None):
    """ids [B, T]. Returns (logits [B, T, V] or final hidden states, [log beta [B, Hkv, T] per layer]).
    checkpoint: recompute each layer in the backward pass instead of storing its T x T attention
    (training on long sequences). sinks: the first positions get log beta = 0 (never forgotten, as the
    bounded cache keeps them). bias_fn: log beta [B, Hkv, T] -> additive attention bias [B, Hkv, T, T] used in
    place of the retention bias (evict.py's relaxed eviction)."""
    b, t_len = ids.shape
    h = parts.embed(ids)
    positions = torch.arange(t_len, device=ids.device).unsqueeze(0).expand(b, -1)
    cos, sin = parts.rope(h, positions)
    g = parts.hq // parts.hkv
    log_betas = []

    def layer_fn(i, h):
        layer = parts.layers[i]
        x = layer.input_layernorm(h)
        q, k, v = parts.qkv(layer, x, cos, sin)
        lb = gates[i](x).transpose(1, 2) if gates is not None else None   # [B, Hkv, T]
        if lb is not None and sinks:
            lb = torch.cat([torch.zeros_like(lb[..., :sinks]), lb[..., sinks:]], -1)
        if lb is not None and bias:
            mask = (bias_fn or retention_bias)(lb).repeat_interleave(g, 1).to(q.dtype)  # [B, Hq, T, T]
            attn = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                                  attn_mask=mask, scale=parts.scale)
        else:
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=parts.scale, enable_gqa=True)
        out = parts.finish(layer, h, attn)
        return out if lb is None else (out, lb)

    for i in range(parts.num_layers):
        if checkpoint and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint as ckpt
            res = ckpt(layer_fn, i, h, use_reentrant=False)
        else:
            res = layer_fn(i, h)
        if gates is not None:
            h, lb = res
            log_betas.append(lb)
        else:
            h = res
    return (parts.logits(h) if want_logits else h), log_betas


class BoundedLM:
    """One sequence through the bounded cache of reference.py. `feed(ids)` appends tokens (split where
    the cache fills) and returns their next-token logits."""

    def __init__(self, parts: Parts, cache: BoundedCache, gates: GateSet | None = None):
        self.parts, self.cache, self.gates = parts, cache, gates
        if gates is None and cache.policy.name == "retention" and cache.capacity < (1 << 40):
            raise GateError("the retention policy needs gates")

    @torch.no_grad()
    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [L] -> logits [L, V] (float32)."""
        out, start = [], 0
        for n in self.cache.pieces(ids.shape[0]):
            out.append(self._piece(ids[start:start + n]))
            start += n
        return torch.cat(out, 0)

    def _piece(self, ids: torch.Tensor) -> torch.Tensor:
        p, cache = self.parts, self.cache
        L = ids.shape[0]
        positions = torch.arange(cache.seen, cache.seen + L, device=ids.device)
        h = p.embed(ids.unsqueeze(0))
        cos, sin = p.rope(h, positions.unsqueeze(0))
        want = cache.policy.needs_attention
        for i, layer in enumerate(p.layers):
            lc = cache.layers[i]
            x = layer.input_layernorm(h)
            q, k, v = p.qkv(layer, x, cos, sin)
            if self.gates is not None:
                lb = self.gates[i](x)[0].transpose(0, 1)            # [Hkv, L]
            else:
                lb = torch.zeros(p.hkv, L, device=ids.device)
            lc.append(k[0], v[0], positions.unsqueeze(0).expand(p.hkv, -1), lb)
            o, probs = attend(q[0], lc, L, p.scale, want)
            if want:
                cache.policy.observe(lc, probs)
            h = p.finish(layer, h, o.unsqueeze(0))
        cache.after_piece(L)
        return p.logits(h)[0].float()

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new: int, eos: int | None = None) -> list[int]:
        """Greedy decoding: the prompt, then one token per step."""
        logits = self.feed(prompt)[-1]
        out = []
        for _ in range(max_new):
            tok = int(torch.argmax(logits))
            out.append(tok)
            if eos is not None and tok == eos:
                break
            logits = self.feed(torch.tensor([tok], device=prompt.device))[-1]
        return out
