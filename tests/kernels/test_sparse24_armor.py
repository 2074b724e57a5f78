"""ARMOR (kernels/sparse24/armor.py): the block-diagonal algebra against dense matrices, the discrete step's
guarantee, the whole per-layer run against its NoWag-P start, and the stored checkpoint format."""
import json
import os

import pytest
import torch

from kernels.sparse24 import armor as AR
from kernels.sparse24 import prune as P
from kernels.sparse24.armor_model import ArmorLinear, load_armor_model
from kernels.sparse24.format import count_24_violations


def dense_bd(blocks):
    return torch.block_diag(*blocks)


def problem(d_out=48, d_in=80, tokens=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g) * (torch.rand(d_in, generator=g) + 0.2)
    x = torch.randn(tokens, d_in, generator=g) @ (torch.eye(d_in) + 0.3 * torch.randn(d_in, d_in, generator=g))
    return w, x, (x * x).sum(0)


@pytest.mark.parametrize("n,b,k", [(3, 4, 7), (5, 8, 1), (2, 16, 33)])
def test_block_diagonal_products_equal_dense(n, b, k):
    g = torch.Generator().manual_seed(n * b + k)
    blocks = torch.randn(n, b, b, generator=g)
    m = torch.randn(n * b, k, generator=g)
    torch.testing.assert_close(AR.bd_left(blocks, m), dense_bd(blocks) @ m)
    mt = torch.randn(k, n * b, generator=g)
    torch.testing.assert_close(AR.bd_right(mt, blocks), mt @ dense_bd(blocks))
    x = torch.randn(2, k, n * b, generator=g)  # any leading dims
    torch.testing.assert_close(AR.bd_apply(x, blocks), x @ dense_bd(blocks).t())


def test_armor_linear_is_x_times_acb_transposed():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, 8, 8, generator=g), torch.randn(5, 8, 8, generator=g)
    core = P.prune_magnitude(torch.randn(48, 40, generator=g))
    bias = torch.randn(48, generator=g)
    x = torch.randn(3, 7, 40, generator=g)
    w = dense_bd(a) @ core @ dense_bd(b)
    torch.testing.assert_close(AR.armor_weight(a, core, b), w)
    torch.testing.assert_close(AR.armor_linear(x, a, core, b, bias), x @ w.t() + bias, rtol=1e-4, atol=1e-4)


def block_losses(p):
    blk = p.a.shape[1]
    n0, n1 = p.w_bar.shape[0] // blk, p.w_bar.shape[1] // blk
    e = (AR.armor_weight(p.a, p.core, p.b) - p.w_bar).square() * p.h
    return e.reshape(n0, blk, n1, blk).sum((1, 3))


def test_discrete_step_never_raises_a_block_loss_and_keeps_24():
    w, _, h = problem()
    p = AR.init_problem(w, h, 8)
    g = torch.Generator().manual_seed(0)
    # perturb the wrappers so the step has something to fix (at A = B = I the start is already optimal per group)
    p.a += 0.05 * torch.randn(p.a.shape, generator=g)
    p.b += 0.05 * torch.randn(p.b.shape, generator=g)
    changed_total = 0
    for _ in range(20):
        before = block_losses(p)
        resid = p.residual()
        _, g_core, _ = AR.gradients(p, resid)
        changed_total += AR.discrete_step(p, resid, g_core, g)
        after = block_losses(p)
        assert bool((after <= before * (1 + 1e-5) + 1e-7).all()), (after - before).max()
        # the residual it keeps up to date is the true one
        torch.testing.assert_close(resid, p.residual(), rtol=1e-4, atol=1e-5)
        assert count_24_violations(p.core) == 0
        assert bool((p.mask.reshape(-1, 4).sum(1) == 2).all())
    assert changed_total > 0


