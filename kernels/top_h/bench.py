"""Top-H filter vs vLLM's own top-p (sort-based, and its Triton kernel on CUDA) and min-p.

    python -m kernels.top_h.bench [--sizes 1x32000,64x152064] [--reps 3] [--out PATH]
    python -m kernels.top_h.bench --compare-authors --logits logits.pt [--alpha 0.4]

Prints one table and writes JSON. On CUDA our filter is the Triton kernel, on CPU the
vectorised torch path. Every method runs on a fresh copy of the logits (they all work in
place); the time of that copy is measured alone and subtracted. "ratio" is our time over the
fastest baseline of the same row (< 1: we are faster). Baselines come from the installed
vLLM; where an import fails an equivalent plain-torch version runs and the table says so.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from types import SimpleNamespace

import torch

from .authors import top_h_keep_mask_authors
from .ops import top_h_filter_, top_h_keep_mask_torch, _per_row

DEFAULT_SIZES = [(b, v) for v in (32000, 152064) for b in (1, 64, 256)]
TOP_P, MIN_P, ALPHA = 0.9, 0.1, 0.4


# ---------------------------------------------------------------- baselines

def _top_p_sort_torch(logits, p):
    """Same steps as vLLM's apply_top_k_top_p_pytorch (top-p only)."""
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    probs_sum = logits_sort.softmax(dim=-1).cumsum(dim=-1)
    mask = probs_sum <= 1 - p.unsqueeze(1)
    mask[:, -1] = False
    logits_sort.masked_fill_(mask, float("-inf"))
    return logits.scatter_(dim=-1, index=logits_idx, src=logits_sort)


