"""Conversations written by a chat model itself (Magpie-style), as calibration/distillation data, and
`leanserve self-chat`.

A 2:4 copy is served as a chat model, so what distillation should teach it is the dense model's chat
behaviour. Hand-collected chat data is scarce and never matches the model's own distribution; an aligned model
writes it for free (Xu et al., "Magpie", arXiv 2406.08464): give it only its chat template up to the start of a
user turn and it samples a plausible user request; then it answers that request as it would when served. The
pairs are this model's own questions and answers, so no dataset is needed, nothing is copied from one, and a
held-out evaluation set stays held out.

- user turn: sampled (temperature, top-p) from the template's text up to the user message, i.e. with the
  template's default system prompt where it has one; kept only when it ends with an end-of-turn token within
  the budget, is not blank and is not a duplicate;
- topic control (optional): every user turn can be made to start with one of a few opening words
  (--user-start "What is" ...), cycled over the batch: the model completes the request from there, so the
  data can lean towards, e.g., short general-knowledge questions without writing any question by hand;
- held-out sets stay out: a sampled user turn that is close to any text of --exclude (word-set Jaccard
  >= 0.5, or equal) is dropped, so an evaluation set's questions never become training data;
- answer: greedy by default (what `leanserve eval chat` scores), through the template with the generation
  prompt, at most --max-answer-tokens.

Output: one {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]} a line (kernels/calibration.py
reads it; the template re-adds the default system prompt, as it does for a served request).
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import torch

_SENTINEL = "\x00leanserve-user-turn\x00"


def user_prefix(tokenizer) -> str:
    """The chat template's text before a user message's content (system prompt included, if any)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("self-chat needs a tokenizer with a chat template, and this one has none")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False)
    if _SENTINEL not in text:
        raise ValueError("the chat template does not place the user message verbatim; cannot find the user turn")
    return text.split(_SENTINEL)[0]


def _stop_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model has no end-of-turn (eos) token: cannot tell where a turn ends")
    return ids


