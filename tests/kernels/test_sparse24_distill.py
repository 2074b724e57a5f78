"""Distillation after 2:4 pruning (kernels/sparse24/distill.py): it lowers the KL to the dense model, keeps every
weight 2:4 with the pruner's mask, never returns worse than its start on the held-out windows, and runs as
`leanserve distill`."""
import copy
import json

import pytest
import torch

from kernels.sparse24 import prune as P
from kernels.sparse24.armor_model import ArmorLinear
from kernels.sparse24.distill import disjoint_windows, distill, held_out_kl, sparse_parameters, token_kl
from kernels.sparse24.format import count_24_violations
from tests.kernels.test_sparse24_armor import tiny_llama


def _ids(n=8, t=32, seed=0):
    return torch.randint(0, 101, (n, t), generator=torch.Generator().manual_seed(seed))


def test_token_kl_is_the_mean_kl_and_zero_on_itself():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 11, generator=g)
    tp = t.log_softmax(-1)
    ref = torch.nn.functional.kl_div(s.log_softmax(-1).flatten(0, 1), tp.flatten(0, 1), log_target=True,
                                     reduction="batchmean")
    torch.testing.assert_close(token_kl(s, tp), ref)
    assert token_kl(t, tp).abs().item() < 1e-6


@pytest.mark.parametrize("method,opts", [("sparsegpt", None), ("armor", {"block": 8, "iters": 5})])
def test_distill_lowers_the_kl_keeps_the_masks_and_trains_only_the_sparse_layers(method, opts):
    dense = tiny_llama()
    ids = _ids()
    student = copy.deepcopy(dense)
    P.prune_model_inplace(student, method, ids, progress=False, armor=opts)
    masks = {n: (p != 0).clone() for n, p, m in sparse_parameters(student) if m is not None}
    frozen = {n: p.detach().clone() for n, p in student.named_parameters()
              if not any(n == k or n.endswith(("armor_a", "armor_b")) for k in masks)}
    before = held_out_kl(student, dense, ids, 4)
    rep = distill(student, dense, ids, steps=30, lr=1e-3, batch_tokens=64, held_out=2, evals=5, progress=False)
    after = held_out_kl(student, dense, ids, 4)
    assert rep["held_out_kl"] <= rep["held_out_kl_init"] and after < 0.8 * before, (rep, before, after)
    params = dict(student.named_parameters())
    for n, m in masks.items():
        assert count_24_violations(params[n]) == 0 and not params[n][~m].any()  # same mask, still 2:4
    for n, v in frozen.items():
        assert torch.equal(params[n], v), n  # embeddings, norms, head untouched
    assert all(not p.requires_grad for p in student.parameters())
    if method == "armor":
        assert sum(isinstance(m, ArmorLinear) for m in student.modules()) == 14


def test_distill_never_returns_worse_than_its_start_on_the_held_out_windows():
    dense = tiny_llama()
    ids = _ids()
    student = copy.deepcopy(dense)
    P.prune_model_inplace(student, "sparsegpt", ids, progress=False)
    start = {n: p.detach().clone() for n, p in student.named_parameters()}
    held = ids[-2:]
    kl0 = held_out_kl(student, dense, held, 2)
    rep = distill(student, dense, ids, steps=4, lr=10.0, batch_tokens=64, held_out=2, evals=4, progress=False)
    assert rep["history"] and all(h["held_out_kl"] > kl0 for h in rep["history"])  # the huge lr only hurt
    assert rep["best_step"] == 0 and abs(rep["held_out_kl"] - kl0) < 1e-5
    for n, p in student.named_parameters():
        assert torch.equal(p, start[n]), n  # so the pruner's weights come back


