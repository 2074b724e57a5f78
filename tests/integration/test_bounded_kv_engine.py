"""The bounded KV cache on the real vLLM CPU engine with the default model and its shipped gates (fp32):

* start-up: vLLM's own log reports the bounded capacity (max concurrency ~ one ring page per request);
* exactness: greedy tokens equal kernels/retention/llama.BoundedLM (the HF reference eviction) for 10
  prompts, each generating past several compactions, one with a long prompt prefilled in chunks;
* stock equality: sequences that never fill the ring give exactly stock vLLM's tokens;
* metrics: vLLM's /metrics shows the KV tokens held vs the unbounded equivalent and the budget;
* an unsupported engine setting (prefix caching) stops the engine at start with one line.

Engines are started the way `leanserve serve --kv-budget` starts its embedded one, one at a time
(own_engine: after the shared engine is stopped). Sizes are small on purpose (2-core CI): budget
M = 64, buffer 32 -> ring C = 96, so 160 generated tokens cross 3+ compactions.
"""
import collections
import concurrent.futures as cf
import shlex

import httpx
import pytest

from kernels.model_prep import default_model_dir, verify
from kernels.vllm_plugin.bounded_kv.config import engine_args
from tests.support import engines
from tests.support.hf import GREEDY_PROMPTS, engine_greedy_mismatches, first_difference, one_thread
from tests.support.servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.own_engine]

NAME = "smollm2-bounded"
M, B = 64, 32
GEN = 160          # generated tokens per exactness prompt: >= 3 compactions for a 10-token prompt
STOCK_GEN = 40     # prompt + 40 <= M: nothing is ever evicted
BATCH = 64         # --max-num-batched-tokens: the long prompt is prefilled in chunks (multi-round plans)
PROMPTS = GREEDY_PROMPTS[:9]


def long_prompt(tok) -> list[int]:
    from kernels.retention.cli import REPO_ROOT
    text = (REPO_ROOT / "data/wikitext2/valid.txt").read_text()[:4000]
    return tok(text, add_special_tokens=False)["input_ids"][:200]


@pytest.fixture(scope="module")
def prompt_ids():
    if not verify(default_model_dir()):
        pytest.fail("the default model is not prepared: run `leanserve prepare-model` (make test does)")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    ids = {p: tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS}
    ids["<wikitext, 200 tokens>"] = long_prompt(tok)
    return ids


@pytest.fixture(scope="module")
def reference(prompt_ids):
    """BoundedLM greedy tokens (HF fp32, the shipped gates, sinks from gates.json), before any engine starts."""
    import torch
    from transformers import AutoModelForCausalLM

    from kernels.retention.gate import GateSet
    from kernels.retention.llama import BoundedLM, Parts
    from kernels.retention.reference import BoundedCache, RetentionPolicy
    from kernels.vllm_plugin.bounded_kv.config import shipped_gates

    gates = GateSet.load(shipped_gates(default_model_dir()))
    parts = Parts(AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval())
    out = {}
    with one_thread():
        for label, ids in prompt_ids.items():
            lm = BoundedLM(parts, BoundedCache(parts.num_layers, M, B, RetentionPolicy(sinks=gates.meta.sinks)), gates)
            out[label] = lm.generate(torch.tensor(ids), GEN)
    return out


def start(extra: str):
    return engines.start_engine(default_model_dir(), NAME, extra)


def bounded_extra(more: str = "") -> str:
    base = f"--max-model-len 1024 --max-num-batched-tokens {BATCH} {more}".strip()
    return base + " " + shlex.join(engine_args(default_model_dir(), M, B, extra_args=base))


@pytest.fixture(scope="module")
def stock_tokens(prompt_ids, reference, exclusive_engine):
    eng = start(f"--max-model-len 1024 --max-num-batched-tokens {BATCH} --no-enable-prefix-caching")
    try:
        eng.wait_healthy(600)
        out = {}
        with httpx.Client(base_url=eng.url, timeout=600) as c:
            for p in PROMPTS:
                out[p] = complete(c, prompt_ids[p], STOCK_GEN)
        yield out
    finally:
        eng.stop()


