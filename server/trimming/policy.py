"""When to stop thinking (after TrimR): the decision logic and the per-response driver.

Overthinking: `consistency` answer-bearing thoughts in a row agree -> cut after the last of them.
Thoughts that reach no answer neither extend nor break the streak (unless reset_on_unanswered).
Repetition: the `max_repeats`-th thought that repeats an earlier one word for word (a decoding
loop; single repeats happen in healthy traces too) -> cut before it.
Underthinking: `max_thoughts` thoughts or `thinking_budget` tokens without convergence -> cut.
In every case the caller then closes the thinking and makes the model answer.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Optional

from .rule_verifier import RuleVerifier, Verifier
from .segment import DEFAULT_MARKERS, THINK, Delimiters, Segmenter, Thought

# Without a tokenizer (offline eval, or a relay that does not count) tokens are estimated as
# chars / 4, the usual ratio for English BPE text; a share of tokens cut then equals the share
# of characters cut.
CHARS_PER_TOKEN = 4
MIN_REPEAT_CHARS = 40


def estimate_tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


VERIFIERS = ("rule", "model")
# What a request may set (the `trim` knob); the other fields are the server's.
REQUEST_FIELDS = ("enabled", "consistency", "max_thoughts", "thinking_budget", "verifier")


class TrimConfigError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class TrimConfig:
    """Every trimming setting, for the gateway (a request's `trim`, validated by from_request) and for
    `leanserve eval trim`. Invalid values raise TrimConfigError naming the field."""
    enabled: bool = True
    consistency: int = 2  # agreeing answer-bearing thoughts needed to cut
    # None: no limit. Thoughts are short (every "But"/"Wait" paragraph starts one): on the
    # Sky-T1 dev traces 20 cut many healthy traces too early; 100 only cut runaway ones.
    max_thoughts: Optional[int] = 100
    thinking_budget: Optional[int] = None  # tokens; None: no budget
    verifier: str = "rule"  # "rule" (regex) or "model" (an LLM asked; server/trimming/model_verifier.py)
    max_repeats: Optional[int] = 3  # verbatim repeated thoughts that mean a loop; None: off
    min_thought_chars: int = 0  # shorter would-be thoughts merge into the next
    reset_on_unanswered: bool = False
    markers: tuple[str, ...] = DEFAULT_MARKERS
    delimiters: Delimiters = THINK

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise TrimConfigError("enabled", "must be true or false")
        if not _int(self.consistency) or not 1 <= self.consistency <= 10:
            raise TrimConfigError("consistency", "must be an integer from 1 to 10")
        for name in ("max_thoughts", "thinking_budget", "max_repeats"):
            v = getattr(self, name)
            if v is not None and (not _int(v) or v < 1):
                raise TrimConfigError(name, "must be an integer >= 1 (or null: no limit)")
        if self.verifier not in VERIFIERS:
            raise TrimConfigError("verifier", f"must be one of {', '.join(map(repr, VERIFIERS))}")

    @classmethod
    def from_request(cls, spec) -> "TrimConfig":
        """The `trim` of a request body: true (the defaults), false, or an object of REQUEST_FIELDS."""
        if isinstance(spec, bool):
            return cls(enabled=spec)
        if not isinstance(spec, dict):
            raise TrimConfigError("", "must be true, false or an object")
        unknown = sorted(set(spec) - set(REQUEST_FIELDS))
        if unknown:
            raise TrimConfigError(unknown[0], f"unknown field (allowed: {', '.join(REQUEST_FIELDS)})")
        return cls(**spec)


class Action(str, enum.Enum):
    CONTINUE = "continue"
    CUT = "cut"


@dataclass(frozen=True)
class Decision:
    action: Action = Action.CONTINUE
    reason: Optional[str] = None  # "overthinking" | "repetition" | "max_thoughts" | "thinking_budget"
    keep_upto: Optional[int] = None  # stream char offset: keep thinking text before it
    answer: Optional[str] = None  # agreed answer (overthinking), else the latest one seen
    thought_index: Optional[int] = None  # last thought kept

    @property
    def cut(self) -> bool:
        return self.action is Action.CUT


CONTINUE = Decision()


class TrimState:
    """Pure decision state for one response. After a cut, every call returns that cut."""

    def __init__(self, config: TrimConfig) -> None:
        self.config = config
        self.thoughts = 0
        self.streak = 0
        self.streak_answer: Optional[str] = None
        self.latest_answer: Optional[str] = None
        self.last_index: Optional[int] = None
        self.decision = CONTINUE
        self._seen: set[str] = set()  # normalised thought texts
        self.repeats = 0

    def observe(self, thought: Thought, answer: Optional[str], agrees: Optional[bool] = None) -> Decision:
        """One completed thought and its answer; `agrees`: answer matches streak_answer
        (None: compare the strings)."""
        if self.decision.cut or not self.config.enabled:
            return self.decision
        if self._repeats(thought.text):
            return self._cut("repetition", thought.start, self.latest_answer)
        self.thoughts += 1
        self.last_index = thought.index
        if answer is None:
            if self.config.reset_on_unanswered:
                self.streak, self.streak_answer = 0, None
        else:
            if agrees is None:
                agrees = answer == self.streak_answer
            self.streak = self.streak + 1 if (self.streak_answer is not None and agrees) else 1
            self.streak_answer = self.latest_answer = answer
            if self.streak >= self.config.consistency:
                return self._cut("overthinking", thought.end, answer)
        if self.config.max_thoughts is not None and self.thoughts >= self.config.max_thoughts:
            return self._cut("max_thoughts", thought.end, self.latest_answer)
        return CONTINUE

    def _repeats(self, text: str) -> bool:
        if self.config.max_repeats is None:
            return False
        key = " ".join(text.split())
        if len(key) < MIN_REPEAT_CHARS:  # short stock phrases recur without a loop
            return False
        if key in self._seen:
            self.repeats += 1
        self._seen.add(key)
        return self.repeats >= self.config.max_repeats

    def observe_budget(self, thinking_tokens: int, offset: Optional[int]) -> Decision:
        """Thinking tokens so far, with `offset` the stream position they reach (None: the caller
        decides where to cut)."""
        budget = self.config.thinking_budget
        if self.decision.cut or not self.config.enabled or budget is None or thinking_tokens < budget:
            return self.decision
        return self._cut("thinking_budget", offset, self.latest_answer)

    def _cut(self, reason: str, keep_upto: int, answer: Optional[str]) -> Decision:
        self.decision = Decision(Action.CUT, reason, keep_upto, answer, self.last_index)
        return self.decision


class ThoughtTrimmer:
    """Segmenter + verifier + TrimState for one response: what a streaming relay drives.

    feed() every text delta of the model output (content, tags included), finish() at the end.
    Only thoughts ended by a marker are judged: once thinking has ended there is nothing to cut.
    """

    def __init__(
        self,
        config: TrimConfig = TrimConfig(),
        verifier: Optional[Verifier] = None,
        question: Optional[str] = None,
        estimate_budget: bool = True,
    ) -> None:
        """estimate_budget=False: the caller counts real tokens and applies the budget itself with
        state.observe_budget (the streaming relay, at the exact chunk); no estimate is made here."""
        self.config = config
        self.estimate_budget = estimate_budget
        self.verifier = verifier or RuleVerifier()
        self.question = question
        self.segmenter = Segmenter(config.markers, config.delimiters, config.min_thought_chars)
        self.state = TrimState(config)
        self.thoughts: list[tuple[Thought, Optional[str]]] = []  # judged thoughts, for inspection

    @property
    def decision(self) -> Decision:
        return self.state.decision

    async def feed(self, delta: str, thinking_tokens: Optional[int] = None) -> Decision:
        """thinking_tokens: real count of thinking tokens so far, if the caller has one;
        otherwise the budget uses estimate_tokens."""
        if not self.config.enabled or self.decision.cut:
            return self.decision
        return await self._judge(self.segmenter.feed(delta), thinking_tokens)

    async def finish(self) -> Decision:
        if not self.config.enabled or self.decision.cut:
            return self.decision
        return await self._judge(self.segmenter.flush(), None)

    async def _judge(self, thoughts: list[Thought], thinking_tokens: Optional[int]) -> Decision:
        thoughts = [t for t in thoughts if t.closed_by == "marker"]
        limit = self._budget_offset() if thinking_tokens is None and self.estimate_budget else None
        answers = await self.verifier.answers([t.text for t in thoughts], self.question) if thoughts else []
        for t, a in zip(thoughts, answers):
            if limit is not None and t.end > limit:
                return self.state.observe_budget(self.config.thinking_budget or 0, limit)
            agrees = None
            if a is not None and self.state.streak_answer is not None:
                (agrees,) = await self.verifier.agreements([(self.state.streak_answer, a)], self.question)
            self.thoughts.append((t, a))
            d = self.state.observe(t, a, agrees)
            if d.cut:
                return d
        seg = self.segmenter
        if thinking_tokens is not None:
            if seg.phase == "thinking":
                return self.state.observe_budget(thinking_tokens, seg.consumed)
        elif limit is not None:
            end = seg.thinking_end if seg.thinking_end is not None else seg.consumed
            if end > limit:  # also when thinking ended in this delta, past the budget
                return self.state.observe_budget(self.config.thinking_budget or 0, limit)
        return self.decision

    def _budget_offset(self) -> Optional[int]:
        """Stream offset where the estimated thinking budget runs out."""
        start = self.segmenter.thinking_start
        if self.config.thinking_budget is None or start is None:
            return None
        return start + self.config.thinking_budget * CHARS_PER_TOKEN
