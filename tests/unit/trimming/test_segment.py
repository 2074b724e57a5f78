import json
import random
from pathlib import Path

import pytest

from server.trimming.segment import SKY_T1, THINK, Delimiters, Segmenter

TEXT = (
    "preamble that is not thinking <think>\n\nLet me start. x = 2.\n\n"
    "Wait, that is wrong.\n\nWaiting is not a marker here.\n\nButter neither.\n\n"
    "But, on the other hand, x = 3.\n\nHmm. Hold on.\n\nHold on, recheck.\n\n"
    "Let me double-check: 3.\n\nAlternatively\nsomething.\n\nBut</think> the answer is 3. \n\nWait no"
)


def segment(text, chunks=None, **kw):
    seg = Segmenter(**kw)
    out = []
    if chunks is None:
        out += seg.feed(text)
    else:
        i = 0
        for n in chunks:
            out += seg.feed(text[i : i + n])
            i += n
        out += seg.feed(text[i:])
    return out + seg.flush(), seg


def random_chunks(rng, total, hi):
    sizes, n = [], 0
    while n < total:
        sizes.append(rng.randint(1, hi))
        n += sizes[-1]
    return sizes


def test_splits_at_paragraph_markers_only():
    thoughts, seg = segment(TEXT, delimiters=THINK)
    starts = [t.text.lstrip("\n").split()[0] for t in thoughts]
    assert starts == ["Let", "Wait,", "But,", "Hmm.", "Hold", "Let", "Alternatively", "But"]
    assert "Waiting is not a marker" in thoughts[1].text
    assert "Butter neither" in thoughts[1].text
    assert thoughts[3].text == "\n\nHmm. Hold on."  # a marker inside a paragraph does not split
    assert [t.closed_by for t in thoughts] == ["marker"] * 7 + ["close"]
    assert [t.index for t in thoughts] == list(range(8))


def test_hmm_splits_when_followed_by_non_letter():
    thoughts, _ = segment("<think>a\n\nHmm, b\n\nHmmm c</think>", delimiters=THINK)
    assert [t.text for t in thoughts] == ["a", "\n\nHmm, b\n\nHmmm c"]


def test_offsets_tile_the_thinking_text():
    thoughts, seg = segment(TEXT, delimiters=THINK)
    assert seg.thinking_start == TEXT.index("<think>") + len("<think>")
    assert seg.thinking_end == TEXT.index("</think>")
    assert thoughts[0].start == seg.thinking_start and thoughts[-1].end == seg.thinking_end
    for a, b in zip(thoughts, thoughts[1:]):
        assert a.end == b.start
    for t in thoughts:
        assert TEXT[t.start : t.end] == t.text
    assert seg.phase == "after"
    assert seg.consumed == len(TEXT)


@pytest.mark.parametrize("seed", range(40))
def test_same_thoughts_under_any_chunking(seed):
    rng = random.Random(seed)
    kw = dict(delimiters=THINK, min_chars=rng.choice([0, 0, 30]))
    whole, _ = segment(TEXT, **kw)
    pieces, _ = segment(TEXT, random_chunks(rng, len(TEXT), rng.choice([1, 3, 9])), **kw)
    assert pieces == whole


def test_marker_and_tags_straddling_deltas():
    text = "<think>one\n\nWait, two\n\nBut three</think>"
    whole, _ = segment(text, delimiters=THINK)
    for cut in range(1, len(text)):
        split, _ = segment(text, [cut], delimiters=THINK)
        assert split == whole, cut


def test_min_chars_merges_short_thoughts():
    text = "<think>" + "a" * 50 + "\n\nWait, b.\n\nBut " + "c" * 50 + "</think>"
    short, _ = segment(text, delimiters=THINK, min_chars=0)
    merged, _ = segment(text, delimiters=THINK, min_chars=20)
    assert len(short) == 3
    assert len(merged) == 2 and merged[1].text.startswith("\n\nWait, b.\n\nBut ")


def test_custom_markers():
    thoughts, _ = segment("<think>a\n\nActually, b\n\nWait, c</think>", delimiters=THINK, markers=("Actually",))
    assert [t.text for t in thoughts] == ["a", "\n\nActually, b\n\nWait, c"]


def test_explicit_open_ignores_text_until_tag():
    thoughts, seg = segment("no thinking here\n\nWait, really", delimiters=THINK)
    assert thoughts == [] and seg.thinking_start is None and seg.thinking_chars == 0


def test_sky_t1_delimiters_and_missing_tags():
    text = "<|begin_of_thought|>\n\nA.\n\nWait, B.\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\nC<|end_of_solution|>"
    thoughts, seg = segment(text, delimiters=SKY_T1)
    assert [t.text.strip() for t in thoughts] == ["A.", "Wait, B."]
    assert seg.thinking_start == len("<|begin_of_thought|>")
    # No tags at all (some 27B responses): everything is thinking.
    thoughts, seg = segment("A.\n\nWait, B.", delimiters=SKY_T1)
    assert [t.text for t in thoughts] == ["A.", "\n\nWait, B."] and seg.thinking_start == 0
    # Solution tag without an end-of-thought tag ends thinking too; a cut-off response ends at flush.
    thoughts, _ = segment("<|begin_of_thought|>A\n\nBut B<|begin_of_solution|>C", delimiters=SKY_T1)
    assert thoughts[-1].text == "\n\nBut B" and thoughts[-1].closed_by == "close"
    thoughts, _ = segment("<|begin_of_thought|>A\n\nBut B", delimiters=SKY_T1)
    assert thoughts[-1].closed_by == "flush"


def test_implicit_open_waits_for_a_possible_tag_prefix():
    d = Delimiters(open="<think>", close=("</think>",), implicit_open=True)
    for text in ["<think>x\n\nWait, y</think>", "  \n<think>x\n\nWait, y</think>", "x\n\nWait, y</think>"]:
        whole, seg = segment(text, delimiters=d)
        assert [t.text.strip() for t in whole] == ["x", "Wait, y"]
        chunked, _ = segment(text, [1] * len(text), delimiters=d)
        assert chunked == whole


DATA = Path(__file__).resolve().parents[3] / "data" / "reasoning_traces" / "sample.jsonl"


def test_real_traces_chunking_invariance():
    rng = random.Random(7)
    with open(DATA, encoding="utf-8") as f:
        items = [json.loads(line) for line in f][::6]  # 10 of the 60, every benchmark
    assert {it["benchmark"] for it in items} == {"aime24", "amc23", "math500"}
    for it in items:
        text = it["response"][:20000]
        whole, _ = segment(text, delimiters=SKY_T1)
        assert len(whole) > 1
        assert segment(text, random_chunks(rng, len(text), 16), delimiters=SKY_T1)[0] == whole