@pytest.fixture(scope="module")
def engine(stock_tokens, tmp_path_factory):
    import os
    metrics_dir = tmp_path_factory.mktemp("prom")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)  # as `leanserve serve --kv-budget` sets it
    try:
        eng = start(bounded_extra())
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
    try:
        eng.wait_healthy(600)
        yield eng
    finally:
        eng.stop()


def complete(client, ids, n):
    r = client.post("/v1/completions", json={"model": NAME, "prompt": ids, "max_tokens": n, "temperature": 0,
                                             "ignore_eos": True, "return_token_ids": True})
    r.raise_for_status()
    return r.json()["choices"][0]["token_ids"]


def test_startup_log_reports_the_bounded_capacity(engine):
    log = "\n".join(engine.tail)
    assert f"bounded KV cache: budget M={M}, buffer {B}, ring C={M + B} tokens" in log, log[-3000:]
    conc = float(log.split("Maximum concurrency for 1,024 tokens per request: ")[1].split("x")[0].replace(",", ""))
    # One ring page per request: C slots of K+V (+ 8 B side tables per slot-head) vs 1024 tokens of K+V.
    # VLLM_CPU_KVCACHE_SPACE=4 GiB / (30 layers x 3 heads x 96 x (512 + 8) B) = 954 requests.
    assert 900 < conc < 1000, conc


def test_greedy_equals_the_reference_eviction(engine, prompt_ids, reference):
    mismatches = engine_greedy_mismatches(engine.url, NAME, prompt_ids, [reference[p] for p in prompt_ids])
    assert not mismatches, "\n".join(mismatches)


def test_without_eviction_equals_stock_vllm(engine, prompt_ids, stock_tokens):
    with httpx.Client(base_url=engine.url, timeout=600) as c:
        diffs = [f"{p!r}: {d}" for p in PROMPTS
                 if (d := first_difference(complete(c, prompt_ids[p], STOCK_GEN), stock_tokens[p]))]
    assert not diffs, "\n".join(diffs)


def test_concurrent_requests_and_metrics(engine, prompt_ids):
    """8 requests at once (rings compacted in the same steps, blocks reused afterwards), then /metrics."""
    with httpx.Client(base_url=engine.url, timeout=600) as c, cf.ThreadPoolExecutor(8) as ex:
        outs = list(ex.map(lambda p: complete(c, prompt_ids[p], 120), PROMPTS[:8]))
        assert all(len(o) == 120 for o in outs)
        text = c.get("/metrics").text
    values = {}
    for line in text.splitlines():
        if line.startswith("leanserve_kv_"):
            name, _, v = line.rpartition(" ")
            values[name.split("{")[0]] = float(v)
    assert values.get("leanserve_kv_budget_tokens") == M, text[-2000:]
    assert values.get("leanserve_kv_ring_capacity_tokens") == M + B
    assert 0 < values["leanserve_kv_tokens_held"] <= values["leanserve_kv_tokens_unbounded"]


def test_prefix_caching_stops_the_engine_at_start_with_one_line(engine):
    """Past the gateway's own checks (tests/unit/test_bounded_kv_config.py): vLLM started by hand with the
    overrides and prefix caching on. Runs last in the module (the engine fixture has finished its work)."""
    engine.stop()
    args = engine_args(default_model_dir(), M, B)
    eng = start("--max-model-len 1024 " + shlex.join([a for a in args if a != "--no-enable-prefix-caching"])
                + " --enable-prefix-caching")
    log = engines.refused_start_log(eng)
    assert "the bounded KV cache needs prefix caching off (--no-enable-prefix-caching)" in log, log[-3000:]


