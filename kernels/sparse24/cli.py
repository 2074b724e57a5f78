"""`leanserve prune`: its arguments, their checks, the pruner, a read-back check of the written
checkpoint. server/cli.py names this module and imports it only when the command runs (torch and
transformers live in the engine extra)."""
from __future__ import annotations

import sys
from pathlib import Path

import transformers  # noqa: F401  (imported here so a missing engine extra fails before any work)

from kernels import model_prep

from . import prune
from .checkpoint import check_pruned


def _check_model_dir(path: str) -> str | None:
    try:
        model_prep.validate_model_dir(Path(path))
    except model_prep.PrepareError as e:
        return str(e)
    return None


def add_arguments(p) -> None:
    p.description = ("Prunes every linear layer of the decoder blocks to 2:4 along its input dimension and writes "
                     "a normal HF checkpoint whose config.json carries a \"leanserve_sparsity\" marker.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="dense HF model directory")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where to write the pruned checkpoint")
    p.add_argument("--method", choices=prune.METHODS, required=True,
                   help="magnitude (no calibration), wanda, sparsegpt or armor (these three need --calib)")
    p.add_argument("--calib", action="append", default=None, metavar="FILE",
                   help="calibration data: a text file, or a .jsonl of conversations (OpenAI \"messages\" or GSM8K "
                        "question/answer lines) rendered through the model's chat template; repeat to mix. Keep it "
                        "disjoint from what you evaluate on")
    p.add_argument("--samples", type=int, default=128, help="calibration windows [default 128]")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window [default 2048]")
    p.add_argument("--seed", type=int, default=0, help="seed of the window positions [default 0]")
    g = p.add_argument_group("armor", "ARMOR: a 2:4 core between block-diagonal wrappers (y = A (C (B x)))")
    g.add_argument("--block-size", type=int, default=None,
                   help="wrapper block size: a multiple of 4 dividing every layer dimension [default: the largest "
                        "one adding at most 5%% parameters to the decoder blocks; 16 for SmolLM2-135M]")
    g.add_argument("--iters", type=int, default=1000,
                   help="block coordinate descent iterations per linear layer [default 1000]")
    g.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate of the continuous step [default 1e-4]")
    g.add_argument("--proxy", choices=prune.ARMOR_PROXIES, default="nowag",
                   help="layer loss: nowag (the authors': squared error weighted by diag(X X^T), NoWag-P start) or "
                        "hessian (the layer's output error with the full X X^T, started from SparseGPT's weight; "
                        "costs a d_out x d_in x d_in product per iteration) [default nowag]")
    p.add_argument("--force", action="store_true", help="overwrite OUT_DIR if it already holds a checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args) -> int:
    err = _check_model_dir(args.model_dir)
    if err:
        print(f"leanserve: {err}", file=sys.stderr)
        return 1
    src, out = Path(args.model_dir).resolve(), Path(args.out_dir).resolve()
    if out == src:
        print("leanserve: OUT_DIR must differ from MODEL_DIR (the dense checkpoint is kept)", file=sys.stderr)
        return 1
    if (out / "config.json").exists() and not args.force:
        print(f"leanserve: {out} already holds a checkpoint; pass --force to overwrite it", file=sys.stderr)
        return 1
    if args.method != "magnitude" and not args.calib:
        print(f"leanserve: --method {args.method} needs calibration text: --calib FILE", file=sys.stderr)
        return 1
    for c in args.calib or []:
        if not Path(c).is_file():
            print(f"leanserve: calibration file {c} does not exist", file=sys.stderr)
            return 1
    if args.iters < 0 or args.lr <= 0:
        print("leanserve: need --iters >= 0 and --lr > 0", file=sys.stderr)
        return 1
    armor = None
    if args.method == "armor":
        armor = {"iters": args.iters, "lr": args.lr, "seed": args.seed, "proxy": args.proxy}
        if args.block_size is not None:
            armor["block"] = args.block_size
    if args.samples < 1 or args.seqlen < 2:
        print("leanserve: need --samples >= 1 and --seqlen >= 2", file=sys.stderr)
        return 1
    try:
        summary = prune.prune_model(str(src), str(out), args.method, args.calib if args.method != "magnitude" else None,
                                    samples=args.samples, seqlen=args.seqlen, progress=not args.quiet, seed=args.seed,
                                    armor=armor)
    except KeyboardInterrupt:
        print("leanserve: interrupted; nothing written", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, AttributeError, KeyError) as e:
        print(f"leanserve: pruning failed ({type(e).__name__}): {e}", file=sys.stderr)
        return 1
    chk = check_pruned(str(out))
    calib = "" if args.method == "magnitude" else \
        f", calibration {args.samples} x {args.seqlen} tokens of {', '.join(args.calib)}"
    print(f"wrote {out} (2:4 {args.method}{calib}; {summary['seconds']} s)")
    if "armor" in summary:
        arm = summary["armor"]
        start = "SparseGPT" if arm["proxy"] == "hessian" else "NoWag-P"
        print(f"ARMOR: block size {arm['block_size']}, {arm['iters']} iterations per layer (lr {arm['lr']}, "
              f"{arm['proxy']} proxy); wrappers "
              f"add {arm['added_params']:,} parameters ({100 * arm['added_params'] / summary['model_params']:.2f}% of "
              f"the model, {100 * arm['added_params'] / summary['dense_block_params']:.2f}% of the block linears); "
              f"mean proxy loss {summary['loss_init']:.4g} ({start}) -> {summary['loss']:.4g}; per layer in "
              f"{out / 'armor_report.json'}")
        if summary["worse_than_init"]:
            print(f"leanserve: proxy loss above its initialisation in {summary['worse_than_init']}", file=sys.stderr)
            return 1
    print(f"2:4 check: {chk['tensors']} linear weights in the decoder blocks, {chk['bad_groups']} groups of 4 with "
          f"more than 2 nonzeros; {chk['zeros']:,} of {chk['weights']:,} weights are zero "
          f"({100 * chk['zeros'] / max(chk['weights'], 1):.1f}%)")
    print(f"packed size of these layers: {chk['packed_bytes'] / 2**20:.1f} MiB vs {chk['dense_bytes'] / 2**20:.1f} MiB "
          f"dense ({chk['ratio']:.4f}x; in bfloat16 {chk['ratio_bf16']:.4f}x)")
    if chk["bad"] or not chk["tensors"]:
        print(f"leanserve: the written checkpoint is not 2:4 sparse: {chk['bad'][:5] or 'no block linears found'}",
              file=sys.stderr)
        return 1
    print(f"serve it: leanserve serve --model {out} --engine-args '--quantization leanserve-2of4'")
    return 0
