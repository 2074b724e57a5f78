"""`leanserve eval trim`: replay recorded reasoning traces through the trimming code.

Each trace's response is fed through the same ThoughtTrimmer (segmenter, rule verifier, policy)
the gateway uses. Reported per benchmark and consistency setting:
  * cut %: share of thinking tokens after the cut point (tokens estimated as chars/4, so this is
    the share of thinking characters);
  * acc trimmed: when cut, the answer the thinking had settled on (overthinking) or the latest
    answer it reached (max_thoughts / budget; none -> wrong); when not cut, the untrimmed answer;
  * acc untrimmed: the response's final answer (\\boxed{} of the solution, same extractor);
  * dataset acc: the traces' own `correct` flag (the original harness), for reference.
Thinking is the text between the thought tags; a response without an open tag (some 27B runs)
counts as thinking from its start up to a close/solution tag or its end, and a response cut off
by the length limit counts as thinking up to its end.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Optional

from .answers import answers_equal, final_answer, normalize
from .policy import ThoughtTrimmer, TrimConfig, estimate_tokens
from .rule_verifier import RuleVerifier
from .segment import SKY_T1

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TRACES = "data/reasoning_traces/sample.jsonl"  # relative to the repository root
SOLUTION_OPEN, SOLUTION_CLOSE = "<|begin_of_solution|>", "<|end_of_solution|>"
BENCHMARK_ORDER = ("aime24", "amc23", "math500")


def load_traces(path: str, limit: Optional[int] = None) -> list[dict]:
    items = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                items.append(json.loads(line))
            if limit is not None and len(items) >= limit:
                break
    return items


async def replay(item: dict, config: TrimConfig) -> dict:
    """One trace through the trimmer; what would have been cut and which answer results."""
    response = item["response"]
    trimmer = ThoughtTrimmer(config, RuleVerifier(), item.get("question"))
    d = await trimmer.feed(response)
    if not d.cut:
        d = await trimmer.finish()
    seg = trimmer.segmenter
    start = seg.thinking_start or 0
    end = seg.thinking_end if seg.thinking_end is not None else len(response)
    untrimmed = final_answer(response, SOLUTION_OPEN, SOLUTION_CLOSE)
    trimmed = d.answer if d.cut else untrimmed
    gold = item.get("gold_answer")
    cut_chars = max(0, end - d.keep_upto) if d.cut else 0
    return {
        "id": item.get("id"),
        "benchmark": item.get("benchmark", "?"),
        "thinking_tokens": estimate_tokens(end - start),
        "cut_tokens": estimate_tokens(cut_chars),
        "thinking_ended": seg.ended_by == "close",  # by a tag, not by the length limit
        "cut": d.cut,
        "reason": d.reason,
        "keep_upto": d.keep_upto,
        "answer_trimmed": trimmed,
        "answer_untrimmed": untrimmed,
        "gold": normalize(gold),
        "correct_trimmed": answers_equal(trimmed, gold),
        "correct_untrimmed": answers_equal(untrimmed, gold),
        "dataset_correct": bool(item.get("correct")),
    }


def summarize(rows: list[dict]) -> dict:
    n = len(rows)
    think = sum(r["thinking_tokens"] for r in rows)
    pct = lambda k: 100.0 * sum(bool(r[k]) for r in rows) / n if n else 0.0  # noqa: E731
    ended = [r for r in rows if r["thinking_ended"]]
    ended_think = sum(r["thinking_tokens"] for r in ended)
    reasons: dict[str, int] = {}
    for r in rows:
        if r["cut"]:
            reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
    out = {
        "n": n,
        "cut_pct_ended": 100.0 * sum(r["cut_tokens"] for r in ended) / ended_think if ended_think else 0.0,
        "reasons": reasons,
        "thinking_tokens": think,
        "cut_pct": 100.0 * sum(r["cut_tokens"] for r in rows) / think if think else 0.0,
        "traces_cut_pct": pct("cut"),
        "acc_untrimmed": pct("correct_untrimmed"),
        "acc_trimmed": pct("correct_trimmed"),
        "acc_dataset": pct("dataset_correct"),
        "flips_to_wrong": sum(r["correct_untrimmed"] and not r["correct_trimmed"] for r in rows),
        "flips_to_right": sum(r["correct_trimmed"] and not r["correct_untrimmed"] for r in rows),
    }
    out["delta_pp"] = out["acc_trimmed"] - out["acc_untrimmed"]
    return out


def by_benchmark(rows: list[dict]) -> dict[str, dict]:
    names = [b for b in BENCHMARK_ORDER if any(r["benchmark"] == b for r in rows)]
    names += sorted({r["benchmark"] for r in rows} - set(names))
    out = {b: summarize([r for r in rows if r["benchmark"] == b]) for b in names}
    out["all"] = summarize(rows)
    return out


def markdown(results: dict[int, dict[str, dict]]) -> str:
    head = (
        "| consistency | benchmark | n | thinking tokens (est.) | cut % | cut % (ended) | traces cut % "
        "| acc untrimmed % | acc trimmed % | Δ pp | flips -/+ | dataset acc % |\n"
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    lines = []
    for k, per in results.items():
        for b, s in per.items():
            lines.append(
                f"| {k} | {b} | {s['n']} | {s['thinking_tokens']:,} | {s['cut_pct']:.1f} "
                f"| {s['cut_pct_ended']:.1f} | {s['traces_cut_pct']:.1f} "
                f"| {s['acc_untrimmed']:.1f} | {s['acc_trimmed']:.1f} "
                f"| {s['delta_pp']:+.1f} | {s['flips_to_wrong']}/{s['flips_to_right']} | {s['acc_dataset']:.1f} |"
            )
    return head + "\n".join(lines)


async def evaluate(items: Iterable[dict], config: TrimConfig) -> list[dict]:
    return [await replay(it, config) for it in items]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--traces", default=DEFAULT_TRACES,
                   help="JSONL with response, gold_answer, benchmark, correct (relative paths resolve against the "
                        f"repository; default {DEFAULT_TRACES}, a sample of the Sky-T1 traces)")
    p.add_argument("--consistency", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument(
        "--max-thoughts", type=int, default=TrimConfig.max_thoughts,
        help="underthinking cut after N thoughts (0: off)",
    )
    p.add_argument("--thinking-budget", type=int, default=0, help="cut after N thinking tokens (0: off)")
    p.add_argument("--max-repeats", type=int, default=TrimConfig.max_repeats, help="loop cut (0: off)")
    p.add_argument("--min-thought-chars", type=int, default=TrimConfig.min_thought_chars)
    p.add_argument("--limit", type=int, default=None, help="only the first N traces")
    p.add_argument("--json", dest="json_out", default=None, help="write summaries and per-trace rows here")


def main(args: argparse.Namespace) -> int:
    traces = next((c for c in (Path(args.traces), REPO_ROOT / args.traces) if c.is_file()), None)
    if traces is None:
        print(f"leanserve: traces file {args.traces} not found (also tried {REPO_ROOT / args.traces})",
              file=sys.stderr)
        return 1
    items = load_traces(str(traces), args.limit)
    base = TrimConfig(
        max_thoughts=args.max_thoughts or None,
        thinking_budget=args.thinking_budget or None,
        max_repeats=args.max_repeats or None,
        min_thought_chars=args.min_thought_chars,
        delimiters=SKY_T1,
    )
    results, per_trace = {}, {}
    for k in args.consistency:
        rows = asyncio.run(evaluate(items, replace(base, consistency=k)))
        results[k], per_trace[k] = by_benchmark(rows), rows
    print(
        f"Thought trimming, rule verifier, {len(items)} traces from {traces}; "
        f"max_thoughts={base.max_thoughts}, thinking_budget={base.thinking_budget}, "
        f"max_repeats={base.max_repeats}, "
        f"min_thought_chars={base.min_thought_chars}; tokens estimated as chars/4.\n"
    )
    print(markdown(results))
    for k, per in results.items():
        print(f"\nconsistency {k}, cuts by reason (all): {per['all']['reasons']}")
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump({"config": vars(args), "summary": results, "traces": per_trace}, f, indent=1)
    return 0


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="python -m server.trimming.offline_eval", description=__doc__.split("\n")[0])
    add_arguments(_p)
    sys.exit(main(_p.parse_args()))