def test_leanserve_serve_kv_budget_on_a_2of4_checkpoint_with_top_h_and_trim(exclusive_engine, tmp_path):
    """Everything composes, through `leanserve serve` (gateway + embedded engine): a 2:4-pruned checkpoint
    served with --quantization leanserve-2of4 and --kv-budget (the dense model's gates, named explicitly),
    chat requests with top_h and trim served past compactions, bad input an OpenAI-shaped 400, the
    engine's /metrics carrying the bounded gauges (PROMETHEUS_MULTIPROC_DIR set by serve), SIGTERM
    stopping everything."""
    import signal
    import subprocess
    import sys
    import time

    from kernels.vllm_plugin.bounded_kv.config import shipped_gates

    pruned = tmp_path / "smollm2-2of4"
    r = subprocess.run([sys.executable, "-m", "server.cli", "prune", str(default_model_dir()), str(pruned),
                        "--method", "magnitude", "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    port, engine_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--engine-port",
                             str(engine_port), "--model", str(pruned), "--served-model-name", "pruned",
                             "--kv-budget", str(M), "--kv-buffer", str(B),
                             "--retention-gates", str(shipped_gates(default_model_dir())), "--log-level", "info",
                             "--engine-args", "--max-model-len 1024 --quantization leanserve-2of4"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = collections.deque(maxlen=20000)

    def drain_output():
        for line in proc.stdout:
            log.append(line.decode(errors="replace"))
    import threading
    threading.Thread(target=drain_output, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, "".join(log)[-4000:]
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() - t0 < 600, "leanserve serve --kv-budget was not ready within 600 s"
            time.sleep(0.5)
        text = "".join(log)
        assert "leanserve-2of4: 2:4 linear layers" in text and f"bounded KV cache: budget M={M}" in text, text[-4000:]
        with httpx.Client(base_url=url, timeout=600) as c:
            for body in ({"max_tokens": 150, "top_h": 0.9, "trim": True},  # 150 + prompt > C: compactions
                         {"max_tokens": 150, "top_h": 0.6, "stream": True}):
                r = c.post("/v1/chat/completions", json={
                    "model": "pruned", "temperature": 0.7, "seed": 1, **body,
                    "messages": [{"role": "user", "content": "Write a short story about a lighthouse."}]})
                assert r.status_code == 200, r.text
                if body.get("stream"):
                    assert r.text.rstrip().endswith("data: [DONE]") and '"content"' in r.text, r.text[-2000:]
                else:
                    assert r.json()["usage"]["completion_tokens"] > 0
            bad = c.post("/v1/chat/completions", json={"model": "pruned", "top_h": 3,
                                                       "messages": [{"role": "user", "content": "hi"}]})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_h"
        metrics = httpx.get(f"http://127.0.0.1:{engine_port}/metrics", timeout=30).text
        assert f"leanserve_kv_budget_tokens {float(M)}" in metrics, metrics[-2000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{engine_port}/health", timeout=2)


def test_teacher_forced_logprobs_through_the_engine_equal_the_reference(exclusive_engine, tmp_path):
    """kernels/retention's evaluation protocol run through the engine (bounded_kv/quality.py): prompt logprobs
    of a 600-token held-out sequence, prefilled in 64-token chunks that the plan splits where the ring fills,
    against BoundedLM's teacher-forced logprobs (M = 64, B = 32: 5 compactions inside the prompt)."""
    import json

    from kernels.vllm_plugin.bounded_kv import quality

    out = tmp_path / "q.json"
    assert quality.main(["--seq-len", "600", "--max-seqs", "1", "--budgets", str(M), "--buffer", str(B),
                         "--batch", str(BATCH), "--text", "data/wikitext2/valid.txt@0.5:1", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert abs(row["ppl_engine"] / row["ppl_reference"] - 1) < 1e-4, row
    assert row["logprob_gap_mean"] < 1e-3, row
    assert abs(row["kl_top20_engine"] - row["kl_top20_reference"]) < 1e-3 and row["kl_full_reference"] > 0, row
