"""The eviction reference (kernels/retention/reference.py) and the gated Llama forward passes."""
import pytest
import torch

from kernels.retention.gate import GateMeta, GateSet
from kernels.retention.llama import BoundedLM, Parts, forward_full
from kernels.retention.reference import (BoundedCache, LayerCache, StreamingPolicy, H2OPolicy, SnapKVPolicy,
                                         RetentionPolicy, capacity_loss, capacity_sum_reference, make_policy,
                                         retention_scores, top_m_slots, unbounded)
from tests.support.tiny_llama import tiny_model


def random_gates(model, seed=0, bias=2.0, scale=0.5):
    cfg = model.config
    g = GateSet(GateMeta(cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, 8, bias_init=bias))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(torch.randn_like(p) * scale)
    return g


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_forward_full_equals_hf(model_type):
    m = tiny_model(model_type, seed=1)
    ids = torch.randint(0, m.config.vocab_size, (2, 37))
    with torch.no_grad():
        ref = m(ids).logits
        ours, _ = forward_full(Parts(m), ids)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_budget_beyond_sequence_equals_full_attention(model):
    ids = torch.randint(0, model.config.vocab_size, (150,))
    with torch.no_grad():
        ref = model(ids[None]).logits[0]
    gates = random_gates(model)
    for policy in ("retention", "streaming", "h2o", "snapkv"):
        lm = BoundedLM(Parts(model), BoundedCache(2, budget=150, buffer=1, policy=make_policy(policy)),
                       gates if policy == "retention" else None)
        out = torch.cat([lm.feed(ids[:60]), lm.feed(ids[60:61]), lm.feed(ids[61:])])
        assert lm.cache.held_tokens() == 150  # never compacted
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_result_does_not_depend_on_batching(model):
    """Pieces end where the cache fills, so any chunking of the same tokens gives the same cache."""
    ids = torch.randint(0, model.config.vocab_size, (203,))
    gates = random_gates(model, seed=5)
    outs, states = [], []
    for chunks in ([203], [1] * 203, [50, 7, 100, 46], [13] * 15 + [8]):
        lm = BoundedLM(Parts(model), BoundedCache(2, budget=17, buffer=9, policy=RetentionPolicy()), gates)
        s, o = 0, []
        for c in chunks:
            o.append(lm.feed(ids[s:s + c]))
            s += c
        outs.append(torch.cat(o))
        states.append([(lc.pos.clone(), lc.k.clone()) for lc in lm.cache.layers])
    for o, st in zip(outs[1:], states[1:]):
        torch.testing.assert_close(o, outs[0], atol=1e-5, rtol=1e-5)
        for (p, k), (p0, k0) in zip(st, states[0]):
            assert torch.equal(p, p0)
            torch.testing.assert_close(k, k0, atol=1e-6, rtol=1e-6)


