"""SLO summary of a load test, from the per-request samples that loadtest/locustfile.py writes.

  python -m loadtest.report SAMPLES.jsonl [--out DIR] [--slo-ttft 2.0] [--slo-tpot 0.1] [--fail-on-errors]

Writes DIR/report.md, DIR/report.csv (metric,value,unit) and DIR/report.png (needs matplotlib), and
prints the Markdown. Definitions:
  window      first request sent → last request ended (wall clock)
  TPOT        per request: (e2e - TTFT) / (output tokens - 1); 0 for requests with at most one token
  goodput     requests that succeeded with TTFT <= --slo-ttft and TPOT <= --slo-tpot, per second of window
  requests/s  successful requests per second of window; output tokens/s likewise (engine-reported usage)
  ITL         every gap between consecutive token events, pooled over all successful requests
Percentiles are exact (linear interpolation between order statistics, as numpy's default).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import Counter
from pathlib import Path

QUANTILES = (50, 90, 99)


def percentile(values, q: float) -> float:
    """q-th percentile (0..100) of values, linear interpolation between order statistics."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution(values) -> dict:
    xs = list(values)
    d = {f"p{q}": percentile(xs, q) for q in QUANTILES}
    d["mean"] = sum(xs) / len(xs) if xs else math.nan
    d["max"] = max(xs) if xs else math.nan
    d["n"] = len(xs)
    return d


def load_samples(path) -> list[dict]:
    samples = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                samples.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not JSON: {e}") from None
    return samples


def succeeded(s: dict) -> bool:
    return s.get("error") is None and s.get("status") == 200


def tpot(s: dict) -> float:
    n = s.get("output_tokens") or 0
    return (s["e2e"] - s["ttft"]) / (n - 1) if n > 1 else 0.0


def summarize(samples: list[dict], slo_ttft: float, slo_tpot: float) -> dict:
    if not samples:
        raise ValueError("no samples: the load test recorded no request")
    ok = [s for s in samples if succeeded(s)]
    window = max(s["end"] for s in samples) - min(s["start"] for s in samples)
    if window <= 0:
        raise ValueError("the samples span no time")
    good = [s for s in ok if s["ttft"] <= slo_ttft and tpot(s) <= slo_tpot]
    out_tokens = sum(s.get("output_tokens") or 0 for s in ok)
    errors = Counter(str(s.get("status")) for s in samples if not succeeded(s))
    return {
        "requests": len(samples),
        "succeeded": len(ok),
        "failed": len(samples) - len(ok),
        "window_s": window,
        "requests_per_s": len(ok) / window,
        "output_tokens_per_s": out_tokens / window,
        "output_tokens": out_tokens,
        "prompt_tokens": sum(s.get("prompt_tokens") or 0 for s in ok),
        "slo_ttft_s": slo_ttft,
        "slo_tpot_s": slo_tpot,
        "goodput_rps": len(good) / window,
        "goodput_share": len(good) / len(samples),
        "latency": {
            "ttft": distribution(s["ttft"] for s in ok),
            "tpot": distribution(tpot(s) for s in ok),
            "itl": distribution(g for s in ok for g in s.get("itl") or ()),
            "e2e": distribution(s["e2e"] for s in ok),
        },
        "output_tokens_per_request": distribution(s.get("output_tokens") or 0 for s in ok),
        "errors_by_status": dict(sorted(errors.items())),
        "error_examples": {st: next(s.get("error") for s in samples if str(s.get("status")) == st and not succeeded(s))
                           for st in errors},
    }


def _ms(x: float) -> str:
    return "–" if math.isnan(x) else f"{x * 1000:.1f}"