def test_disjoint_windows_never_overlap_and_follow_the_seed():
    ids = torch.arange(1000)
    w = disjoint_windows(ids, 0, 64, seed=3)
    assert w.shape == (15, 64) and sorted(w[:, 0].tolist()) == list(range(0, 960, 64))  # every window, once
    assert torch.equal(w[:, 1:] - w[:, :1], torch.arange(1, 64).expand(15, -1))  # contiguous runs of the stream
    assert torch.equal(disjoint_windows(ids, 5, 64, seed=3), w[:5])  # a prefix of the same seeded order
    assert not torch.equal(disjoint_windows(ids, 0, 64, seed=4), w)
    with pytest.raises(ValueError, match="fewer than --samples 16"):
        disjoint_windows(ids, 16, 64)
    with pytest.raises(ValueError, match="at least two windows"):
        disjoint_windows(ids[:100], 0, 64)


def test_distill_argument_checks():
    dense = tiny_llama()
    with pytest.raises(ValueError, match="steps >= 1"):
        distill(copy.deepcopy(dense), dense, _ids(), steps=0)
    with pytest.raises(ValueError, match="more calibration windows"):
        distill(copy.deepcopy(dense), dense, _ids(n=2), steps=1, held_out=2)


def test_distill_command_writes_a_distilled_checkpoint_in_the_pruned_format(tmp_path, capsys):
    from kernels.perplexity import load_model
    from kernels.sparse24.checkpoint import check_pruned
    from server.cli import main as cli_main
    from tests.kernels.test_sparse24_prune import write_tiny_checkpoint

    src, pruned, out = tmp_path / "dense", tmp_path / "armor", tmp_path / "distilled"
    text = write_tiny_checkpoint(str(src))
    calib = ["--calib", text, "--samples", "8", "--seqlen", "32"]
    assert cli_main(["prune", str(src), str(pruned), "--method", "armor", *calib, "--block-size", "8", "--iters", "5",
                     "--quiet"]) == 0
    capsys.readouterr()
    rc = cli_main(["distill", str(src), str(pruned), str(out), "--calib", text, "--samples", "16", "--seqlen", "32",
                   "--steps", "20", "--lr", "1e-3", "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "20 steps (lr 0.001, 14 windows a step, 14 windows trained on, 2 held out)" in printed, printed
    assert "0 groups of 4 with more than 2 nonzeros" in printed
    marker = json.loads((out / "config.json").read_text())["leanserve_sparsity"]
    assert marker["method"] == "armor" and marker["armor"]["block_size"] == 8  # the pruner's marker is kept
    d = marker["distill"]
    assert d["steps"] == 20 and d["samples"] == 16 and d["held_out_kl"] < d["held_out_kl_init"]
    assert json.loads((out / "distill_report.json").read_text())["history"]
    assert (out / "armor_report.json").exists() and check_pruned(str(out))["bad"] == []
    _, model = load_model(out)
    assert sum(isinstance(m, ArmorLinear) for m in model.modules()) == 14
    _, before = load_model(pruned)
    with torch.no_grad():  # trained: the logits moved (and stay finite)
        after, start = model(_ids(n=2)).logits, before(_ids(n=2)).logits
    assert not torch.equal(after, start) and torch.isfinite(after).all()
    for argv, msg in [([str(src), str(src), str(out)], "already holds a checkpoint"),
                      ([str(src), str(tmp_path / "nope"), str(tmp_path / "o2")], "PRUNED_DIR"),
                      ([str(src), str(src), str(tmp_path / "o3")], "not a 2:4 checkpoint"),
                      ([str(src), str(pruned), str(pruned)], "must differ"),
                      ([str(src), str(pruned), str(tmp_path / "o4"), "--samples", "1"], "need --samples 0 (all) or >= 2"),
                      ([str(src), str(pruned), str(tmp_path / "o5"), "--steps", "0"], "need --steps >= 1")]:
        rc = cli_main(["distill", *argv, "--calib", text, "--seqlen", "16", "--quiet"])
        assert rc == 1 and msg in capsys.readouterr().err, argv
    assert not any((tmp_path / o).exists() for o in ("o2", "o3", "o4", "o5"))