def test_eviction_keeps_exactly_the_top_m_per_head_in_position_order(model):
    ids = torch.randint(0, model.config.vocab_size, (300,))
    gates = random_gates(model, seed=7, scale=1.0)
    m, b = 23, 11
    cache = BoundedCache(2, budget=m, buffer=b, policy=RetentionPolicy(sinks=0))  # the authors' rule
    lm = BoundedLM(Parts(model), cache, gates)
    seen_compactions = []
    orig = LayerCache.compact

    def spy(self, policy, t):
        before = (self.pos.clone(), self.log_beta.clone())
        orig(self, policy, t)
        seen_compactions.append((before, t, self.pos.clone()))
    LayerCache.compact = spy
    try:
        for tok in ids:
            lm.feed(tok[None])
            assert cache.held_tokens() < m + b
    finally:
        LayerCache.compact = orig
    assert len(seen_compactions) == 2 * ((300 - (m + b)) // b + 1)
    differs = False
    for (pos, lb), t, kept in seen_compactions:
        assert kept.shape == (2, m)
        assert bool((kept[:, 1:] > kept[:, :-1]).all())  # sorted by position
        for h in range(2):  # brute force: the m best (score, newer first) positions
            score = (lb[h] * (t - pos[h]).float()).tolist()
            order = sorted(range(len(score)), key=lambda i: (-score[i], -i))[:m]
            assert sorted(pos[h, order].tolist()) == kept[h].tolist()
        differs |= not torch.equal(kept[0], kept[1])
    assert differs  # heads keep their own token sets


def test_retention_sinks_always_stay():
    lc = layer_with(torch.arange(30).repeat(2, 1), budget=6)
    lc.log_beta = -torch.ones(2, 30) * 0.5  # every old token decays fast: recency would win
    lc.log_beta[1, 10] = 0.0                # except one token head 1 retains
    lc.compact(RetentionPolicy(sinks=2), t=31)
    assert lc.pos.tolist() == [[0, 1, 26, 27, 28, 29], [0, 1, 10, 27, 28, 29]]
    lc = layer_with(torch.arange(30).repeat(1, 1), budget=6)
    lc.log_beta = -torch.ones(1, 30) * 0.5
    lc.compact(RetentionPolicy(sinks=0), t=31)
    assert lc.pos.tolist() == [[24, 25, 26, 27, 28, 29]]


def test_top_m_ties_keep_newer_and_respect_count():
    s = torch.tensor([[1.0, 5.0, 1.0, 1.0, 5.0, 0.0, 9.0, 9.0]])
    assert top_m_slots(s, 3).tolist() == [[4, 6, 7]]
    assert top_m_slots(s, 4).tolist() == [[1, 4, 6, 7]]
    assert top_m_slots(s, 5).tolist() == [[1, 3, 4, 6, 7]]
    assert top_m_slots(s, 3, count=5).tolist() == [[1, 3, 4]]
    assert top_m_slots(s, 9, count=2).tolist() == [[0, 1]]


def layer_with(pos, budget):
    h, n = pos.shape
    lc = LayerCache(budget)
    lc.append(torch.randn(h, n, 4), torch.randn(h, n, 4), pos, torch.zeros(h, n))
    return lc


def test_streaming_keeps_sinks_and_recent():
    lc = layer_with(torch.arange(20).repeat(2, 1), budget=7)
    lc.compact(StreamingPolicy(sinks=4), t=21)
    assert lc.pos.tolist() == [[0, 1, 2, 3, 17, 18, 19]] * 2


def test_h2o_keeps_heavy_hitters_and_recent_window():
    lc = layer_with(torch.arange(10).repeat(2, 1), budget=4)
    pol = H2OPolicy(recent=2)
    probs = torch.zeros(2, 3, 10)
    probs[0, :, 5] = 0.5
    probs[0, 0, 1] = 0.4
    probs[1, :, 2] = 0.2
    probs[1, :, 6] = 0.3  # head 1 prefers other tokens
    pol.observe(lc, probs)
    pol.observe(lc, probs[:, :1])  # accumulates over later queries
    lc.compact(pol, t=11)
    assert lc.pos.tolist() == [[1, 5, 8, 9], [2, 6, 8, 9]]
    assert lc.state["acc"][0].tolist() == pytest.approx([0.8, 2.0, 0.0, 0.0])


def test_snapkv_uses_the_newest_window_pooled():
    lc = layer_with(torch.arange(12).repeat(1, 1), budget=4)
    pol = SnapKVPolicy(window=2, kernel=3)
    old = torch.zeros(1, 5, 12)
    old[0, :, 0] = 1.0  # attention from queries outside the window does not count
    pol.observe(lc, old)
    new = torch.zeros(1, 2, 12)
    new[0, :, 4] = 0.6  # pooled: neighbours 3 and 5 score 0.6 too
    new[0, 0, 8] = 0.5
    pol.observe(lc, new)
    lc.compact(pol, t=13)
    assert lc.pos.tolist() == [[4, 5, 10, 11]]  # 0.6 ties: newer first (5 over 4 over 3); window kept


def test_capacity_sum_and_loss_by_hand():
    lb = torch.log(torch.tensor([[0.5, 1.0, 0.25]]))
    s = capacity_sum_reference(lb)
    assert s[0].tolist() == pytest.approx([1.0, 1.5, 0.25 + 1.0 + 1.0])
    assert float(capacity_loss(s, 1)) == pytest.approx(((1.5 - 1) / 1 + (2.25 - 1) / 1) / 2)
    assert float(capacity_loss(s, 3)) == 0.0


def test_retention_scores_broadcast_t():
    lb = torch.tensor([[[-0.5, -0.1]], [[-1.0, 0.0]]])
    pos = torch.tensor([[[0, 3]], [[1, 2]]])
    out = retention_scores(lb, pos, torch.tensor([4, 10]))
    torch.testing.assert_close(out, torch.tensor([[[-2.0, -0.1]], [[-9.0, 0.0]]]))


def test_unknown_policy_and_bad_budget():
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("lru")
    with pytest.raises(ValueError):
        BoundedCache(2, budget=0, buffer=4, policy=RetentionPolicy())
    assert unbounded(2).capacity > 1 << 39
