"""Model-level quality of the three 2:4 pruners: perplexity of the dense model and of its magnitude, Wanda
and SparseGPT 2:4 copies on held-out text, with one calibration budget for all.

    python -m kernels.sparse24.quality [--model DIR] [--text data/wikitext2/valid.txt] [--samples 32]
        [--calib-seqlen 256] [--eval-tokens 32768] [--eval-seqlen 1024] [--out bench-results/sparse24_quality.json]

The text is tokenized whole and split in two halves: calibration windows come from the second half
(seeded positions), perplexity is measured on the first `--eval-tokens` tokens of the first half
(non-overlapping windows, kernels/perplexity.py). Pruning runs in memory (kernels/sparse24/prune.py, the
code `leanserve prune` runs), float32, HF transformers. tests/kernels/test_sparse24_quality.py runs the same
comparison with a small budget.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from kernels.model_prep import default_model_dir
from kernels.perplexity import REPO_ROOT, load_model, perplexity, tokenize_file

from .prune import calibration_windows, prune_model_inplace

# The one-shot pruners; ARMOR (minutes per layer) and chat quality are in bench/pruning_quality.py.
METHODS = ("magnitude", "wanda", "sparsegpt")

DEFAULT_TEXT = REPO_ROOT / "data" / "wikitext2" / "valid.txt"


def compare(model_dir, text_path, samples: int, calib_seqlen: int, eval_tokens: int, eval_seqlen: int,
            seed: int = 0, progress: bool = False) -> dict:
    """{"dense": ppl, "magnitude": ppl, "wanda": ppl, "sparsegpt": ppl, ...settings, "seconds"}."""
    t0 = time.time()
    tokenizer, dense = load_model(model_dir)
    ids = tokenize_file(tokenizer, text_path)
    half = ids.numel() // 2
    held_out, calib_pool = ids[:half][:eval_tokens], ids[half:]
    calib = calibration_windows(calib_pool, samples, calib_seqlen, seed)
    res = {"dense": perplexity(dense, held_out, eval_seqlen, progress=progress)}
    for method in METHODS:
        model = copy.deepcopy(dense)
        prune_model_inplace(model, method, None if method == "magnitude" else calib, progress=progress)
        res[method] = perplexity(model, held_out, eval_seqlen, progress=progress)
        del model
    res.update(model=str(model_dir), text=Path(text_path).name, samples=samples, calib_seqlen=calib_seqlen,
               eval_tokens=int(held_out.numel()), eval_seqlen=eval_seqlen, seed=seed,
               seconds=round(time.time() - t0, 1))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="dense HF model directory (default: the prepared default model)")
    ap.add_argument("--text", default=str(DEFAULT_TEXT))
    ap.add_argument("--samples", type=int, default=32, help="calibration windows (Wanda, SparseGPT)")
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--eval-seqlen", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench-results/sparse24_quality.json")
    a = ap.parse_args(argv)
    res = compare(a.model or default_model_dir(), a.text, a.samples, a.calib_seqlen, a.eval_tokens,
                  a.eval_seqlen, a.seed, progress=True)
    print(f"\n2:4 pruners, {res['model']}: calibration {a.samples} x {a.calib_seqlen} tokens (second half of "
          f"{res['text']}), perplexity on the first {res['eval_tokens']} tokens (windows of {a.eval_seqlen}); "
          f"{res['seconds']} s\n")
    print("| model | perplexity | ratio to dense |\n|---|---:|---:|")
    for name in ("dense", "sparsegpt", "wanda", "magnitude"):
        print(f"| {name if name == 'dense' else '2:4 ' + name} | {res[name]:.2f} | {res[name] / res['dense']:.2f} |")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))
        print(f"\nwrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
