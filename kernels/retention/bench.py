"""Benchmark the retention kernels against the strongest baseline measured in the same run.

    python -m kernels.retention.bench [--quick] [--check] [--out bench-results/retention.json]

* compaction of R rings x H KV heads x C = M + B slots x D: ops.compact_ (the Triton kernel on CUDA,
  vectorised torch on CPU) vs the batched torch topk + gather path (compact_torch_, the strongest
  plain-torch way) and the per-ring reference loop;
* capacity sum forward + backward over [rows, T]: ops.capacity_sum (Triton on CUDA, tiled torch on
  CPU) vs the materialised T x T reference under autograd;
* (CPU, with a model) the gate's share of a decode step of the reference bounded model.
--check compares every output with reference.py first. Imports nothing from vLLM.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from . import ops
from .reference import capacity_sum_reference, compact_reference


def _timer(cuda: bool):
    if cuda:
        import triton.testing
        return lambda fn: float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))

    def bench(fn, reps=5):
        fn()
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(out)
    return bench


def _rings(r, h, c, d, dev, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    kv = torch.randn(r, h, c, 2 * d, generator=g).to(dev, dtype)
    pos = torch.sort(torch.randint(0, 1 << 20, (r, h, c), generator=g), -1).values.to(dev, torch.int32)
    lb = (-torch.rand(r, h, c, generator=g) * 0.05).to(dev)
    return kv, pos, lb, torch.full((r,), c, device=dev, dtype=torch.int32), torch.full((r,), 1 << 20, device=dev)


def bench_compaction(shapes, cuda: bool, check: bool) -> list[dict]:
    dev = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    timer = _timer(cuda)
    rows = []
    for r, h, m, b, d in shapes:
        c = m + b
        kv, pos, lb, count, t = _rings(r, h, c, d, dev, dtype)

        def run(fn):
            kv2, pos2, lb2 = kv.clone(), pos.clone(), lb.clone()
            return lambda: fn(kv2[..., :d], kv2[..., d:], pos2, lb2, count, t, m)
        if check:
            want = compact_reference(kv[..., :d].float(), kv[..., d:].float(), pos, lb, count, t, m)
            kv2, pos2, lb2 = kv.clone(), pos.clone(), lb.clone()
            ops.compact_(kv2[..., :d], kv2[..., d:], pos2, lb2, count, t, m)
            assert torch.equal(pos2[:, :, :m], want[2][:, :, :m]), "compaction: kept positions differ"
            assert torch.equal(kv2[:, :, :m, :d].float(), want[0][:, :, :m]), "compaction: K differs"
        # Each timed call starts from a full ring: copy the pristine state back, timed apart.
        ours = timer(run(ops.compact_))
        torch_path = timer(run(ops.compact_torch_))
        copy = timer(lambda: (kv.clone(), pos.clone(), lb.clone()))
        ref = timer(lambda: compact_reference(kv[..., :d], kv[..., d:], pos, lb, count, t, m)) if r * h <= 256 else None
        bytes_moved = 2 * r * h * m * 2 * d * kv.element_size()
        rows.append({"op": "compact", "rings": r, "heads": h, "budget": m, "buffer": b, "head_dim": d,
                     "dtype": str(dtype).removeprefix("torch."), "ours_ms": ours, "torch_topk_ms": torch_path,
                     "reference_loop_ms": ref, "clone_ms": copy,
                     "ratio_vs_torch": ours / torch_path, "GB_s": bytes_moved / ours / 1e6})
        print(f"compact R={r:4d} H={h} M={m:5d} B={b:4d} D={d}: ours {ours:8.3f} ms  torch topk+gather "
              f"{torch_path:8.3f} ms  ratio {ours / torch_path:.3f}x"
              + (f"  reference loop {ref:8.2f} ms" if ref else ""), flush=True)
    return rows


def bench_capacity(shapes, cuda: bool, check: bool) -> list[dict]:
    dev = "cuda" if cuda else "cpu"
    timer = _timer(cuda)
    rows = []
    for n_rows, t_len in shapes:
        lb = (-torch.rand(n_rows, t_len, device=dev) * 0.02).requires_grad_()
        g = torch.randn(n_rows, t_len, device=dev)
        if check:
            a, = torch.autograd.grad((ops.capacity_sum(lb) * g).sum(), lb)
            b, = torch.autograd.grad((capacity_sum_reference(lb) * g).sum(), lb)
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-2)

        def fwd_bwd(fn):
            return lambda: torch.autograd.grad((fn(lb) * g).sum(), lb)
        ours = timer(fwd_bwd(ops.capacity_sum))
        mat_bytes = n_rows * t_len * t_len * 4
        ref = timer(fwd_bwd(capacity_sum_reference)) if mat_bytes <= (8 << 30 if cuda else 1 << 30) else None
        rows.append({"op": "capacity_sum", "rows": n_rows, "T": t_len, "ours_ms": ours, "materialised_ms": ref,
                     "ratio_vs_materialised": None if ref is None else ours / ref})
        print(f"capacity fwd+bwd rows={n_rows:4d} T={t_len:6d}: ours {ours:9.3f} ms  materialised "
              + (f"{ref:9.3f} ms  ratio {ours / ref:.3f}x" if ref else "(skipped: T x T does not fit)"), flush=True)
    return rows


def bench_gate_overhead(model_dir: str, budget: int, buffer: int, steps: int) -> dict:
    """Decode step of the reference bounded model (CPU, fp32): retention (gates computed) vs streaming
    (same cache, no gates), after filling the cache past several compactions."""
    from transformers import AutoModelForCausalLM

    from .cli import shipped_gates_for
    from .gate import GateSet
    from .llama import BoundedLM, Parts
    from .reference import BoundedCache, make_policy

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    parts = Parts(model)
    gdir = shipped_gates_for(model_dir)
    gates = GateSet.load(gdir) if gdir else None
    if gates is None:
        raise SystemExit(f"no shipped gates for {model_dir}")
    ids = torch.randint(0, model.config.vocab_size, (budget + 3 * buffer,))
    out = {}
    for name, g in (("retention", gates), ("streaming", None)):
        lm = BoundedLM(parts, BoundedCache(parts.num_layers, budget, buffer, make_policy(name)), g)
        lm.feed(ids)
        times = []
        for i in range(steps):
            t0 = time.perf_counter()
            lm.feed(ids[i:i + 1])
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times) * 1e3
    gate_ms = []
    x = torch.randn(1, 1, model.config.hidden_size)
    with torch.no_grad():
        for _ in range(steps):
            t0 = time.perf_counter()
            for layer_gate in gates.layers:
                layer_gate(x)
            gate_ms.append(time.perf_counter() - t0)
    res = {"op": "gate_overhead", "budget": budget, "buffer": buffer, "step_ms_with_gates": out["retention"],
           "step_ms_without": out["streaming"], "gates_alone_ms": statistics.median(gate_ms) * 1e3,
           "params": gates.num_parameters(), "model_params": sum(p.numel() for p in model.parameters())}
    res["gate_share"] = res["gates_alone_ms"] / res["step_ms_without"]
    print(f"decode step (reference, fp32, {torch.get_num_threads()} threads): with gates {out['retention']:.2f} ms, "
          f"without {out['streaming']:.2f} ms; the gates alone {res['gates_alone_ms']:.3f} ms = "
          f"{100 * res['gate_share']:.1f}% of a step; gate parameters {res['params']:,} = "
          f"{100 * res['params'] / res['model_params']:.2f}% of the model", flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes (CPU, or a quick GPU check)")
    ap.add_argument("--check", action="store_true", help="compare with reference.py first")
    ap.add_argument("--model", default=None, help="HF model directory: also measure the gates' decode overhead")
    ap.add_argument("--out", default="bench-results/retention.json")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    if a.quick or not cuda:
        comp = [(8, 3, 64, 32, 64), (32, 3, 128, 128, 64)]
        cap = [(90, 256), (90, 1024)]
    else:  # Llama-3-8B-shaped: 8 KV heads, head dim 128; rings of a batch of requests x 32 layers
        comp = [(32 * 4, 8, 1024, 128, 128), (32 * 64, 8, 1024, 128, 128), (32 * 4, 8, 4096, 512, 128),
                (32 * 64, 8, 128, 128, 128)]
        cap = [(256, 4096), (256, 16384), (32 * 8, 32768)]
    print(f"device: {torch.cuda.get_device_name() if cuda else platform.processor() or 'cpu'}, "
          f"torch {torch.__version__}", flush=True)
    rows = bench_compaction(comp, cuda, a.check) + bench_capacity(cap, cuda, a.check)
    if a.model:
        rows.append(bench_gate_overhead(a.model, 128, 128, 20))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"device": "cuda" if cuda else "cpu", "rows": rows}, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
