"""Perplexity of a HF causal LM on a text file, and `leanserve eval ppl`.

The model side of the evaluations (2:4 pruning quality, kernels/sparse24/quality.py); plain HF
transformers in float32, so it scores the checkpoint, not an engine.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from kernels import model_prep

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = "data/wikitext2/valid.txt"  # relative to the repository root


def tokenize_file(tokenizer, path: str | Path):
    """The whole file as one 1-D tensor of token ids (no special tokens)."""
    text = Path(path).read_text(encoding="utf-8")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def load_model(model_dir: str | Path):
    """(tokenizer, model) of a HF checkpoint, float32, eval mode; an ARMOR checkpoint with its wrappers."""
    from kernels.sparse24.armor_model import checkpoint_marker, is_armor_marker, load_armor_model

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if is_armor_marker(checkpoint_marker(model_dir)):
        return tokenizer, load_armor_model(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return tokenizer, model


def perplexity(model, ids, seqlen: int = 2048, stride: int | None = None, progress: bool = False) -> float:
    """Perplexity of `model` on the 1-D token ids `ids`.

    Windows of seqlen start every `stride` tokens (default: seqlen, i.e. non-overlapping); each
    window scores only the tokens not scored by an earlier window. A window's first token has no
    context and is not scored, so non-overlapping windows score seqlen - 1 tokens each (the
    convention of the SparseGPT/Wanda evaluations); the last, shorter window is kept.
    """
    stride = stride or seqlen
    if not 0 < stride <= seqlen:
        raise ValueError("need 0 < stride <= seqlen")
    n = ids.numel()
    if n < 2:
        raise ValueError("need at least 2 tokens")
    nll, count, scored_to = 0.0, 0, 1  # token 0 has no context
    with torch.no_grad():
        for begin in tqdm(range(0, n - 1, stride), disable=not progress, desc="ppl"):
            end = min(begin + seqlen, n)
            if end - begin < 2:
                break
            window = ids[begin:end]
            logits = model(window[None], use_cache=False).logits[0, :-1].float()
            lo = max(scored_to, begin + 1)  # first position to score (needs one token of context)
            first = lo - begin - 1  # its index in the targets window[1:]
            nll += torch.nn.functional.cross_entropy(logits[first:], window[1:][first:], reduction="sum").item()
            count += end - lo
            scored_to = end
            if end == n:
                break
    return float(torch.exp(torch.tensor(nll / count)))


def eval_perplexity(model_dir: str | Path, text_path: str | Path, seqlen: int = 2048, max_tokens: int | None = None,
                    stride: int | None = None, progress: bool = False) -> float:
    """Perplexity of the checkpoint in model_dir on a text file (optionally its first max_tokens tokens)."""
    tokenizer, model = load_model(model_dir)
    ids = tokenize_file(tokenizer, text_path)
    if max_tokens:
        ids = ids[:max_tokens]
    return perplexity(model, ids, seqlen, stride, progress)


# ----------------------------------------------------------------------------- `leanserve eval ppl`

def add_arguments(p) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="HF model directory (dense or pruned)")
    p.add_argument("--text", default=DEFAULT_TEXT,
                   help=f"text file (relative paths resolve against the repository; default {DEFAULT_TEXT})")
    p.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (non-overlapping windows)")
    p.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens of the text")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def resolve_text(path: str) -> Path | None:
    """A text file given on the command line: as given, else relative to the repository."""
    for cand in (Path(path), REPO_ROOT / path):
        if cand.is_file():
            return cand
    return None


def main(a) -> int:
    text = resolve_text(a.text)
    if text is None:
        print(f"leanserve: text file {a.text} not found (also tried {REPO_ROOT / a.text})", file=sys.stderr)
        return 1
    if a.seqlen < 2 or (a.max_tokens is not None and a.max_tokens < 2):
        print("leanserve: need --seqlen >= 2 and --max-tokens >= 2", file=sys.stderr)
        return 1
    try:
        model_prep.validate_model_dir(Path(a.model_dir))
    except model_prep.PrepareError as e:
        print(f"leanserve: {e}", file=sys.stderr)
        return 1
    try:
        ppl = eval_perplexity(a.model_dir, text, seqlen=a.seqlen, max_tokens=a.max_tokens, progress=not a.quiet)
    except (ValueError, OSError, RuntimeError, AttributeError, KeyError) as e:
        print(f"leanserve: evaluation failed ({type(e).__name__}): {e}", file=sys.stderr)
        return 1
    limit = f", first {a.max_tokens} tokens" if a.max_tokens else ""
    print(f"perplexity {ppl:.4f}  ({a.model_dir} on {text.name}{limit}, windows of {a.seqlen} tokens)")
    return 0
