"""Quality of the 2:4 pruners on the default model, each with two calibration sets, in one run:
held-out WikiText-2 perplexity, perplexity on a second text (long reasoning traces), and chat quality
(`leanserve eval chat`: the dense model's own greedy answers scored under the pruned one, and simple factual
questions the dense model answers right).

  python -m bench.pruning_quality [--methods wanda sparsegpt armor] [--calib wiki chat] [--armor-iters 1000]
      [--armor-proxy nowag|hessian] [--armor-lr 1e-4] [--distill-steps 0] [--distill-lr 1e-4]
      [--distill-samples 0]
      [--samples 32] [--seqlen 512] [--work bench-results/pruning] [--json bench/figures/pruning_quality.json]
  python -m bench.pruning_quality --checkpoints DIR [DIR ...]   (only evaluate these, same protocol)

Every pruned checkpoint is made by the real command, `leanserve prune ... --calib ...` (same calibration
budget for every method), and kept in --work (an existing one is reused: delete it to re-prune).
WikiText-2 valid is split by lines: the first half is the held-out text (its first --eval-tokens tokens,
windows of 1024), the second half calibrates. Calibration sets: "wiki" = that second half; "chat" = the
GSM8K problems in data/gsm8k/test500.jsonl as user/assistant conversations through the chat template, mixed
with the same WikiText half. The second text is the responses of data/reasoning_traces/sample.jsonl (or
--traces FILE). Pass other files to re-measure on text that is not in the repository.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from kernels.model_prep import default_model_dir
from kernels.perplexity import REPO_ROOT, load_model, perplexity

WIKI = REPO_ROOT / "data" / "wikitext2" / "valid.txt"
GSM8K = REPO_ROOT / "data" / "gsm8k" / "test500.jsonl"
TRACES = REPO_ROOT / "data" / "reasoning_traces" / "sample.jsonl"


def split_wiki(path: Path, work: Path) -> tuple[Path, Path]:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    half = len(lines) // 2
    held, calib = work / "wiki_heldout.txt", work / "wiki_calib.txt"
    held.write_text("".join(lines[:half]), encoding="utf-8")
    calib.write_text("".join(lines[half:]), encoding="utf-8")
    return held, calib


def text_ids(tok, path: Path, max_tokens: int) -> torch.Tensor:
    from kernels.retention.data import read_documents

    docs = read_documents(str(path), (0.0, 1.0))
    ids: list[int] = []
    for d in docs:
        ids += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


def _timed(cmd: list[str]) -> float:
    """Runs a leanserve command (echoed), failing the benchmark if it fails; returns its wall time."""
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True)
    return round(time.time() - t0, 1)


def prune(model: str, out: Path, method: str, calib: list[Path], a) -> float:
    """Runs `leanserve prune`; returns its wall time (0 when the checkpoint already exists)."""
    if (out / "config.json").exists():
        return 0.0
    cmd = [sys.executable, "-m", "server.cli", "prune", model, str(out), "--method", method,
           "--samples", str(a.samples), "--seqlen", str(a.seqlen), "--quiet"]
    for c in calib:
        cmd += ["--calib", str(c)]
    if method == "armor":
        cmd += ["--iters", str(a.armor_iters), "--proxy", a.armor_proxy, "--lr", str(a.armor_lr)]
    return _timed(cmd)


def distill(model: str, pruned: Path, out: Path, calib: list[Path], a) -> float:
    """Runs `leanserve distill` on a pruned checkpoint (same calibration files, --distill-samples non-overlapping
    windows of them: by default all, far more than the pruners' budget); returns its wall time."""
    if (out / "config.json").exists():
        return 0.0
    cmd = [sys.executable, "-m", "server.cli", "distill", model, str(pruned), str(out), "--samples",
           str(a.distill_samples), "--seqlen", str(a.seqlen), "--steps", str(a.distill_steps),
           "--lr", str(a.distill_lr), "--quiet"]
    for c in calib:
        cmd += ["--calib", str(c)]
    return _timed(cmd)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="dense model dir (default: the prepared default model)")
    ap.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt", "armor"])
    ap.add_argument("--calib", nargs="+", default=["wiki", "chat"], choices=["wiki", "chat"])
    ap.add_argument("--armor-iters", type=int, default=1000)
    ap.add_argument("--armor-proxy", default="nowag", choices=["nowag", "hessian"])
    ap.add_argument("--armor-lr", type=float, default=1e-4)
    ap.add_argument("--distill-steps", type=int, default=0,
                    help="also `leanserve distill` every pruned checkpoint, this many steps (0: off)")
    ap.add_argument("--distill-lr", type=float, default=1e-4)
    ap.add_argument("--distill-samples", type=int, default=0,
                    help="non-overlapping calibration windows distillation uses (0: all the calibration files have)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--wiki", default=str(WIKI), help="WikiText-style text split into held-out / calibration halves")
    ap.add_argument("--conversations", default=str(GSM8K), help="chat calibration conversations (.jsonl)")
    ap.add_argument("--traces", default=str(TRACES), help="second evaluation text (.jsonl of traces or .txt)")
    ap.add_argument("--prompts", default=None, help="held-out chat prompts (default: eval chat's)")
    ap.add_argument("--facts", default=None, help="factual questions (default: eval chat's)")
    ap.add_argument("--checkpoints", nargs="+", default=None, metavar="DIR",
                    help="evaluate these existing checkpoints (and the dense model) with the same protocol; no pruning")
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--traces-tokens", type=int, default=16384)
    ap.add_argument("--work", default="bench-results/pruning")
    ap.add_argument("--json", default="bench/figures/pruning_quality.json")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    from kernels.chat_quality import (DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPTS, chat_quality, dense_cache_path,
                                      load_facts, load_prompts)
    from kernels.perplexity import resolve_text

    torch.set_num_threads(a.threads)
    model = a.model or str(default_model_dir())
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    held, wiki_calib = split_wiki(Path(a.wiki), work)
    calib_sets = {"wiki": [wiki_calib], "chat": [Path(a.conversations), wiki_calib]}
    prompts, facts = load_prompts(a.prompts), load_facts(a.facts)
    # the dense answers once per dense model and prompts file, shared with `leanserve eval chat`
    cache = dense_cache_path(model, resolve_text(a.prompts or DEFAULT_PROMPTS), DEFAULT_MAX_NEW_TOKENS)

    d_tok, dense = load_model(model)
    wiki_ids = text_ids(d_tok, held, a.eval_tokens)
    trace_ids = text_ids(d_tok, Path(a.traces), a.traces_tokens)

    def evaluate(tok, m) -> dict:
        r = {"wiki_ppl": perplexity(m, wiki_ids, 1024), "traces_ppl": perplexity(m, trace_ids, 1024)}
        r.update(chat_quality(m, tok, dense, d_tok, prompts, facts, cache=cache))
        return r

    rows = [{"method": "dense", "calib": None, **evaluate(d_tok, dense)}]

    def add(row: dict) -> None:
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if not isinstance(v, (list, dict))}), flush=True)

    for ckpt in a.checkpoints or []:
        tok, m = load_model(ckpt)
        add({"method": Path(ckpt).name, "calib": None, "checkpoint": str(ckpt), **evaluate(tok, m)})
        del m
    for cal in ([] if a.checkpoints else a.calib):
        for method in a.methods:
            tag = "" if a.armor_proxy == "nowag" else f"h{a.armor_lr:g}"
            out = work / f"{method}_{cal}" if method != "armor" else work / f"armor{a.armor_iters}{tag}_{cal}"
            secs = prune(model, out, method, calib_sets[cal], a)
            tok, m = load_model(out)
            label = method if method != "armor" or a.armor_proxy == "nowag" else "armor (hessian)"
            add({"method": label, "calib": cal, "prune_seconds": secs, "checkpoint": str(out), **evaluate(tok, m)})
            del m
            if a.distill_steps:
                dout = out.with_name(f"{out.name}_d{a.distill_steps}lr{a.distill_lr:g}")
                secs = distill(model, out, dout, calib_sets[cal], a)
                tok, m = load_model(dout)
                add({"method": label + " + distill", "calib": cal, "prune_seconds": rows[-1]["prune_seconds"],
                     "distill_seconds": secs, "checkpoint": str(dout), **evaluate(tok, m)})
                del m
    base = rows[0]
    if a.checkpoints:
        print(f"\n2:4 checkpoints against {Path(model).name}\n")
    else:
        print(f"\n2:4 pruners on {Path(model).name}: calibration {a.samples} x {a.seqlen} tokens; ARMOR "
              f"{a.armor_iters} iterations per layer, {a.armor_proxy} proxy, lr {a.armor_lr:g}; distillation "
              f"{a.distill_steps} steps, lr {a.distill_lr:g}\n")
    print("| method | calibration | WikiText ppl (x dense) | traces ppl (x dense) | chat answers ppl (x dense) | "
          "facts kept |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['calib'] or '-'} | {r['wiki_ppl']:.2f} ({r['wiki_ppl'] / base['wiki_ppl']:.2f}) | "
              f"{r['traces_ppl']:.3f} ({r['traces_ppl'] / base['traces_ppl']:.2f}) | "
              f"{r['answer_ppl']:.3f} ({r['answer_ppl_ratio']:.2f}) | {r['facts_kept']} of {r['facts_dense_right']} |")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"model": Path(model).name, "samples": a.samples, "seqlen": a.seqlen,
                                            "armor_iters": a.armor_iters, "armor_proxy": a.armor_proxy,
                                            "armor_lr": a.armor_lr, "distill_steps": a.distill_steps,
                                            "distill_lr": a.distill_lr, "rows": rows}, indent=1))
        print(f"\nwrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
