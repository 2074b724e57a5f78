"""Self-written chat data (kernels/self_chat.py): the user turn starts where the template puts a user message,
unfinished/blank/duplicate user turns are dropped, the real default model writes conversations that the
calibration reader takes, and `leanserve self-chat` writes them with clear errors."""
import json

import pytest
import torch
from transformers import AutoTokenizer

from kernels import self_chat as S
from kernels.calibration import calibration_ids, render_conversations
from kernels.perplexity import load_model
from kernels.model_prep import default_model_dir
from server.cli import main as cli


@pytest.fixture(scope="module")
def real():
    tok, model = load_model(str(default_model_dir()))
    return tok, model


def test_user_prefix_is_the_template_up_to_the_user_message():
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    prefix = S.user_prefix(tok)
    full = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False)
    assert full.startswith(prefix) and full[len(prefix):].startswith("Hi there")
    assert prefix.rstrip().endswith("user")  # SmolLM2: "...<|im_start|>user\n", after the default system prompt
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        S.user_prefix(tok)


def test_unfinished_blank_and_duplicate_user_turns_are_dropped(monkeypatch, real):
    tok, model = real
    users = iter([[("Hello?", True), ("cut off mid", False), ("", True), ("hello?", True)],
                  [("What is tea?", True), ("Hello?", True), ("x", False), ("Name a colour.", True)]])
    calls = []

    def fake(model, tokenizer, texts, max_new, sample, temperature, top_p, stop):
        calls.append((len(texts), sample))
        if sample and max_new == 7:
            return next(users)
        return [(f"answer {i}", i % 2 == 0) for i in range(len(texts))]

    monkeypatch.setattr(S, "_generate", fake)
    convs, st = S.self_chat(model, tok, 3, max_user_tokens=7, batch=4, progress=False)
    assert [c[0]["content"] for c in convs] == ["Hello?", "What is tea?", "Name a colour."]
    assert all([m["role"] for m in c] == ["user", "assistant"] for c in convs)
    assert st == {**st, "user_turns_sampled": 8, "unfinished": 2, "blank_or_duplicate": 3, "conversations": 3}
    assert calls == [(4, True), (1, False), (4, True), (2, False)]  # answers greedy, only for kept turns


def test_user_starts_are_cycled_and_held_out_questions_are_dropped(monkeypatch, real):
    tok, model = real
    prefix = S.user_prefix(tok)
    seen_texts = []

    def fake(model, tokenizer, texts, max_new, sample, temperature, top_p, stop):
        if not sample:
            return [("an answer ", True)] * len(texts)
        seen_texts.append(texts)
        return [(" the capital of France?", True), (" wrote Hamlet?", True), (" is tea made?", True)][:len(texts)]

    monkeypatch.setattr(S, "_generate", fake)
    convs, st = S.self_chat(model, tok, 2, batch=3, progress=False, user_starts=["What is", " Who ", "How"],
                            exclude=["What's the capital of France?", "Who wrote the play Romeo and Juliet?"])
    assert seen_texts[0] == [prefix + "What is", prefix + "Who", prefix + "How"]
    # "What is the capital of France?" is close to the first held-out question (Jaccard 5/7 >= 0.5)
    assert [c[0]["content"] for c in convs] == ["Who wrote Hamlet?", "How is tea made?"]
    assert [c[1]["content"] for c in convs] == ["an answer"] * 2
    assert st["excluded"] == 1
    assert S.near("who wrote the play romeo and juliet", [S._words("Who wrote the play Romeo and Juliet?")])
    assert not S.near("Who wrote Hamlet?", [S._words("Who wrote the play Romeo and Juliet?")])
    with pytest.raises(ValueError, match="blank"):
        S.self_chat(model, tok, 1, progress=False, user_starts=[" "])


def test_held_out_texts_reads_eval_files(tmp_path):
    from kernels.chat_quality import load_facts

    facts = S.held_out_texts("data/chat_eval/facts.jsonl")
    assert facts == [f["question"] for f in load_facts()]
    assert len(S.held_out_texts("data/chat_eval/prompts.jsonl")) == 24
    conv = tmp_path / "c.jsonl"
    conv.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi?"},
                                             {"role": "assistant", "content": "Hello."}]}) + "\n")
    assert S.held_out_texts(conv) == ["Hi?"]
    (tmp_path / "t.txt").write_text("one\n\n two \n")
    assert S.held_out_texts(tmp_path / "t.txt") == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"answer": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        S.held_out_texts(tmp_path / "bad.jsonl")


