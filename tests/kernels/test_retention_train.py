"""train-gates on a tiny random Llama: the loss goes down, an interrupted run resumes where it stopped."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kernels import model_prep
from kernels.retention import train as T
from kernels.retention.gate import GateError, GateSet
from tests.support.tiny_llama import save_tiny_with_tokenizer

TEXT = Path(__file__).resolve().parents[2] / "data" / "wikitext2" / "valid.txt"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    default = model_prep.default_model_dir()
    if not model_prep.verify(default):
        pytest.fail(f"the default model is not prepared in {default}: run `make model`")
    return save_tiny_with_tokenizer(tmp_path_factory.mktemp("tiny") / "tiny-llama", default, seed=4)


def config(tiny_dir, out, **kw):
    base = dict(model_dir=str(tiny_dir), out_dir=str(out), sources=[{"path": str(TEXT), "slice": [0.0, 0.1]}],
                budget=16, buffer=8, seq_len=64, batch=2, steps=12, lr=3e-2, warmup=2, gate_width=8,
                bias_init=4.0, checkpoint_every=3, seed=1)
    base.update(kw)
    return T.TrainConfig(**base)


def test_training_lowers_the_loss_and_writes_gates(tiny_dir, tmp_path):
    trainer = T.Trainer(config(tiny_dir, tmp_path), progress=False, log=lambda *_: None)
    model, tok = trainer._load_model()
    parts = T.Parts(model)
    held = trainer.batch(trainer._pools(tok), step=10 ** 6)  # a batch training never draws

    def loss_of(gates):
        with torch.no_grad():
            out = T.losses(parts, gates, held, 16)
        return float(out["task"] + out["cap"]), float(out["cap"])

    before, cap_before = loss_of(trainer.initial_gates(model))
    gates = trainer.run()
    after, cap_after = loss_of(gates)
    assert after < before - 0.5 * cap_before, (before, after)
    assert cap_after < 0.5 * cap_before
    hist = json.loads((tmp_path / "history.json").read_text())
    assert len(hist) == 12
    back = GateSet.load(tmp_path)
    assert back.meta.training["steps"] == 12 and back.meta.budget == 16
    for a, b in zip(gates.parameters(), back.parameters()):
        assert torch.equal(a, b)
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_interrupted_run_resumes_from_its_checkpoint(tiny_dir, tmp_path):
    whole = T.Trainer(config(tiny_dir, tmp_path / "whole", steps=6), progress=False, log=lambda *_: None).run()
    cut = T.Trainer(config(tiny_dir, tmp_path / "cut", steps=6), progress=False, log=lambda *_: None)
    cut.stop_after = 4  # as if Ctrl-C arrived during step 4
    cut.run()
    st = torch.load(tmp_path / "cut" / T.STATE, weights_only=False)
    assert st["step"] == 4 and not (tmp_path / "cut" / "gates.json").exists()
    logs = []
    resumed = T.Trainer(config(tiny_dir, tmp_path / "cut", steps=6), progress=False, log=logs.append).run()
    assert any("resuming" in m and "step 4" in m for m in logs)
    for a, b in zip(whole.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="other settings"):
        T.Trainer(config(tiny_dir, tmp_path / "cut", steps=6, budget=15), progress=False).run()


def test_unsupported_architecture_is_refused_before_loading(tmp_path):
    from transformers import GPT2Config
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(GateError, match="support the llama"):
        T.Trainer(config(tmp_path, tmp_path / "out"), progress=False)._load_model()


def test_sequence_must_exceed_four_budgets(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="at least 4x"):
        T.Trainer(config(tiny_dir, tmp_path, seq_len=63), progress=False)


def test_cli_trains_then_evaluates_the_tiny_model(tiny_dir, tmp_path, capsys):
    from server.cli import main

    gates = tmp_path / "gates"
    assert main(["train-gates", str(tiny_dir), str(gates), "--text", f"{TEXT}@0:0.05", "--budget", "16",
                 "--seq-len", "64", "--steps", "3", "--gate-width", "8", "--quiet"]) == 0
    out = tmp_path / "kv.json"
    assert main(["eval", "kv", str(tiny_dir), "--gates", str(gates), "--budgets", "16", "200", "--buffer", "8",
                 "--text", f"{TEXT}@0.5:0.6", "--seq-len", "160", "--max-seqs", "2", "--json", str(out),
                 "--plot", str(tmp_path / "kv.png"), "--quiet"]) == 0
    rows = json.loads(out.read_text())
    assert {(r["method"], r["budget"]) for r in rows} == {("full", 0)} | {
        (m, b) for m in ("retention", "streaming", "h2o", "snapkv") for b in (16, 200)}
    full = next(r for r in rows if r["method"] == "full")
    for r in rows:
        assert r["tokens"] == 2 * 159 and r["kl"] >= -1e-6
        if r["budget"] == 200:  # budget beyond the sequence: exactly the full model
            assert r["kl"] < 1e-6 and r["ppl"] == pytest.approx(full["ppl"], rel=1e-5)
        elif r["method"] != "full":
            assert r["kl"] > 1e-4  # eviction happened and changed the predictions
    assert "| retention | 16 |" in capsys.readouterr().out
    assert (tmp_path / "kv.png").stat().st_size > 1000


def test_cli_errors_are_one_line(tiny_dir, tmp_path, capsys):
    from server.cli import main

    assert main(["eval", "kv", str(tmp_path / "nope")]) == 1
    assert main(["eval", "kv", str(tiny_dir)]) == 1  # no gates shipped for this model, none given
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "pass --gates DIR" in err[1]
    with pytest.raises(SystemExit):
        main(["train-gates", str(tiny_dir), str(tmp_path / "o"), "--text", str(tmp_path / "missing.txt")])