def test_gradients_match_autograd():
    w, _, h = problem(32, 48)
    p = AR.init_problem(w, h, 16)
    g = torch.Generator().manual_seed(2)
    p.a += 0.1 * torch.randn(p.a.shape, generator=g)
    p.b += 0.1 * torch.randn(p.b.shape, generator=g)
    a, c, b = (t.clone().requires_grad_(True) for t in (p.a, p.core, p.b))
    loss = ((AR.armor_weight(a, c, b) - p.w_bar).square() * p.h).sum() / p.scale
    loss.backward()
    g_a, g_c, g_b = AR.gradients(p, p.residual())
    for got, want in ((g_a, a.grad), (g_c, c.grad), (g_b, b.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_armor_prune_beats_its_start_and_folds_back():
    w, x, h = problem(64, 96)
    r0 = AR.armor_prune(w, h, 16, iters=0)
    # NoWag-P: wrappers = the norms, mask = top 2 of W_bar^2 h per group, values unchanged
    p = AR.init_problem(w, h, 16)
    torch.testing.assert_close(AR.armor_weight(r0.a, r0.core, r0.b), (p.w_bar * p.mask) * p.row[:, None] * p.col)
    r = AR.armor_prune(w, h, 16, iters=150)
    assert r.loss <= r.loss_init and r.loss < 0.97 * r.loss_init
    assert count_24_violations(r.core) == 0
    w_hat = AR.armor_weight(r.a, r.core, r.b)
    # the proxy loss is computed in the normalised space; it is the model's loss once folded back
    p_loss = ((w_hat / (p.row[:, None] * p.col) - p.w_bar).square() * p.h).sum() / p.scale
    assert float(p_loss) == pytest.approx(r.loss, rel=1e-3)

    def out_err(wh):
        return float(((w - wh) @ x.t()).norm() / (w @ x.t()).norm())

    assert out_err(w_hat) < out_err(AR.armor_weight(r0.a, r0.core, r0.b))


def test_armor_prune_never_ends_above_its_start_even_with_a_huge_step():
    w, _, h = problem(32, 32)
    r = AR.armor_prune(w, h, 8, iters=30, lr=1.0)  # Adam at lr 1 overshoots; the best state is kept
    assert r.loss <= r.loss_init


# ----------------------------------------------------------------------------- the full proxy (hessian=)

def out_error(w, w_hat, x) -> float:
    """The layer's relative output error ||(W_hat - W) X||^2 / ||W X||^2: what the full proxy is."""
    return float(((w_hat - w) @ x.t()).square().sum() / (w @ x.t()).square().sum())


def full_problem(d_out=48, d_in=64, block=8, seed=3):
    w, x, _ = problem(d_out, d_in, seed=seed)
    hess = x.t() @ x
    start = P.prune_sparsegpt(w, hess)
    return w, x, hess, start, AR.init_problem(w, None, block, hessian=hess, start=start)


def test_full_proxy_is_the_layer_output_error_and_starts_at_sparsegpt():
    w, x, hess, start, p = full_problem()
    torch.testing.assert_close(AR.armor_weight(*AR.fold(p)), start, rtol=1e-4, atol=1e-5)
    assert p.loss(p.residual()) == pytest.approx(out_error(w, start, x), rel=1e-4)
    p.a += 0.1 * torch.randn(p.a.shape, generator=torch.Generator().manual_seed(0))
    assert p.loss(p.residual()) == pytest.approx(out_error(w, AR.armor_weight(*AR.fold(p)), x), rel=1e-4)


def test_full_proxy_gradients_match_autograd():
    w, x, hess, start, p = full_problem(32, 48, 16)
    g = torch.Generator().manual_seed(5)
    p.a += 0.1 * torch.randn(p.a.shape, generator=g)
    p.b += 0.1 * torch.randn(p.b.shape, generator=g)
    a, c, b = (t.clone().requires_grad_(True) for t in (p.a, p.core, p.b))
    e = AR.armor_weight(a, c, b) - p.w_bar
    loss = ((e @ p.hess) * e * p.row_w[:, None]).sum() / p.scale
    loss.backward()
    for got, want in zip(AR.gradients(p, p.residual()), (a.grad, c.grad, b.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_full_proxy_discrete_step_never_raises_the_loss_and_keeps_its_state_exact():
    w, x, hess, start, p = full_problem()
    g = torch.Generator().manual_seed(1)
    p.a += 0.05 * torch.randn(p.a.shape, generator=g)
    p.b += 0.05 * torch.randn(p.b.shape, generator=g)
    resid = p.residual()
    eh = p.weighted(resid)
    changed, n_rows = 0, p.a.shape[0]
    for _ in range(25):
        before = p.loss(resid, eh)
        _, g_core, _ = AR.gradients(p, resid, eh)
        k = AR.discrete_step(p, resid, g_core, g, eh)
        assert k <= n_rows  # at most one block per block row
        changed += k
        true = p.residual()
        torch.testing.assert_close(resid, true, rtol=1e-4, atol=1e-5)
        true_eh = true @ p.hess  # kept by rank-b updates: float32 rounding relative to its scale
        torch.testing.assert_close(eh, true_eh, rtol=1e-3, atol=1e-5 * float(true_eh.abs().max()))
        assert p.loss(true) <= before * (1 + 1e-5) + 1e-9
        assert count_24_violations(p.core) == 0 and bool((p.mask.reshape(-1, 4).sum(1) == 2).all())
    assert changed > 0
    with pytest.raises(ValueError, match="needs eh"):
        AR.discrete_step(p, resid, g_core, g)


def test_full_proxy_run_beats_sparsegpt_on_the_layer_output():
    w, x, hess, start, _ = full_problem(64, 96, 16)
    r = AR.armor_prune(w, None, 16, iters=150, hessian=hess, start=start, lr=1e-3)
    assert r.loss_init == pytest.approx(out_error(w, start, x), rel=1e-4)
    w_hat = AR.armor_weight(r.a, r.core, r.b)
    assert count_24_violations(r.core) == 0
    assert r.loss == pytest.approx(out_error(w, w_hat, x), rel=1e-3)
    assert r.loss < 0.97 * r.loss_init
    # lr 1: Adam overshoots, the best state (SparseGPT's at worst) is what comes back
    assert AR.armor_prune(w, None, 16, iters=20, hessian=hess, start=start, lr=1.0).loss <= r.loss_init


def test_start_must_be_24():
    w, x, _ = problem(16, 32)
    with pytest.raises(ValueError, match="not 2:4"):
        AR.init_problem(w, None, 8, hessian=x.t() @ x, start=w)


def test_block_size_rules():
    assert AR.auto_block([(576, 576), (192, 576), (1536, 576), (576, 1536)]) == 16  # the default model
    assert AR.auto_block([(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]) == 128  # Llama-3-8B
    with pytest.raises(ValueError, match="does not divide"):
        AR.check_block(16, 576, 200)
    with pytest.raises(ValueError, match="multiple of 4"):
        AR.check_block(6, 48, 48)
    with pytest.raises(ValueError, match="pass --block-size"):
        AR.auto_block([(64, 64)])  # any wrapper is > 5% of so small a layer


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def test_sequential_armor_and_the_stored_format_round_trip(tmp_path):
    from safetensors.torch import load_file

    from kernels.sparse24.checkpoint import check_pruned, write_marker

    model = tiny_llama()
    ids = torch.randint(0, 101, (4, 24), generator=torch.Generator().manual_seed(0))
    opts = {"block": 8, "iters": 10}
    pruned = P.prune_model_inplace(model, "armor", ids, progress=False, armor=opts)
    assert len(pruned) == 14 and len(opts["report"]) == 14
    assert all(r["loss"] <= r["loss_init"] for r in opts["report"].values())
    lins = [m for m in model.modules() if isinstance(m, ArmorLinear)]
    assert len(lins) == 14 and all(count_24_violations(m.weight) == 0 for m in lins)
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    write_marker(tmp_path, {"method": "armor", "armor": {"block_size": 8}})
    sd = load_file(os.path.join(tmp_path, "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj"
    assert sd[q + ".armor_a"].shape == (8, 8, 8) and sd[q + ".armor_b"].shape == (8, 8, 8)
    assert sd["model.layers.0.self_attn.k_proj.armor_a"].shape == (4, 8, 8)  # 2 KV heads x 16 = 32 outputs
    assert check_pruned(tmp_path)["bad"] == []  # the cores are ordinary 2:4 weights
    loaded = load_armor_model(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["leanserve_sparsity"]["method"] == "armor"


def test_full_proxy_starts_each_layer_from_sparsegpt_and_improves_on_it():
    import copy

    ids = torch.randint(0, 101, (4, 24), generator=torch.Generator().manual_seed(0))
    base = tiny_llama()
    sgpt = copy.deepcopy(base)
    P.prune_model_inplace(sgpt, "sparsegpt", ids, progress=False)
    start = copy.deepcopy(base)
    P.prune_model_inplace(start, "armor", ids, progress=False, armor={"block": 8, "iters": 0, "proxy": "hessian"})
    with torch.no_grad():  # 0 iterations: SparseGPT's model, sequential calibration included
        torch.testing.assert_close(start(ids).logits, sgpt(ids).logits, rtol=1e-4, atol=1e-4)
    opts = {"block": 8, "iters": 40, "lr": 1e-3, "proxy": "hessian"}
    P.prune_model_inplace(base, "armor", ids, progress=False, armor=opts)
    losses = list(opts["report"].values())
    assert all(r["loss"] <= r["loss_init"] for r in losses)
    assert sum(r["loss"] for r in losses) < 0.95 * sum(r["loss_init"] for r in losses)
    with pytest.raises(ValueError, match="unknown ARMOR proxy"):
        P.prune_model_inplace(tiny_llama(), "armor", ids, progress=False, armor={"block": 8, "proxy": "full"})


def test_load_armor_model_refuses_a_plain_checkpoint(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not an ARMOR checkpoint"):
        load_armor_model(tmp_path)


def test_prune_command_writes_an_armor_checkpoint(tmp_path, capsys):
    from kernels.perplexity import load_model
    from server.cli import main as cli_main
    from tests.kernels.test_sparse24_prune import write_tiny_checkpoint

    src, out = tmp_path / "dense", tmp_path / "armor"
    text = write_tiny_checkpoint(str(src))
    rc = cli_main(["prune", str(src), str(out), "--method", "armor", "--calib", text, "--samples", "4",
                   "--seqlen", "32", "--block-size", "8", "--iters", "5", "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "ARMOR: block size 8, 5 iterations" in printed and "0 groups of 4 with more than 2 nonzeros" in printed
    marker = json.loads((out / "config.json").read_text())["leanserve_sparsity"]
    assert marker["method"] == "armor" and marker["armor"]["block_size"] == 8
    assert marker["armor"]["added_params"] == 2 * 8 * (2 * (64 + 64) + 2 * (32 + 64) + 3 * (128 + 64))  # q o, k v, gate up down
    report = json.loads((out / "armor_report.json").read_text())
    assert len(report) == 14 and all(r["loss"] <= r["loss_init"] for r in report.values())
    _, model = load_model(out)  # kernels.perplexity.load_model knows the format
    assert sum(isinstance(m, ArmorLinear) for m in model.modules()) == 14
    # a block size that does not divide the layers: one clear line, nothing written
    rc = cli_main(["prune", str(src), str(tmp_path / "bad"), "--method", "armor", "--calib", text,
                   "--samples", "2", "--seqlen", "16", "--block-size", "12", "--quiet"])
    assert rc == 1 and "does not divide" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    rc = cli_main(["prune", str(src), str(tmp_path / "full"), "--method", "armor", "--calib", text, "--samples", "4",
                   "--seqlen", "32", "--block-size", "8", "--iters", "5", "--proxy", "hessian", "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0 and "hessian proxy" in printed and "(SparseGPT) ->" in printed, printed
    assert json.loads((tmp_path / "full" / "config.json").read_text())["leanserve_sparsity"]["armor"]["proxy"] == "hessian"