def to_markdown(r: dict, title: str = "Load test") -> str:
    lines = [
        f"### {title}",
        "",
        f"{r['requests']} requests in {r['window_s']:.1f} s: {r['succeeded']} succeeded, {r['failed']} failed.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| goodput (TTFT ≤ {r['slo_ttft_s']:g} s and TPOT ≤ {r['slo_tpot_s'] * 1000:g} ms) "
        f"| {r['goodput_rps']:.2f} req/s ({r['goodput_share']:.1%} of requests) |",
        f"| requests/s (succeeded) | {r['requests_per_s']:.2f} |",
        f"| output tokens/s | {r['output_tokens_per_s']:.1f} |",
        f"| output tokens per request (mean / p50 / max) | {r['output_tokens_per_request']['mean']:.1f} / "
        f"{r['output_tokens_per_request']['p50']:.0f} / {r['output_tokens_per_request']['max']:.0f} |",
        "",
        "| latency (ms) | p50 | p90 | p99 | mean | max | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, label in (("ttft", "TTFT"), ("itl", "ITL"), ("tpot", "TPOT"), ("e2e", "E2E")):
        d = r["latency"][key]
        lines.append(f"| {label} | {_ms(d['p50'])} | {_ms(d['p90'])} | {_ms(d['p99'])} | {_ms(d['mean'])} "
                     f"| {_ms(d['max'])} | {d['n']} |")
    lines += ["", "| errors by status | count | example |", "|---|---|---|"]
    if r["errors_by_status"]:
        for status, count in r["errors_by_status"].items():
            example = (r["error_examples"].get(status) or "").replace("|", "\\|").replace("\n", " ")[:120]
            lines.append(f"| {status} | {count} | {example} |")
    else:
        lines.append("| none | 0 | |")
    return "\n".join(lines) + "\n"


def csv_rows(r: dict) -> list[tuple[str, float, str]]:
    rows = [
        ("requests", r["requests"], "count"), ("succeeded", r["succeeded"], "count"),
        ("failed", r["failed"], "count"), ("window", r["window_s"], "s"),
        ("requests_per_s", r["requests_per_s"], "1/s"), ("output_tokens_per_s", r["output_tokens_per_s"], "1/s"),
        ("output_tokens", r["output_tokens"], "count"), ("prompt_tokens", r["prompt_tokens"], "count"),
        ("slo_ttft", r["slo_ttft_s"], "s"), ("slo_tpot", r["slo_tpot_s"], "s"),
        ("goodput", r["goodput_rps"], "1/s"), ("goodput_share", r["goodput_share"], "ratio"),
    ]
    for key, d in r["latency"].items():
        rows += [(f"{key}_{stat}", d[stat], "s") for stat in ("p50", "p90", "p99", "mean", "max")]
    rows += [(f"output_tokens_per_request_{stat}", r["output_tokens_per_request"][stat], "count")
             for stat in ("p50", "mean", "max")]
    rows += [(f"errors_status_{status}", count, "count") for status, count in r["errors_by_status"].items()]
    return rows


def write_csv(r: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("metric", "value", "unit"))
        w.writerows(csv_rows(r))


def token_times(s: dict) -> list[float]:
    """Wall-clock times of a successful request's token events (start + TTFT + cumulative gaps)."""
    t = s["start"] + s["ttft"]
    times = [t]
    for gap in s.get("itl") or ():
        t += gap
        times.append(t)
    return times


def plot(samples: list[dict], r: dict, path: Path) -> str | None:
    """Writes the PNG; returns None, or why no plot was written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "PNG plot not written: matplotlib is not installed (pip install matplotlib)"
    ok = [s for s in samples if succeeded(s)]
    t0 = min(s["start"] for s in samples)
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    a = ax[0][0]
    a.scatter([s["start"] - t0 for s in ok], [s["ttft"] for s in ok], s=8, label="TTFT")
    a.scatter([s["start"] - t0 for s in ok], [s["e2e"] for s in ok], s=8, label="E2E")
    bad = [s for s in samples if not succeeded(s)]
    if bad:
        a.scatter([s["start"] - t0 for s in bad], [0] * len(bad), marker="x", color="red", label="failed")
    a.axhline(r["slo_ttft_s"], color="grey", ls="--", lw=1, label="TTFT SLO")
    a.set(xlabel="request sent (s)", ylabel="seconds", title="Per-request latency")
    a.legend()
    a = ax[0][1]
    secs = Counter(int(t - t0) for s in ok for t in token_times(s))
    xs = range(0, int(r["window_s"]) + 1)
    a.plot(list(xs), [secs.get(x, 0) for x in xs])
    a.set(xlabel="time (s)", ylabel="token events / s", title=f"Output rate (mean {r['output_tokens_per_s']:.0f} tok/s)")
    a = ax[1][0]
    for key, label in (("ttft", "TTFT"), ("e2e", "E2E")):
        vals = sorted(s[key] for s in ok)
        a.plot(vals, [(i + 1) / len(vals) for i in range(len(vals))], label=label)
    itl = sorted(g for s in ok for g in s.get("itl") or ())
    if itl:
        a.plot(itl, [(i + 1) / len(itl) for i in range(len(itl))], label="ITL")
    a.set(xscale="log", xlabel="seconds (log)", ylabel="share ≤ x", title="Latency CDFs")
    a.legend()
    a = ax[1][1]
    a.scatter([s["ttft"] for s in ok], [tpot(s) * 1000 for s in ok], s=8)
    a.axvline(r["slo_ttft_s"], color="grey", ls="--", lw=1)
    a.axhline(r["slo_tpot_s"] * 1000, color="grey", ls="--", lw=1)
    a.set(xlabel="TTFT (s)", ylabel="TPOT (ms)",
          title=f"SLO: goodput {r['goodput_rps']:.2f} req/s ({r['goodput_share']:.0%})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.report", description=__doc__.split("\n\n")[0])
    p.add_argument("samples", help="JSONL written by the locustfile (--samples-file)")
    p.add_argument("--out", default=None, help="folder for report.md/.csv/.png (default: the samples' folder)")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="TTFT SLO in seconds (default 2.0)")
    p.add_argument("--slo-tpot", type=float, default=0.1, help="TPOT SLO in seconds (default 0.1)")
    p.add_argument("--title", default="Load test")
    p.add_argument("--fail-on-errors", action="store_true", help="exit 1 if any request failed")
    args = p.parse_args(argv)
    out = Path(args.out or Path(args.samples).parent)
    out.mkdir(parents=True, exist_ok=True)
    samples = load_samples(args.samples)
    try:
        r = summarize(samples, args.slo_ttft, args.slo_tpot)
    except ValueError as e:
        print(f"report: {e}", file=sys.stderr)
        return 1
    md = to_markdown(r, args.title)
    why = plot(samples, r, out / "report.png")
    md += f"\n{why}\n" if why else "\n![load test](report.png)\n"
    (out / "report.md").write_text(md)
    write_csv(r, out / "report.csv")
    (out / "report.json").write_text(json.dumps(r, indent=2) + "\n")
    print(md)
    if why:
        print(f"report: {why}", file=sys.stderr)
    print(f"report: wrote {out / 'report.md'}, {out / 'report.csv'}" + ("" if why else f", {out / 'report.png'}"),
          file=sys.stderr)
    if args.fail_on_errors and r["failed"]:
        print(f"report: {r['failed']} of {r['requests']} requests failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
