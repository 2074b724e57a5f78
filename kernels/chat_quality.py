"""Chat quality of a (pruned) HF causal LM against its dense original, and `leanserve eval chat`.

WikiText perplexity misses what a 2:4 prune can do to an instruct model: a SparseGPT copy calibrated on raw
WikiText keeps a fine perplexity and answers "What is the capital of France?" with "B.B.B...". Two measures
that see it, both through the model's chat template as a served request is rendered:

- answer perplexity: the dense model's own greedy answers to held-out everyday prompts, scored teacher-forced
  (only the answer tokens, each conditioned on the rendered prompt and the answer so far) under MODEL and
  under the dense model; the ratio ppl_model / ppl_dense is 1.0 for the dense model itself and grows as MODEL
  drifts from what the dense model would say. An answer's tokens include its closing EOS (<|im_end|>) when
  the dense model stopped within the budget: knowing when to stop is part of chatting.
- facts: simple factual questions asked greedily to both; of those the dense model gets right, how many
  MODEL still gets right ("facts_kept of facts_dense_right"). A reply is right when one of the accepted
  answers occurs in it and, for a numeric answer, the first number it commits to is that answer (fact_right).

The dense answers (generation is most of the cost) are cached: in memory per dense model object, and by the
CLI in ~/.cache/leanserve/chat_eval/ keyed by the dense checkpoint's config.json, the prompts file and
--max-new-tokens, so evaluating several pruned copies generates them once. Plain HF transformers in
float32 (kernels/perplexity.py), so it scores the checkpoint, not an engine.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import time
import weakref
from pathlib import Path

import torch

from kernels import model_prep
from kernels.calibration import conversation
from kernels.perplexity import REPO_ROOT, load_model, resolve_text

DEFAULT_PROMPTS = "data/chat_eval/prompts.jsonl"  # relative to the repository root
DEFAULT_FACTS = "data/chat_eval/facts.jsonl"
DEFAULT_MAX_NEW_TOKENS = 96
FACT_MAX_NEW_TOKENS = 48
CACHE_VERSION = 2  # 2: each answer carries its NLL under the dense model


# ----------------------------------------------------------------------------- data

def _resolve(path, default: str) -> Path:
    p = resolve_text(str(path or default))
    if p is None:
        raise FileNotFoundError(f"{path or default} not found (also tried {REPO_ROOT / (path or default)})")
    return p


def jsonl_records(path: Path):
    """(line number, object) for each non-blank line of a .jsonl; a clear error on a line that is not JSON."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None


def load_prompts(path: str | Path | None = None) -> list[list[dict]]:
    """Held-out prompts (default data/chat_eval/prompts.jsonl): lines {"prompt": str} (one user turn) or
    {"messages": [...]} ending with a user turn. Each as a list of messages."""
    path = _resolve(path, DEFAULT_PROMPTS)
    out = []
    for n, obj in jsonl_records(path):
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            out.append([{"role": "user", "content": obj["prompt"]}])
            continue
        msgs = conversation(obj, f"{path}:{n}") if isinstance(obj, dict) and "messages" in obj else None
        if not msgs or msgs[-1]["role"] != "user":
            raise ValueError(f"{path}:{n}: need {{\"prompt\": str}} or {{\"messages\": [...]}} ending with a user turn")
        out.append(msgs)
    if not out:
        raise ValueError(f"{path}: no prompts (empty file)")
    return out


def load_facts(path: str | Path | None = None) -> list[dict]:
    """Factual questions (default data/chat_eval/facts.jsonl): lines {"question": str, "answers": [str, ...]}."""
    path = _resolve(path, DEFAULT_FACTS)
    out = []
    for n, obj in jsonl_records(path):
        answers = obj.get("answers") if isinstance(obj, dict) else None
        if not (isinstance(obj.get("question") if isinstance(obj, dict) else None, str) and isinstance(answers, list)
                and answers and all(isinstance(a, str) and a.strip() for a in answers)):
            raise ValueError(f"{path}:{n}: need {{\"question\": str, \"answers\": [non-empty str, ...]}}")
        out.append({"question": obj["question"], "answers": answers})
    if not out:
        raise ValueError(f"{path}: no questions (empty file)")
    return out


