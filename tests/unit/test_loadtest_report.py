"""loadtest/report.py: exact percentiles, goodput under TTFT/TPOT SLOs, errors by status, outputs."""
import csv
import json
import math
import sys

import pytest

from loadtest import report


def sample(start, ttft, e2e, tokens, itl=None, status=200, error=None):
    if itl is None and tokens > 1:
        itl = [(e2e - ttft) / (tokens - 1)] * (tokens - 1)
    return {"start": start, "end": start + e2e, "ttft": ttft, "e2e": e2e, "output_tokens": tokens,
            "prompt_tokens": 10, "itl": itl or [], "status": status, "error": error, "endpoint": "chat"}


def failed(start, status, error="HTTP 429: queue full"):
    return {"start": start, "end": start + 0.01, "ttft": None, "e2e": None, "output_tokens": 0, "prompt_tokens": None,
            "itl": [], "status": status, "error": error, "endpoint": "chat"}


def test_percentile_interpolates_between_order_statistics():
    assert report.percentile([4, 1, 3, 2], 50) == 2.5
    assert report.percentile(range(1, 11), 90) == pytest.approx(9.1)
    assert report.percentile(range(1, 11), 99) == pytest.approx(9.91)
    assert report.percentile([7], 99) == 7
    assert math.isnan(report.percentile([], 50))


def test_goodput_counts_requests_meeting_both_slos_per_second():
    samples = [
        sample(0.0, ttft=0.5, e2e=1.5, tokens=11),   # TPOT 0.1: meets both (boundaries are inclusive)
        sample(1.0, ttft=2.5, e2e=3.0, tokens=11),   # TTFT misses
        sample(2.0, ttft=0.2, e2e=4.2, tokens=11),   # TPOT 0.4 misses
        sample(3.0, ttft=0.1, e2e=0.1, tokens=1),    # one token: TPOT 0, meets
        failed(5.0, 429),
        failed(6.0, 429),
        failed(9.99, "stream_error", "stream error: engine died"),
    ]
    r = report.summarize(samples, slo_ttft=0.5, slo_tpot=0.1)
    assert r["window_s"] == pytest.approx(10.0)
    assert (r["requests"], r["succeeded"], r["failed"]) == (7, 4, 3)
    assert r["goodput_rps"] == pytest.approx(2 / 10)
    assert r["goodput_share"] == pytest.approx(2 / 7)
    assert r["requests_per_s"] == pytest.approx(4 / 10)
    assert r["output_tokens_per_s"] == pytest.approx(34 / 10)
    assert r["errors_by_status"] == {"429": 2, "stream_error": 1}
    assert r["error_examples"]["stream_error"] == "stream error: engine died"
    # Latencies only over successful requests; ITL pools every gap.
    assert r["latency"]["ttft"]["n"] == 4
    assert r["latency"]["ttft"]["p50"] == pytest.approx(0.35)
    assert r["latency"]["itl"]["n"] == 30
    assert r["latency"]["tpot"]["max"] == pytest.approx(0.4)
    assert r["latency"]["e2e"]["max"] == pytest.approx(4.2)


def test_no_samples_is_an_error():
    with pytest.raises(ValueError):
        report.summarize([], 1, 1)


def write_samples(path, samples):
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))


def test_main_writes_markdown_csv_and_png(tmp_path, capsys):
    samples = [sample(i * 0.5, ttft=0.1 + i * 0.01, e2e=1.0 + i * 0.1, tokens=20) for i in range(20)]
    write_samples(tmp_path / "samples.jsonl", samples)
    assert report.main([str(tmp_path / "samples.jsonl"), "--out", str(tmp_path / "out"), "--slo-ttft", "0.195",
                        "--fail-on-errors"]) == 0
    md = (tmp_path / "out" / "report.md").read_text()
    assert md == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "20 requests" in md and "| none | 0 | |" in md and "goodput" in md
    rows = {row["metric"]: float(row["value"]) for row in csv.DictReader(open(tmp_path / "out" / "report.csv"))}
    assert rows["requests"] == 20 and rows["failed"] == 0
    assert rows["ttft_p50"] == pytest.approx(report.percentile([0.1 + i * 0.01 for i in range(20)], 50))
    assert rows["goodput"] == pytest.approx(10 / rows["window"])  # TTFT <= 0.195 s: i = 0..9
    png = tmp_path / "out" / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # matplotlib is a dev dependency
    assert "![load test](report.png)" in md


def test_fail_on_errors_and_error_table(tmp_path, capsys):
    write_samples(tmp_path / "s.jsonl", [sample(0, 0.1, 1.0, 5), failed(0.5, 503, "HTTP 503: no | healthy engine")])
    assert report.main([str(tmp_path / "s.jsonl"), "--fail-on-errors"]) == 1
    md = (tmp_path / "report.md").read_text()
    assert "| 503 | 1 | HTTP 503: no \\| healthy engine |" in md
    assert report.main([str(tmp_path / "s.jsonl")]) == 0


def test_missing_matplotlib_is_reported_not_hidden(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    samples = [sample(0, 0.1, 1.0, 5)]
    r = report.summarize(samples, 1, 1)
    why = report.plot(samples, r, tmp_path / "p.png")
    assert "matplotlib is not installed" in why and not (tmp_path / "p.png").exists()
