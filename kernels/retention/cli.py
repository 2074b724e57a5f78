"""`leanserve train-gates` and `leanserve eval kv`: argument parsing next to the code they run."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_GATES = Path(__file__).resolve().parent / "gates"
DEFAULT_EVAL_TEXTS = ["data/reasoning_traces/sample.jsonl", "data/wikitext2/valid.txt@0.5:1"]


def shipped_gates_for(model_dir: str | Path) -> Path | None:
    """The gates shipped for a model directory's name, if any."""
    d = SHIPPED_GATES / Path(model_dir).name
    return d if (d / "gates.json").is_file() else None


def _text_arg(spec: str) -> dict:
    """PATH or PATH@START:END (fractions of the file's lines / records). Relative paths that do not
    exist from here resolve against the repository."""
    from .data import parse_slice

    path, _, sl = spec.partition("@")
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = REPO_ROOT / p
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"text file {path} not found")
    try:
        a, b = parse_slice(sl)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return {"path": str(p), "slice": [a, b]}


def _fail(msg: str) -> int:
    print(f"leanserve: {msg}", file=sys.stderr)
    return 1


def _check_model(model_dir: str) -> str | None:
    from kernels import model_prep

    try:
        model_prep.validate_model_dir(Path(model_dir))
    except model_prep.PrepareError as e:
        return str(e)
    from transformers import AutoConfig

    from .gate import GateError
    from .llama import check_supported
    try:
        check_supported(AutoConfig.from_pretrained(model_dir))
    except GateError as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------- train-gates

def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="HF model directory (Llama, Mistral, Qwen2 or Qwen3)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where the gates, the training state and loss.png go; "
                                                     "running again with the same OUT_DIR resumes")
    p.add_argument("--text", action="append", type=_text_arg, required=True, metavar="PATH[@A:B]",
                   help="training text (repeatable): a .txt file or a .jsonl of records (the 'response', "
                        "'text' or 'question'+'answer' fields); @A:B keeps that fraction of its lines/records")
    p.add_argument("--exclude-ids-from", default=None, metavar="JSONL",
                   help="leave out the .jsonl records whose 'id' appears in this file (held-out evaluation)")
    p.add_argument("--budget", type=int, default=128, help="training budget M, tokens per layer and KV head [128]")
    p.add_argument("--buffer", type=int, default=128, help="eviction buffer recorded for serving [128]")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per training sequence, >= 4 x budget [1024]")
    p.add_argument("--batch", type=int, default=1, help="sequences per step [1]")
    p.add_argument("--steps", type=int, default=400, help="optimiser steps [400]")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW, cosine) [2e-3]")
    p.add_argument("--warmup", type=int, default=20, help="warm-up steps [20]")
    p.add_argument("--gate-width", type=int, default=128, help="gate MLP width [128]")
    p.add_argument("--bias-init", type=float, default=8.0, help="initial gate bias b (beta = sigmoid(b)) [8]")
    p.add_argument("--cap-weight", type=float, default=1.0, help="weight of the capacity loss [1]")
    p.add_argument("--checkpoint-every", type=int, default=25, help="save the training state every N steps [25]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sinks", type=int, default=4,
                   help="the first positions of every sequence are never forgotten, in training as when "
                        "serving (0: the TRIM-KV authors' rule) [4]")
    p.add_argument("--init-from", default="", metavar="GATES_DIR",
                   help="start from these gates instead of a fresh initialisation (e.g. to continue on longer "
                        "sequences); a larger --gate-width widens them without changing what they compute")
    p.add_argument("--recompute", action="store_true",
                   help="recompute each layer in the backward pass instead of storing its attention "
                        "(less memory for long --seq-len, about 30%% more time)")
    p.add_argument("--objective", choices=["trimkv", "rank", "evict"], default="trimkv",
                   help="trimkv: the authors' loss (CE + KL of the soft-forgetting model, capacity hinge); rank: "
                        "train the served keep-top-M rule against what full attention will attend to "
                        "(kernels/retention/rank.py; ours); evict: KL of the served eviction schedule, relaxed "
                        "(kernels/retention/evict.py; ours) [trimkv]")
    p.add_argument("--rank-budgets", type=int, nargs="+", default=[64, 128, 256],
                   help="budgets the rank and evict objectives train for (evict: one per step, in turn) [64 128 256]")
    p.add_argument("--evict-temperature", type=float, default=0.1,
                   help="softness of the relaxed eviction, in log(-score) units (evict) [0.1]")
    p.add_argument("--rank-starts", type=int, default=8, help="compaction starts per sequence (rank) [8]")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def train_main(args) -> int:
    err = _check_model(args.model_dir)
    if err:
        return _fail(err)
    from .train import TrainConfig, Trainer

    excl = str(Path(args.exclude_ids_from).resolve()) if args.exclude_ids_from else None
    if excl and not Path(excl).is_file():
        return _fail(f"--exclude-ids-from: {args.exclude_ids_from} not found")
    sources = [{**t, **({"exclude_ids_from": excl} if excl and t["path"].endswith(".jsonl") else {})}
               for t in args.text]
    cfg = TrainConfig(model_dir=str(Path(args.model_dir).resolve()), out_dir=args.out_dir, sources=sources,
                      budget=args.budget, buffer=args.buffer, seq_len=args.seq_len, batch=args.batch,
                      steps=args.steps, lr=args.lr, warmup=args.warmup, gate_width=args.gate_width,
                      bias_init=args.bias_init, cap_weight=args.cap_weight,
                      checkpoint_every=args.checkpoint_every, seed=args.seed, threads=args.threads,
                      init_from=str(Path(args.init_from).resolve()) if args.init_from else "",
                      recompute=args.recompute, sinks=args.sinks, objective=args.objective,
                      rank_budgets=sorted(args.rank_budgets), rank_starts=args.rank_starts,
                      evict_temperature=args.evict_temperature)
    try:
        Trainer(cfg, progress=not args.quiet).run()
    except (ValueError, OSError) as e:  # GateError is a ValueError
        return _fail(str(e))
    return 0


