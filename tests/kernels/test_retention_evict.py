"""`train-gates --objective evict` (kernels/retention/evict.py): the relaxed eviction becomes the bounded cache's
eviction as its temperature goes to 0, it depends only on the order of the scores, and training lowers it."""
import pytest
import torch

from kernels.retention import evict
from kernels.retention import train as T
from kernels.retention.llama import BoundedLM, forward_full
from kernels.retention.reference import BoundedCache, make_policy
from tests.kernels.test_retention_train import config, tiny_dir  # noqa: F401  (fixture)


def _random_gates(trainer, model, seed):
    gates = trainer.initial_gates(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in gates.parameters():      # rates that differ a lot between tokens and heads
            p.normal_(0.0, 0.7)
    return gates


@pytest.mark.parametrize("budget,buffer,sinks,t_len", [(16, 8, 2, 64), (13, 5, 0, 47), (9, 7, 4, 50)])
def test_cold_limit_is_the_bounded_cache(tiny_dir, tmp_path, budget, buffer, sinks, t_len):  # noqa: F811
    trainer = T.Trainer(config(tiny_dir, tmp_path), progress=False, log=lambda *_: None)
    model, _ = trainer._load_model()
    parts = T.Parts(model)
    gates = _random_gates(trainer, model, seed=budget)
    torch.manual_seed(t_len)
    ids = torch.randint(0, model.config.vocab_size, (1, t_len))
    with torch.no_grad():
        relaxed, _ = forward_full(parts, ids, gates, bias=True, sinks=sinks,
                                  bias_fn=lambda lb: evict.eviction_bias(lb, budget, buffer, sinks, 1e-7))
        cache = BoundedCache(parts.num_layers, budget, buffer, make_policy("retention", sinks=sinks))
        served = BoundedLM(parts, cache, gates).feed(ids[0])
        full, _ = forward_full(parts, ids)
    start = budget + buffer
    torch.testing.assert_close(relaxed[0], served, atol=2e-4, rtol=0)
    assert (full[0, start:] - served[start:]).abs().max() > 1e-2     # eviction did change something


def _bias(lb, temperature=0.1, budget=10, buffer=6, sinks=2):
    return evict.eviction_bias(lb, budget, buffer, sinks, temperature)


def test_bias_layout_and_scale_invariance():
    torch.manual_seed(0)
    lb = -torch.rand(2, 3, 40) * 0.5 - 1e-3
    bias = _bias(lb)
    points = evict.compaction_points(40, 10, 6)
    assert points == [16, 22, 28, 34]
    causal = torch.zeros(40, 40).masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), float("-inf"))
    assert torch.equal(bias[..., :16, :], causal[:16].expand(2, 3, -1, -1))       # before the first compaction
    for q in (16, 21, 22, 39):
        last = max(p for p in points if p <= q)
        assert torch.equal(bias[..., q, last:q + 1], torch.zeros(2, 3, q + 1 - last))  # since it: full weight
        assert (bias[..., q, :2] == 0).all()                                    # sinks always whole
        assert (bias[..., q, 2:last] < 0).all()
    # Only the order of the scores matters: one common factor on every rate changes nothing.
    torch.testing.assert_close(_bias(lb * 7.5), bias, atol=1e-5, rtol=0)
    # Cold: each head keeps exactly budget tokens before the query's compaction.
    cold = _bias(lb, temperature=1e-6)
    for q in (16, 30, 39):
        last = max(p for p in points if p <= q)
        assert ((cold[..., q, :last] > -1).sum(-1) == 10).all()
    with pytest.raises(ValueError, match="no room"):
        evict.eviction_bias(lb, 2, 6, 2, 0.1)


def test_a_needed_token_is_pushed_to_stay():
    """A loss that wants a token near the threshold visible moves its log beta towards 0 (slower forgetting)."""
    lb = torch.full((1, 1, 30), -0.1)
    lb[0, 0, 5] = -0.11                                # just below the threshold at the first compaction
    lb.requires_grad_(True)
    bias = evict.eviction_bias(lb, 8, 4, 0, 0.1)
    (-bias[0, 0, 12:, 5].sum()).backward()             # a loss that wants token 5 visible
    assert lb.grad[0, 0, 5] < 0                        # descent raises log beta


def test_evict_training_lowers_the_relaxed_kl(tiny_dir, tmp_path):  # noqa: F811
    # Start from gates that rank badly (random rates), so that there is room to learn on a random model.
    first = T.Trainer(config(tiny_dir, tmp_path / "start"), progress=False, log=lambda *_: None)
    model, tok = first._load_model()
    start = _random_gates(first, model, seed=3)
    start.save(tmp_path / "start")
    cfg = config(tiny_dir, tmp_path / "run", objective="evict", rank_budgets=[10, 16], sinks=2, steps=16, lr=5e-2,
                 evict_temperature=0.1, init_from=str(tmp_path / "start"), bias_init=9.0)
    trainer = T.Trainer(cfg, progress=False, log=lambda *_: None)
    parts = T.Parts(model)
    held = trainer.batch(trainer._pools(tok), step=10 ** 6)

    def kl_of(gates):
        with torch.no_grad():
            return sum(float(evict.losses(parts, gates, held, m, 8, 2, 0.1)["kl"]) for m in (10, 16))

    before = kl_of(start)
    gates = trainer.run()
    assert kl_of(gates) < 0.95 * before, (before, kl_of(gates))   # 0.00273 -> 0.00247 (a random model)
    assert gates.meta.training["objective"] == "evict" and gates.meta.training["budgets"] == [10, 16]
    assert gates.meta.bias_init == start.meta.bias_init == 4.0   # the start's initialisation, not --bias-init
    with pytest.raises(ValueError, match="below --seq-len"):
        config(tiny_dir, tmp_path / "x", objective="evict", rank_budgets=[60]).check()


def test_free_rates_start_from_the_given_rates():
    """bench/retention_free_rates.py fits one free rate per token; it must start exactly at the gates' rates."""
    from bench.retention_free_rates import FreeRates

    lbs = [-torch.rand(9, 3).double() ** 4 * 5 - 1e-7 for _ in range(2)]      # log beta from ~-1e-7 to -5
    free = FreeRates([lb.float() for lb in lbs])
    for i, lb in enumerate(lbs):
        got = free[i](torch.zeros(2, 9, 4))
        assert got.shape == (2, 9, 3)
        torch.testing.assert_close(got[1].double(), lb, rtol=1e-4, atol=1e-9)
