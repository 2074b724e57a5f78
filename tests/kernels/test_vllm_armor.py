"""The ARMOR linear method of --quantization leanserve-2of4 (kernels/vllm_plugin/armor.py) on CPU, inside real vLLM
linear layers (merged QKV with uneven shards, merged gate/up, plain) loaded through their own weight loaders, against
kernels.sparse24.armor.armor_linear per shard (the HF layer's compute rule); where the loaders put each shard; the
errors for block sizes that do not fit, wrong wrapper shapes, missing wrappers and tensor parallelism."""
import pytest
import torch

pytest.importorskip("vllm")

from vllm.model_executor.layers.linear import (  # noqa: E402
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)

from kernels.sparse24.armor import armor_linear  # noqa: E402
from kernels.sparse24.prune import prune_magnitude  # noqa: E402
from kernels.vllm_plugin import armor as AR  # noqa: E402
from kernels.vllm_plugin import sparse24 as S  # noqa: E402
from tests.kernels.test_vllm_sparse24 import vllm_ctx  # noqa: E402,F401  (the one-process tp=1 setup)

B = 16
K = 96  # 6 input blocks of 16
MARKER = {"format": "2:4", "method": "armor", "armor": {"block_size": B, "iters": 20, "added_params": 0}}


def config(block=B):
    return S.Sparse24Config.from_config({"leanserve_sparsity": {**MARKER, "armor": {"block_size": block}}})


@pytest.fixture(params=S.CPU_MODES)  # triton: the kernel on CPU tensors (TRITON_INTERPRET=1, kernels/conftest.py)
def cpu_mode(request, monkeypatch):
    monkeypatch.setenv(S.CPU_MODE_ENV, request.param)
    return request.param


def gen(seed):
    return torch.Generator().manual_seed(seed)


