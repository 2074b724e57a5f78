"""The token stream the 2:4 pruners sample their calibration windows from (kernels/sparse24/prune.py).

Calibrated on raw WikiText only, SparseGPT keeps a fine WikiText perplexity but an instruct model loses its
chat behaviour ("What is the capital of France?" -> "B.B.B..."): the pruner never saw the chat template's
markers nor an assistant turn. So calibration data may also be conversations, rendered through the model's
own chat template exactly as a served request is:

- a text file (any name not ending in .jsonl): the whole text, as kernels/perplexity.tokenize_file reads it;
- a .jsonl file: one conversation a line, either {"messages": [{"role", "content"}, ...]} (the OpenAI shape)
  or {"question", "answer"} (the GSM8K shape, data/gsm8k: user = question, assistant = the worked answer
  without its <<calculator>> annotations and with the final "#### N" as "The answer is N.").

Each conversation is rendered with tokenizer.apply_chat_template(tokenize=False) and tokenized on its own,
without adding special tokens again (the template already has them); conversations, and several files, are
concatenated in the order given. No shuffling: the pruners draw windows at seeded random positions of the
whole stream (prune.calibration_windows), so the order only decides which neighbours share a window.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

_CALC = re.compile(r"<<[^<>]*>>")
_FINAL = re.compile(r"\n?####\s*(.+?)\s*$")


def gsm8k_answer(answer: str) -> str:
    """A GSM8K worked answer as an assistant would say it: no <<calc>> annotations, final "The answer is N."."""
    text = _CALC.sub("", answer)
    m = _FINAL.search(text)
    if m:
        text = text[:m.start()].rstrip() + f"\nThe answer is {m.group(1)}."
    return text.strip()


def conversation(obj, where: str) -> list[dict]:
    """One .jsonl line (parsed) as a list of {"role", "content"} messages; ValueError naming `where` otherwise."""
    if isinstance(obj, dict) and "messages" in obj:
        msgs = obj["messages"]
        if not (isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs)):
            raise ValueError(f"{where}: \"messages\" must be a non-empty list of {{\"role\": str, \"content\": str}}")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if isinstance(obj, dict) and isinstance(obj.get("question"), str) and isinstance(obj.get("answer"), str):
        return [{"role": "user", "content": obj["question"].strip()},
                {"role": "assistant", "content": gsm8k_answer(obj["answer"])}]
    raise ValueError(f"{where}: neither a conversation {{\"messages\": [...]}} nor a GSM8K line "
                     f"{{\"question\": str, \"answer\": str}}")


def render_conversations(path: str | Path) -> list[list[dict]]:
    """The conversations of a .jsonl file, one per non-blank line (model-independent: no tokenizer)."""
    path = Path(path)
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        out.append(conversation(obj, f"{path}:{n}"))
    if not out:
        raise ValueError(f"{path}: no conversations (empty file)")
    return out


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def conversation_ids(tokenizer, path: str | Path) -> list[int]:
    """The conversations of a .jsonl file through the tokenizer's chat template, concatenated."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{path}: conversations need a tokenizer with a chat template, and this one has none")
    ids: list[int] = []
    for msgs in render_conversations(path):
        ids += _ids(tokenizer, tokenizer.apply_chat_template(msgs, tokenize=False))
    return ids


def calibration_ids(tokenizer, path: str | Path | list | tuple) -> torch.Tensor:
    """1-D LongTensor: the files' token streams (text whole, .jsonl as conversations), concatenated in order."""
    paths = [path] if isinstance(path, (str, Path)) else list(path)
    if not paths:
        raise ValueError("no calibration files")
    ids: list[int] = []
    for p in map(Path, paths):
        if p.suffix == ".jsonl":
            ids += conversation_ids(tokenizer, p)
        else:
            part = _ids(tokenizer, p.read_text(encoding="utf-8"))
            if not part:
                raise ValueError(f"{p}: no text (empty file)")
            ids += part
    return torch.tensor(ids, dtype=torch.long)