def test_a_model_that_never_ends_a_user_turn_is_an_error(monkeypatch, real):
    tok, model = real
    monkeypatch.setattr(S, "_generate", lambda m, t, texts, *a: [("never ends", False)] * len(texts))
    with pytest.raises(RuntimeError, match="rarely ends a user turn"):
        S.self_chat(model, tok, 2, batch=8, progress=False)


def test_bad_arguments_are_errors(real):
    tok, model = real
    for kw in ({"n": 0}, {"n": 1, "temperature": 0}, {"n": 1, "top_p": 1.5}, {"n": 1, "batch": 0}):
        with pytest.raises(ValueError):
            S.self_chat(model, tok, progress=False, **kw)


def test_the_default_model_writes_conversations_the_calibration_reads(tmp_path, real):
    tok, model = real
    side = tok.padding_side
    convs, st = S.self_chat(model, tok, 2, max_user_tokens=48, max_answer_tokens=12, batch=4, seed=3,
                            progress=False)
    again, _ = S.self_chat(model, tok, 2, max_user_tokens=48, max_answer_tokens=12, batch=4, seed=3,
                           progress=False)
    assert convs == again  # seeded
    assert tok.padding_side == side  # the caller's tokenizer is left as it was
    assert len(convs) == 2 and len({c[0]["content"] for c in convs}) == 2
    assert all(c[0]["content"].strip() and c[1]["content"].strip() for c in convs)
    assert all("<|im_end|>" not in c[0]["content"] + c[1]["content"] for c in convs)  # no special tokens
    out = tmp_path / "chat.jsonl"
    S.write_jsonl(convs, out)
    assert render_conversations(out) == convs
    ids = calibration_ids(tok, [str(out)]).tolist()
    one = tok(tok.apply_chat_template(convs[0], tokenize=False), add_special_tokens=False)["input_ids"]
    assert ids[:len(one)] == one
    # the greedy answer is what the model says to that user turn (the longest prompt: no padding in its batch)
    prompts = [tok.apply_chat_template(c[:1], tokenize=False, add_generation_prompt=True) for c in convs]
    k = max(range(2), key=lambda i: len(tok(prompts[i], add_special_tokens=False)["input_ids"]))
    prompt = prompts[k]
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        g = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(g[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() == convs[k][1]["content"]


def test_cli_writes_the_jsonl_and_refuses_bad_paths(tmp_path, capsys):
    m = str(default_model_dir())
    out = tmp_path / "c.jsonl"
    assert cli(["self-chat", m, str(out), "--n", "2", "--max-user-tokens", "48", "--max-answer-tokens", "8",
                "--batch", "4", "--quiet"]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 2 and all(len(x["messages"]) == 2 for x in lines)
    assert "wrote" in capsys.readouterr().out
    assert cli(["self-chat", m, str(out), "--n", "2", "--quiet"]) == 1
    assert "--force" in capsys.readouterr().err
    assert cli(["self-chat", m, str(tmp_path / "c.txt"), "--quiet"]) == 1
    assert ".jsonl" in capsys.readouterr().err
    assert cli(["self-chat", str(tmp_path / "nope"), str(tmp_path / "d.jsonl"), "--quiet"]) == 1
    assert "MODEL_DIR" in capsys.readouterr().err
    assert cli(["self-chat", m, str(tmp_path / "e.jsonl"), "--exclude", str(tmp_path / "missing.jsonl"),
                "--quiet"]) == 1
    assert "--exclude" in capsys.readouterr().err
    out = tmp_path / "s.jsonl"
    assert cli(["self-chat", m, str(out), "--n", "2", "--max-user-tokens", "32", "--max-answer-tokens", "8",
                "--batch", "4", "--user-start", "What is", "--exclude", "data/chat_eval/facts.jsonl", "--quiet"]) == 0
    assert all(json.loads(x)["messages"][0]["content"].startswith("What is") for x in out.read_text().splitlines())
