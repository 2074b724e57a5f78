"""Verifiers: what thought trimming asks about thoughts.

The protocol is async and batched so that a model-based verifier (an LLM asked whether a thought
reached an answer and whether two answers agree, thresholding P(Yes)) can batch requests from
many streams. The rule verifier answers the same questions with regexes, synchronously.
"""
from __future__ import annotations

import abc
from typing import Optional, Sequence

from .answers import answers_equal, thought_answer


class Verifier(abc.ABC):
    @abc.abstractmethod
    async def answers(self, thoughts: Sequence[str], question: Optional[str] = None) -> list[Optional[str]]:
        """For each thought, the answer it reaches (a comparable string) or None."""

    @abc.abstractmethod
    async def agreements(
        self, pairs: Sequence[tuple[str, str]], question: Optional[str] = None
    ) -> list[bool]:
        """For each (a, b) pair of answers, whether they are the same answer."""


class RuleVerifier(Verifier):
    """Regex extraction + normalised equality; no model, no I/O."""

    def __init__(self, last_sentences: int = 2) -> None:
        self.last_sentences = last_sentences

    def answer(self, thought_text: str) -> Optional[str]:
        return thought_answer(thought_text, self.last_sentences)

    def agree(self, a: Optional[str], b: Optional[str]) -> bool:
        return a is not None and b is not None and answers_equal(a, b)

    async def answers(self, thoughts: Sequence[str], question: Optional[str] = None) -> list[Optional[str]]:
        return [self.answer(t) for t in thoughts]

    async def agreements(
        self, pairs: Sequence[tuple[str, str]], question: Optional[str] = None
    ) -> list[bool]:
        return [self.agree(a, b) for a, b in pairs]
