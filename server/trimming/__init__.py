"""Thought trimming (after TrimR): stop a reasoning model's thinking once its answer has settled.

segment: thinking text -> thoughts; answers: answer extraction/normalisation; rule_verifier:
the verifier protocol and its regex implementation; policy: when to cut, and ThoughtTrimmer,
which a streaming relay drives; offline_eval: `leanserve eval trim` on recorded traces.
Pure Python (stdlib only).
"""
from .answers import answers_equal, final_answer, normalize, thought_answer
from .policy import (
    CHARS_PER_TOKEN,
    CONTINUE,
    Action,
    Decision,
    ThoughtTrimmer,
    TrimConfig,
    TrimState,
    estimate_tokens,
)
from .rule_verifier import RuleVerifier, Verifier
from .segment import DEFAULT_MARKERS, SKY_T1, THINK, Delimiters, Segmenter, Thought

__all__ = [
    "Action",
    "CHARS_PER_TOKEN",
    "CONTINUE",
    "DEFAULT_MARKERS",
    "Decision",
    "Delimiters",
    "RuleVerifier",
    "SKY_T1",
    "Segmenter",
    "THINK",
    "Thought",
    "ThoughtTrimmer",
    "TrimConfig",
    "TrimState",
    "Verifier",
    "answers_equal",
    "estimate_tokens",
    "final_answer",
    "normalize",
    "thought_answer",
]
