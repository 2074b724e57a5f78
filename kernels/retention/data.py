"""Training and evaluation text: documents from plain-text files and JSONL records, as token ids.

A JSONL record contributes its "response" field (reasoning traces), else "text", else
"question" + "answer". A plain-text file is one document. `slice_` keeps a fraction of each file
(by lines for text, by records for JSONL) so that training and evaluation can use disjoint parts.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def parse_slice(spec: str | None) -> tuple[float, float]:
    if not spec:
        return 0.0, 1.0
    try:
        a, b = (float(x) if x else d for x, d in zip(spec.split(":"), (0.0, 1.0)))
    except ValueError:
        raise ValueError(f"slice {spec!r} is not START:END with fractions in [0, 1]") from None
    if not 0.0 <= a < b <= 1.0:
        raise ValueError(f"slice {spec!r} is not START:END with 0 <= START < END <= 1")
    return a, b


def read_documents(path: str | Path, slice_: tuple[float, float] = (0.0, 1.0),
                   exclude_ids: set[str] = frozenset()) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text file {p} does not exist")
    a, b = slice_
    if p.suffix == ".jsonl":
        lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        lines = lines[int(a * len(lines)):int(b * len(lines))]
        docs = []
        for n, ln in enumerate(lines, 1):
            try:
                rec = json.loads(ln)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}: line {n} is not JSON: {e}") from None
            if str(rec.get("id", "")) in exclude_ids:
                continue
            text = rec.get("response") or rec.get("text") or \
                "\n".join(str(rec[k]) for k in ("question", "answer") if rec.get(k))
            if text:
                docs.append(text)
        return docs
    lines = p.read_text(encoding="utf-8").splitlines(keepends=True)
    return ["".join(lines[int(a * len(lines)):int(b * len(lines))])]


def read_ids(path: str | Path) -> set[str]:
    """The `id` fields of a JSONL file (records to leave out of training)."""
    return {str(json.loads(ln).get("id")) for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()}


class TokenPool:
    """Tokenised documents; samples windows of a fixed length inside one document where possible."""

    def __init__(self, tokenizer, docs: list[str], name: str = ""):
        self.name = name
        eos = tokenizer.eos_token_id
        self.docs = [np.asarray(tokenizer(d, add_special_tokens=False)["input_ids"], dtype=np.int64) for d in docs]
        self.docs = [d for d in self.docs if len(d)]
        if not self.docs:
            raise ValueError(f"{name or 'text'}: no tokens")
        self.joined = np.concatenate([np.append(d, eos) for d in self.docs])
        self.tokens = int(sum(len(d) for d in self.docs))

    def window(self, rng: np.random.Generator, length: int) -> np.ndarray:
        long = [d for d in self.docs if len(d) >= length]
        if long:
            w = np.asarray([len(d) - length + 1 for d in long], dtype=np.float64)
            d = long[rng.choice(len(long), p=w / w.sum())]
            s = int(rng.integers(0, len(d) - length + 1))
            return d[s:s + length]
        if len(self.joined) < length:
            raise ValueError(f"{self.name or 'text'} has {len(self.joined)} tokens, fewer than {length}")
        s = int(rng.integers(0, len(self.joined) - length + 1))
        return self.joined[s:s + length]

    def sequences(self, length: int, max_n: int) -> list[np.ndarray]:
        """Up to max_n evaluation sequences of exactly `length` tokens: consecutive pieces of the
        documents, taken round-robin (piece 0 of every document, then piece 1, ...) for variety."""
        pieces = [[d[j:j + length] for j in range(0, len(d) - length + 1, length)] for d in self.docs]
        out, j = [], 0
        while len(out) < max_n and any(j < len(p) for p in pieces):
            out.extend(p[j] for p in pieces if j < len(p))
            j += 1
        return out[:max_n]
