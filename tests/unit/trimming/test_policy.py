import asyncio
import random

import pytest

from server.trimming.policy import (CHARS_PER_TOKEN, Action, ThoughtTrimmer, TrimConfig, TrimConfigError, TrimState,
                                    estimate_tokens)
from server.trimming.rule_verifier import RuleVerifier, Verifier
from server.trimming.segment import Thought

THOUGHTS = [
    "Let me set up the equations. So x = 3.",  # 0: answer 3
    "\n\nWait, I need y as well, let me expand the product carefully.",  # 1: no answer
    "\n\nBut then the total is 2y + x. Therefore, the answer is 5.",  # 2: answer 5
    "\n\nHmm, I should check the expansion of the product again.",  # 3: no answer
    "\n\nWait, let me verify: 2 + 3 = 5. So the answer is 5.",  # 4: answer 5, agrees with 2
    "\n\nAlternatively, we could use symmetry. So the answer is 5.",  # 5: would make 3 in a row
    "\n\nBut let me also try small cases to be completely sure of it.",  # 6
]


def stream(thoughts=THOUGHTS, close=True):
    return "<think>" + "".join(thoughts) + ("</think>\n\nThe answer is 5." if close else "")


def end_of(i, thoughts=THOUGHTS):
    return len("<think>") + sum(len(t) for t in thoughts[: i + 1])


def run(text, config, chunks=None, verifier=None):
    async def go():
        trimmer = ThoughtTrimmer(config, verifier)
        if chunks is None:
            d = await trimmer.feed(text)
        else:
            i, d = 0, None
            for n in chunks:
                d = await trimmer.feed(text[i : i + n])
                i += n
                if d.cut:
                    break
        if not d.cut:
            d = await trimmer.finish()
        return d, trimmer

    return asyncio.run(go())


def test_consistency_2_cuts_after_the_second_agreeing_thought():
    d, _ = run(stream(), TrimConfig(consistency=2))
    assert d.action is Action.CUT and d.cut
    assert d.reason == "overthinking"
    assert d.answer == "5"
    assert d.keep_upto == end_of(4)
    assert d.thought_index == 4
    assert stream()[: d.keep_upto].endswith("So the answer is 5.")


def test_consistency_1_and_3():
    d1, _ = run(stream(), TrimConfig(consistency=1))
    assert (d1.reason, d1.answer, d1.keep_upto) == ("overthinking", "3", end_of(0))
    d3, _ = run(stream(), TrimConfig(consistency=3))
    assert (d3.reason, d3.answer, d3.keep_upto) == ("overthinking", "5", end_of(5))


def test_a_different_answer_breaks_the_streak():
    thoughts = THOUGHTS[:3] + ["\n\nWait, so the answer is 7."] + THOUGHTS[4:]
    d, _ = run(stream(thoughts), TrimConfig(consistency=2))
    assert d.keep_upto == end_of(5, thoughts) and d.answer == "5"


def test_unanswered_thoughts_can_reset_the_streak():
    d, _ = run(stream(), TrimConfig(consistency=2, reset_on_unanswered=True))
    assert d.keep_upto == end_of(5)  # 4 and 5 are adjacent; 2 and 4 are not


def test_no_cut_without_agreement_or_after_thinking_ended():
    d, trimmer = run(stream(THOUGHTS[:4]), TrimConfig(consistency=2))
    assert not d.cut and d.action is Action.CONTINUE
    # The last thought (ended by </think>) agrees, but thinking is over: nothing to cut.
    d, _ = run(stream(THOUGHTS[:5]), TrimConfig(consistency=2))
    assert not d.cut


def test_max_thoughts_forces_an_answer():
    d, _ = run(stream(), TrimConfig(consistency=3, max_thoughts=4))
    assert d.reason == "max_thoughts"
    assert d.keep_upto == end_of(3)
    assert d.answer == "5"  # the latest answer reached
    d, _ = run(stream(), TrimConfig(consistency=3, max_thoughts=1))
    assert (d.reason, d.answer, d.keep_upto) == ("max_thoughts", "3", end_of(0))


def test_overthinking_wins_over_max_thoughts_on_the_same_thought():
    d, _ = run(stream(), TrimConfig(consistency=2, max_thoughts=5))
    assert d.reason == "overthinking"


def test_thinking_budget_estimated_and_chunking_invariant():
    budget = 30  # tokens -> 120 chars of thinking
    config = TrimConfig(consistency=3, thinking_budget=budget)
    d, _ = run(stream(), config)
    assert d.reason == "thinking_budget"
    assert d.keep_upto == len("<think>") + budget * CHARS_PER_TOKEN
    rng = random.Random(3)
    for _ in range(20):
        chunks = [rng.randint(1, 15) for _ in range(200)]
        assert run(stream(), config, chunks)[0] == d


