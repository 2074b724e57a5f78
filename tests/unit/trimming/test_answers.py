import pytest

from server.trimming.answers import answers_equal, boxed_all, final_answer, normalize, thought_answer


@pytest.mark.parametrize(
    "a, b",
    [
        (r"\boxed{\dfrac{1}{2}}", "0.5"),
        ("0.5", "1/2"),
        (r"\tfrac12", "1/2"),
        (r"\frac9{19}", "9/19"),
        (r"-\frac{3}{4}", "-0.75"),
        (r"\boxed{25}", "025"),  # AIME answers are written with leading zeros
        ("2.0", "2"),
        ("1,000", "1000"),
        ("1{,}000", "1000"),
        ("$27$", "27"),
        (r"\$27", "27"),
        ("27 miles", "27"),
        (r"27\text{ miles}", "27"),
        (r"45^\circ", "45"),
        ("45°", "45"),
        ("45 degrees", "45"),
        (r"50\%", "50"),
        ("x = 5", "5"),
        (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
        (r"\text{east}", "east"),
        ("(E)", "E"),
        (r"x \in [-2, 7]", "[-2,7]"),
        (r"\sqrt2", r"\sqrt{2}"),
        (r"10^{2}", "10^2"),
        (r"\begin{pmatrix} \frac{1}{5} \\ -\frac{18}{5} \end{pmatrix}", r"\begin{pmatrix}1/5\\-18/5\end{pmatrix}"),
    ],
)
def test_equal_answers_normalise_equal(a, b):
    assert normalize(a) == normalize(b)
    assert answers_equal(a, b)


@pytest.mark.parametrize(
    "a, b",
    [("1/2", "1/3"), ("2", "-2"), ("25", "250"), (r"\sqrt{2}", "2"), ("1,2", "12"), ("(1,2)", "(2,1)"), ("3 and 4", "3")],
)
def test_different_answers_stay_different(a, b):
    assert not answers_equal(a, b)


def test_normalised_numbers_are_fractions():
    assert normalize(r"\boxed{\dfrac{1}{2}}") == "1/2"
    assert normalize("025") == "25"
    assert normalize("-0.75") == "-3/4"
    assert normalize(None) is None and normalize("  ") is None
    assert not answers_equal(None, None)


def test_boxed_with_nested_braces():
    text = r"so \boxed{\frac{\sqrt{3}}{2}} and then \boxed{ {a}_{1} }"
    assert boxed_all(text) == [r"\frac{\sqrt{3}}{2}", " {a}_{1} "]
    assert boxed_all(r"\boxed{unclosed") == []


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Therefore, the sum of the squares is 236.", "236"),
        ("Therefore, the answer is 27 miles.", "27"),
        ("So the final answer is: 12", "12"),
        ("Thus the answer is \\(\\frac{3}{4}\\).", "3/4"),
        ("So, \\( x = 5 \\).", "5"),
        ("Hence, the total is 5^2 + 7^2 + 9^2 + 9^2 = 25 + 49 + 81 + 81 = 236.", "236"),
        ("Thus, the area is:\n\n\\[\n\\frac{1}{2} \\times 3 \\times 4 = 6\n\\]", "6"),
        ("Now sum them: 1+4=5\nSo, the remainder when K is divided by 10 is 5.", "5"),
        ("Therefore, the answer is 236.\n\nYes, that checks out.", "236"),
        ("**Final Answer**\n\n\\[ \\boxed{3159} \\]", "3159"),
        ("a long derivation \\boxed{7} and a remark after it.", "7"),
    ],
)
def test_thought_answer_found(text, expected):
    assert thought_answer(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "So, the meeting point is 27 miles from A.",  # value not at the end
        "So, b cannot be 9.",  # negated
        "So if x = 2, then y is 5.",  # conditional
        "So the answer seems to be 12.",  # hedged
        "Maybe the answer is 12.",
        "Therefore, b < 9.",  # inequality
        "So the equation is \\( x^2 + y^2 = 25 \\).",  # an equation, not a value
        "Thus, a + b = 12.",
        "So, the list would be 3, 9, 9, 9.",
        "Let me compute 3+4 = 7.",  # no conclusion
        "The number 7 appears twice.",
        "Therefore, the answer is 301.\n\nWait, that doesn't match the earlier sum.",  # doubted afterwards
        "Therefore, the answer is 301. Is that right?",
        # A newer computation after the claim: the thought has moved on.
        "So, the time is 1.5 hours.\n\nThen, in that time, Alicia bikes 18 * 1.5 = 27 miles.",
        "So, the equation becomes: \\[\\frac{1}{7} = 7^{p} \\times 289\\]",  # relation in p
        "",
    ],
)
def test_thought_answer_none(text):
    assert thought_answer(text) is None


def test_only_the_last_sentences_count():
    early = "So the answer is 5.\n\n" + "Then we expand the product and collect terms.\n\n" * 3
    assert thought_answer(early) is None
    assert thought_answer(early, last_sentences=5) == "5"


def test_final_answer_prefers_the_solution_box():
    resp = (
        "<|begin_of_thought|>maybe \\boxed{3}<|end_of_thought|><|begin_of_solution|>"
        "so \\boxed{\\dfrac{1}{2}}<|end_of_solution|>"
    )
    assert final_answer(resp, "<|begin_of_solution|>", "<|end_of_solution|>") == "1/2"


def test_final_answer_without_tags():
    assert final_answer("work... **Final Answer** \\[ \\boxed{025} \\]") == "25"
    assert final_answer("lots of work.\n\nTherefore, the answer is 42.") == "42"
    # Last resort, as the traces' own harness: the last number.
    assert final_answer("we get 7 apples and 8 pears") == "8"
    assert final_answer("no numbers at all") is None