def _norm(s: str) -> str:
    return " ".join(s.split())


def answer_matches(reply: str, answers: list[str]) -> bool:
    """True when one of `answers` occurs in `reply`: case-insensitive, whitespace normalised, on word
    boundaries (no letter, digit or _ touching it), and a number not inside a longer one ("4" is not in "14",
    "4.5" or "1,400"). Only literal matches: "four" counts for 4 only when "four" is listed."""
    text = _norm(reply)
    for a in answers:
        pat = r"(?<!\w)(?<!\d[.,])" + re.escape(_norm(a)) + r"(?![.,]\d)(?!\w)"
        if re.search(pat, text, flags=re.IGNORECASE):
            return True
    return False


_NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                 "sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred "
                 "thousand million").split()
_NW = "(?:" + "|".join(_NUMBER_WORDS) + ")"
# A number as a reply states it: digits with decimal or thousands separators ("9.33", "1,400"; "100%" is a
# percentage, not 100) or a run of number words ("twenty-four", "one hundred"). A lone "one" is left out: it
# is mostly a pronoun ("one of ...").
_NUMBER = re.compile(r"(?<![\w.,])\d+(?:[.,]\d+)*%?(?!\w)|\b" + _NW + r"(?:[\s-]+" + _NW + r")*\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


_WORD_VALUE = {w: i for i, w in enumerate(_NUMBER_WORDS[:20])} | {w: 10 * i for i, w in enumerate(_NUMBER_WORDS[20:28], 2)}
_SCALE = {"hundred": 100, "thousand": 1000, "million": 10 ** 6}


def _value(mention: str) -> str:
    """A canonical spelling of a number, so that "ten" and "10" compare equal: digits without thousands
    separators ("1,400" -> "1400"); number words summed ("twenty four" -> "24", "one hundred" -> "100")."""
    if mention[0].isdigit():
        return re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", mention)
    total = current = 0
    for w in mention.split():
        if w in _SCALE:
            current = max(current, 1) * _SCALE[w]
            if w != "hundred":
                total, current = total + current, 0
        else:
            current += _WORD_VALUE[w]
    return str(total + current)


def _numbers(text: str) -> list[str]:
    """The numbers `text` states, in order, each as _value spells it."""
    out = []
    for m in _NUMBER.finditer(text):
        n = re.sub(r"[\s-]+", " ", m.group(0).lower())
        if n != "one":
            out.append(_value(n))
    return out


def fact_right(reply: str, answers: list[str], question: str = "") -> bool:
    """Whether `reply` answers a factual question right: an accepted answer occurs in it (answer_matches) and,
    for a question with a numeric answer (an accepted answer that is a number), the first sentence of the
    reply that states a number not already in the question states no number but accepted ones. A reply
    commits to the first number it gives: "A day is 36 hours. A week is 24 hours." is wrong for 24, and so is
    a sentence that gives the answer beside another ("Half of 10 is 10/2 = 5/2 = 2/4", "3 sides, so 3 * 3 =
    9 sides"). Answers that are not numbers (names, places) have no such check: only their presence counts."""
    if not answer_matches(reply, answers):
        return False
    numeric = [_numbers(a) for a in answers]
    accepted = {n[0] for n in numeric if len(n) == 1}
    if not accepted:
        return True
    given = set(_numbers(question))
    for sentence in _SENTENCE_END.split(reply):
        new = [n for n in _numbers(sentence) if n not in given]
        if new:
            return all(n in accepted for n in new)
    return False


# ----------------------------------------------------------------------------- generation and scoring

def _prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat evaluation needs a tokenizer with a chat template")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def greedy_reply(model, tokenizer, messages: list[dict], max_new_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of a greedy chat reply (HF generate; stops after EOS, which it keeps)."""
    prompt = _prompt_ids(tokenizer, messages)
    inp = torch.tensor([prompt])
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    out = model.generate(inp, attention_mask=torch.ones_like(inp), do_sample=False, max_new_tokens=max_new_tokens,
                         temperature=None, top_p=None, top_k=None, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else
                         tokenizer.eos_token_id)
    answer = out[0, len(prompt):].tolist()
    stops = set(eos if isinstance(eos, list) else [eos])
    for i, t in enumerate(answer):  # drop any padding after the first EOS
        if t in stops:
            answer = answer[:i + 1]
            break
    return prompt, answer


def _reply_text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


_MEMORY: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # dense model -> {key: answers}


def _fingerprint(model) -> float:
    """A cheap checksum of the weights (every 9973rd of each tensor): the in-memory cache must not hand one
    model's answers to the same object after it was changed in place (pruned)."""
    return float(sum(p.detach().reshape(-1)[::9973].double().sum() for p in model.parameters()))


def _prompts_digest(prompts: list[list[dict]]) -> str:
    return hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()


def dense_answers(dense_model, dense_tokenizer, prompts: list[list[dict]], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                  cache="memory", progress: bool = False) -> tuple[list[dict], str]:
    """The dense model's greedy answers to `prompts`: ([{"messages", "prompt_ids", "answer_ids", "answer",
    "dense_nll"}] (the answer's summed NLL under the dense model, scored once here),
    "used" | "generated"). cache: "memory" (per dense model object, this process), a JSON file path (read when
    it holds these prompts and max_new_tokens, else written), or None (always generate)."""
    from tqdm.auto import tqdm

    key = (_prompts_digest(prompts), max_new_tokens)
    if cache == "memory":
        hit = _MEMORY.get(dense_model, {}).get(key)
        if hit is not None and hit[0] == _fingerprint(dense_model):
            return hit[1], "used"
    elif cache is not None:
        cache = Path(cache)
        try:
            stored = json.loads(cache.read_text())
            if (stored.get("version") == CACHE_VERSION and stored.get("max_new_tokens") == max_new_tokens
                    and [a["messages"] for a in stored["answers"]] == prompts):
                return stored["answers"], "used"
        except (OSError, ValueError, KeyError, TypeError):
            pass
    answers = []
    for msgs in tqdm(prompts, desc="dense answers", disable=not progress):
        p, a = greedy_reply(dense_model, dense_tokenizer, msgs, max_new_tokens)
        answers.append({"messages": msgs, "prompt_ids": p, "answer_ids": a, "answer": _reply_text(dense_tokenizer, a),
                        "dense_nll": answer_nll(dense_model, p, a) if a else 0.0})
    if cache == "memory":
        _MEMORY.setdefault(dense_model, {})[key] = (_fingerprint(dense_model), answers)
    elif cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "max_new_tokens": max_new_tokens, "answers": answers}))
        tmp.replace(cache)
    return answers, "generated"


