"""Answer extraction and normalisation for thought trimming.

Precision beats recall: a thought only "reaches an answer" when it boxes one, says "the answer is
...", or ends on a conclusion sentence ("So/Therefore/Thus/Hence ... is X.") whose value is short
and sits at the end. A wrong agreement cuts a trace too early; a missed one only saves less.
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def boxed_all(text: str) -> list[str]:
    """Contents of every \\boxed{...} (nested braces allowed), in order."""
    out = []
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            out.append(text[m.end() : i - 1])
    return out


def last_boxed(text: str) -> Optional[str]:
    found = boxed_all(text)
    return found[-1] if found else None


# ---------------------------------------------------------------- normalisation

_UNIT_STOP = {"and", "or", "from", "to", "of", "in", "at", "for", "with", "is", "are", "if", "when"}
_NUM = r"-?(?:\d+(?:\.\d*)?|\.\d+)"


def _to_fraction(s: str) -> Optional[Fraction]:
    m = re.fullmatch(r"(-?)\\frac\{(" + _NUM + r")\}\{(" + _NUM + r")\}", s)
    if m:
        num, den = Fraction(m.group(2)), Fraction(m.group(3))
        return None if den == 0 else (-1 if m.group(1) else 1) * num / den
    m = re.fullmatch(r"(" + _NUM + r")/(" + _NUM + r")", s)
    if m:
        den = Fraction(m.group(2))
        return None if den == 0 else Fraction(m.group(1)) / den
    if re.fullmatch(_NUM, s):
        return Fraction(s)
    return None


def _strip_units(s: str) -> str:
    """'27 miles' -> '27', '5\\text{ cm}' -> '5'; keeps connectives like 'and'."""
    def unit_words(words: str) -> bool:
        ws = words.split()
        return 0 < len(ws) <= 2 and all(w.isalpha() and w.lower() not in _UNIT_STOP for w in ws)

    m = re.fullmatch(r"(.+?)\s*\\(?:text|mbox|mathrm|textbf)\{([^{}]*)\}(?:\^?\{?[23]\}?)?", s)
    if m and unit_words(m.group(2)):
        s = m.group(1)
    m = re.fullmatch(r"(" + _NUM + r")\s+([A-Za-z ]+?)(?:\^?[23])?", s)
    if m and unit_words(m.group(2)):
        s = m.group(1)
    return s


def normalize(ans: Optional[str]) -> Optional[str]:
    """Canonical string for an answer: equal answers give equal strings (numbers as p/q)."""
    if ans is None:
        return None
    s = ans.strip()
    inner = last_boxed(s)
    if inner is not None and re.match(r"\s*\\(?:boxed|fbox)", s):
        s = inner
    s = s.replace("\u2212", "-").replace("\\$", "").replace("$", "")
    s = re.sub(r"^\\[(\[]|\\[)\]]$", "", s.strip()).strip()
    s = re.sub(r"\\[()\[\]]", "", s)
    s = re.sub(r"\\(?:left|right|displaystyle|!|,|;|:|quad|qquad)(?![A-Za-z])", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)  # \frac12
    s = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", s)  # \frac9{19}
    s = re.sub(r"\\frac\{(-?\d+)\}\{(\d+)\}", r"\1/\2", s)  # also inside tuples, matrices
    s = re.sub(r"\\sqrt\s*(\d+)", r"\\sqrt{\1}", s)
    s = re.sub(r"\^\s*\{?\\circ\}?|°|\\degree|\s*degrees?\b", "", s)
    s = s.replace("\\%", "").replace("%", "").replace("{,}", ",")
    s = re.sub(r"(?<!\\)\\ ", " ", s)  # "\ " is a space, "\\" a row break
    s = s.strip().rstrip(".").strip()
    s = _strip_units(s)
    m = re.fullmatch(r"\\(?:text|mbox|mathrm|textbf)\{([^{}]*)\}", s)
    if m:  # a text answer like \text{east}
        s = m.group(1).strip().lower()
    s = re.sub(r"^(?:[A-Za-z]|\\[a-z]+)(?:_\{?\w+\}?)?\s*=\s*(?=\S)", "", s)  # "x = 5" -> "5"
    s = re.sub(r"^[A-Za-z]\s*\\in\s*", "", s)  # "x \in [-2, 7]"
    m = re.fullmatch(r"\(?([A-Ea-e])\)?", s)
    if m:  # a multiple-choice letter
        return m.group(1).upper()
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"([\^_])\{(\w)\}", r"\1\2", s)
    frac = _to_fraction(s)
    if frac is not None:
        return str(frac)
    return s or None


def answers_equal(a: Optional[str], b: Optional[str]) -> bool:
    na, nb = normalize(a), normalize(b)
    return na is not None and na == nb


# ---------------------------------------------------------------- extraction from a thought

_CONCLUDE = re.compile(
    r"^\W*(?:so|therefore|thus|hence|finally|consequently|in conclusion|this means|"
    r"that means|which means|this gives|that gives)\b",
    re.I,
)
# Hedged, negated or conditional sentences do not settle anything.
_HEDGE = re.compile(
    r"\b(?:not|no|cannot|never|if|maybe|perhaps|might|could|suppose|assume|assuming|unless|"
    r"whether|wrong|incorrect|contradict\w*|seems?|probably|likely|guess|approximately|about|"
    r"around|roughly|check|verify|let's|let)\b|n't\b|\?",
    re.I,
)
# A later sentence that doubts what came before voids it.
_DOUBT = re.compile(
    r"\b(?:wait|wrong|mistake|incorrect|error|contradict\w*|not|doesn't|isn't|can't|cannot)\b|\?", re.I
)
_ANSWER_IS = re.compile(
    r"\b(?:final answer|answer)\s*(?:is|would be|should be|will be|must be|:|=)\s*:?\s*(?P<v>.+)$", re.I
)
# Greedy: the value follows the last verb of the sentence.
_VERB_VALUE = re.compile(r"^.*\s(?:is|are|equals|be|becomes|gives|get|got)\s*:?\s*(?P<v>\S.*)$", re.I)
_AFTER_CONCLUDE = re.compile(_CONCLUDE.pattern + r",?\s*(?P<v>\S.*)$", re.I)
# A value worth comparing: one math block, one short expression, or a number with a unit.
_MATH_BLOCK = re.compile(r"\\\((?P<a>.+?)\\\)|\\\[(?P<b>.+?)\\\]|\$\$(?P<c>.+?)\$\$|\$(?P<d>[^$]+)\$", re.S)
_SIMPLE = re.compile(r"-?[\w\\{}^/.+\-*()=]+|" + _NUM + r"(?:\s+[A-Za-z]+){0,2}")


def _value(raw: str) -> Optional[str]:
    """The answer in the tail of a conclusion sentence, or None if it is not a single short value."""
    v = raw.strip().rstrip(".!;, ").strip()
    if "=" in v:
        v = _right_of_equals(v)
        # "... = 2y + 1": a relation between unknowns, not a value.
        if v is None or re.search(r"[A-Za-z]", re.sub(r"\\[A-Za-z]+", "", v)):
            return None
    if not v or len(v) > 60 or not _SIMPLE.fullmatch(v):
        return None
    if re.search(r"[<>≤≥]|\\(?:[lg]eq?|approx|neq|pm|sim)(?![A-Za-z])", v):
        return None
    return v if re.search(r"\d", v) else None  # numeric content keeps prose ("is odd") out


def _right_of_equals(v: str) -> Optional[str]:
    """'5^2 + 7^2 = 74' -> '74'; 'x = 5' -> '5'; '5 sets * 6 = 30' -> '30';
    an equation between variables such as 'x^2 + y^2 = 25' -> None."""
    parts = [p.strip() for p in v.split("=")]
    for p in parts[:-1]:
        if re.fullmatch(r"(?:[A-Za-z]|\\[A-Za-z]+)(?:_\{?\w+\}?)?(?:\([^()]*\))?", p):
            continue  # one variable: "x = 5", "f(2) = 7"
        # Otherwise only numbers, operators and words (units) may stand left of "=".
        bare = re.sub(r"\\[A-Za-z]+|[A-Za-z]{2,}", "", p)
        if re.search(r"[A-Za-z]", bare):
            return None
    return parts[-1] or None


_DISPLAY = re.compile(r"\s*\n\s*(\\\[.+?\\\]|\$\$.+?\$\$)", re.S)


def _sentences(tail: str) -> list[str]:
    r"""Sentences of the text; a line break ends a sentence, except before display math, which
    belongs to the line that introduces it ("the answer is:\n\n\[ 5 \]")."""
    tail = _DISPLAY.sub(lambda m: " " + m.group(1), tail)
    # Each math block becomes one token: its content without spaces.
    tail = _MATH_BLOCK.sub(lambda m: re.sub(r"\s+", "", next(g for g in m.groups() if g)), tail)
    out = []
    for line in tail.split("\n"):
        out += [p.strip() for p in re.split(r"(?<=[.!?])\s+(?=[A-Z*\\])", line) if p.strip()]
    return out


def _claim(sent: str) -> Optional[re.Match]:
    """Where the value of an answer statement starts, or None if the sentence claims nothing."""
    m = _ANSWER_IS.search(sent)
    if m is None and _CONCLUDE.search(sent):
        m = _VERB_VALUE.search(sent) or (_AFTER_CONCLUDE.search(sent) if "=" in sent else None)
    return m


def thought_answer(text: str, last_sentences: int = 2) -> Optional[str]:
    """Normalised answer a thought reaches, or None.

    A \\boxed{} anywhere in the thought, else an answer statement among its last sentences:
    "the answer is X" or a conclusion ("So/Therefore/...") ending in a value. Only the latest
    sentence with a number counts: if it is hedged, unreadable or no claim (a new computation),
    or a later sentence doubts it, the thought reaches no answer.
    """
    boxed = last_boxed(text)
    if boxed is not None:
        return normalize(boxed)
    tail = text[-600:]
    if len(text) > 600 and "\n" in tail:  # start at a line so math delimiters pair up
        tail = tail[tail.index("\n") :]
    for sent in reversed(_sentences(tail)[-last_sentences:]):
        sent = sent.replace("**", "")
        m = _claim(sent)
        if m is None or not re.search(r"\d", m.group("v")):
            if _DOUBT.search(sent) or re.search(r"\d", sent):
                return None  # doubt, or a newer number than any claim before it
            continue  # no number ("So, this checks out."): look one sentence back
        if _HEDGE.search(sent[: m.start("v")]):
            return None
        v = _value(m.group("v"))
        return normalize(v) if v is not None else None
    return None


def final_answer(response: str, solution_open: str = "", solution_close: str = "") -> Optional[str]:
    """Final answer of a whole response: the \\boxed{} of its solution section, else the last
    \\boxed{} anywhere, else an answer statement at its end, else (as the original evaluation
    harness of the traces does) its last number."""
    sol = response
    if solution_open and solution_open in response:
        sol = response.split(solution_open)[-1]
        if solution_close:
            sol = sol.split(solution_close)[0]
        boxed = last_boxed(sol)
        if boxed is not None:
            return normalize(boxed)
    boxed = last_boxed(response)
    if boxed is not None:
        return normalize(boxed)
    stated = thought_answer(sol)
    if stated is not None:
        return stated
    numbers = re.findall(r"-?\d*\.?\d+", sol.replace(",", ""))
    return normalize(numbers[-1]) if numbers else None
