"""`leanserve eval chat` (kernels/chat_quality.py): the answer-match rule, the shipped prompts and questions, and
the whole evaluation on the real default model against itself (answer perplexity ratio exactly 1, every
question the dense model gets right kept), with the dense answers cached in a file and in memory.

Run time: about 20 s on 2 shared cores (2 prompts x 8 tokens, 2 questions, one torch thread)."""
import json

import pytest

from kernels import chat_quality as C
from kernels.model_prep import default_model_dir, verify
from kernels.perplexity import load_model
from server import cli
from tests.support.hf import one_thread


@pytest.mark.parametrize("reply, answers, right", [
    ("The capital of France is Paris.", ["Paris"], True),
    ("the capital of france is PARIS", ["Paris"], True),
    ("Parisian cafés are famous.", ["Paris"], False),
    ("It is Lyon.", ["Paris"], False),
    ("2 plus 2 is 4.", ["4"], True),
    ("The answer is 14.", ["4"], False),
    ("The answer is 4.5.", ["4"], False),
    ("About 1,400 of them.", ["4"], False),
    ("It is (4)!", ["4"], True),
    ("There are four of them.", ["4"], False),
    ("There are four of them.", ["4", "four"], True),
    ("Written by William\n  Shakespeare.", ["William Shakespeare"], True),
    ("Water is H2O.", ["H2O", "H₂O"], True),
    ("Jane Austen wrote it.", ["Bronte", "Austen"], True),
    ("", ["Paris"], False),
])
def test_answer_matches_on_word_boundaries(reply, answers, right):
    assert C.answer_matches(reply, answers) is right


@pytest.mark.parametrize("reply, answers, question, right", [
    ("The capital of France is Paris.", ["Paris"], "What is the capital of France?", True),
    ("The capital of France is France.", ["Paris"], "What is the capital of France?", False),
    ("Half of 10 is 5.", ["5", "five"], "What is half of 10?", True),
    ("Half of ten is five.", ["5", "five"], "What is half of 10?", True),
    ("Half of 10 is 10/2 = 5/2 = 2/4.", ["5", "five"], "What is half of 10?", False),
    ("A day is 36 hours.\nA week is 24 hours.", ["24", "twenty-four"], "How many hours are in a day?", False),
    ("A day is made of hours. So, a day is twenty-four hours.", ["24", "twenty-four"], "How many hours?", True),
    ("A day is made of hours. So, a day is 24 hours. A week is 168 hours.", ["24"], "How many hours?", True),
    ("A triangle has 3 sides, so it has 3 * 3 = 9 sides.", ["3", "three"], "How many sides?", False),
    ("3 times 3 is 9.33.33.33", ["9", "nine"], "What is 3 times 3?", False),
    ("2 + 2 = 4", ["4", "four"], "What is 2 plus 2?", True),
    ("Water boils at 100%.", ["100", "one hundred"], "At how many degrees?", False),
    ("Water boils at one hundred degrees.", ["100", "one hundred"], "At how many degrees?", True),
    ("It is one of the 7 days.", ["7", "seven"], "How many days are in a week?", True),
    ("The answer is 2 + 2.", ["4", "four"], "What is 2 plus 2?", False),
])
def test_fact_right_commits_to_the_first_number(reply, answers, question, right):
    assert C.fact_right(reply, answers, question) is right


def test_score_facts_counts_only_what_the_dense_model_gets_right():
    rows = [{"question": "What is 2 plus 2?", "answers": ["4"], "dense_reply": "It is 4.", "model_reply": "4."},
            {"question": "What is 3 times 3?", "answers": ["9"], "dense_reply": "It is 6.", "model_reply": "9"},
            {"question": "Capital of Japan?", "answers": ["Tokyo"], "dense_reply": "Tokyo.", "model_reply": "Japan."}]
    assert C.score_facts(rows) == {"facts_n": 3, "facts_dense_right": 2, "facts_kept": 1, "facts_model_right": 2}
    assert [r["model_right"] for r in rows] == [True, True, False]


def test_shipped_prompts_and_facts_load():
    prompts, facts = C.load_prompts(), C.load_facts()
    assert len(prompts) == 24 and all(p[-1]["role"] == "user" for p in prompts)
    assert len(facts) == 16 and all(f["answers"] for f in facts)
    # An echoed question must not count as right.
    assert not any(C.answer_matches(f["question"], f["answers"]) for f in facts)
    assert not any(C.fact_right(f["question"], f["answers"], f["question"]) for f in facts)