@torch.no_grad()
def _generate(model, tokenizer, texts: list[str], max_new: int, sample: bool, temperature: float, top_p: float,
              stop: set[int]) -> list[tuple[str, bool]]:
    """(decoded continuation without special tokens, unstripped; ended on a stop token) per text; left-padded."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"  # generation continues at the right end
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    kw = dict(do_sample=True, temperature=temperature, top_p=top_p) if sample else dict(do_sample=False)
    out = model.generate(**enc, max_new_tokens=max_new, eos_token_id=sorted(stop),
                         pad_token_id=tokenizer.pad_token_id, top_k=None, **kw)
    res = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        ended = next((i for i, t in enumerate(row) if t in stop), None)
        body = row if ended is None else row[:ended]
        res.append((tokenizer.decode(body, skip_special_tokens=True), ended is not None))
    return res


def _words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"\w+", text.lower()))


def near(text: str, others: list[frozenset[str]], threshold: float = 0.5) -> bool:
    """True when `text` equals, or shares at least `threshold` of its word set (Jaccard) with, one of `others`."""
    w = _words(text)
    return any(w == o or (w and o and len(w & o) / len(w | o) >= threshold) for o in others)


def self_chat(model, tokenizer, n: int, max_user_tokens: int = 96, max_answer_tokens: int = 256,
              temperature: float = 1.0, top_p: float = 0.95, answer_temperature: float = 0.0, batch: int = 32,
              seed: int = 0, progress: bool = True, user_starts: list[str] | None = None,
              exclude: list[str] | None = None) -> tuple[list[list[dict]], dict]:
    """n conversations [user, assistant] written by the model; returns them and a small report.

    user_starts: opening words the user turns are made to begin with (cycled); exclude: texts no kept user turn
    may be close to (see `near`)."""
    from tqdm.auto import tqdm

    if n < 1 or batch < 1 or max_user_tokens < 1 or max_answer_tokens < 1:
        raise ValueError("self-chat needs n, batch and the token budgets >= 1")
    if temperature <= 0 or not 0 < top_p <= 1 or answer_temperature < 0:
        raise ValueError("self-chat needs temperature > 0, 0 < top_p <= 1 and answer temperature >= 0")
    starts = [x.strip() for x in user_starts or []]
    if any(not x for x in starts):
        raise ValueError("self-chat: a user start must not be blank")
    held_out = [_words(x) for x in exclude or []]
    prefix = user_prefix(tokenizer)
    stop = _stop_ids(model, tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(seed)
    model.eval()
    seen: set[str] = set()
    convs: list[list[dict]] = []
    stats = {"user_turns_sampled": 0, "unfinished": 0, "blank_or_duplicate": 0, "excluded": 0, "answers_cut": 0}
    bar = tqdm(total=n, desc="self-chat", disable=not progress)
    t0 = time.time()
    while len(convs) < n:
        if stats["user_turns_sampled"] >= 20 * n + 100:
            raise RuntimeError(
                f"only {len(convs)} usable user turns in {stats['user_turns_sampled']} samples: the model rarely "
                f"ends a user turn within {max_user_tokens} tokens ({stats['unfinished']} unfinished) or repeats "
                f"itself ({stats['blank_or_duplicate']}) or stays close to --exclude ({stats['excluded']})")
        users = []
        k = stats["user_turns_sampled"]
        heads = [starts[(k + i) % len(starts)] if starts else "" for i in range(batch)]
        for head, (cont, ended) in zip(heads, _generate(model, tokenizer, [prefix + h for h in heads],
                                                        max_user_tokens, True, temperature, top_p, stop)):
            stats["user_turns_sampled"] += 1
            text = (head + cont).strip()
            if not ended:
                stats["unfinished"] += 1
            elif not cont.strip() or text.lower() in seen:
                stats["blank_or_duplicate"] += 1
            elif near(text, held_out):
                stats["excluded"] += 1
            else:
                seen.add(text.lower())
                users.append(text)
        users = users[:n - len(convs)]
        if not users:
            continue
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": u}], tokenize=False,
                                                 add_generation_prompt=True) for u in users]
        answers = _generate(model, tokenizer, prompts, max_answer_tokens, answer_temperature > 0,
                            answer_temperature or 1.0, 1.0, stop)
        for u, (a, ended) in zip(users, answers):
            stats["answers_cut"] += not ended
            convs.append([{"role": "user", "content": u}, {"role": "assistant", "content": a.strip()}])
        bar.update(len(users))
    bar.close()
    stats.update(conversations=len(convs), seconds=round(time.time() - t0, 1))
    return convs, stats


def held_out_texts(path: str | Path) -> list[str]:
    """The texts of an evaluation file to keep out: a .jsonl's "question"/"prompt" fields and user messages, or
    the non-blank lines of any other file."""
    from kernels.chat_quality import jsonl_records

    path = Path(path)
    if path.suffix != ".jsonl":
        return [x.strip() for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    out = []
    for n, obj in jsonl_records(path):
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: expected an object")
        found = [obj[k] for k in ("question", "prompt") if isinstance(obj.get(k), str)]
        found += [m["content"] for m in obj.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"
                  and isinstance(m.get("content"), str)]
        if not found:
            raise ValueError(f"{path}:{n}: no \"question\", \"prompt\" or user message to exclude")
        out += found
    return out


def write_jsonl(convs: list[list[dict]], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for msgs in convs:
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- CLI

def add_arguments(p) -> None:
    p.description = ("Writes chat conversations by the model itself (Magpie-style: it samples a user request from its "
                     "chat template, then answers it greedily) as a .jsonl that `leanserve distill --calib` and "
                     "`leanserve prune --calib` read.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="HF chat model (with a chat template)")
    p.add_argument("out", metavar="OUT.jsonl", help="where to write the conversations")
    p.add_argument("--n", type=int, default=512, help="conversations to write [default 512]")
    p.add_argument("--max-user-tokens", type=int, default=96, help="budget of a user turn [default 96]")
    p.add_argument("--max-answer-tokens", type=int, default=256, help="budget of an answer [default 256]")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of user turns [default 1]")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p of user turns [default 0.95]")
    p.add_argument("--answer-temperature", type=float, default=0.0, help="0: greedy answers [default 0]")
    p.add_argument("--user-start", action="append", default=[], metavar="TEXT",
                   help="opening words every user turn begins with, e.g. \"What is\"; repeat to cycle several "
                        "[default: none, the model starts the turn]")
    p.add_argument("--exclude", action="append", default=[], metavar="FILE",
                   help="evaluation data to keep out: user turns close to any of its questions/prompts are dropped "
                        "(.jsonl with question/prompt/messages, or lines of text); repeat for several")
    p.add_argument("--batch", type=int, default=32, help="sequences generated together [default 32]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--force", action="store_true", help="overwrite OUT.jsonl")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args) -> int:
    from kernels import model_prep
    from kernels.perplexity import load_model

    out = Path(args.out)
    if out.suffix != ".jsonl":
        print("leanserve: OUT must end in .jsonl (calibration reads .jsonl files as conversations)", file=sys.stderr)
        return 1
    if out.exists() and not args.force:
        print(f"leanserve: {out} exists; pass --force to overwrite it", file=sys.stderr)
        return 1
    try:
        model_prep.validate_model_dir(Path(args.model_dir))
    except model_prep.PrepareError as e:
        print(f"leanserve: MODEL_DIR: {e}", file=sys.stderr)
        return 1
    try:
        exclude = [t for f in args.exclude for t in held_out_texts(f)]
    except (OSError, ValueError) as e:
        print(f"leanserve: --exclude: {e}", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer, model = load_model(args.model_dir)
    try:
        convs, stats = self_chat(model, tokenizer, args.n, args.max_user_tokens, args.max_answer_tokens,
                                 args.temperature, args.top_p, args.answer_temperature, args.batch, args.seed,
                                 progress=not args.quiet, user_starts=args.user_start, exclude=exclude)
    except (ValueError, RuntimeError) as e:
        print(f"leanserve: self-chat failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("leanserve: interrupted; nothing written", file=sys.stderr)
        return 130
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(convs, out)
    print(f"wrote {out}: {stats['conversations']} conversations in {stats['seconds']} s "
          f"({stats['user_turns_sampled']} user turns sampled: {stats['unfinished']} unfinished, "
          f"{stats['blank_or_duplicate']} blank or duplicate, {stats['excluded']} close to --exclude dropped; "
          f"{stats['answers_cut']} answers cut at "
          f"{args.max_answer_tokens} tokens)")
    return 0
