"""Benchmark y = x @ W^T with W 2:4 sparse: our Triton kernel vs dense cuBLAS vs cuSPARSELt.

    python -m kernels.sparse24.bench [--sizes full|small] [--ms 1,8,16] [--out bench-results/sparse24.json]

On CUDA the default is the full grid (N, K) in {(4096,4096), (14336,4096), (4096,14336)} and
M in {1, 8, 16, 32, 64, 128, 512, 4096}, bf16, timed with triton.testing.do_bench (median,
L2 flushed before each run). Without CUDA it runs a small grid with the torch path so the script
can be tested anywhere. Imports nothing from vllm or transformers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from .format import compress_24, compressed_nbytes
from .ops import sparse24_linear
from .prune import prune_magnitude

FULL_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
FULL_MS = [1, 8, 16, 32, 64, 128, 512, 4096]
SMALL_SHAPES = [(256, 512), (512, 256)]
SMALL_MS = [1, 8, 64]
KERNEL_ONLY = 1 << 62  # dense_min_m that no M reaches
BOTH_PATHS_MAX_M = 64  # also time the gemv and mm kernels separately up to this M


def _timer(cuda: bool):
    if cuda:
        import triton.testing

        def bench(fn):
            try:
                return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
            except TypeError:  # older signature
                return float(triton.testing.do_bench(fn, warmup=25, rep=100))
        return bench

    def bench_cpu(fn, reps=5):
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return bench_cpu


def _cusparselt(w, x, bench):
    """(ms, backend, y) or (None, error string, None)."""
    try:
        from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured
        SparseSemiStructuredTensor._FORCE_CUTLASS = False  # prefer cuSPARSELt
        ws = to_sparse_semi_structured(w)
        y = F.linear(x, ws)
        return bench(lambda: F.linear(x, ws)), type(ws).__name__, y
    except Exception as e:  # report, never fail the run
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}", None


def _rel_err(y, ref):
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def run(shapes, ms, dtype, device, out_path):
    cuda = device == "cuda"
    bench = _timer(cuda)
    if cuda:
        from .triton_gemm import GEMV_MAX_M, sparse24_linear_triton
    rows, sizes = [], []
    for n, k in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        w = prune_magnitude(torch.randn(n, k, device=device, generator=g, dtype=torch.float32)).to(dtype)
        values, meta = compress_24(w)
        dense_b = n * k * w.element_size()
        comp_b = compressed_nbytes(n, k, dtype)
        sizes.append({"N": n, "K": k, "dense_bytes": dense_b, "compressed_bytes": comp_b,
                      "ratio": round(comp_b / dense_b, 4)})
        for m in ms:
            x = torch.randn(m, k, device=device, generator=g, dtype=torch.float32).to(dtype)
            ref = F.linear(x, w)
            row = {"N": n, "K": k, "M": m, "dtype": str(dtype).removeprefix("torch.")}
            row["dense_ms"] = bench(lambda: F.linear(x, w))
            # The kernel alone, never the dense switch (whose threshold this benchmark is there to set).
            y = sparse24_linear(x, values, meta, dense_min_m=KERNEL_ONLY)
            row["ours_ms"] = bench(lambda: sparse24_linear(x, values, meta, dense_min_m=KERNEL_ONLY))
            row["ours_rel_err"] = _rel_err(y, ref)
            if cuda:
                row["ours_path"] = "gemv" if m <= GEMV_MAX_M else "mm"
                if m <= BOTH_PATHS_MAX_M:
                    for path in ("gemv", "mm"):
                        yp = sparse24_linear_triton(x, values, meta, path=path)
                        row[f"ours_{path}_ms"] = bench(lambda: sparse24_linear_triton(x, values, meta, path=path))
                        row[f"ours_{path}_rel_err"] = _rel_err(yp, ref)
                ms_s, backend, ys = _cusparselt(w, x, bench)
            else:
                row["ours_path"] = "torch (decompress + dense)"
                ms_s, backend, ys = None, "unavailable: no CUDA", None
            row["cusparselt_ms"] = ms_s
            row["cusparselt_backend" if ms_s is not None else "cusparselt_error"] = backend
            if ys is not None:
                row["cusparselt_rel_err"] = _rel_err(ys, ref)
            row["dense_over_ours"] = row["dense_ms"] / row["ours_ms"]
            row["cusparselt_over_ours"] = ms_s / row["ours_ms"] if ms_s else None
            rows.append(row)
            _print_row(row, first=len(rows) == 1)
    result = {
        "benchmark": "sparse24 y = x @ W^T (W 2:4, ratios > 1 mean ours is faster)",
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cusparselt_available": bool(cuda and torch.backends.cusparselt.is_available()),
        "timer": "triton.testing.do_bench median, L2 flushed" if cuda else "perf_counter median of 5",
        "sizes": sizes,
        "rows": rows,
    }
    print()
    for s in sizes:
        print(f"bytes N={s['N']} K={s['K']}: dense {s['dense_bytes'] / 2**20:.1f} MiB, "
              f"2:4 values+meta {s['compressed_bytes'] / 2**20:.1f} MiB ({s['ratio']:.4f})")
    if out_path:
        os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {out_path}")
    return result


def _triton_version():
    try:
        import triton
        return triton.__version__
    except Exception:
        return None


def _fmt(v, spec=".4f"):
    return "-" if v is None else format(v, spec)


def _print_row(r, first):
    if first:
        print(f"{'N':>6} {'K':>6} {'M':>5} | {'dense ms':>9} {'cuSPLt ms':>9} {'ours ms':>9} "
              f"{'gemv ms':>9} {'mm ms':>9} | {'dense/ours':>10} {'cuSPLt/ours':>11} | path  rel_err")
    print(f"{r['N']:>6} {r['K']:>6} {r['M']:>5} | {_fmt(r['dense_ms']):>9} {_fmt(r['cusparselt_ms']):>9} "
          f"{_fmt(r['ours_ms']):>9} {_fmt(r.get('ours_gemv_ms')):>9} {_fmt(r.get('ours_mm_ms')):>9} | "
          f"{_fmt(r['dense_over_ours'], '.2f'):>10} {_fmt(r['cusparselt_over_ours'], '.2f'):>11} | "
          f"{r['ours_path'].split()[0]:5} {r['ours_rel_err']:.1e}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", choices=["full", "small"], default=None,
                    help="default: full on CUDA, small otherwise")
    ap.add_argument("--ms", default=None, help="comma-separated M values (overrides the grid's)")
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--out", default="bench-results/sparse24.json")
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = a.sizes or ("full" if device == "cuda" else "small")
    shapes, ms = (FULL_SHAPES, FULL_MS) if sizes == "full" else (SMALL_SHAPES, SMALL_MS)
    if a.ms:
        ms = [int(v) for v in a.ms.split(",")]
    return run(shapes, ms, getattr(torch, a.dtype), device, a.out)


if __name__ == "__main__":
    main()
