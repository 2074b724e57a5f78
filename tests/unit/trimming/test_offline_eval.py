import json

import pytest

from server import cli
from server.trimming import offline_eval

B, E = "<|begin_of_thought|>", "<|end_of_thought|>"
SB, SE = "<|begin_of_solution|>", "<|end_of_solution|>"

# Overthinking: the answer 12 settles in thought 1 and thought 2; 3 more thoughts follow.
OVER = (
    B + "\n\nLet me count. So the answer is 12.\n\n"
    "Wait, let me recount the pairs one by one. So the answer is 12.\n\n"
    + "".join(f"Alternatively, think about case {i} in a completely different way here.\n\n" for i in range(3))
    + E + "\n\n" + SB + "The count is \\boxed{12}." + SE
)
# The answer changes late: thoughts say 3 and then 4; the solution says 4.
CHANGE = (
    B + "\n\nSo the answer is 3.\n\nBut the last case was missed, which adds one more. Therefore, the answer is 4."
    + E + SB + "\\boxed{4}" + SE
)
# No tags at all (like some 27B responses), no agreement; ends in plain prose.
PLAIN = "First compute 2+2.\n\nWait, that gives 4 apples.\n\nSo we have 4 apples in total"
# Cut off by the length limit in a loop: no answer at the end.
LOOP = B + "\n\nSo the answer is 9." + "\n\nWait, we need to reconsider the whole setup of the 3 cases here." * 5


def write(tmp_path, rows):
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


ROWS = [
    {"id": "a", "benchmark": "aime24", "question": "q", "response": OVER, "gold_answer": "012", "correct": True},
    {"id": "b", "benchmark": "amc23", "question": "q", "response": CHANGE, "gold_answer": "4", "correct": True},
    {"id": "c", "benchmark": "math500", "question": "q", "response": PLAIN, "gold_answer": "4", "correct": False},
    {"id": "d", "benchmark": "math500", "question": "q", "response": LOOP, "gold_answer": "9", "correct": False},
]


def test_main_prints_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "out.json"
    rc = cli.main(["eval", "trim", "--traces", write(tmp_path, ROWS), "--consistency", "1", "2", "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "| consistency | benchmark |" in table
    for b in ("aime24", "amc23", "math500", "all"):
        assert f"| 2 | {b} |" in table
    data = json.loads(out.read_text())
    rows2 = {r["id"]: r for r in data["traces"]["2"]}

    a = rows2["a"]
    assert a["cut"] and a["reason"] == "overthinking" and a["answer_trimmed"] == "12" and a["correct_trimmed"]
    kept = OVER.index("So the answer is 12.", OVER.index("Wait")) + len("So the answer is 12.")
    assert a["keep_upto"] == kept
    thinking = OVER.index(E) - len(B)
    assert a["thinking_tokens"] == -(-thinking // 4)
    assert a["cut_tokens"] == -(-(OVER.index(E) - kept) // 4)

    b = rows2["b"]
    assert not b["cut"] and b["answer_trimmed"] == "4" and b["correct_untrimmed"]

    c = rows2["c"]  # whole response is thinking; untrimmed answer = last number ("4 apples")
    assert not c["cut"] and c["thinking_tokens"] == -(-len(PLAIN) // 4) and c["correct_untrimmed"]
    assert not c["thinking_ended"]

    d = rows2["d"]  # loop cut; the answer reached before the loop is the forced one
    assert d["reason"] == "repetition" and d["answer_trimmed"] == "9" and d["correct_trimmed"]
    assert not d["correct_untrimmed"]  # its last number is not an answer

    summ = data["summary"]["2"]
    assert summ["aime24"]["n"] == 1 and summ["all"]["n"] == 4
    assert summ["all"]["acc_untrimmed"] == pytest.approx(75.0)
    assert summ["all"]["acc_trimmed"] == pytest.approx(100.0)
    assert summ["all"]["acc_dataset"] == pytest.approx(50.0)
    assert summ["all"]["flips_to_right"] == 1 and summ["all"]["flips_to_wrong"] == 0
    assert 0 < summ["all"]["cut_pct"] < 100

    # Consistency 1 cuts the late-changing trace at its first answer: a wrong early stop.
    rows1 = {r["id"]: r for r in data["traces"]["1"]}
    assert rows1["b"]["cut"] and rows1["b"]["answer_trimmed"] == "3" and not rows1["b"]["correct_trimmed"]
    assert data["summary"]["1"]["amc23"]["delta_pp"] == pytest.approx(-100.0)


def test_limit_and_max_thoughts(tmp_path, capsys):
    path = write(tmp_path, ROWS)
    cli.main(["eval", "trim", "--traces", path, "--limit", "1", "--consistency", "3", "--max-thoughts", "2"])
    table = capsys.readouterr().out
    assert "| 3 | aime24 | 1 |" in table and "amc23" not in table
    rows = offline_eval.asyncio.run(
        offline_eval.evaluate(
            offline_eval.load_traces(path, 1),
            offline_eval.TrimConfig(consistency=3, max_thoughts=2, delimiters=offline_eval.SKY_T1),
        )
    )
    assert rows[0]["reason"] == "max_thoughts"


def test_summarize_weights_by_tokens():
    rows = [
        dict(benchmark="x", thinking_tokens=100, cut_tokens=50, cut=True, reason="overthinking",
             correct_trimmed=True, correct_untrimmed=True, dataset_correct=True, thinking_ended=True),
        dict(benchmark="x", thinking_tokens=300, cut_tokens=0, cut=False, reason=None,
             correct_trimmed=False, correct_untrimmed=False, dataset_correct=True, thinking_ended=False),
    ]
    s = offline_eval.summarize(rows)
    assert s["cut_pct"] == pytest.approx(12.5)
    assert s["cut_pct_ended"] == pytest.approx(50.0)
    assert s["traces_cut_pct"] == pytest.approx(50.0)
    assert s["acc_trimmed"] == s["acc_untrimmed"] == pytest.approx(50.0)
    assert s["reasons"] == {"overthinking": 1}
