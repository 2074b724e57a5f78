"""Benchmark y = x @ W^T with W 2:4 sparse: our Triton kernel vs dense cuBLAS vs cuSPARSELt; and ARMOR.

    python -m kernels.sparse24.bench [--sizes full|small] [--ms 1,8,16] [--armor-block B]
                                     [--out bench-results/sparse24.json]

On CUDA the default is the full grid (N, K) in {(4096,4096), (14336,4096), (4096,14336)} and
M in {1, 8, 16, 32, 64, 128, 512, 4096}, bf16, timed with triton.testing.do_bench (median,
L2 flushed before each run). Without CUDA it runs a small grid with the torch path so the script
can be tested anywhere. Imports nothing from vllm or transformers.

ARMOR rows ("armor_rows", one per (N, K, M)): an ARMOR layer y = ((x B^T) C^T) A^T as the vLLM method computes it
(kernels/vllm_plugin/armor.py): bd_apply of the block-diagonal B [K/b, b, b], the 2:4 core C through our kernel (the
same call as the plain 2:4 row), bd_apply of A [N/b, b, b]; timed against dense cuBLAS on a weight of the same shape
and the plain 2:4 kernel (ratios > 1 mean ARMOR is faster), with its error against the dense reference
x (A C B)^T (fp32). Block size b: 128 on the full grid (the authors' size for 7-13B models), 16 on the small one.
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

from .armor import armor_weight, bd_apply
from .format import compress_24, compressed_nbytes
from .ops import sparse24_linear
from .prune import prune_magnitude

FULL_SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336)]
FULL_MS = [1, 8, 16, 32, 64, 128, 512, 4096]
SMALL_SHAPES = [(256, 512), (512, 256)]
SMALL_MS = [1, 8, 64]
ARMOR_BLOCK = {"full": 128, "small": 16}  # 128: the authors' replication size
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


def _armor_factors(n, k, block, device, dtype, g):
    """A [N/b, b, b], B [K/b, b, b] as ARMOR leaves them: near the identity (scaled by row / column norms in a real
    checkpoint; unit here, so errors compare with the plain rows)."""
    def wrapper(d):
        eye = torch.eye(block, device=device)
        return (eye + torch.randn(d // block, block, block, device=device, generator=g) / block ** 0.5).to(dtype)
    return wrapper(n), wrapper(k)


def _armor_row(row, x, acb, values, meta, a, b, bench):
    """Time and check one ARMOR layer (see the module docstring) against the dense and plain 2:4 times of `row`."""
    def armor():
        return bd_apply(sparse24_linear(bd_apply(x, b), values, meta, dense_min_m=KERNEL_ONLY), a)

    y = armor()
    ref = x.float() @ acb.t()
    r = {k: row[k] for k in ("N", "K", "M", "dtype")}
    r["block"] = a.shape[1]
    r["armor_ms"] = bench(armor)
    u = torch.randn_like(y)  # an input of the core's output shape for A alone
    r["armor_wrappers_ms"] = bench(lambda: (bd_apply(x, b), bd_apply(u, a)))  # the two wrappers, no core
    r["dense_ms"], r["ours_ms"] = row["dense_ms"], row["ours_ms"]
    r["dense_over_armor"] = r["dense_ms"] / r["armor_ms"]
    r["ours_over_armor"] = r["ours_ms"] / r["armor_ms"]
    r["armor_max_err"] = float((y.float() - ref).abs().max())
    r["armor_ref_max_abs"] = float(ref.abs().max())
    r["armor_rel_err"] = _rel_err(y, ref)
    return r


def run(shapes, ms, dtype, device, out_path, armor_block=0):
    cuda = device == "cuda"
    bench = _timer(cuda)
    if cuda:
        from .triton_gemm import GEMV_MAX_M, sparse24_linear_triton
    rows, sizes, armor_rows = [], [], []
    for n, k in shapes:
        g = torch.Generator(device=device).manual_seed(0)
        w = prune_magnitude(torch.randn(n, k, device=device, generator=g, dtype=torch.float32)).to(dtype)
        values, meta = compress_24(w)
        dense_b = n * k * w.element_size()
        comp_b = compressed_nbytes(n, k, dtype)
        sizes.append({"N": n, "K": k, "dense_bytes": dense_b, "compressed_bytes": comp_b,
                      "ratio": round(comp_b / dense_b, 4)})
        if armor_block:
            # Their own generator: the plain rows' x stay those of a run without ARMOR rows.
            a_w, b_w = _armor_factors(n, k, armor_block, device, dtype, torch.Generator(device=device).manual_seed(1))
            acb = armor_weight(a_w.float(), w.float(), b_w.float())  # the dense reference A C B, fp32
            wrap_b = (a_w.numel() + b_w.numel()) * a_w.element_size()
            sizes[-1].update(armor_block=armor_block, armor_wrapper_bytes=wrap_b,
                             armor_ratio=round((comp_b + wrap_b) / dense_b, 4))
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
            if armor_block:
                armor_rows.append(_armor_row(row, x, acb, values, meta, a_w, b_w, bench))
    result = {
        "benchmark": "sparse24 y = x @ W^T (W 2:4, ratios > 1 mean ours is faster)",
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "cusparselt_available": bool(cuda and torch.backends.cusparselt.is_available()),
        "timer": "triton.testing.do_bench median, L2 flushed" if cuda else "perf_counter median of 5",
        "sizes": sizes,
        "rows": rows,
        "armor_benchmark": "ARMOR y = ((x B^T) C^T) A^T: bd_apply(B), 2:4 core through our kernel, bd_apply(A); "
                           "dense_over_armor / ours_over_armor > 1 mean ARMOR is faster; error vs x (A C B)^T in fp32",
        "armor_rows": armor_rows,
    }
    if armor_rows:
        print()
        _print_armor(armor_rows)
    print()
    for s in sizes:
        print(f"bytes N={s['N']} K={s['K']}: dense {s['dense_bytes'] / 2**20:.1f} MiB, "
              f"2:4 values+meta {s['compressed_bytes'] / 2**20:.1f} MiB ({s['ratio']:.4f})"
              + (f"; ARMOR b={s['armor_block']} + wrappers {s['armor_wrapper_bytes'] / 2**20:.1f} MiB "
                 f"({s['armor_ratio']:.4f})" if "armor_block" in s else ""))
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


def _print_armor(rows):
    print(f"ARMOR {'N':>6} {'K':>6} {'M':>5} {'b':>4} | {'dense ms':>9} {'2:4 ms':>9} {'armor ms':>9} "
          f"{'wrap ms':>9} | {'dense/armor':>11} {'2:4/armor':>9} | max_err (ref max) rel_err")
    for r in rows:
        print(f"      {r['N']:>6} {r['K']:>6} {r['M']:>5} {r['block']:>4} | {_fmt(r['dense_ms']):>9} "
              f"{_fmt(r['ours_ms']):>9} {_fmt(r['armor_ms']):>9} {_fmt(r['armor_wrappers_ms']):>9} | "
              f"{r['dense_over_armor']:>11.2f} {r['ours_over_armor']:>9.2f} | {r['armor_max_err']:.2e} "
              f"({r['armor_ref_max_abs']:.1f}) {r['armor_rel_err']:.1e}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", choices=["full", "small"], default=None,
                    help="default: full on CUDA, small otherwise")
    ap.add_argument("--ms", default=None, help="comma-separated M values (overrides the grid's)")
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--armor-block", type=int, default=None,
                    help="ARMOR wrapper block size (0: no ARMOR rows) [default: 128 full, 16 small]")
    ap.add_argument("--out", default="bench-results/sparse24.json")
    a = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = a.sizes or ("full" if device == "cuda" else "small")
    shapes, ms = (FULL_SHAPES, FULL_MS) if sizes == "full" else (SMALL_SHAPES, SMALL_MS)
    if a.ms:
        ms = [int(v) for v in a.ms.split(",")]
    block = ARMOR_BLOCK[sizes] if a.armor_block is None else a.armor_block
    if block and any(n % block or k % block for n, k in shapes):
        ap.error(f"--armor-block {block} must divide every N and K of the grid {shapes}")
    return run(shapes, ms, getattr(torch, a.dtype), device, a.out, armor_block=block)


if __name__ == "__main__":
    main()
