"""The hindsight reference of `eval kv --methods oracle` (kernels/retention/oracle.py): it compacts where the
bounded cache does, its future attention equals HF's own attention maps summed by hand, and it keeps exactly
the top M of them per head."""
import pytest
import torch

from kernels.retention.evaluate import evaluate
from kernels.retention.llama import BoundedLM, Parts
from kernels.retention.oracle import OraclePolicy, compaction_starts, future_attention, set_future
from kernels.retention.reference import BoundedCache, LayerCache, StreamingPolicy
from tests.support.tiny_llama import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=4, attn_implementation="eager")


@pytest.mark.parametrize("m, b, n", [(23, 11, 300), (5, 3, 8), (5, 3, 40), (64, 128, 130), (7, 1, 30)])
def test_starts_are_where_the_cache_compacts(model, m, b, n, monkeypatch):
    seen = []
    orig = LayerCache.compact
    monkeypatch.setattr(LayerCache, "compact", lambda self, policy, t: (seen.append(t - 1), orig(self, policy, t)))
    ids = torch.randint(0, model.config.vocab_size, (n,))
    BoundedLM(Parts(model), BoundedCache(model.config.num_hidden_layers, m, b, StreamingPolicy())).feed(ids)
    layers = model.config.num_hidden_layers
    assert seen[::layers] == compaction_starts(m, b, n)


def test_future_attention_sums_hf_attention_maps(model):
    ids = torch.randint(0, model.config.vocab_size, (57,))
    with torch.no_grad():
        maps = model(ids[None], output_attentions=True).attentions        # per layer [1, Hq, T, T]
    starts = [0, 20, 56]
    fut = future_attention(Parts(model), ids, starts)
    hkv = model.config.num_key_value_heads
    for layer_maps, f in zip(maps, fut):
        per_kv = layer_maps[0].view(hkv, -1, 57, 57).sum(1)
        for s in starts:
            torch.testing.assert_close(f[s], per_kv[:, s:].sum(1), atol=1e-5, rtol=1e-5)


def test_oracle_keeps_the_top_m_of_future_attention_per_head(model):
    m, b = 9, 6
    ids = torch.randint(0, model.config.vocab_size, (m + b + 4,))
    start = compaction_starts(m, b, len(ids))[0]
    fut = future_attention(Parts(model), ids, [start])
    cache = BoundedCache(model.config.num_hidden_layers, m, b, OraclePolicy())
    set_future(cache, fut)
    BoundedLM(Parts(model), cache).feed(ids[:start])
    for lc, f in zip(cache.layers, fut):
        assert lc.pos.shape == (model.config.num_key_value_heads, m)
        want = f[start][:, :start].topk(m, dim=1).indices.sort(1).values
        assert torch.equal(lc.pos, want)
    assert any(not torch.equal(lc.pos[0], lc.pos[1]) for lc in cache.layers)  # per head, not shared


def test_eval_with_the_oracle(model):
    seqs = {"t": [torch.randint(0, model.config.vocab_size, (80,)) for _ in range(2)]}
    rows = evaluate(Parts(model), None, seqs, [8, 200], 4, ["oracle"], progress=False)
    by_budget = {r.budget: r for r in rows if r.method == "oracle"}
    assert by_budget[200].kl < 1e-6 and by_budget[8].kl > 1e-4
