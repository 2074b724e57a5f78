"""Decode step of one Llama-3-8B-shaped layer with a bounded ring vs the full KV cache (bench/gpu.sh).

Per decode step and layer, batch b: the layer's GEMMs (qkv, o, gate_up, down at batch b), the retention
gate, and attention of one query per sequence over the cache: the full KV (T tokens) or the ring
(C = M + B slots), both with the same attention kernel (torch SDPA: FlashAttention on CUDA). The ring
also pays its compaction (kernels/retention/ops.compact_: the Triton kernel on CUDA), once every B
steps, amortised per step. The ratio full / bounded of the step time is the decode-throughput ratio
of a model made of such layers (the paper: 130.5 vs 68.4 tok/s at 32K, batch 4, M = 1024 on an H200).

    python -m kernels.vllm_plugin.bounded_kv.bench_gpu --out bench-results/bounded_kv_gpu.json
    python -m kernels.vllm_plugin.bounded_kv.bench_gpu --quick   # small sizes, runs on CPU
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LLAMA3_8B = dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336, gate_inner=512)
SMALL = dict(hidden=256, heads=8, kv_heads=2, head_dim=32, ffn=512, gate_inner=64)


def timeit(fn, device, iters: int) -> float:
    fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


class Layer:
    def __init__(self, s: dict, batch: int, device, dtype):
        g = torch.Generator(device="cpu").manual_seed(0)
        r = lambda *sh: (torch.randn(*sh, generator=g) * 0.02).to(device=device, dtype=dtype)  # noqa: E731
        h, d = s["hidden"], s["head_dim"]
        self.s, self.b = s, batch
        self.w_qkv = r(h, (s["heads"] + 2 * s["kv_heads"]) * d)
        self.w_o = r(s["heads"] * d, h)
        self.w_gu = r(h, 2 * s["ffn"])
        self.w_down = r(s["ffn"], h)
        self.g1, self.g2 = r(h, s["gate_inner"]).float(), r(s["gate_inner"], s["kv_heads"]).float()
        self.x = r(batch, h)

    def gemms(self, gate: bool):
        x = self.x
        qkv = x @ self.w_qkv
        if gate:  # the retention gate reads the same input as qkv
            F.logsigmoid(F.silu(x.float() @ self.g1) @ self.g2)
        y = qkv[:, : self.s["heads"] * self.s["head_dim"]] @ self.w_o
        gu = (x + y) @ self.w_gu
        a, b = gu.chunk(2, -1)
        return (F.silu(a) * b) @ self.w_down

    def attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def bench(s, batch, contexts, m, buf, device, dtype, iters) -> list[dict]:
    from kernels.retention.ops import compact_

    layer = Layer(s, batch, device, dtype)
    hq, hk, d = s["heads"], s["kv_heads"], s["head_dim"]
    q = torch.randn(batch, hq, 1, d, device=device, dtype=dtype)
    c = m + buf
    ring_k = torch.randn(batch, hk, c, d, device=device, dtype=dtype)
    ring_v = torch.randn_like(ring_k)
    pos = torch.arange(c, device=device, dtype=torch.int32).expand(batch, hk, c).contiguous()
    lb = -torch.rand(batch, hk, c, device=device) * 1e-2
    count = torch.full((batch,), c, device=device, dtype=torch.long)
    t = torch.full((batch,), c + 1, device=device, dtype=torch.long)
    work = [torch.empty_like(x) for x in (ring_k, ring_v, pos, lb)]

    def compaction():  # on a copy, so every call does the same work
        for w, x in zip(work, (ring_k, ring_v, pos, lb)):
            w.copy_(x)
        compact_(*work, count, t, m, 4)

    t_copy = timeit(lambda: [w.copy_(x) for w, x in zip(work, (ring_k, ring_v, pos, lb))], device, iters)
    t_compact = max(timeit(compaction, device, max(1, iters // 4)) - t_copy, 0.0)
    t_ring_attn = timeit(lambda: layer.attend(q, ring_k, ring_v), device, iters)
    t_gemm_gate = timeit(lambda: layer.gemms(True), device, iters)
    t_gemm = timeit(lambda: layer.gemms(False), device, iters)
    bounded = t_gemm_gate + t_ring_attn + t_compact / buf
    out = []
    for ctx in contexts:
        k = torch.randn(batch, hk, ctx, d, device=device, dtype=dtype)
        v = torch.randn_like(k)
        t_full_attn = timeit(lambda: layer.attend(q, k, v), device, iters)
        del k, v
        full = t_gemm + t_full_attn
        out.append({"context": ctx, "batch": batch, "budget": m, "buffer": buf, "ring": c,
                    "full_attn_us": t_full_attn * 1e6, "ring_attn_us": t_ring_attn * 1e6,
                    "compaction_us": t_compact * 1e6, "compaction_per_step_us": t_compact / buf * 1e6,
                    "gemms_us": t_gemm * 1e6, "gemms_with_gate_us": t_gemm_gate * 1e6,
                    "full_step_us": full * 1e6, "bounded_step_us": bounded * 1e6,
                    "attention_ratio": t_full_attn / (t_ring_attn + t_compact / buf),
                    "decode_throughput_ratio": full / bounded})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes and contexts (CPU)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--buffer", type=int, default=128)
    ap.add_argument("--contexts", default="8192,16384,32768")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default="bench-results/bounded_kv_gpu.json")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.quick:
        shape, contexts, m, buf, iters = SMALL, [512, 1024], 64, 32, 5
    else:
        shape, contexts, m, buf, iters = LLAMA3_8B, [int(x) for x in a.contexts.split(",")], a.budget, a.buffer, a.iters
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = bench(shape, a.batch, contexts, m, buf, device, dtype, iters)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"one decode step of a {'Llama-3-8B' if not a.quick else 'small'}-shaped layer, batch {a.batch}, "
          f"{dtype}, {name}; ring C = {m} + {buf}")
    print(f"{'context':>8} {'full attn us':>12} {'ring attn us':>12} {'compact/step':>12} {'gemms us':>9} "
          f"{'full step':>10} {'bounded step':>12} {'attn x':>7} {'decode x':>8}")
    for r in rows:
        print(f"{r['context']:>8} {r['full_attn_us']:>12.1f} {r['ring_attn_us']:>12.1f} {r['compaction_per_step_us']:>12.2f} "
              f"{r['gemms_us']:>9.1f} {r['full_step_us']:>10.1f} {r['bounded_step_us']:>12.1f} "
              f"{r['attention_ratio']:>6.2f}x {r['decode_throughput_ratio']:>7.2f}x")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"device": name, "dtype": str(dtype), "shape": shape, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