def test_thinking_budget_with_real_token_counts():
    async def go():
        trimmer = ThoughtTrimmer(TrimConfig(thinking_budget=10))
        d = await trimmer.feed("<think>abc", thinking_tokens=9)
        assert not d.cut
        d = await trimmer.feed(" def", thinking_tokens=10)
        return d

    d = asyncio.run(go())
    assert d.reason == "thinking_budget" and d.keep_upto == len("<think>abc def")


def test_repetition_loop_is_cut():
    loop = "\n\nWait, so we need the sum of the first few terms of the sequence."
    thoughts = THOUGHTS[:2] + [loop] * 6
    d, _ = run(stream(thoughts), TrimConfig(max_repeats=3))
    assert d.reason == "repetition"
    assert d.keep_upto == end_of(4, thoughts)  # kept up to the start of the third repeat
    assert d.answer == "3"
    d, _ = run(stream(thoughts), TrimConfig(max_repeats=None))
    assert not d.cut


def test_decisions_do_not_depend_on_chunking():
    config = TrimConfig(consistency=2)
    whole, _ = run(stream(), config)
    rng = random.Random(0)
    for _ in range(30):
        chunks = [rng.randint(1, 9) for _ in range(200)]
        assert run(stream(), config, chunks)[0] == whole


def test_disabled_never_cuts():
    d, trimmer = run(stream(), TrimConfig(enabled=False, max_thoughts=1))
    assert not d.cut and trimmer.thoughts == []


def test_state_stays_cut():
    state = TrimState(TrimConfig(consistency=1))
    t = Thought(0, "x", 0, 10, "marker")
    first = state.observe(t, "4")
    assert first.cut
    assert state.observe(Thought(1, "y", 10, 20, "marker"), None) is first
    assert state.observe_budget(10**6, 30) is first


def test_state_uses_the_given_agreement():
    state = TrimState(TrimConfig(consistency=2, max_thoughts=None))
    assert not state.observe(Thought(0, "a", 0, 5, "marker"), "1/2").cut
    assert not state.observe(Thought(1, "b", 5, 9, "marker"), "0.5", agrees=False).cut
    d = state.observe(Thought(2, "c", 9, 12, "marker"), "half", agrees=True)
    assert d.cut and d.keep_upto == 12 and d.answer == "half"


def test_config_validation():
    with pytest.raises(ValueError):
        TrimConfig(consistency=0)
    with pytest.raises(ValueError):
        TrimConfig(max_thoughts=0)
    with pytest.raises(ValueError):
        TrimConfig(thinking_budget=0)


def test_estimate_tokens():
    assert estimate_tokens(0) == 0 and estimate_tokens(1) == 1 and estimate_tokens(8) == 2


class CountingVerifier(Verifier):
    """A stand-in for a model verifier: every thought of >= 30 chars 'answers' 7."""

    def __init__(self):
        self.batches = []

    async def answers(self, thoughts, question=None):
        self.batches.append(list(thoughts))
        await asyncio.sleep(0)
        return ["7" if len(t) >= 30 else None for t in thoughts]

    async def agreements(self, pairs, question=None):
        return [a == b for a, b in pairs]


def test_async_verifier_protocol():
    v = CountingVerifier()
    d, _ = run(stream(), TrimConfig(consistency=2), verifier=v)
    assert d.answer == "7" and d.keep_upto == end_of(1)
    assert v.batches and all(isinstance(b, list) for b in v.batches)


def test_rule_verifier_sync_and_async():
    v = RuleVerifier()
    assert v.answer("Therefore, the answer is \\(\\dfrac{1}{2}\\).") == "1/2"
    assert v.agree("1/2", "0.5") and not v.agree("1/2", None)
    assert asyncio.run(v.answers(["So the answer is 4.", "no"])) == ["4", None]
    assert asyncio.run(v.agreements([("4", "4.0"), ("4", "5")])) == [True, False]


def test_request_trim_is_one_config_with_the_budget_in_it():
    c = TrimConfig.from_request({"consistency": 3, "thinking_budget": 50, "verifier": "model"})
    assert (c.consistency, c.thinking_budget, c.verifier, c.max_thoughts) == (3, 50, "model", 100)
    assert TrimConfig.from_request(True) == TrimConfig() and not TrimConfig.from_request(False).enabled
    for spec, field in [({"consistency": True}, "consistency"), ({"thinking_budget": 1.5}, "thinking_budget"),
                        ({"markers": []}, "markers"), ({"verifier": "oracle"}, "verifier")]:
        with pytest.raises(TrimConfigError) as e:
            TrimConfig.from_request(spec)
        assert e.value.field == field


def test_a_caller_that_counts_tokens_gets_no_estimated_budget_cut():
    async def go():
        trimmer = ThoughtTrimmer(TrimConfig(thinking_budget=2), estimate_budget=False)
        d = await trimmer.feed("<think>" + "a long thought without any answer " * 5)
        assert not d.cut  # ~40 estimated tokens, but the caller has not reported any
        return trimmer.state.observe_budget(2, None)
    d = asyncio.run(go())
    assert d.cut and d.reason == "thinking_budget" and d.keep_upto is None
