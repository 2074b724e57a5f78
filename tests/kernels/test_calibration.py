"""Calibration data for the 2:4 pruners (kernels/calibration.py): text files whole, .jsonl conversations (OpenAI
"messages" or GSM8K question/answer lines) through the default model's real chat template, several files in
order, and one clear error per malformed input."""
import json

import pytest
import torch
from transformers import AutoTokenizer

from kernels.calibration import calibration_ids, gsm8k_answer, render_conversations
from kernels.model_prep import default_model_dir, verify
from kernels.perplexity import REPO_ROOT, tokenize_file

GSM8K_LINE = {"question": "Janet has 3 apples and buys 4 more. How many does she have?",
              "answer": "She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"}
CHAT = {"messages": [{"role": "user", "content": "What is the capital of France?"},
                     {"role": "assistant", "content": "The capital of France is Paris."}]}


def write_jsonl(path, *lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    if not verify(default_model_dir()):
        pytest.fail("the default model is not prepared: run `leanserve prepare-model` (make test does)")
    return AutoTokenizer.from_pretrained(default_model_dir())


def test_gsm8k_answer_drops_calculator_annotations_and_states_the_result():
    assert gsm8k_answer(GSM8K_LINE["answer"]) == "She has 3 + 4 = 7 apples.\nThe answer is 7."
    first = json.loads((REPO_ROOT / "data/gsm8k/test500.jsonl").read_text().splitlines()[0])
    out = gsm8k_answer(first["answer"])
    assert "<<" not in out and "####" not in out and out.endswith("The answer is 18.")


def test_render_conversations_reads_both_shapes_and_skips_blank_lines(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", CHAT, "", GSM8K_LINE)
    convs = render_conversations(f)
    assert convs[0] == CHAT["messages"]
    assert convs[1] == [{"role": "user", "content": GSM8K_LINE["question"]},
                        {"role": "assistant", "content": "She has 3 + 4 = 7 apples.\nThe answer is 7."}]


@pytest.mark.parametrize("bad, message", [
    ({"text": "hello"}, "c.jsonl:2: neither a conversation"),
    ({"question": "q"}, "c.jsonl:2: neither a conversation"),
    ({"messages": []}, "c.jsonl:2: \"messages\" must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, "c.jsonl:2: \"messages\" must be a non-empty list"),
    ("[1, 2]", "c.jsonl:2: neither a conversation"),
    ("{not json", "c.jsonl:2: not JSON"),
])
def test_a_line_of_neither_shape_is_an_error_naming_its_line(tmp_path, bad, message):
    f = write_jsonl(tmp_path / "c.jsonl", CHAT, bad)
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        render_conversations(f)


def test_empty_files_are_errors(tmp_path, tokenizer):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="empty file"):
        render_conversations(tmp_path / "e.jsonl")
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(ValueError, match="empty file"):
        calibration_ids(tokenizer, tmp_path / "e.txt")
    with pytest.raises(ValueError, match="no calibration files"):
        calibration_ids(tokenizer, [])


def test_text_file_is_the_whole_text(tmp_path, tokenizer):
    f = tmp_path / "t.txt"
    f.write_text("The quick brown fox jumps over the lazy dog.\n" * 3)
    ids = calibration_ids(tokenizer, f)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert torch.equal(ids, tokenize_file(tokenizer, f))


def contains(stream: list[int], part: list[int]) -> bool:
    return any(stream[i:i + len(part)] == part for i in range(len(stream) - len(part) + 1))


def test_conversations_go_through_the_chat_template(tmp_path, tokenizer):
    f = write_jsonl(tmp_path / "c.jsonl", CHAT, GSM8K_LINE)
    ids = calibration_ids(tokenizer, str(f)).tolist()
    for msgs in render_conversations(f):
        one = tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
        assert contains(ids, one)
    start, end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids.count(start) == 6 and ids.count(end) == 6  # system (the template's default), user, assistant x 2
    assert "The answer is 7." in tokenizer.decode(ids) and "<<" not in tokenizer.decode(ids)


def test_several_files_are_concatenated_in_order(tmp_path, tokenizer):
    c = write_jsonl(tmp_path / "c.jsonl", CHAT)
    t = tmp_path / "t.txt"
    t.write_text("Some plain text.")
    mixed = calibration_ids(tokenizer, [c, t])
    assert torch.equal(mixed, torch.cat([calibration_ids(tokenizer, c), calibration_ids(tokenizer, t)]))


def test_conversations_need_a_chat_template(tmp_path, tokenizer):
    tok = AutoTokenizer.from_pretrained(default_model_dir())  # a copy: the fixture's is shared
    tok.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        calibration_ids(tok, write_jsonl(tmp_path / "c.jsonl", CHAT))
