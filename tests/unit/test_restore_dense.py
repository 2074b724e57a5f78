"""bench.restore_dense: the chosen linears come back dense, everything else stays the pruned copy's."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.restore_dense import main, restore


def _ckpt(d, tensors, marker=None):
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"))
    cfg = {"architectures": ["LlamaForCausalLM"], **({"leanserve_sparsity": marker} if marker else {})}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "tokenizer.json").write_text("{}")


def _tensors(seed):
    g = torch.Generator().manual_seed(seed)
    names = [f"model.layers.{i}.{k}.weight" for i in range(3)
             for k in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")]
    t = {n: torch.randn(8, 12, generator=g) for n in names}
    t["model.embed_tokens.weight"] = torch.randn(5, 12, generator=g)
    t["model.layers.0.input_layernorm.weight"] = torch.randn(12, generator=g)
    return t


def test_kind_and_layers_pick_what_comes_back():
    pruned, dense = _tensors(0), _tensors(1)
    out, share = restore(pruned, dense, {"mlp"}, {2})
    for name, w in out.items():
        back = (".mlp." in name or name.startswith("model.layers.2.")) and name.endswith("proj.weight")
        assert torch.equal(w, dense[name] if back else pruned[name]), name
    assert share == pytest.approx(8 / 12)          # 6 MLP linears + layer 2's 2 attention linears, of 12


def test_cli_writes_a_plain_checkpoint_and_refuses_armor(tmp_path, capsys):
    pruned, dense = _tensors(0), _tensors(1)
    _ckpt(tmp_path / "p", pruned, {"format": "2:4", "method": "sparsegpt"})
    _ckpt(tmp_path / "d", dense)
    assert main([str(tmp_path / "p"), str(tmp_path / "d"), str(tmp_path / "o"), "--kind", "self_attn"]) == 0
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert "leanserve_sparsity" not in cfg and cfg["leanserve_restored_dense"]["share_of_linear_weights"] == 0.5
    got = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert torch.equal(got["model.layers.1.self_attn.o_proj.weight"], dense["model.layers.1.self_attn.o_proj.weight"])
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], pruned["model.layers.1.mlp.up_proj.weight"])
    assert (tmp_path / "o" / "tokenizer.json").is_file()
    _ckpt(tmp_path / "a", pruned, {"format": "2:4", "method": "armor"})
    with pytest.raises(SystemExit):
        main([str(tmp_path / "a"), str(tmp_path / "d"), str(tmp_path / "o2"), "--kind", "mlp"])
    assert "ARMOR" in capsys.readouterr().err
