import json
import os

import pytest
import torch

from kernels.perplexity import eval_perplexity
from kernels.sparse24 import prune as P
from kernels.sparse24.format import count_24_violations


def exactly_half_per_group(w):
    return count_24_violations(w) == 0 and bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all())


def correlated_acts(k, tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5 + torch.eye(k)
    scale = torch.rand(k, generator=g) * 3 + 0.1  # uneven column norms
    return (torch.randn(tokens, k, generator=g) @ mix) * scale  # [tokens, K]


@pytest.fixture
def layer_problem():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 160, generator=g)  # K=160: not a multiple of the 128 block
    return w, correlated_acts(160, 600)


WEIGHT_METHODS = [m for m in P.METHODS if m != "armor"]  # ARMOR replaces the layer: tests/kernels/test_sparse24_armor.py


def test_each_pruner_gives_exact_24(layer_problem):
    w, x = layer_problem
    for method in WEIGHT_METHODS:
        stats = P.LinearStats(w.shape[1], method)
        stats.add(x[None])  # 3-D input like a real [batch, seq, hidden]
        out = stats.prune(w)
        assert out.shape == w.shape and out.dtype == w.dtype
        assert exactly_half_per_group(out), method
    # magnitude and Wanda only mask; they never change kept weights
    m = P.prune_magnitude(w)
    assert torch.equal(m[m != 0], w[m != 0])


def test_wanda_differs_from_magnitude_when_norms_differ():
    w = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    act_sq = torch.tensor([1.0, 1.0, 100.0, 100.0])  # columns 2, 3 see 10x larger inputs
    assert P.prune_magnitude(w).tolist() == [[4.0, 3.0, 0.0, 0.0]]
    assert P.prune_wanda(w, act_sq).tolist() == [[0.0, 0.0, 2.0, 1.0]]
    assert torch.equal(P.prune_wanda(w, torch.ones(4)), P.prune_magnitude(w))  # equal norms: same


def test_sparsegpt_reconstructs_best(layer_problem):
    w, x = layer_problem
    stats = {m: P.LinearStats(w.shape[1], m) for m in WEIGHT_METHODS}
    for s in stats.values():
        s.add(x)

    def err(wp):
        return ((w - wp) @ x.t()).norm().item()

    e = {m: err(s.prune(w)) for m, s in stats.items()}
    assert e["sparsegpt"] < e["wanda"] <= e["magnitude"] * 1.05, e
    assert e["sparsegpt"] < 0.9 * e["wanda"], e


def test_sparsegpt_edge_cases():
    w = torch.randn(8, 16)
    h = torch.eye(16)
    h[3, 3] = 0  # a dead input column is zeroed
    out = P.prune_sparsegpt(w, h, blocksize=8)
    assert count_24_violations(out) == 0 and (out[:, 3] == 0).all()
    with pytest.raises(ValueError):
        P.prune_sparsegpt(w, h, blocksize=6)
    with pytest.raises(ValueError, match="multiple of 4"):
        P.mask_24(torch.randn(2, 6))


# ----------------------------------------------------------------------------- tiny Llama

def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def test_capture_and_block_loop_reproduce_the_model():
    model = tiny_llama()
    ids = torch.randint(0, 101, (2, 16))
    captured = P._capture_block0_inputs(model, model.model.layers, ids)
    with torch.no_grad():
        for j, (args, kw) in enumerate(captured):
            h = args[0] if args else kw["hidden_states"]
            for layer in model.model.layers:
                h = P._run_block(layer, args, kw, h)
            ref = model(ids[j:j + 1], output_hidden_states=True).hidden_states[-1]
            torch.testing.assert_close(model.model.norm(h), ref)