def factors(d_out, d_in, seed, block=B):
    """(A, C, B) of one checkpoint linear: C 2:4, A and B near the identity (as ARMOR's are) with noise."""
    g = gen(seed)
    core = prune_magnitude(torch.randn(d_out, d_in, generator=g))
    a = torch.eye(block) + 0.3 * torch.randn(d_out // block, block, block, generator=g)
    b = torch.eye(block) + 0.3 * torch.randn(d_in // block, block, block, generator=g)
    return a, core, b


def load(layer, shards: dict):
    """Load each checkpoint linear's (A, C, B) the way vLLM does: the merged loaders get the shard id."""
    for sid, (a, core, b) in shards.items():
        for param, t in ((layer.weight, core), (layer.armor_a, a), (layer.armor_b, b)):
            if sid is None:
                param.weight_loader(param, t)
            else:
                param.weight_loader(param, t, sid)


def reference(x, shards: dict, bias=None):
    y = torch.cat([armor_linear(x, a, core, b) for a, core, b in shards.values()], dim=-1)
    return y if bias is None else y + bias


def check(layer, shards, mode, bias=None, ms=(1, 5, 33)):
    assert isinstance(layer.quant_method, AR.ArmorLinearMethod)
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.sparse24_path == mode
    for m in ms:
        x = torch.randn(m, K, generator=gen(100 + m))
        want = reference(x, shards, bias)
        y = layer(x)
        y = y[0] if isinstance(y, tuple) else y
        torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
        y3 = layer(x.reshape(1, m, K))  # leading batch dims pass through
        y3 = y3[0] if isinstance(y3, tuple) else y3
        torch.testing.assert_close(y3, want.reshape(1, m, -1), rtol=1e-4, atol=1e-4)


def test_qkv_uneven_shards_each_with_its_own_b(vllm_ctx, cpu_mode):
    head, nq, nkv = 16, 4, 2  # output partition sizes [64, 32, 32]
    layer = QKVParallelLinear(K, head, nq, nkv, bias=False, quant_config=config(),
                              prefix="model.layers.0.self_attn.qkv_proj")
    shards = {"q": factors(64, K, 1), "k": factors(32, K, 2), "v": factors(32, K, 3)}
    load(layer, shards)
    # Where the loaders put each shard: A's blocks at the shard's output offset / b, one B per shard.
    torch.testing.assert_close(layer.armor_a.data, torch.cat([shards[s][0] for s in "qkv"]))
    for i, s in enumerate("qkv"):
        torch.testing.assert_close(layer.armor_b.data[i], shards[s][2])
    assert layer.armor_b.shape == (3, K // B, B, B) and layer.armor_a.shape == (128 // B, B, B)
    check(layer, shards, cpu_mode)


def test_gate_up(vllm_ctx, cpu_mode):
    inter = 48
    layer = MergedColumnParallelLinear(K, [inter, inter], bias=False, quant_config=config(),
                                       prefix="model.layers.11.mlp.gate_up_proj")
    shards = {0: factors(inter, K, 4), 1: factors(inter, K, 5)}
    load(layer, {1: shards[1], 0: shards[0]})  # any order
    torch.testing.assert_close(layer.armor_a.data[inter // B:], shards[1][0])
    torch.testing.assert_close(layer.armor_b.data[1], shards[1][2])
    check(layer, shards, cpu_mode)


def test_plain_row_parallel_with_bias(vllm_ctx, cpu_mode):
    n = 32
    layer = RowParallelLinear(K, n, bias=True, quant_config=config(), prefix="model.layers.3.self_attn.o_proj")
    shards = {None: factors(n, K, 6)}
    bias = torch.randn(n, generator=gen(7))
    load(layer, shards)
    layer.weight_loader(layer.bias, bias)
    assert layer.armor_b.shape == (1, K // B, B, B)
    check(layer, shards, cpu_mode, bias=bias)


def test_vllm_stacked_load_path(vllm_ctx):
    """vLLM's Llama loader tags each stacked tensor with .shard_id and calls the merged layer's load_weights."""
    inter = 32
    layer = MergedColumnParallelLinear(K, [inter, inter], bias=False, quant_config=config(),
                                       prefix="model.layers.1.mlp.gate_up_proj")
    shards = {0: factors(inter, K, 8), 1: factors(inter, K, 9)}
    tagged = []
    for sid, (a, core, b) in shards.items():
        for name, t in (("weight", core), ("armor_a", a), ("armor_b", b)):
            t = t.clone()
            t.shard_id = sid
            tagged.append((name, t))
    assert len(list(layer.load_weights(tagged))) == 6
    check(layer, shards, S.cpu_mode())


def test_default_dense_path_uses_vllm_cpu_gemm_per_shard(vllm_ctx, monkeypatch):
    monkeypatch.delenv(S.CPU_MODE_ENV, raising=False)
    layer = QKVParallelLinear(K, 16, 4, 2, bias=False, quant_config=config(),
                              prefix="model.layers.0.self_attn.qkv_proj")
    shards = {"q": factors(64, K, 1), "k": factors(32, K, 2), "v": factors(32, K, 3)}
    load(layer, shards)
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.sparse24_path == "dense" and not hasattr(layer, "sparse24_values")
    assert [hasattr(c, "cpu_linear") for c in layer.armor_core] == [True] * 3  # vLLM's dispatch ran on each shard
    assert layer.weight.numel() == 0  # the merged core lives on in the shards only


def test_compressed_keeps_only_the_packed_core(vllm_ctx, monkeypatch):
    monkeypatch.setenv(S.CPU_MODE_ENV, "compressed")
    layer = MergedColumnParallelLinear(K, [32, 32], bias=False, quant_config=config(),
                                       prefix="model.layers.0.mlp.gate_up_proj")
    shards = {0: factors(32, K, 1), 1: factors(32, K, 2)}
    load(layer, shards)
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.weight.numel() == 0 and layer.sparse24_values.shape == (64, K // 2)


def test_added_bytes_counted_at_create_time(vllm_ctx):
    cfg = config()
    QKVParallelLinear(K, 16, 4, 2, bias=False, quant_config=cfg, prefix="model.layers.0.self_attn.qkv_proj")
    RowParallelLinear(K, 32, bias=False, quant_config=cfg, prefix="model.layers.0.self_attn.o_proj")
    assert (cfg.armor_layers, cfg.armor_shards) == (2, 4)
    # A: b * d_out per layer; B: b * d_in per shard (q, k and v each have one) -> float32 bytes
    assert cfg.armor_added_bytes == 4 * B * ((128 + 3 * K) + (32 + K))


def test_non_block_layers_stay_unquantized(vllm_ctx):
    cfg = config()
    outside = ReplicatedLinear(K, 8, bias=False, quant_config=cfg, prefix="model.projector")
    assert type(outside.quant_method) is UnquantizedLinearMethod


@pytest.mark.parametrize("head,nq,nkv,block,what", [
    (16, 4, 1, 32, r"shard\(s\) 'k': 16, 'v': 16 \(shard sizes \[64, 16, 16\]\)"),  # b divides q only
    (16, 3, 3, 32, r"shard\(s\) 'q': 48, 'k': 48, 'v': 48"),
])
def test_block_not_dividing_a_shard_is_a_start_up_error_naming_the_layer(vllm_ctx, head, nq, nkv, block, what):
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.qkv_proj: ARMOR block size " + str(block)
                       + r" .*does not divide the output size of " + what):
        QKVParallelLinear(128, head, nq, nkv, bias=False, quant_config=config(block),
                          prefix="model.layers.2.self_attn.qkv_proj")


def test_block_not_dividing_the_input_or_plain_output(vllm_ctx):
    with pytest.raises(ValueError, match=r"down_proj: ARMOR block size 16 .*does not divide the input size 72"):
        RowParallelLinear(72, 32, bias=False, quant_config=config(), prefix="model.layers.0.mlp.down_proj")
    with pytest.raises(ValueError, match=r"down_proj: ARMOR block size 16 .*does not divide the output size 40"):
        RowParallelLinear(K, 40, bias=False, quant_config=config(), prefix="model.layers.0.mlp.down_proj")


def test_checkpoint_block_size_differing_from_the_marker(vllm_ctx):
    layer = RowParallelLinear(K, 32, bias=False, quant_config=config(), prefix="model.layers.4.mlp.down_proj")
    a8 = torch.randn(4, 8, 8)
    with pytest.raises(ValueError, match=r"model\.layers\.4\.mlp\.down_proj\.armor_a has shape \(4, 8, 8\), expected "
                       r"\(2, 16, 16\) for ARMOR block size 16 .*blocks are 8 x 8, the marker says 16"):
        layer.armor_a.weight_loader(layer.armor_a, a8)
    qkv = QKVParallelLinear(K, 16, 4, 2, bias=False, quant_config=config(), prefix="model.layers.4.self_attn.qkv_proj")
    with pytest.raises(ValueError, match=r"qkv_proj\.armor_a \(shard 'k'\) has shape \(4, 16, 16\), expected "
                       r"\(2, 16, 16\)"):
        qkv.armor_a.weight_loader(qkv.armor_a, torch.randn(4, 16, 16), "k")  # q's size given for k


def test_missing_wrapper_of_one_shard(vllm_ctx):
    layer = QKVParallelLinear(K, 16, 4, 2, bias=False, quant_config=config(),
                              prefix="model.layers.0.self_attn.qkv_proj")
    shards = {"q": factors(64, K, 1), "k": factors(32, K, 2), "v": factors(32, K, 3)}
    load(layer, shards)
    layer.armor_loaded.discard(("b", 1))
    with pytest.raises(ValueError, match=r"qkv_proj: the ARMOR checkpoint has no armor_b\['k'\]"):
        layer.quant_method.process_weights_after_loading(layer)


def test_core_must_be_24(vllm_ctx):
    layer = RowParallelLinear(K, 32, bias=False, quant_config=config(), prefix="model.layers.5.mlp.down_proj")
    a, core, b = factors(32, K, 1)
    core[3, 4:8] = 1.0
    load(layer, {None: (a, core, b)})
    with pytest.raises(ValueError, match=r"model\.layers\.5\.mlp\.down_proj: weight \[32, 96\] is not 2:4 sparse"):
        layer.quant_method.process_weights_after_loading(layer)


def test_tensor_parallel_is_refused_in_one_line(vllm_ctx):
    layer = torch.nn.Module()
    layer.tp_size = 2  # as LinearBase sets it before create_weights (a tp=2 group cannot be built in one process)
    method = AR.ArmorLinearMethod(config(), "model.layers.0.self_attn.o_proj")
    with pytest.raises(ValueError, match=r"o_proj: .* tensor parallel size 1 only \(got 2\)") as e:
        method.create_weights(layer, K // 2, [32], K, 32, torch.float32, weight_loader=lambda *a: None)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("arm", [None, {}, {"block_size": 6}, {"block_size": "16"}, {"block_size": 0}])
def test_marker_without_a_valid_block_size(arm):
    marker = {"format": "2:4", "method": "armor"}
    if arm is not None:
        marker["armor"] = arm
    with pytest.raises(ValueError, match="block_size"):
        S.Sparse24Config.from_config({"leanserve_sparsity": marker})


def test_plain_24_marker_still_gets_the_24_method(vllm_ctx):
    cfg = S.Sparse24Config.from_config({"leanserve_sparsity": {"format": "2:4", "method": "wanda"}})
    layer = RowParallelLinear(K, 32, bias=False, quant_config=cfg, prefix="model.layers.0.self_attn.o_proj")
    assert type(layer.quant_method) is S.Sparse24LinearMethod and not hasattr(layer, "armor_a")
