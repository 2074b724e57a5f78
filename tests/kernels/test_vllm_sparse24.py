"""The leanserve-2of4 QuantizationConfig and its linear method on CPU, inside real vLLM linear layers
(plain, merged QKV and merged gate/up, loaded through their own weight loaders) against F.linear of
the masked dense weight; the packed bytes; the errors; the plugin registration."""
import importlib.metadata
import tempfile

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("vllm")

from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.distributed import parallel_state  # noqa: E402
from vllm.model_executor.layers.linear import (  # noqa: E402
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding  # noqa: E402

from kernels.sparse24.format import decompress_24  # noqa: E402
from kernels.sparse24.prune import prune_magnitude  # noqa: E402
from kernels.vllm_plugin import sparse24 as S  # noqa: E402

MARKER = {"leanserve_sparsity": {"format": "2:4", "method": "magnitude"}}
K = 96  # a multiple of 4 but not of 16: the last metadata word is half used


@pytest.fixture(scope="module")
def vllm_ctx():
    """One-process 'distributed' setup (tp=1) so vLLM's parallel linear layers can be built."""
    cfg = VllmConfig()
    with set_current_vllm_config(cfg):
        owned = not parallel_state.model_parallel_is_initialized()
        if owned:
            path = tempfile.mktemp(prefix="sp24-dist-")
            parallel_state.init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                                        distributed_init_method=f"file://{path}", backend="gloo")
            parallel_state.initialize_model_parallel(1, 1)
        yield cfg
        if owned:
            parallel_state.destroy_model_parallel()
            parallel_state.destroy_distributed_environment()


@pytest.fixture(params=S.CPU_MODES)  # triton: the kernel on CPU tensors (TRITON_INTERPRET=1, kernels/conftest.py)
def cpu_mode(request, monkeypatch):
    monkeypatch.setenv(S.CPU_MODE_ENV, request.param)
    return request.param


