"""Retention gates: checkpoint round trip, errors, and beta = 1 with an unbounded cache = the ungated model."""
import json

import pytest
import torch

from kernels.retention.gate import GateError, GateMeta, GateSet, read_meta, widen_into
from kernels.retention.llama import BoundedLM, Parts, forward_full
from kernels.retention.reference import BoundedCache, RetentionPolicy
from tests.support.tiny_llama import tiny_model


def test_save_load_round_trip(tmp_path):
    meta = GateMeta(64, 3, 2, 12, bias_init=4.0, model="tiny", budget=96, buffer=32, training={"steps": 7})
    g = GateSet(meta)
    with torch.no_grad():
        for p in g.parameters():
            p.add_(torch.randn_like(p))
    g.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gates.json", "gates.safetensors"]
    back = GateSet.load(tmp_path)
    assert back.meta == meta
    x = torch.randn(5, 64)
    for a, b in zip(g.layers, back.layers):
        assert torch.equal(a(x), b(x))
    assert read_meta(tmp_path).training == {"steps": 7}


def test_widening_keeps_what_the_gates_compute_and_narrowing_is_refused():
    small = GateSet(GateMeta(64, 3, 2, 12))
    with torch.no_grad():
        for p in small.parameters():
            p.add_(torch.randn_like(p))
    wide = GateSet(GateMeta(64, 3, 2, 19))
    widen_into(wide, small)
    x = torch.randn(7, 64)
    for a, b in zip(small.layers, wide.layers):
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=1e-6)
        assert b.w1.weight[12:].abs().sum() > 0          # the new units have inputs, so training can move them
    loss = sum(g(x).sum() for g in wide.layers)
    loss.backward()
    assert all(g.w2.weight.grad[:, 12:].abs().sum() > 0 for g in wide.layers)
    with pytest.raises(GateError, match="cannot narrow"):
        widen_into(GateSet(GateMeta(64, 3, 2, 8)), small)


def test_bad_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(GateError, match="not a retention-gate checkpoint"):
        GateSet.load(tmp_path)
    GateSet(GateMeta(64, 2, 2, 8)).save(tmp_path)
    meta = json.loads((tmp_path / "gates.json").read_text())
    (tmp_path / "gates.json").write_text(json.dumps({**meta, "num_layers": 3}))
    with pytest.raises(GateError, match="no tensor layer2"):
        GateSet.load(tmp_path)
    (tmp_path / "gates.json").write_text(json.dumps({**meta, "intermediate_size": 9}))
    with pytest.raises(GateError, match="does not match"):
        GateSet.load(tmp_path)
    (tmp_path / "gates.json").write_text("{")
    with pytest.raises(GateError, match="cannot read"):
        GateSet.load(tmp_path)
    with pytest.raises(GateError, match="trained for a model"):
        GateMeta(64, 2, 2, 8).check_model(64, 30, 3)


def test_beta_one_and_no_budget_give_the_ungated_model():
    model = tiny_model(seed=2)
    cfg = model.config
    gates = GateSet(GateMeta(cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, 8, bias_init=1e4))
    ids = torch.randint(0, cfg.vocab_size, (1, 90))
    with torch.no_grad():
        ref = model(ids).logits
        biased, lbs = forward_full(Parts(model), ids, gates, bias=True)
        assert all(float(lb.abs().max()) == 0.0 for lb in lbs)  # log beta = 0 exactly
        torch.testing.assert_close(biased, ref, atol=2e-5, rtol=1e-5)
        lm = BoundedLM(Parts(model), BoundedCache(2, budget=10 ** 6, buffer=1, policy=RetentionPolicy()), gates)
        torch.testing.assert_close(lm.feed(ids[0]), ref[0], atol=2e-5, rtol=1e-5)


def test_small_beta_changes_the_biased_model():
    """The training bias is live: strong forgetting must change the logits."""
    model = tiny_model(seed=2)
    cfg = model.config
    gates = GateSet(GateMeta(cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, 8, bias_init=-3.0))
    ids = torch.randint(0, cfg.vocab_size, (1, 40))
    with torch.no_grad():
        assert (forward_full(Parts(model), ids, gates, bias=True)[0] - model(ids).logits).abs().max() > 1e-2


def test_training_sinks_are_never_forgotten():
    model = tiny_model(seed=2)
    cfg = model.config
    gates = GateSet(GateMeta(cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, 8, bias_init=-3.0))
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        _, lbs = forward_full(Parts(model), ids, gates, bias=True, sinks=3)
        _, free = forward_full(Parts(model), ids, gates, bias=True)
    for lb, lf in zip(lbs, free):
        assert float(lb[..., :3].abs().max()) == 0.0 and float(lf[..., :3].max()) < -1.0
        assert torch.equal(lb[..., 3:], lf[..., 3:])  # layer 0: the other gates see the same input
        break
