"""Re-apply the current factual answer rule (kernels.chat_quality.fact_right) to the greedy replies stored in
result files, without generating anything again: greedy replies do not depend on the rule, only their
verdicts do. Reads the JSON that `python -m bench.pruning_quality` and `leanserve eval chat --json` write
(any object holding a "facts" list of {question, answers, dense_reply, model_reply}), prints the facts kept
before and after per row, and rewrites the files in place unless --dry-run.

  python -m bench.rescore_facts bench/figures/pruning_quality*.json [--dry-run]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kernels.chat_quality import score_facts


def _rows(obj):
    """Every object in `obj` (a result file's JSON) that holds a list of fact rows."""
    if isinstance(obj, dict):
        if isinstance(obj.get("facts"), list) and all(isinstance(r, dict) and "model_reply" in r for r in obj["facts"]):
            yield obj
        for v in obj.values():
            yield from _rows(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _rows(v)


def rescore(path: Path, write: bool) -> list[tuple[str, int, int, int]]:
    """(row label, facts kept before, after, dense right after) for each scored object in the file."""
    data = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for obj in _rows(data):
        before = obj.get("facts_kept")
        obj.update(score_facts(obj["facts"]))
        label = " ".join(str(obj[k]) for k in ("method", "calib") if obj.get(k)) or path.stem
        out.append((label, before, obj["facts_kept"], obj["facts_dense_right"]))
    if not out:
        raise ValueError(f"{path}: no factual-question results in it")
    if write:
        path.write_text(json.dumps(data, indent=1), encoding="utf-8")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.rescore_facts", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--dry-run", action="store_true", help="print the new counts, write nothing")
    a = ap.parse_args(argv)
    for path in a.files:
        try:
            rows = rescore(path, not a.dry_run)
        except (OSError, ValueError) as e:
            print(f"{path}: {e}", file=sys.stderr)
            return 1
        for label, before, after, dense in rows:
            print(f"{path.name}: {label}: facts kept {before} -> {after} (dense right on {dense})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