def sparse(n, k, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return prune_magnitude(torch.randn(n, k, generator=g)).to(dtype)


def inputs(m, k, seed=7, dtype=torch.float32):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def run(layer, x):
    y = layer(x)
    return y[0] if isinstance(y, tuple) else y


def finish_and_check(layer, dense_w, mode, bias=None, ms=(1, 5, 33)):
    """process_weights_after_loading, then apply for several M against F.linear(masked dense)."""
    assert isinstance(layer.quant_method, S.Sparse24LinearMethod)
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.sparse24_path == mode
    if mode == "dense":
        assert not hasattr(layer, "sparse24_values")  # never packed: vLLM's CPU GEMM gets the dense weight
    else:
        assert layer.weight.numel() == 0  # dense weight freed, only the packed form is kept
        assert torch.equal(decompress_24(layer.sparse24_values, layer.sparse24_meta), dense_w)
    for m in ms:
        x = inputs(m, dense_w.shape[1], seed=m, dtype=dense_w.dtype)
        ref = F.linear(x.float(), dense_w.float(), None if bias is None else bias.float())
        torch.testing.assert_close(run(layer, x).float(), ref, rtol=1e-5, atol=1e-5)
        x3 = x.reshape(1, m, -1)  # leading batch dims pass through
        torch.testing.assert_close(run(layer, x3).float(), ref.reshape(1, m, -1), rtol=1e-5, atol=1e-5)


def test_plain_row_parallel_with_bias(vllm_ctx, cpu_mode):
    n = 40
    layer = RowParallelLinear(K, n, bias=True, quant_config=S.Sparse24Config.from_config(MARKER),
                              prefix="model.layers.3.self_attn.o_proj")
    w = sparse(n, K, 1)
    b = torch.randn(n, generator=torch.Generator().manual_seed(2))
    layer.weight_loader(layer.weight, w)
    layer.weight_loader(layer.bias, b)
    finish_and_check(layer, w, cpu_mode, bias=b)


def test_merged_qkv(vllm_ctx, cpu_mode):
    head, nq, nkv = 16, 4, 2  # GQA: output partition sizes [64, 32, 32]
    layer = QKVParallelLinear(K, head, nq, nkv, bias=False, quant_config=S.Sparse24Config(),
                              prefix="model.layers.0.self_attn.qkv_proj")
    shards = {"q": sparse(nq * head, K, 3), "k": sparse(nkv * head, K, 4), "v": sparse(nkv * head, K, 5)}
    for sid, w in shards.items():  # the checkpoint's separate q/k/v tensors, via the merged loader
        layer.weight_loader(layer.weight, w, sid)
    finish_and_check(layer, torch.cat([shards["q"], shards["k"], shards["v"]]), cpu_mode)


def test_merged_gate_up(vllm_ctx, cpu_mode):
    inter = 24
    layer = MergedColumnParallelLinear(K, [inter, inter], bias=False, quant_config=S.Sparse24Config(),
                                       prefix="model.layers.11.mlp.gate_up_proj")
    gate, up = sparse(inter, K, 6), sparse(inter, K, 7)
    layer.weight_loader(layer.weight, gate, 0)
    layer.weight_loader(layer.weight, up, 1)
    finish_and_check(layer, torch.cat([gate, up]), cpu_mode)


def test_bf16_packed_bytes_at_most_057_of_dense(vllm_ctx, monkeypatch):
    monkeypatch.setenv(S.CPU_MODE_ENV, "compressed")
    inter, hidden = 1536, 576  # the default model's MLP
    layer = MergedColumnParallelLinear(hidden, [inter, inter], bias=False, params_dtype=torch.bfloat16,
                                       quant_config=S.Sparse24Config(), prefix="model.layers.0.mlp.gate_up_proj")
    w = torch.cat([sparse(inter, hidden, 8, torch.bfloat16), sparse(inter, hidden, 9, torch.bfloat16)])
    layer.weight_loader(layer.weight, w[:inter], 0)
    layer.weight_loader(layer.weight, w[inter:], 1)
    dense_bytes = w.numel() * w.element_size()
    layer.quant_method.process_weights_after_loading(layer)
    held = sum(t.numel() * t.element_size() for t in (layer.sparse24_values, layer.sparse24_meta, layer.weight))
    assert layer.sparse24_bytes == (held, dense_bytes)
    assert held <= 0.57 * dense_bytes, held / dense_bytes  # 0.5625 = K/2 values + K/16 int16 meta words
    x = inputs(3, hidden, dtype=torch.bfloat16)
    torch.testing.assert_close(run(layer, x), F.linear(x, w), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("m", [9, 40])  # the Triton GEMV and tl.dot kernels
@pytest.mark.parametrize("dense_min_m", [1, 10**9])  # transient dense weight / the kernel
def test_custom_op_matches_the_reference_on_both_sides_of_the_dense_switch(vllm_ctx, m, dense_min_m):
    from kernels.sparse24.format import compress_24
    from kernels.sparse24.reference import sparse24_linear_reference
    values, meta = compress_24(sparse(32, K, 10))
    x, b = inputs(m, K), torch.randn(32)
    y = S.sparse24_linear_op(x, values, meta, b, use_triton=True, dense_min_m=dense_min_m)
    torch.testing.assert_close(y, sparse24_linear_reference(x, values, meta, b), rtol=1e-5, atol=1e-4)


def test_not_24_is_a_clear_error_naming_the_layer(vllm_ctx):
    layer = ReplicatedLinear(K, 8, bias=False, quant_config=S.Sparse24Config(), prefix="model.layers.5.mlp.down_proj")
    w = sparse(8, K, 11)
    w[3, 4:8] = 1.0  # one group with 4 nonzeros
    layer.weight_loader(layer.weight, w)
    with pytest.raises(ValueError, match=r"model\.layers\.5\.mlp\.down_proj.*not 2:4 sparse \(1 of 192 groups"):
        layer.quant_method.process_weights_after_loading(layer)


def test_input_size_not_multiple_of_4(vllm_ctx):
    with pytest.raises(ValueError, match="multiple of 4"):
        ReplicatedLinear(10, 8, bias=False, quant_config=S.Sparse24Config(), prefix="model.layers.0.mlp.down_proj")


def test_quant_method_only_inside_decoder_blocks(vllm_ctx):
    cfg = S.Sparse24Config()
    inside = ReplicatedLinear(K, 8, bias=False, quant_config=cfg, prefix="model.layers.29.mlp.down_proj")
    outside = ReplicatedLinear(K, 8, bias=False, quant_config=cfg, prefix="model.projector")
    assert isinstance(inside.quant_method, S.Sparse24LinearMethod)
    assert type(outside.quant_method) is UnquantizedLinearMethod
    emb = VocabParallelEmbedding(128, K, quant_config=cfg, prefix="model.embed_tokens")
    head = ParallelLMHead(128, K, quant_config=cfg, prefix="lm_head")
    assert cfg.get_quant_method(emb, "model.embed_tokens") is None
    assert cfg.get_quant_method(head, "lm_head") is None
    assert not isinstance(head.quant_method, S.Sparse24LinearMethod)


def test_config_reads_the_marker_and_only_config_json():
    cfg = S.Sparse24Config.from_config({"model_type": "llama", **MARKER})
    assert cfg.get_name() == "leanserve-2of4" and cfg.marker["method"] == "magnitude"
    for bad in ({"model_type": "llama"}, {"leanserve_sparsity": {"format": "4:8"}}):
        with pytest.raises(ValueError, match="leanserve prune"):
            S.Sparse24Config.from_config(bad)
    files = ["/m/config.json", "/m/generation_config.json", "/m/tokenizer_config.json", "/m/x.json"]
    suffixes = S.Sparse24Config.get_config_filenames()
    assert [f for f in files if any(f.endswith(s) for s in suffixes)] == ["/m/config.json"]  # as vLLM matches


def test_registered_in_vllm_and_as_general_plugin():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    assert "leanserve-2of4" in QUANTIZATION_METHODS
    assert get_quantization_config("leanserve-2of4") is S.Sparse24Config
    eps = {e.name: e.value for e in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert eps.get("leanserve") == "kernels.vllm_plugin:register", "pip install -e . to register the entry point"


def test_bad_cpu_mode(monkeypatch):
    monkeypatch.setenv(S.CPU_MODE_ENV, "sparse")
    with pytest.raises(ValueError, match=S.CPU_MODE_ENV):
        S.cpu_mode()
    monkeypatch.setenv(S.CPU_MODE_ENV, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        S.cpu_mode()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_op_matches_dense():
    from kernels.sparse24.format import compress_24
    w = sparse(256, 512, 12, torch.bfloat16).cuda()
    values, meta = compress_24(w)
    for m in (1, 16, 64, 2048):
        x = inputs(m, 512, dtype=torch.bfloat16).cuda()
        torch.testing.assert_close(S.sparse24_linear_op(x, values, meta, use_triton=True), F.linear(x, w),
                                   rtol=2e-2, atol=2e-2)