def _min_p_torch(logits, min_p):
    """Same steps as vLLM's MinPLogitsProcessor.apply."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill_(probs < threshold, float("-inf"))


def baselines(device: torch.device) -> dict[str, tuple]:
    """name -> (fn(logits, top_p, min_p, row_index) in place, source)."""
    out = {}
    try:
        from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch
        out["top-p sort (vLLM)"] = (lambda x, p, m, i: apply_top_k_top_p_pytorch(x, None, p),
                                    "vllm.v1.sample.ops.topk_topp_sampler.apply_top_k_top_p_pytorch")
    except Exception as e:  # noqa: BLE001 - any import failure means: use the torch copy
        out["top-p sort (torch)"] = (lambda x, p, m, i: _top_p_sort_torch(x, p),
                                     f"plain torch copy (vLLM import failed: {type(e).__name__})")
    if device.type == "cuda":
        try:
            from vllm.v1.sample.ops.topk_topp_triton import apply_top_k_top_p_triton
            out["top-p triton (vLLM)"] = (lambda x, p, m, i: apply_top_k_top_p_triton(x, None, p),
                                          "vllm.v1.sample.ops.topk_topp_triton")
        except Exception as e:  # noqa: BLE001
            out["top-p triton (vLLM)"] = (None, f"unavailable ({type(e).__name__})")
        try:
            from vllm.v1.worker.gpu.sample.min_p import apply_min_p
            out["min-p (vLLM)"] = (
                lambda x, p, m, i: apply_min_p(x, i, m),
                "vllm.v1.worker.gpu.sample.min_p.apply_min_p (Triton)")
        except Exception as e:  # noqa: BLE001
            out["min-p (torch)"] = (lambda x, p, m, i: _min_p_torch(x, m),
                                    f"plain torch copy (vLLM import failed: {type(e).__name__})")
    else:
        try:
            from vllm.v1.sample.logits_processor.builtin import MinPLogitsProcessor

            def vllm_min_p(x, p, m, i):
                state = SimpleNamespace(min_p_count=x.shape[0], min_p=m.unsqueeze(1))
                return MinPLogitsProcessor.apply(state, x)
            out["min-p (vLLM)"] = (vllm_min_p, "vllm.v1.sample.logits_processor.builtin.MinPLogitsProcessor.apply")
        except Exception as e:  # noqa: BLE001
            out["min-p (torch)"] = (lambda x, p, m, i: _min_p_torch(x, m),
                                    f"plain torch copy (vLLM import failed: {type(e).__name__})")
    return out


# ---------------------------------------------------------------- timing

def _time_cpu(fn, x, reps):
    fn(x.clone())  # warm-up
    ts = []
    while len(ts) < reps or (sum(ts) < 0.3 and len(ts) < 50):  # small sizes: more calls
        y = x.clone()
        t0 = time.perf_counter()
        fn(y)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def _time_cuda(fn, x, reps):
    import triton.testing
    ms = triton.testing.do_bench(lambda: fn(x.clone()), rep=max(25, reps * 10))
    copy = triton.testing.do_bench(lambda: x.clone(), rep=max(25, reps * 10))
    return max(ms - copy, 0.0)


def make_logits(b, v, device, dtype, real=None, seed=0):
    if real is not None:  # tile real rows up to b, cut / pad the vocabulary to v
        rows = real[torch.arange(b) % real.shape[0]].float()
        if rows.shape[1] >= v:
            rows = rows[:, :v]
        else:
            pad = torch.full((b, v - rows.shape[1]), float("-inf"))
            rows = torch.cat([rows, pad], 1)
        return rows.to(device=device, dtype=dtype).contiguous()
    g = torch.Generator().manual_seed(seed)
    # Roughly LLM-like: a normal bulk plus a few strongly preferred tokens per row.
    x = torch.randn(b, v, generator=g) * 2.0
    x[:, :8] += torch.rand(b, 8, generator=g) * 10
    return x[:, torch.randperm(v, generator=g)].to(device=device, dtype=dtype).contiguous()


def run(sizes, reps, device, dtype, real=None):
    base = baselines(device)
    timer = _time_cuda if device.type == "cuda" else _time_cpu
    rows = []
    for b, v in sizes:
        x = make_logits(b, v, device, dtype, real)
        p = torch.full((b,), TOP_P, device=device)
        m = torch.full((b,), MIN_P, device=device)
        alpha = _per_row(ALPHA, b, device)
        idx = torch.arange(b, device=device, dtype=torch.int32)
        ours = timer(lambda y: top_h_filter_(y, alpha), x, reps)
        row = {"B": b, "V": v, "top_h_ms": ours, "baselines_ms": {}}
        for name, (fn, _src) in base.items():
            if fn is None:
                continue
            xb = x.float() if "triton" in name else x  # vLLM's Triton top-p takes fp32 only
            row["baselines_ms"][name] = timer(lambda y, fn=fn: fn(y, p, m, idx), xb, reps)
        best = min(row["baselines_ms"].items(), key=lambda kv: kv[1])
        row["strongest"] = best[0]
        row["ratio"] = ours / best[1] if best[1] > 0 else float("nan")
        sort_ms = [t for n, t in row["baselines_ms"].items() if n.startswith("top-p sort")]
        row["ratio_vs_top_p_sort"] = ours / sort_ms[0] if sort_ms else float("nan")
        row["kept_mean"] = float((~torch.isneginf(top_h_filter_(x.clone(), alpha))).sum(1)
                                 .float().mean())
        rows.append(row)
        print(f"  done B={b} V={v}", flush=True)
    return rows, {k: src for k, (_fn, src) in base.items()}


def print_table(rows, sources, device_name, impl):
    names = list(sources)
    head = f"{'B':>4} {'V':>7} | {'top-H (' + impl + ') ms':>22} | " + " | ".join(
        f"{n:>20}" for n in names) + f" | {'vs top-p sort':>13} | {'vs strongest':>20} | {'kept':>6}"
    print(f"\nTop-H filter on {device_name}: alpha={ALPHA}, top-p={TOP_P}, min-p={MIN_P} "
          "(ms per call, median)")
    print(head)
    print("-" * len(head))
    for r in rows:
        cells = " | ".join(f"{r['baselines_ms'].get(n, float('nan')):>20.3f}" for n in names)
        print(f"{r['B']:>4} {r['V']:>7} | {r['top_h_ms']:>22.3f} | {cells} | "
              f"{r['ratio_vs_top_p_sort']:>13.2f} | {r['ratio']:>6.2f} {'(' + r['strongest'] + ')':>13} | "
              f"{r['kept_mean']:>6.0f}")
    print("ratios: top-H time / baseline time (< 1: top-H is faster); kept: mean top-H kept set")
    print("sources: " + "; ".join(f"{k} = {v}" for k, v in sources.items()))


# ---------------------------------------------------------------- correctness on the device

def _tie_only_difference(keep, ref, x) -> bool:
    """keep differs from ref at most on the tie group at ref's threshold, taken whole."""
    finite = ~torch.isneginf(x)
    if torch.equal(keep, ref) or not finite.any():
        return torch.equal(keep | ~finite, ref | ~finite)
    group = x == x[ref & finite].min()
    return torch.equal(keep[~group], ref[~group]) and (
        bool(keep[group].all()) or (not ref[group].all() and not keep[group].any()))


def check(sizes, device, dtype, real=None):
    """Our filter on `device` against the CPU torch path (itself tested against reference.py),
    per-row alpha in [0.05, 0.95] and temperature in [0.5, 1.5]. Returns failing rows."""
    failures = []
    for b, v in sizes:
        x = make_logits(b, v, device, dtype, real, seed=1)
        g = torch.Generator().manual_seed(b + v)
        alpha = torch.rand(b, generator=g) * 0.9 + 0.05
        temp = torch.rand(b, generator=g) + 0.5
        out = top_h_filter_(x.clone(), alpha.to(device), temp.to(device))
        keep = (~torch.isneginf(out)).cpu()
        xc = x.cpu().float()
        ref = top_h_keep_mask_torch(xc, alpha, 1.0 / temp, entropy_dtype=torch.float64)
        bad = [i for i in range(b) if not _tie_only_difference(keep[i], ref[i], xc[i])]
        untouched = torch.equal(out.cpu()[keep], x.cpu()[keep])
        print(f"  check B={b} V={v} {dtype}: {b - len(bad)}/{b} rows agree, "
              f"kept values untouched: {untouched}", flush=True)
        failures += [(b, v, i) for i in bad] + ([] if untouched else [(b, v, "values")])
    return failures