@pytest.mark.parametrize("line, message", [
    ({"prompt": 3}, "p.jsonl:1: need"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "ending with a user"),
])
def test_malformed_prompts_are_errors(tmp_path, line, message):
    (tmp_path / "p.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=message):
        C.load_prompts(tmp_path / "p.jsonl")


@pytest.mark.parametrize("line", [{"question": "q"}, {"question": "q", "answers": []}, {"question": "q", "answers": [""]}])
def test_malformed_facts_are_errors(tmp_path, line):
    (tmp_path / "f.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(ValueError, match="f.jsonl:1: need"):
        C.load_facts(tmp_path / "f.jsonl")


@pytest.fixture(scope="module")
def dense():
    if not verify(default_model_dir()):
        pytest.fail("the default model is not prepared: run `leanserve prepare-model` (make test does)")
    return load_model(default_model_dir())


def small_set():
    facts = [f for f in C.load_facts() if f["question"] in ("What is the capital of France?", "What is 2 plus 2?")]
    return C.load_prompts()[:2], facts


def test_dense_against_itself_with_a_file_cache(dense, tmp_path):
    tok, model = dense
    prompts, facts = small_set()
    cache = tmp_path / "dense.json"
    with one_thread():
        r = C.chat_quality(model, tok, model, tok, prompts, facts, max_new_tokens=8, cache=cache)
        again = C.chat_quality(model, tok, model, tok, prompts, facts, max_new_tokens=8, cache=cache)
    assert r["dense_cache"] == "generated" and again["dense_cache"] == "used" and again["dense_facts_cache"] == "used"
    assert r["answer_ppl_ratio"] == 1.0 and r["answer_ppl"] == r["answer_ppl_dense"] > 1.0
    assert r["n_prompts"] == 2 and 2 <= r["answer_tokens"] <= 16
    assert r["facts_n"] == 2 and r["facts_dense_right"] == 2 and r["facts_kept"] == r["facts_dense_right"]
    assert "Paris" in r["facts"][0]["dense_reply"] and r["facts"][0]["model_reply"] == r["facts"][0]["dense_reply"]
    for key in ("answer_ppl", "answer_tokens", "facts_kept", "facts"):
        assert again[key] == r[key], key
    stored = json.loads(cache.read_text())
    assert stored["max_new_tokens"] == 8 and [a["messages"] for a in stored["answers"]] == prompts
    # Another budget is another entry: the file no longer matches and is regenerated.
    with one_thread():
        assert C.dense_answers(model, tok, prompts, 4, cache)[1] == "generated"


def test_memory_cache_is_per_dense_model_and_weights(dense):
    tok, model = dense
    prompts, _ = small_set()
    with one_thread():
        first, how = C.dense_answers(model, tok, prompts[:1], 4)
        second, how2 = C.dense_answers(model, tok, prompts[:1], 4)
        assert (how, how2) == ("generated", "used") and second == first
        w = model.model.layers[0].mlp.down_proj.weight
        saved = w.detach().clone()
        try:
            w.data.zero_()  # changed in place (as pruning does): no stale answers
            assert C.dense_answers(model, tok, prompts[:1], 4)[1] == "generated"
        finally:
            w.data.copy_(saved)
        assert C.dense_answers(model, tok, prompts[:1], 4, cache=None)[1] == "generated"


def test_cache_path_keys(tmp_path):
    p1, p2 = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    p1.write_text('{"prompt": "a"}\n')
    p2.write_text('{"prompt": "b"}\n')
    d = default_model_dir()
    keys = {C.dense_cache_path(d, p1, 96), C.dense_cache_path(d, p2, 96), C.dense_cache_path(d, p1, 95)}
    assert len(keys) == 3 and all(k.parent.name == "chat_eval" for k in keys)


def test_cli(dense, tmp_path, monkeypatch, capsys):
    model_dir = str(default_model_dir())
    monkeypatch.setenv("LEANSERVE_HOME", str(tmp_path / "home"))  # the answers cache
    prompts, facts = small_set()
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p[0]["content"]}) + "\n" for p in prompts[:1]))
    (tmp_path / "f.jsonl").write_text("".join(json.dumps(f) + "\n" for f in facts))
    argv = ["eval", "chat", model_dir, "--dense", model_dir, "--prompts", str(tmp_path / "p.jsonl"),
            "--facts", str(tmp_path / "f.jsonl"), "--max-new-tokens", "4", "--threads", "1", "--quiet",
            "--json", str(tmp_path / "out.json")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "dense answers: generated, cached in" in out and "ratio 1.0000" in out
    assert "the model keeps 2 of 2" in out and "wrong:" not in out
    assert cli.main(argv) == 0
    assert "dense answers: cache used" in capsys.readouterr().out
    r = json.loads((tmp_path / "out.json").read_text())
    assert r["answer_ppl_ratio"] == 1.0 and len(r["facts"]) == 2 and r["facts"][1]["model_reply"]
    assert list((tmp_path / "home" / "chat_eval").glob("dense-*.json"))


def test_cli_errors(tmp_path, capsys):
    assert cli.main(["eval", "chat", str(tmp_path), "--dense", str(tmp_path)]) == 1
    assert "no config.json" in capsys.readouterr().err
    assert cli.main(["eval", "chat", str(tmp_path), "--dense", str(tmp_path), "--prompts", "nope.jsonl"]) == 1
    assert "nope.jsonl not found" in capsys.readouterr().err


def test_rescore_facts_rewrites_stored_verdicts(tmp_path, capsys):
    """bench.rescore_facts re-applies fact_right to stored replies (a pruning_quality-shaped file) and
    refuses a file with no factual results."""
    from bench import rescore_facts
    rows = [{"question": "How many hours are in a day?", "answers": ["24"], "dense_reply": "It has 24 hours.",
             "dense_right": True, "model_reply": "A day is 36 hours. A week is 24 hours.", "model_right": True}]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"rows": [{"method": "armor", "calib": "chat", "facts_kept": 1, "facts": rows}]}))
    assert rescore_facts.main([str(path), "--dry-run"]) == 0
    assert json.loads(path.read_text())["rows"][0]["facts_kept"] == 1  # dry run: untouched
    assert rescore_facts.main([str(path)]) == 0
    row = json.loads(path.read_text())["rows"][0]
    assert (row["facts_kept"], row["facts_dense_right"], row["facts"][0]["model_right"]) == (0, 1, False)
    assert "armor chat: facts kept 1 -> 0" in capsys.readouterr().out
    (tmp_path / "empty.json").write_text("{}")
    assert rescore_facts.main([str(tmp_path / "empty.json")]) == 1
