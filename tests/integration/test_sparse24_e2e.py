"""The 2:4-pruned default model on a real vLLM CPU engine with --quantization leanserve-2of4 gives the same
greedy tokens as HF transformers on the same checkpoint (float32), on both CPU paths of the method: the
default `dense` one (checked, not packed, vLLM's CPU GEMM) and `compressed` (only the packed weights are
kept, decompressed on every call). tests/integration/test_sparse24_triton_engine.py runs the Triton path.

The checkpoint is written by `leanserve prune --method magnitude` (no calibration, fast) into a temp dir;
the engines are started like `leanserve serve` starts its embedded one (server.supervisor), one at a time.
"""
import subprocess
import sys

import pytest

from kernels.model_prep import default_model_dir, verify
from tests.support import engines
from tests.support.hf import GREEDY_PROMPTS as PROMPTS
from tests.support.hf import engine_greedy_mismatches, hf_greedy

pytestmark = [pytest.mark.integration, pytest.mark.own_engine]

NAME = "smollm2-2of4"
# Per CPU mode: (prompts, tokens). `compressed` decompresses 210 weights per forward step: fewer tokens.
RUNS = {"dense": (PROMPTS[:6], 48), "compressed": (PROMPTS[6:9], 24)}


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    src = default_model_dir()
    if not verify(src):
        pytest.fail("the default model is not prepared: run `leanserve prepare-model` (make test does)")
    out = tmp_path_factory.mktemp("sparse24") / "smollm2-magnitude"
    r = cli("prune", str(src), str(out), "--method", "magnitude", "--quiet", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2:4 check: 210 linear weights in the decoder blocks, 0 groups" in r.stdout, r.stdout
    return out


def start_engine(model_dir, extra: str, env: dict[str, str] | None = None):
    return engines.start_engine(model_dir, NAME, extra, env)


@pytest.fixture(scope="module")
def hf_reference(pruned_dir, prompt_ids):
    """HF greedy tokens for every run, computed before any engine starts (nothing else on the cores)."""
    return {mode: hf_greedy(pruned_dir, [prompt_ids[p] for p in prompts], n) for mode, (prompts, n) in RUNS.items()}


@pytest.fixture(scope="module", params=list(RUNS))
def engine(request, pruned_dir, hf_reference, exclusive_engine):
    eng = start_engine(pruned_dir, "--quantization leanserve-2of4 --max-model-len 1024",
                       {"LEANSERVE_SPARSE24_CPU": request.param})
    eng.mode = request.param
    try:
        eng.wait_healthy(600)
        yield eng
    finally:
        eng.stop()


@pytest.fixture(scope="module")
def prompt_ids(pruned_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(pruned_dir)
    return {p: tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS}


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    cases = [
        (["prune", str(tmp_path / "nope"), str(tmp_path / "out"), "--method", "magnitude"], "does not exist"),
        (["prune", str(default_model_dir()), str(tmp_path / "out"), "--method", "wanda"], "needs calibration text"),
        (["prune", str(default_model_dir()), str(default_model_dir()), "--method", "magnitude"], "must differ"),
        (["eval", "ppl", str(tmp_path)], "no config.json"),
        (["eval", "ppl", str(default_model_dir()), "--text", str(tmp_path / "none.txt")], "not found"),
    ]
    for args, msg in cases:
        r = cli(*args)
        assert r.returncode == 1 and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_cli_eval_ppl_default_text_dense_vs_pruned(pruned_dir):
    """`leanserve eval ppl` on its default text (data/wikitext2/valid.txt): magnitude 2:4 pruning of a 135M
    model costs a lot of perplexity (BENCHMARKS.md: x100 and more), far beyond any window noise."""
    ppl = {}
    for name, d in (("dense", default_model_dir()), ("pruned", pruned_dir)):
        r = cli("eval", "ppl", str(d), "--max-tokens", "1024", "--seqlen", "512", "--quiet")
        assert r.returncode == 0, r.stderr[-3000:]
        assert "valid.txt, first 1024 tokens, windows of 512 tokens" in r.stdout, r.stdout
        ppl[name] = float(r.stdout.split("perplexity ")[1].split()[0])
    assert 5 < ppl["dense"] < 60 and ppl["pruned"] > 5 * ppl["dense"], ppl


def test_dense_checkpoint_with_the_flag_is_a_clear_error(exclusive_engine):
    """The flag on a checkpoint without the marker stops the engine with a message that says what to do.
    (The tests above need no engine and run first; this one ends before the module's engines start.)"""
    eng = start_engine(default_model_dir(), "--quantization leanserve-2of4 --max-model-len 1024")
    log = engines.refused_start_log(eng)
    assert "leanserve prune" in log and "leanserve_sparsity" in log, log[-3000:]


def test_engine_used_the_2of4_method_on_its_cpu_path(engine):
    log = "\n".join(engine.tail)
    want = {"dense": "2:4 checked, not packed", "compressed": "packed weights only, decompressed on every call"}
    assert f"leanserve-2of4: 2:4 linear layers; compute path: CPU: {want[engine.mode]}" in log, log[-3000:]


def test_greedy_tokens_equal_hf(engine, hf_reference, prompt_ids):
    prompts, _ = RUNS[engine.mode]
    mismatches = engine_greedy_mismatches(engine.url, NAME, {p: prompt_ids[p] for p in prompts},
                                          hf_reference[engine.mode])
    assert not mismatches, "\n".join(mismatches)
