"""The repository works from a bare clone: nothing tracked points outside it, and the data it ships is
the data its READMEs describe. (.ci/run runs the whole suite from a fresh clone in an empty folder.)"""
import hashlib
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Spelled in pieces so that this file does not match itself.
OUTSIDE = re.compile("|".join([r"\.\./" + "shared", "/" + "work/", r"parent\.parent\.parent"]))
DATASETS = ["wikitext2/valid.txt", "gsm8k/test500.jsonl", "reasoning_traces/sample.jsonl", "chat_eval/facts.jsonl",
            "chat_eval/prompts.jsonl",
            "openai/openapi-chat-completions.yaml"]


def tracked_text_files():
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in out.decode().split("\0"):
        p = ROOT / name
        if name and p.is_file() and not name.startswith("data/") and p.stat().st_size < 2_000_000:
            try:
                yield name, p.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue


def test_no_tracked_file_points_outside_the_repository():
    hits = [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
            for name, text in tracked_text_files() for m in OUTSIDE.finditer(text)]
    assert not hits, "paths outside the repository:\n" + "\n".join(hits)


@pytest.mark.parametrize("rel", DATASETS)
def test_shipped_data_matches_its_readme(rel):
    f = ROOT / "data" / rel
    readme = (f.parent / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith(f"| {f.name} |"))
    _, name, size, lines, sha, _ = [c.strip() for c in row.split("|")]
    data = f.read_bytes()
    assert int(size.replace(",", "")) == len(data)
    assert int(lines.replace(",", "")) == data.count(b"\n")
    assert sha == hashlib.sha256(data).hexdigest()
    for field in ("Source repo", "ommit", "icense", "elect"):  # provenance, license and selection rule
        assert field in readme, (rel, field)
