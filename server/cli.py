"""The `leanserve` command."""
from __future__ import annotations

import argparse
import logging
import sys
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
    raise AssertionError(args.what)


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
    e = sub.add_parser("eval", help="offline evaluations (trim: thought trimming on recorded reasoning traces)")
    e.add_argument("what", choices=["trim"])
    e.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the evaluation (see `leanserve eval trim -h`)")
    e.set_defaults(func=_cmd_eval)
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
