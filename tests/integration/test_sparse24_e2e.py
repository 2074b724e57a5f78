"""The 2:4-pruned default model on a real vLLM CPU engine with --quantization leanserve-2of4 gives the same
greedy tokens as HF transformers on the same checkpoint (first 64 tokens of 10 prompts, float32).

The checkpoint is written by `leanserve prune --method magnitude` (no calibration, fast) into a temp dir;
the engine is started like `leanserve serve` starts its embedded one (server.supervisor), with the flag.
"""
import collections
import subprocess
import sys

import httpx
import pytest

from kernels.model_prep import default_model_dir, verify
from server.supervisor import EngineProcess, EngineError, cpu_engine, engine_command, engine_env
from tests.support.servers import free_port

pytestmark = pytest.mark.integration

N_TOKENS = 64
NAME = "smollm2-2of4"
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):",
    "The three most important inventions of the twentieth century are",
    "Water boils at a temperature of",
    "In 1492, Christopher Columbus",
    "The quick brown fox",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "Photosynthesis is the process by which",
    "1, 2, 3, 4, 5,",
]


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    src = default_model_dir()
    if not verify(src):
        pytest.fail("the default model is not prepared: run `leanserve prepare-model` (make test does)")
    out = tmp_path_factory.mktemp("sparse24") / "smollm2-magnitude"
    r = subprocess.run([sys.executable, "-m", "server.cli", "prune", str(src), str(out), "--method", "magnitude",
                        "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2:4 check: 210 linear weights in the decoder blocks, 0 groups" in r.stdout, r.stdout
    return out


def start_engine(model_dir, extra: str) -> EngineProcess:
    port = free_port()
    cpu = cpu_engine()
    eng = EngineProcess(engine_command(str(model_dir), NAME, port, "float32", extra, cpu), engine_env(cpu), port)
    eng.tail = collections.deque(maxlen=5000)  # keep the whole log: the tests look for lines in it
    eng.start()
    return eng


@pytest.fixture(scope="module")
def engine(pruned_dir):
    eng = start_engine(pruned_dir, "--quantization leanserve-2of4 --max-model-len 1024")
    try:
        eng.wait_healthy(600)
        yield eng
    finally:
        eng.stop()


@pytest.fixture(scope="module")
def hf_greedy(pruned_dir):
    """prompt -> (prompt ids, HF greedy continuation ids) on the same checkpoint, float32, no EOS stop."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pruned_dir)
    model = AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        for p in PROMPTS:
            ids = tok(p, add_special_tokens=False)["input_ids"]
            inp, past, gen = torch.tensor([ids]), None, []
            for _ in range(N_TOKENS):
                o = model(inp, past_key_values=past, use_cache=True)
                past = o.past_key_values
                nxt = int(o.logits[0, -1].argmax())
                gen.append(nxt)
                inp = torch.tensor([[nxt]])
            out[p] = (ids, gen)
    return out


def test_dense_checkpoint_with_the_flag_is_a_clear_error():
    """The flag on a checkpoint without the marker stops the engine with a message that says what to do.
    First in the file: it must end before the module's engine starts (one vLLM server at a time)."""
    eng = start_engine(default_model_dir(), "--quantization leanserve-2of4 --max-model-len 1024")
    try:
        with pytest.raises(EngineError) as e:
            eng.wait_healthy(300)
    finally:
        eng.stop()
    log = "\n".join(eng.tail)
    assert "leanserve prune" in log and "leanserve_sparsity" in log, str(e.value)[-3000:]


def test_engine_used_the_2of4_method(engine):
    log = "\n".join(engine.tail)
    assert "leanserve-2of4: packing 2:4 linear layers" in log, log[-3000:]


def test_greedy_tokens_equal_hf(engine, hf_greedy):
    mismatches = []
    with httpx.Client(base_url=engine.url, timeout=300) as c:
        for p in PROMPTS:  # one at a time: the batch shape stays that of a single request
            ids, want = hf_greedy[p]
            r = c.post("/v1/completions", json={"model": NAME, "prompt": ids, "max_tokens": N_TOKENS,
                                                "temperature": 0, "ignore_eos": True, "return_token_ids": True})
            r.raise_for_status()
            got = r.json()["choices"][0]["token_ids"]
            if got != want:
                first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                mismatches.append(f"{p!r}: first difference at token {first}: vLLM {got[first:first + 5]} "
                                  f"HF {want[first:first + 5]}")
    assert not mismatches, "\n".join(mismatches)


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


def test_cli_eval_ppl_on_the_pruned_checkpoint(pruned_dir):
    r = cli("eval", "ppl", str(pruned_dir), "--max-tokens", "1024", "--seqlen", "512", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    ppl = float(r.stdout.split("perplexity ")[1].split()[0])
    assert 1 < ppl < 1e5 and "first 1024 tokens" in r.stdout
