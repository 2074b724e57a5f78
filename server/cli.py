"""The `leanserve` command."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import get_args, get_origin

from pydantic import ValidationError

from .config import Settings

# Repeatable flags whose names differ from the settings field.
_LIST_FLAGS = {"engines": "--engine", "api_keys": "--api-key"}


def _add_settings_flags(p: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        env = f"LEANSERVE_{name.upper()}"
        default = field.get_default(call_default_factory=True)
        help_ = f"{field.description} [env {env}; default {default!r}]"
        if name in _LIST_FLAGS:
            p.add_argument(_LIST_FLAGS[name], dest=name, action="append", default=None, help=help_ + " (repeatable)")
        elif field.annotation is bool:
            p.add_argument("--" + name.replace("_", "-"), dest=name, action=argparse.BooleanOptionalAction,
                           default=None, help=help_)
        else:
            typ = field.annotation if field.annotation in (int, float, str) else str
            p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=help_)


def _settings_from(args: argparse.Namespace) -> Settings:
    given = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**given)  # flags override LEANSERVE_* env vars, which override defaults


def _cmd_serve(args) -> int:
    from .serve import ServeError, serve

    settings = _settings_from(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return serve(settings)
    except ServeError as e:
        print(f"leanserve: {e}", file=sys.stderr)
        return 1


def _cmd_prepare_model(args) -> int:
    try:
        from kernels import model_prep
    except ImportError as e:
        print(f"leanserve: {e}", file=sys.stderr)
        return 1
    try:
        res = model_prep.prepare_default(args.out, force=args.force, progress=not args.quiet)
    except model_prep.PrepareError as e:
        print(f"leanserve: {e}", file=sys.stderr)
        return 1
    print(f"{res.name}: {'converted to' if res.converted else 'already prepared in'} {res.path}")
    return 0


def _cmd_eval(args) -> int:
    if args.what == "trim":
        from .trimming import offline_eval
        return offline_eval.main(args.args)
    if args.what == "ppl":
        return _eval_ppl(args.args)
    raise AssertionError(args.what)


# ----------------------------------------------------------------------------- 2:4 sparsity (engine side, lazy)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PPL_TEXT = "../shared/data/wikitext2/valid.txt"  # relative to the repository root


def _prune_module(what: str):
    """(kernels.sparse24.prune, None) or (None, error message): torch/transformers live in the engine extra."""
    try:
        from kernels.sparse24 import prune
        import transformers  # noqa: F401
    except ImportError as e:
        return None, f"{what} needs torch and transformers (pip install 'leanserve[engine-cpu]'): {e}"
    return prune, None


def _check_model_dir(path: str) -> str | None:
    from kernels import model_prep  # imports neither torch nor transformers

    try:
        model_prep.validate_model_dir(Path(path))
    except model_prep.PrepareError as e:
        return str(e)
    return None


def _check_pruned(out_dir: str) -> dict:
    """Read the written checkpoint back: 2:4 violations and zeros of every decoder-block linear weight."""
    import re

    from safetensors import safe_open

    from kernels.sparse24.format import compressed_nbytes, count_24_violations

    block = re.compile(r"(^|\.)layers\.\d+\..*\.weight$")
    res = {"tensors": 0, "bad_groups": 0, "weights": 0, "zeros": 0, "bad": [], "dense_bytes": 0, "packed_bytes": 0}
    for f in sorted(Path(out_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if not block.search(name):
                    continue
                w = st.get_tensor(name)
                if w.dim() != 2:
                    continue  # norms
                bad = count_24_violations(w)
                res["tensors"] += 1
                res["bad_groups"] += bad
                res["weights"] += w.numel()
                res["zeros"] += int((w == 0).sum())
                res["dense_bytes"] += w.numel() * w.element_size()
                res["packed_bytes"] += compressed_nbytes(w.shape[0], w.shape[1], w.dtype)
                if bad:
                    res["bad"].append(name)
    return res


def _cmd_prune(args) -> int:
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
    if args.calib and not Path(args.calib).is_file():
        print(f"leanserve: calibration file {args.calib} does not exist", file=sys.stderr)
        return 1
    if args.samples < 1 or args.seqlen < 2:
        print("leanserve: need --samples >= 1 and --seqlen >= 2", file=sys.stderr)
        return 1
    prune, err = _prune_module("leanserve prune")
    if err:
        print(f"leanserve: {err}", file=sys.stderr)
        return 1
    try:
        summary = prune.prune_model(str(src), str(out), args.method, args.calib if args.method != "magnitude" else None,
                                    samples=args.samples, seqlen=args.seqlen, progress=not args.quiet, seed=args.seed)
    except (ValueError, OSError, RuntimeError, AttributeError, KeyError) as e:
        print(f"leanserve: pruning failed ({type(e).__name__}): {e}", file=sys.stderr)
        return 1
    chk = _check_pruned(str(out))
    calib = "" if args.method == "magnitude" else f", calibration {args.samples} x {args.seqlen} tokens of {args.calib}"
    print(f"wrote {out} (2:4 {args.method}{calib}; {summary['seconds']} s)")
    print(f"2:4 check: {chk['tensors']} linear weights in the decoder blocks, {chk['bad_groups']} groups of 4 with "
          f"more than 2 nonzeros; {chk['zeros']:,} of {chk['weights']:,} weights are zero "
          f"({100 * chk['zeros'] / max(chk['weights'], 1):.1f}%)")
    print(f"packed size of these layers: {chk['packed_bytes'] / 2**20:.1f} MiB vs {chk['dense_bytes'] / 2**20:.1f} MiB "
          f"dense ({chk['packed_bytes'] / max(chk['dense_bytes'], 1):.4f}x)")
    if chk["bad"] or not chk["tensors"]:
        print(f"leanserve: the written checkpoint is not 2:4 sparse: {chk['bad'][:5] or 'no block linears found'}",
              file=sys.stderr)
        return 1
    print(f"serve it: leanserve serve --model {out} --engine-args '--quantization leanserve-2of4'")
    return 0


def _eval_ppl(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="leanserve eval ppl",
                                 description="Perplexity of a HF causal LM (float32, HF transformers) on a text file.")
    ap.add_argument("model_dir", help="HF model directory (dense or pruned)")
    ap.add_argument("--text", default=DEFAULT_PPL_TEXT,
                    help=f"text file (relative paths resolve against the repository; default {DEFAULT_PPL_TEXT})")
    ap.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (non-overlapping windows)")
    ap.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens of the text")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    text = Path(a.text)
    if not text.is_absolute() and (a.text == DEFAULT_PPL_TEXT or not text.is_file()):
        text = REPO_ROOT / text  # the default always, other relative paths when not found from here
    if not text.is_file():
        print(f"leanserve: text file {a.text} not found (also tried {REPO_ROOT / a.text})", file=sys.stderr)
        return 1
    if a.seqlen < 2 or (a.max_tokens is not None and a.max_tokens < 2):
        print("leanserve: need --seqlen >= 2 and --max-tokens >= 2", file=sys.stderr)
        return 1
    err = _check_model_dir(a.model_dir)
    if err:
        print(f"leanserve: {err}", file=sys.stderr)
        return 1
    prune, err = _prune_module("leanserve eval ppl")
    if err:
        print(f"leanserve: {err}", file=sys.stderr)
        return 1
    try:
        ppl = prune.eval_perplexity(a.model_dir, str(text), seqlen=a.seqlen, max_tokens=a.max_tokens,
                                    progress=not a.quiet)
    except (ValueError, OSError, RuntimeError, AttributeError, KeyError) as e:
        print(f"leanserve: evaluation failed ({type(e).__name__}): {e}", file=sys.stderr)
        return 1
    limit = f", first {a.max_tokens} tokens" if a.max_tokens else ""
    print(f"perplexity {ppl:.4f}  ({a.model_dir} on {text.name}{limit}, windows of {a.seqlen} tokens)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leanserve", description="OpenAI-compatible gateway in front of vLLM")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve the OpenAI API (embedded vLLM engine unless --engine is given)",
                       description="Every option can also be set as a LEANSERVE_* environment variable.")
    _add_settings_flags(s)
    s.set_defaults(func=_cmd_serve)
    m = sub.add_parser("prepare-model", help="convert the default model (SmolLM2-135M-Instruct GGUF) for vLLM")
    m.add_argument("--out", default=None, help="output directory (default: $LEANSERVE_HOME/models/<name>)")
    m.add_argument("--force", action="store_true", help="convert again even if a verified copy exists")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=_cmd_prepare_model)
    e = sub.add_parser("eval", help="offline evaluations (trim: thought trimming on recorded reasoning traces; "
                                    "ppl: perplexity of a model on a text file)")
    e.add_argument("what", choices=["trim", "ppl"])
    e.add_argument("args", nargs=argparse.REMAINDER,
                   help="arguments of the evaluation (see `leanserve eval trim -h`, `leanserve eval ppl -h`)")
    e.set_defaults(func=_cmd_eval)
    pr = sub.add_parser("prune", help="prune a HF Llama-style checkpoint to 2:4 sparsity (serve it with "
                                      "--quantization leanserve-2of4)",
                        description="Prunes every linear layer of the decoder blocks to 2:4 along its input "
                                    "dimension and writes a normal HF checkpoint whose config.json carries a "
                                    "\"leanserve_sparsity\" marker.")
    pr.add_argument("model_dir", metavar="MODEL_DIR", help="dense HF model directory")
    pr.add_argument("out_dir", metavar="OUT_DIR", help="where to write the pruned checkpoint")
    pr.add_argument("--method", choices=["magnitude", "wanda", "sparsegpt"], required=True,
                    help="magnitude (no calibration), wanda or sparsegpt (these two need --calib)")
    pr.add_argument("--calib", default=None, help="calibration text file (wanda, sparsegpt); keep it disjoint "
                                                  "from the text you evaluate on")
    pr.add_argument("--samples", type=int, default=128, help="calibration windows [default 128]")
    pr.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration window [default 2048]")
    pr.add_argument("--seed", type=int, default=0, help="seed of the window positions [default 0]")
    pr.add_argument("--force", action="store_true", help="overwrite OUT_DIR if it already holds a checkpoint")
    pr.add_argument("--quiet", action="store_true", help="no progress bar")
    pr.set_defaults(func=_cmd_prune)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValidationError as e:
        print(f"leanserve: invalid configuration:\n{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