@pytest.mark.parametrize("method", WEIGHT_METHODS)
def test_sequential_prune_tiny_llama(method):
    model = tiny_llama()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 101, (4, 24), generator=torch.Generator().manual_seed(0))
    pruned = P.prune_model_inplace(model, method, ids, progress=False)
    assert len(pruned) == 2 * 7  # q, k, v, o, gate, up, down per block
    for name, t in model.state_dict().items():
        if name.removesuffix(".weight") in pruned:
            assert exactly_half_per_group(t), name
        else:  # embeddings, norms, lm_head untouched
            assert torch.equal(t, dense[name]), name
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_sequential_calibration_uses_pruned_outputs():
    # Wanda on block 1 must see the outputs of the *pruned* block 0.
    model = tiny_llama()
    ids = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(0))
    seen = []
    orig_add = P.LinearStats.add

    def spy(self, x):
        seen.append(x.clone())
        orig_add(self, x)

    P.LinearStats.add = spy
    try:
        P.prune_model_inplace(model, "wanda", ids, progress=False)
    finally:
        P.LinearStats.add = orig_add
    # per block and sample: q, k, v share the input; the first hook of block 1 is its q_proj input
    block1_first = seen[len(seen) // 2]
    with torch.no_grad():
        h = model(ids[:1], output_hidden_states=True).hidden_states[1]  # pruned block 0 output
        expect = model.model.layers[1].input_layernorm(h)
    torch.testing.assert_close(block1_first, expect)


def write_tiny_checkpoint(d):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = [f"w{i}" for i in range(100)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    tiny_llama().save_pretrained(d)
    tok.save_pretrained(d)
    g = torch.Generator().manual_seed(3)
    text = os.path.join(os.path.dirname(d), "calib.txt")
    with open(text, "w") as f:
        f.write(" ".join(words[i] for i in torch.randint(0, 100, (1200,), generator=g).tolist()))
    return text


def test_prune_model_writes_checkpoint_and_eval(tmp_path):
    from safetensors.torch import load_file
    src = str(tmp_path / "dense")
    text = write_tiny_checkpoint(src)
    out = str(tmp_path / "sparse")
    summary = P.prune_model(src, out, "sparsegpt", text, samples=4, seqlen=32, progress=False)
    assert summary["linears"] == 14
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["leanserve_sparsity"] == {"format": "2:4", "method": "sparsegpt", "samples": 4,
                                         "seqlen": 32, "calib": "calib.txt"}
    sd = load_file(os.path.join(out, "model.safetensors"))
    layer_w = [k for k in sd if ".layers." in k and k.endswith("proj.weight")]
    assert len(layer_w) == 14 and all(exactly_half_per_group(sd[k]) for k in layer_w)
    assert os.path.exists(os.path.join(out, "tokenizer.json"))

    dense_ppl = eval_perplexity(src, text, seqlen=64)
    sparse_ppl = eval_perplexity(out, text, seqlen=64, max_tokens=500, stride=32)
    assert 1.0 < dense_ppl < 1000 and 1.0 < sparse_ppl < 1000

    # magnitude needs no calibration file
    P.prune_model(src, str(tmp_path / "mag"), "magnitude", progress=False)
    with pytest.raises(ValueError, match="calib"):
        P.prune_model(src, str(tmp_path / "x"), "wanda", None)
    with pytest.raises(ValueError, match="unknown method"):
        P.prune_model(src, str(tmp_path / "x"), "random", text)


def test_eval_perplexity_matches_model_loss(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = str(tmp_path / "dense")
    text = write_tiny_checkpoint(src)
    ppl = eval_perplexity(src, text, seqlen=256, max_tokens=200)  # one window: exact LM loss
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    with open(text) as f:
        ids = AutoTokenizer.from_pretrained(src)(f.read(), add_special_tokens=False)["input_ids"][:200]
    with torch.no_grad():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss
    assert ppl == pytest.approx(torch.exp(loss).item(), rel=1e-4)


def test_calibration_windows():
    ids = torch.arange(1000)
    a = P.calibration_windows(ids, 5, 64, seed=1)
    assert a.shape == (5, 64) and torch.equal(a, P.calibration_windows(ids, 5, 64, seed=1))
    assert all(torch.equal(r, torch.arange(r[0], r[0] + 64)) for r in a)
    with pytest.raises(ValueError, match="tokens"):
        P.calibration_windows(ids[:10], 1, 64)


def test_one_rule_for_which_linears_are_24():
    from torch import nn

    from kernels.sparse24.checkpoint import is_block_linear
    for name in ("model.layers.3.mlp.down_proj", "model.layers.0.self_attn.qkv_proj",  # HF, vLLM (merged)
                 "model.layers.11.mlp.gate_up_proj", "layers.2.self_attn.o_proj"):
        assert is_block_linear(name), name
    for name in ("lm_head", "model.embed_tokens", "model.projector", "model.norm", "model.players.1.x"):
        assert not is_block_linear(name), name
    model = tiny_llama()
    every = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_block_linear(n)}
    pruned = P.prune_model_inplace(model, "magnitude", progress=False)
    assert set(pruned) == every and "lm_head" not in pruned and len(every) == 14


def test_marker_round_trip(tmp_path):
    from kernels.sparse24.checkpoint import MARKER_KEY, read_marker, write_marker
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    write_marker(tmp_path, {"method": "wanda"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg[MARKER_KEY] == {"format": "2:4", "method": "wanda"} and cfg["model_type"] == "llama"
    assert read_marker(cfg) == cfg[MARKER_KEY]
    assert read_marker({"model_type": "llama"}) is None and read_marker({MARKER_KEY: {"format": "4:8"}}) is None