@torch.no_grad()
def answer_nll(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """Summed negative log-likelihood of answer_ids after prompt_ids, teacher-forced (one forward pass)."""
    ids = torch.tensor([prompt_ids + answer_ids])
    logits = model(ids, use_cache=False).logits[0, len(prompt_ids) - 1:-1].float()
    return torch.nn.functional.cross_entropy(logits, torch.tensor(answer_ids), reduction="sum").item()


def _same_vocab(tok_a, tok_b) -> bool:
    return tok_a is tok_b or tok_a.get_vocab() == tok_b.get_vocab()


def chat_quality(model, tokenizer, dense_model, dense_tokenizer, prompts: list[list[dict]], facts: list[dict],
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, cache="memory", progress: bool = False) -> dict:
    """Chat quality of `model` against `dense_model` (both in memory; see the module docstring). cache: where
    the dense answers are kept (dense_answers; with a file, the dense facts replies go in one beside it). Returns a flat dict of numbers (answer_ppl, answer_ppl_dense,
    answer_ppl_ratio, answer_tokens, n_prompts, facts_n, facts_dense_right, facts_kept, facts_model_right,
    dense_cache and dense_facts_cache: "used" or "generated", seconds) plus "answers" and "facts": per prompt and per question details."""
    t0 = time.time()
    if not _same_vocab(tokenizer, dense_tokenizer):
        raise ValueError("the model and the dense model have different tokenizers: answers cannot be scored")
    answers, used = dense_answers(dense_model, dense_tokenizer, prompts, max_new_tokens, cache, progress)
    nll_m = nll_d = 0.0
    count = 0
    per_prompt = []
    for a in answers:
        if not a["answer_ids"]:
            continue
        m = answer_nll(model, a["prompt_ids"], a["answer_ids"])
        d = a["dense_nll"]
        n = len(a["answer_ids"])
        nll_m, nll_d, count = nll_m + m, nll_d + d, count + n
        per_prompt.append({"prompt": a["messages"][-1]["content"], "dense_answer": a["answer"], "tokens": n,
                           "ppl_model": math.exp(m / n), "ppl_dense": math.exp(d / n)})
    if count == 0:
        raise ValueError("the dense model answered every prompt with nothing")
    ppl_m, ppl_d = math.exp(nll_m / count), math.exp(nll_d / count)

    questions = [[{"role": "user", "content": f["question"]}] for f in facts]
    if cache not in (None, "memory"):  # a file beside the prompts' one, for these questions
        cache = Path(cache)
        cache = cache.with_name(f"{cache.stem}-facts-{_prompts_digest(questions)[:12]}.json")
    dense_replies, facts_used = dense_answers(dense_model, dense_tokenizer, questions, FACT_MAX_NEW_TOKENS, cache)
    rows = []
    for f, msgs, d in zip(facts, questions, dense_replies):
        model_reply = _reply_text(tokenizer, greedy_reply(model, tokenizer, msgs, FACT_MAX_NEW_TOKENS)[1])
        rows.append({"question": f["question"], "answers": f["answers"],
                     "dense_reply": d["answer"], "model_reply": model_reply})
    return {"answer_ppl": ppl_m, "answer_ppl_dense": ppl_d, "answer_ppl_ratio": ppl_m / ppl_d,
            "answer_tokens": count, "n_prompts": len(per_prompt), "max_new_tokens": max_new_tokens,
            **score_facts(rows), "dense_cache": used, "dense_facts_cache": facts_used, "seconds": round(time.time() - t0, 1), "answers": per_prompt, "facts": rows}


def score_facts(rows: list[dict]) -> dict:
    """Marks each row ({question, answers, dense_reply, model_reply}) dense_right / model_right by fact_right,
    in place, and returns the counts: facts_n, facts_dense_right, facts_kept (right for both), facts_model_right."""
    for r in rows:
        r["dense_right"] = fact_right(r["dense_reply"], r["answers"], r["question"])
        r["model_right"] = fact_right(r["model_reply"], r["answers"], r["question"])
    return {"facts_n": len(rows), "facts_dense_right": sum(r["dense_right"] for r in rows),
            "facts_kept": sum(r["dense_right"] and r["model_right"] for r in rows),
            "facts_model_right": sum(r["model_right"] for r in rows)}


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def dense_cache_path(dense_dir: str | Path, prompts_path: str | Path, max_new_tokens: int) -> Path:
    """~/.cache/leanserve/chat_eval/dense-<config sha>-<prompts sha>-<max_new_tokens>.json: the dense answers
    of one checkpoint (its config.json; a pruned copy's carries a marker, so it differs), prompts file and budget."""
    cfg = _sha(Path(dense_dir) / "config.json")[:16]
    return model_prep.leanserve_home() / "chat_eval" / f"dense-{cfg}-{_sha(prompts_path)[:16]}-{max_new_tokens}.json"


# ----------------------------------------------------------------------------- `leanserve eval chat`

def add_arguments(p) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="HF model directory to evaluate (dense or pruned)")
    p.add_argument("--dense", required=True, metavar="DENSE_DIR", help="the dense model it was made from")
    p.add_argument("--prompts", default=DEFAULT_PROMPTS,
                   help=f"held-out chat prompts, .jsonl (relative paths resolve against the repository; "
                        f"default {DEFAULT_PROMPTS})")
    p.add_argument("--facts", default=DEFAULT_FACTS, help=f"factual questions, .jsonl (default {DEFAULT_FACTS})")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"length limit of the dense answers [default {DEFAULT_MAX_NEW_TOKENS}]")
    p.add_argument("--json", default=None, metavar="OUT", help="write the full result (every reply) here")
    p.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's]")
    p.add_argument("--no-cache", action="store_true", help="regenerate the dense answers (and do not store them)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(a) -> int:
    prompts_path, facts_path = resolve_text(a.prompts), resolve_text(a.facts)
    for given, found in ((a.prompts, prompts_path), (a.facts, facts_path)):
        if found is None:
            print(f"leanserve: {given} not found (also tried {REPO_ROOT / given})", file=sys.stderr)
            return 1
    if a.max_new_tokens < 1 or (a.threads is not None and a.threads < 1):
        print("leanserve: need --max-new-tokens >= 1 and --threads >= 1", file=sys.stderr)
        return 1
    try:
        for d in (a.model_dir, a.dense):
            model_prep.validate_model_dir(Path(d))
    except model_prep.PrepareError as e:
        print(f"leanserve: {e}", file=sys.stderr)
        return 1
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        prompts, facts = load_prompts(prompts_path), load_facts(facts_path)
        cache = None if a.no_cache else dense_cache_path(a.dense, prompts_path, a.max_new_tokens)
        d_tok, dense = load_model(a.dense)
        tok, model = load_model(a.model_dir)
        r = chat_quality(model, tok, dense, d_tok, prompts, facts, a.max_new_tokens, cache, progress=not a.quiet)
    except (ValueError, OSError, RuntimeError, AttributeError, KeyError) as e:
        print(f"leanserve: evaluation failed ({type(e).__name__}): {e}", file=sys.stderr)
        return 1
    if cache is None:
        print("dense answers: generated (--no-cache)")
    elif r["dense_cache"] == "used":
        print(f"dense answers: cache used ({cache})")
    else:
        print(f"dense answers: generated, cached in {cache}")
    print(f"answer perplexity ({r['n_prompts']} prompts, {r['answer_tokens']} tokens of the dense model's greedy "
          f"answers, max {a.max_new_tokens}): model {r['answer_ppl']:.4f}  dense {r['answer_ppl_dense']:.4f}  "
          f"ratio {r['answer_ppl_ratio']:.4f}")
    print(f"facts ({r['facts_n']} questions): dense right on {r['facts_dense_right']}; the model keeps "
          f"{r['facts_kept']} of {r['facts_dense_right']} ({r['facts_model_right']} of {r['facts_n']} right overall)")
    for f in r["facts"]:
        if not f["model_right"]:
            print(f"  wrong: {f['question']!r} -> {_norm(f['model_reply'])[:80]!r}")
    print(f"({a.model_dir} vs {a.dense}; {r['seconds']} s)")
    if a.json:
        out = Path(a.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": str(a.model_dir), "dense": str(a.dense), "prompts": str(prompts_path),
                                   "facts_file": str(facts_path), **r}, indent=1))
        print(f"wrote {out}")
    return 0
