"""The `leanserve` command."""
from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from .config import Settings

# Repeatable flags whose names differ from the settings field.
_LIST_FLAGS = {"engines": "--engine", "api_keys": "--api-key", "engine_dns": "--engine-dns"}


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

def _sparse24_cli(what: str):
    """kernels.sparse24.cli, or None after printing why: torch/transformers live in the engine extra."""
    try:
        from kernels.sparse24 import cli
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"leanserve: {what} needs torch and transformers (pip install 'leanserve[engine-cpu]'): {e}",
              file=sys.stderr)
        return None
    return cli


def _cmd_prune(args) -> int:
    cli = _sparse24_cli("leanserve prune")
    return 1 if cli is None else cli.cmd_prune(args)


def _eval_ppl(argv: list[str]) -> int:
    cli = _sparse24_cli("leanserve eval ppl")
    return 1 if cli is None else cli.eval_ppl(argv)


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
