"""The `leanserve` command.

`serve` is the gateway's own command and is defined here. Every other subcommand owns its argument
parser next to its code and is only *named* here, in COMMANDS (top level) or EVALUATIONS
(`leanserve eval <what>`), as a `Subcommand`: its help line, "module:function" that adds its arguments
to an argparse parser, and "module:function" that runs it on the parsed namespace and returns the exit
code. Their modules are imported only when that subcommand runs, so a gateway-only install (no torch,
no vLLM) still runs `leanserve --help`, and an engine-side subcommand there fails with one line.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from pydantic import ValidationError

from .config import Settings
from .logs import setup_logging


@dataclass(frozen=True)
class Subcommand:
    help: str
    arguments: str  # "module:function(parser)": adds the subcommand's arguments
    main: str  # "module:function(args) -> int": runs it


COMMANDS = {
    "prepare-model": Subcommand(
        "convert the default model (SmolLM2-135M-Instruct GGUF) for vLLM",
        "kernels.model_prep:add_arguments", "kernels.model_prep:main"),
    "prune": Subcommand(
        "prune a HF Llama-style checkpoint to 2:4 sparsity (serve it with --quantization leanserve-2of4)",
        "kernels.sparse24.cli:add_arguments", "kernels.sparse24.cli:main"),
    "distill": Subcommand(
        "distil a 2:4 checkpoint towards its dense model (KL on calibration windows; it stays 2:4)",
        "kernels.sparse24.distill_cli:add_arguments", "kernels.sparse24.distill_cli:main"),
    "self-chat": Subcommand(
        "write chat conversations by the model itself (Magpie-style) as calibration/distillation data",
        "kernels.self_chat:add_arguments", "kernels.self_chat:main"),
    "train-gates": Subcommand(
        "train TRIM-KV retention gates for a frozen HF model (for --kv-budget serving and `eval kv`)",
        "kernels.retention.cli:add_train_arguments", "kernels.retention.cli:train_main"),
}
EVALUATIONS = {
    "trim": Subcommand(
        "thought trimming on recorded reasoning traces",
        "server.trimming.offline_eval:add_arguments", "server.trimming.offline_eval:main"),
    "ppl": Subcommand(
        "perplexity of a HF causal LM on a text file (HF transformers, float32)",
        "kernels.perplexity:add_arguments", "kernels.perplexity:main"),
    "chat": Subcommand(
        "chat quality vs the dense model: its greedy answers' perplexity, and factual questions kept",
        "kernels.chat_quality:add_arguments", "kernels.chat_quality:main"),
    "kv": Subcommand(
        "bounded KV cache vs full attention: perplexity and KL per eviction policy and budget",
        "kernels.retention.cli:add_eval_arguments", "kernels.retention.cli:eval_main"),
}

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

    if args.api_keys:
        print("leanserve: warning: --api-key shows in the process list; use LEANSERVE_API_KEYS or --api-key-file",
              file=sys.stderr)
    settings = _settings_from(args)
    setup_logging(settings.log_level, settings.log_format)
    try:
        return serve(settings)
    except ServeError as e:
        print(f"leanserve: {e}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: `serve` in full; the lazy subcommands as names and help lines only (their
    own parsers are built by run_subcommand)."""
    p = argparse.ArgumentParser(prog="leanserve", description="OpenAI-compatible gateway in front of vLLM")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    s = sub.add_parser("serve", help="serve the OpenAI API (embedded vLLM engine unless --engine is given)",
                       description="Every option can also be set as a LEANSERVE_* environment variable.")
    _add_settings_flags(s)
    s.set_defaults(func=_cmd_serve)
    for name, c in COMMANDS.items():
        sub.add_parser(name, help=c.help, add_help=False)
    e = sub.add_parser("eval", help="offline evaluations: " + ", ".join(EVALUATIONS))
    what = e.add_subparsers(dest="what", required=True, metavar="WHAT")
    for name, c in EVALUATIONS.items():
        what.add_parser(name, help=c.help, add_help=False)
    return p


def _load(spec: str):
    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func)


def run_subcommand(prog: str, c: Subcommand, argv: list[str]) -> int:
    try:
        add_arguments, main_ = _load(c.arguments), _load(c.main)
    except ImportError as e:  # the engine extra is missing: one line, no traceback
        print(f"{prog}: needs the engine side of leanserve (torch, transformers, vLLM: "
              f"pip install 'leanserve[engine-cpu]'): {e}", file=sys.stderr)
        return 1
    p = argparse.ArgumentParser(prog=prog, description=c.help)
    add_arguments(p)
    return main_(p.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        return run_subcommand(f"leanserve {argv[0]}", COMMANDS[argv[0]], argv[1:])
    if len(argv) > 1 and argv[0] == "eval" and argv[1] in EVALUATIONS:
        return run_subcommand(f"leanserve eval {argv[1]}", EVALUATIONS[argv[1]], argv[2:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValidationError as e:
        print(f"leanserve: invalid configuration:\n{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
