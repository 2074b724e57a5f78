"""`leanserve distill`: its arguments and checks around kernels/sparse24/distill.distill_checkpoint. server/cli.py
names this module and imports it only when the command runs (torch and transformers live in the engine extra)."""
from __future__ import annotations

import sys
from pathlib import Path

import transformers  # noqa: F401  (imported here so a missing engine extra fails before any work)

from kernels import model_prep

from .checkpoint import check_pruned


def add_arguments(p) -> None:
    p.description = ("Trains a 2:4 checkpoint of `leanserve prune` towards its dense model: the kept values of every "
                     "2:4 weight (the mask stays, so it stays 2:4) and, for ARMOR, the wrappers, minimising the "
                     "per-token KL(dense || pruned) on calibration windows. Writes a checkpoint in the same format.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="the dense HF model the checkpoint was pruned from")
    p.add_argument("pruned_dir", metavar="PRUNED_DIR", help="the 2:4 checkpoint (any method of `leanserve prune`)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where to write the distilled checkpoint")
    p.add_argument("--calib", action="append", required=True, metavar="FILE",
                   help="training data as for `leanserve prune` (text, or .jsonl conversations); repeat to mix")
    p.add_argument("--samples", type=int, default=0,
                   help="non-overlapping windows to use, 1/8 of them held out (0: all the data has) [default 0]")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window [default 512]")
    p.add_argument("--seed", type=int, default=0, help="seed of the window positions and their order [default 0]")
    p.add_argument("--steps", type=int, default=100, help="Adam steps of about 1024 tokens each [default 100]")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (warm-up, cosine) [default 1e-4]")
    p.add_argument("--force", action="store_true", help="overwrite OUT_DIR if it already holds a checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args) -> int:
    from .distill import distill_checkpoint

    for what, path in (("MODEL_DIR", args.model_dir), ("PRUNED_DIR", args.pruned_dir)):
        try:
            model_prep.validate_model_dir(Path(path))
        except model_prep.PrepareError as e:
            print(f"leanserve: {what}: {e}", file=sys.stderr)
            return 1
    out = Path(args.out_dir).resolve()
    if out in (Path(args.model_dir).resolve(), Path(args.pruned_dir).resolve()):
        print("leanserve: OUT_DIR must differ from MODEL_DIR and PRUNED_DIR (both are kept)", file=sys.stderr)
        return 1
    if (out / "config.json").exists() and not args.force:
        print(f"leanserve: {out} already holds a checkpoint; pass --force to overwrite it", file=sys.stderr)
        return 1
    for c in args.calib:
        if not Path(c).is_file():
            print(f"leanserve: calibration file {c} does not exist", file=sys.stderr)
            return 1
    if args.steps < 1 or args.lr <= 0:
        print("leanserve: need --steps >= 1 and --lr > 0", file=sys.stderr)
        return 1
    if args.samples == 1 or args.samples < 0 or args.seqlen < 2:
        print("leanserve: need --samples 0 (all) or >= 2 (some are held out to pick the result) and --seqlen >= 2",
              file=sys.stderr)
        return 1
    try:
        r = distill_checkpoint(args.model_dir, args.pruned_dir, str(out), args.calib, args.steps, lr=args.lr,
                               samples=args.samples, seqlen=args.seqlen, seed=args.seed, progress=not args.quiet)
    except KeyboardInterrupt:
        print("leanserve: interrupted; nothing written", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        print(f"leanserve: distillation failed ({type(e).__name__}): {e}", file=sys.stderr)
        return 1
    chk = check_pruned(str(out))
    print(f"wrote {out}: {r['steps']} steps (lr {r['lr']:g}, {r['batch_windows']} windows a step, "
          f"{r['train_windows']} windows trained on, {r['held_out_windows']} held out); held-out KL to the dense "
          f"model {r['held_out_kl_init']:.4g} -> {r['held_out_kl']:.4g} (weights of step {r['best_step']}); "
          f"{r['seconds']} s")
    print(f"2:4 check: {chk['tensors']} linear weights in the decoder blocks, {chk['bad_groups']} groups of 4 with "
          f"more than 2 nonzeros")
    if chk["bad"] or not chk["tensors"]:
        print(f"leanserve: the written checkpoint is not 2:4 sparse: {chk['bad'][:5]}", file=sys.stderr)
        return 1
    print(f"serve it: leanserve serve --model {out} --engine-args '--quantization leanserve-2of4'")
    return 0