# ---------------------------------------------------------------- paper vs authors

def compare_authors(logits, alphas, temperature=None):
    """Kept-set sizes of the paper rule (reference semantics) vs the authors' code."""
    x = logits.float()
    out = []
    for a in alphas:
        alpha = _per_row(a, x.shape[0], x.device)
        inv_t = None if temperature is None else _per_row(1.0 / temperature, x.shape[0], x.device)
        paper = top_h_keep_mask_torch(x, alpha, inv_t, entropy_dtype=torch.float64)
        authors = torch.cat([top_h_keep_mask_authors(x[r:r + 64], a, temperature)
                             for r in range(0, x.shape[0], 64)])  # bounded float64 memory
        n_p, n_a = paper.sum(1).float(), authors.sum(1).float()
        inter = (paper & authors).sum(1).float()
        out.append({
            "alpha": a, "rows": x.shape[0],
            "paper_kept_mean": float(n_p.mean()), "paper_kept_median": float(n_p.median()),
            "paper_kept_max": int(n_p.max()),
            "authors_kept_mean": float(n_a.mean()), "authors_kept_median": float(n_a.median()),
            "authors_kept_max": int(n_a.max()),
            "same_set_frac": float((paper == authors).all(1).float().mean()),
            "authors_smaller_frac": float((n_a < n_p).float().mean()),
            "authors_larger_frac": float((n_a > n_p).float().mean()),
            "paper_over_100_frac": float((n_p > 100).float().mean()),
            "jaccard_mean": float((inter / (n_p + n_a - inter)).mean()),
        })
    print(f"\nPaper rule vs authors' code on {x.shape[0]} rows of real logits (V={x.shape[1]})")
    cols = ["alpha", "paper_kept_mean", "paper_kept_median", "authors_kept_mean",
            "authors_kept_median", "same_set_frac", "authors_smaller_frac",
            "authors_larger_frac", "paper_over_100_frac", "jaccard_mean"]
    print(" | ".join(cols))
    for r in out:
        print(" | ".join(f"{r[c]:>{len(c)}.3f}" if isinstance(r[c], float) else f"{r[c]:>{len(c)}}"
                         for c in cols))
    return out


# ---------------------------------------------------------------- main

def _parse_sizes(text):
    return [tuple(int(n) for n in s.lower().split("x")) for s in text.split(",") if s]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", help="comma list of BxV, e.g. 1x32000,64x152064")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per method")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--logits", help=".pt file with real logits [N, V]")
    ap.add_argument("--compare-authors", action="store_true")
    ap.add_argument("--check", action="store_true",
                    help="also compare the kept sets with the CPU torch path (needs CUDA to mean much)")
    ap.add_argument("--alpha", type=float, action="append", help="for --compare-authors")
    ap.add_argument("--temperature", type=float, default=None, help="for --compare-authors")
    ap.add_argument("--out", default="bench-results/top_h.json")
    args = ap.parse_args(argv)

    real = None
    if args.logits:
        real = torch.load(args.logits, map_location="cpu")
        real = real if isinstance(real, torch.Tensor) else real["logits"]
        real = real.reshape(-1, real.shape[-1])
    result = {"torch": torch.__version__, "platform": platform.platform(),
              "threads": torch.get_num_threads()}
    if args.compare_authors:
        if real is None:
            ap.error("--compare-authors needs --logits FILE.pt (real logits [N, V])")
        result["compare_authors"] = compare_authors(real, args.alpha or [0.2, 0.4, 0.6, 0.8],
                                                    args.temperature)
        result["logits_file"] = args.logits
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = getattr(torch, args.dtype)
        sizes = _parse_sizes(args.sizes) if args.sizes else DEFAULT_SIZES
        reps = args.reps or (20 if device.type == "cuda" else 2)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
            f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        impl = "Triton" if device.type == "cuda" else "torch"
        if device.type == "cuda":
            import triton
            result["triton"] = triton.__version__
        if args.check:
            fails = check(sizes, device, dtype, real)
            result["check_failures"] = [list(map(str, f)) for f in fails]
            print(f"check: {'OK' if not fails else f'{len(fails)} FAILURES'}")
        rows, sources = run(sizes, reps, device, dtype, real)
        print_table(rows, sources, name, impl)
        result.update({"device": name, "top_h_impl": impl, "dtype": args.dtype,
                       "params": {"alpha": ALPHA, "top_p": TOP_P, "min_p": MIN_P},
                       "logits": args.logits or "synthetic", "baseline_sources": sources,
                       "rows": rows})
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
