"""`train-gates --objective rank` (kernels/retention/rank.py): the loss and its agreement measure on hand-built
scores, the sampled starts, and a few training steps on a tiny random Llama that make the gates keep more of
what hindsight would."""
import numpy as np
import pytest
import torch

from kernels.retention import rank
from kernels.retention import train as T
from tests.kernels.test_retention_train import config, tiny_dir  # noqa: F401  (fixture)


def _future(t_len=40, heads=2, seed=0):
    torch.manual_seed(seed)
    return torch.rand(1, heads, t_len)


@pytest.mark.parametrize("sinks", [0, 3])
def test_agreement_is_one_when_the_gates_rank_as_hindsight(sinks):
    fut = _future()
    s = 30
    ages = (s + 1 - torch.arange(40)).float()
    # score = log_beta * age; choose log_beta so that the score equals the future attention - 2 (always < 0).
    lb = ((fut[0] - 2) / ages).requires_grad_(True)
    loss, agree = rank.rank_loss(lb, fut, [s], [sinks + 5, sinks + 11], sinks)
    assert float(agree) == 1.0
    worse = (-fut[0] - 2) / ages                                           # the reverse order
    _, agree_rev = rank.rank_loss(worse, fut, [s], [sinks + 5, sinks + 11], sinks)
    assert float(agree_rev) < 0.5
    loss_rev, _ = rank.rank_loss(worse, fut, [s], [sinks + 5], sinks)
    assert float(loss_rev) > float(rank.rank_loss(lb.detach(), fut, [s], [sinks + 5], sinks)[0])


def test_a_misranked_heavy_hitter_is_pushed_up():
    fut = torch.zeros(1, 1, 20)
    fut[0, 0, 3] = 5.0                      # hindsight: token 3 matters most
    lb = torch.full((1, 20), -0.01)
    lb[0, 3] = -0.5                         # but its gate forgets it fast
    lb.requires_grad_(True)
    loss, agree = rank.rank_loss(lb, fut, [15], [4], 0)
    loss.backward()
    assert float(agree) < 1.0 and lb.grad[0, 3] < 0   # gradient descent raises its log beta


def test_sample_starts_stay_inside_the_sequence():
    rng = np.random.default_rng(0)
    s = rank.sample_starts(rng, 1024, [64, 128], 128, 8)
    assert len(s) == 8 == len(set(s)) and s == sorted(s) and 192 <= s[0] and s[-1] < 896
    assert rank.sample_starts(rng, 200, [8], 90, 50) == list(range(98, 110))
    with pytest.raises(ValueError, match="no compaction start"):
        rank.sample_starts(rng, 300, [128], 128, 8)
    with pytest.raises(ValueError, match="ascending"):
        rank.layer_inputs_and_future(None, torch.zeros(50, dtype=torch.long), [30, 20])
    with pytest.raises(ValueError, match="ascending"):
        rank.layer_inputs_and_future(None, torch.zeros(50, dtype=torch.long), [20, 51])
    with pytest.raises(ValueError, match="no start leaves room"):
        rank.rank_loss(torch.zeros(1, 10), torch.zeros(1, 1, 10), [5], [8], 0)


def test_rank_training_keeps_more_of_the_hindsight_set(tiny_dir, tmp_path):  # noqa: F811
    cfg = config(tiny_dir, tmp_path, objective="rank", rank_budgets=[10, 16], rank_starts=6, sinks=2, steps=30,
                 lr=1e-1)
    trainer = T.Trainer(cfg, progress=False, log=lambda *_: None)
    model, tok = trainer._load_model()
    parts = T.Parts(model)
    held = trainer.batch(trainer._pools(tok), step=10 ** 6)
    starts = rank.sample_starts(np.random.default_rng(9), 64, [10, 16], 8, 6)

    def agree_of(gates):
        with torch.no_grad():
            return float(rank.losses(parts, gates, held, [10, 16], 8, 2, starts)["agree"])

    before = agree_of(trainer.initial_gates(model))
    gates = trainer.run()
    assert agree_of(gates) > before + 0.02, (before, agree_of(gates))  # 0.35 -> 0.39 (a random model)
    assert gates.meta.training["objective"] == "rank" and "agree" in gates.meta.training["final"]
    assert (tmp_path / "loss.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="unknown objective"):
        config(tiny_dir, tmp_path / "x", objective="nope").check()