# ----------------------------------------------------------------------------- eval kv

def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="HF model directory")
    p.add_argument("--gates", default=None, help="retention-gate checkpoint (default: the gates shipped for "
                                                 "MODEL_DIR's name)")
    p.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256], help="budgets M [64 128 256]")
    p.add_argument("--buffer", type=int, default=128, help="eviction buffer B [128]")
    p.add_argument("--methods", nargs="+", default=["retention", "streaming", "h2o", "snapkv"],
                   choices=["retention", "streaming", "h2o", "snapkv", "oracle"],
                   help="policies to compare; oracle: keep what full attention will attend to most (reads the "
                        "future: a reference for the room there is, not a policy)")
    p.add_argument("--sinks", type=int, default=4,
                   help="first positions the retention and streaming policies always keep (0: the TRIM-KV "
                        "authors' rule for retention) [4]")
    p.add_argument("--text", action="append", type=_text_arg, default=None, metavar="PATH[@A:B]",
                   help="evaluation text (repeatable, as for train-gates); default: "
                        + " and ".join(DEFAULT_EVAL_TEXTS) + " (held out from the shipped gates' training)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per evaluation sequence [2048]")
    p.add_argument("--max-seqs", type=int, default=8, help="sequences per text [8]")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    p.add_argument("--plot", default=None, help="write a KL-vs-budget plot (PNG) here")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def eval_main(args) -> int:
    err = _check_model(args.model_dir)
    if err:
        return _fail(err)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .evaluate import evaluate
    from .gate import GateError, GateSet
    from .llama import Parts

    if args.threads:
        torch.set_num_threads(args.threads)
    gates = None
    if "retention" in args.methods:
        gdir = args.gates or shipped_gates_for(args.model_dir)
        if gdir is None:
            return _fail(f"no gates shipped for {Path(args.model_dir).name}; pass --gates DIR "
                         "(from leanserve train-gates)")
        try:
            gates = GateSet.load(gdir)
        except GateError as e:
            return _fail(str(e))
    if min(args.budgets) < 1 or args.buffer < 1 or args.seq_len < 2:
        return _fail("budgets, --buffer and --seq-len must be positive")
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    mc = model.config
    if gates is not None:
        try:
            gates.meta.check_model(mc.hidden_size, mc.num_hidden_layers, mc.num_key_value_heads)
        except GateError as e:
            return _fail(str(e))
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    try:
        texts = eval_texts(tok, args.text, args.seq_len, args.max_seqs)
    except ValueError as e:
        return _fail(str(e))
    if args.sinks < 0:
        return _fail("--sinks must be >= 0")
    rows = evaluate(Parts(model), gates, texts, sorted(args.budgets), args.buffer, args.methods,
                    progress=not args.quiet, sinks=args.sinks)
    print(format_table(rows, args.buffer, args.sinks))
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=1) + "\n")
    if args.plot:
        plot(rows, args.plot)
    return 0


def eval_texts(tok, specs: list[dict] | None, seq_len: int, max_seqs: int) -> dict:
    """{name: [LongTensor of seq_len tokens]} for each --text (default: DEFAULT_EVAL_TEXTS); the same
    sequences for every caller (the reference evaluation here, the engine's in bounded_kv/quality.py)."""
    import torch

    from .data import TokenPool, read_documents

    texts = {}
    for t in specs or [_text_arg(s) for s in DEFAULT_EVAL_TEXTS]:
        name = Path(t["path"]).name + ("" if t["slice"] == [0.0, 1.0] else "@{:g}:{:g}".format(*t["slice"]))
        seqs = TokenPool(tok, read_documents(t["path"], tuple(t["slice"])), name).sequences(seq_len, max_seqs)
        if not seqs:
            raise ValueError(f"{name} has no sequence of {seq_len} tokens")
        texts[name] = [torch.from_numpy(s) for s in seqs]
    return texts


def format_table(rows, buffer: int, sinks: int) -> str:
    out = [f"| text | method (sinks {sinks}) | budget M (buffer {buffer}) | perplexity | KL(full ‖ bounded) | tokens |",
           "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r.text} | {r.method} | {r.budget or '∞'} | {r.ppl:.3f} | {r.kl:.4f} | {r.tokens} |")
    return "\n".join(out)


def plot(rows, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = sorted({r.text for r in rows})
    fig, axes = plt.subplots(1, len(texts), figsize=(5.2 * len(texts), 3.8), squeeze=False)
    for ax, text in zip(axes[0], texts):
        for m in sorted({r.method for r in rows if r.text == text and r.method != "full"}):
            rr = sorted((r for r in rows if r.text == text and r.method == m), key=lambda r: r.budget)
            ax.plot([r.budget for r in rr], [r.kl for r in rr], marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("budget M (tokens per layer and KV head)")
        ax.set_ylabel("mean KL(full || bounded)")
        ax.set_title(text)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
