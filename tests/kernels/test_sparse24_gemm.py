import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

from kernels.sparse24 import triton_gemm
from kernels.sparse24.format import compress_24
from kernels.sparse24.ops import sparse24_linear
from kernels.sparse24.reference import sparse24_linear_reference
from kernels.sparse24.triton_gemm import sparse24_linear_triton


def random_24(n, k, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    drop = torch.rand(n, k // 4, 4, generator=g).argsort(-1)[..., :2]
    keep = torch.ones(n, k // 4, 4, dtype=torch.bool).scatter_(-1, drop, False)
    return (w * keep.reshape(n, k)).to(dtype)

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-4), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}  # one output rounding step of fp32 sums


@pytest.mark.parametrize("path", ["gemv", "mm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 17, 33])
def test_triton_matches_reference(m, dtype, path):
    n, k = 70, 200  # N and K/2 not multiples of any block; K % 4 == 0
    w = random_24(n, k, seed=m)
    values, meta = compress_24(w.to(dtype))
    g = torch.Generator().manual_seed(100 + m)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if m % 2 else None
    y = sparse24_linear_triton(x, values, meta, bias, path=path)
    ref = sparse24_linear_reference(x, values, meta, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    torch.testing.assert_close(y.float(), ref.float(), **TOL[dtype])


def test_triton_auto_path_batched_and_strided_input():
    n, k = 40, 64
    values, meta = compress_24(random_24(n, k, torch.bfloat16))
    x = torch.randn(2, 5, 2 * k).to(torch.bfloat16)[..., ::2]  # 3-D, non-unit stride along K
    y = sparse24_linear_triton(x, values, meta)
    assert y.shape == (2, 5, n)
    ref = sparse24_linear_reference(x, values, meta)
    torch.testing.assert_close(y.float(), ref.float(), **TOL[torch.bfloat16])


def test_reference_is_dense_matmul():
    w = random_24(9, 48, torch.float64)
    values, meta = compress_24(w)
    x = torch.randn(5, 48, dtype=torch.float64)
    b = torch.randn(9, dtype=torch.float64)
    y = sparse24_linear_reference(x, values, meta, b)  # float32 math, returned as float64
    torch.testing.assert_close(y, x @ w.t() + b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", ["mm", "gemv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_gpu_autotune_config_with_odd_k(config, dtype):
    """The block sizes the GPU autotuner may pick (not only the interpreter's one config), on a K whose
    37 groups of 4 fill no block: masks on K, N and M must hold for every tile shape."""
    n, k = 70, 148
    values, meta = compress_24(random_24(n, k, dtype, seed=5))
    g = torch.Generator().manual_seed(6)
    m = 33 if config == "mm" else 5
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    ref = sparse24_linear_reference(x, values, meta, bias).float()
    configs = triton_gemm.GPU_MM_CONFIGS if config == "mm" else triton_gemm.GPU_GEMV_CONFIGS
    for c in configs:
        y = sparse24_linear_triton(x, values, meta, bias, path=config, config=c)
        torch.testing.assert_close(y.float(), ref, **TOL[dtype], msg=lambda e: f"{c}: {e}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dense_min_m", [1, 10**9])  # both sides of the dense switch
@pytest.mark.parametrize("triton", [None, True])  # CPU default (never Triton) and forced Triton
def test_dispatch_matches_the_reference(dtype, dense_min_m, triton):
    values, meta = compress_24(random_24(24, 100, dtype))
    x = torch.randn(9, 100).to(dtype)
    b = torch.randn(24).to(dtype)
    y = sparse24_linear(x, values, meta, b, triton=triton, dense_min_m=dense_min_m)
    assert y.dtype == dtype and y.shape == (9, 24)
    torch.testing.assert_close(y.float(), sparse24_linear_reference(x, values, meta, b).float(), **TOL[dtype])


def test_shape_and_dtype_errors():
    values, meta = compress_24(random_24(8, 32))
    with pytest.raises(ValueError, match="K=16"):
        sparse24_linear_triton(torch.randn(2, 16), values, meta)
    with pytest.raises(ValueError, match="dtype"):
        sparse24_linear_triton(torch.randn(2, 32).half(), values, meta)


def test_bench_small_runs_on_cpu(tmp_path):
    import json

    from kernels.sparse24 import bench
    out = tmp_path / "sparse24.json"
    res = bench.main(["--sizes", "small", "--ms", "1,3", "--out", str(out)])
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 2 * len(bench.SMALL_SHAPES) == len(res["rows"])
    assert all(r["ours_rel_err"] < 1e-2 and r["dense_ms"] > 0 for r in data["rows"])
    assert data["sizes"][0]["ratio"] == 0.5625
    # ARMOR rows (bd_apply(B), the 2:4 core through the same call, bd_apply(A)): one per (N, K, M), block 16 here.
    arm = data["armor_rows"]
    assert [(r["N"], r["K"], r["M"]) for r in arm] == [(r["N"], r["K"], r["M"]) for r in data["rows"]]
    assert all(r["block"] == 16 and r["armor_ms"] > 0 and r["armor_wrappers_ms"] > 0 for r in arm)
    assert all(r["dense_over_armor"] == r["dense_ms"] / r["armor_ms"] for r in arm)
    assert all(r["ours_over_armor"] == r["ours_ms"] / r["armor_ms"] for r in arm)
    # bf16 against the fp32 x (A C B)^T: errors of bf16 roundings, not of a wrong product
    assert all(r["armor_rel_err"] < 2e-2 and r["armor_max_err"] < 0.05 * r["armor_ref_max_abs"] for r in arm), arm
    n, k = bench.SMALL_SHAPES[0]
    assert data["sizes"][0]["armor_wrapper_bytes"] == 16 * (n + k) * 2


def test_bench_armor_block_must_divide_the_grid(capsys):
    from kernels.sparse24 import bench
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "small", "--armor-block", "48", "--out", ""])
    assert "must divide every N and K" in capsys.readouterr().err
