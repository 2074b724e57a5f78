"""An ARMOR checkpoint of the default model on a real vLLM CPU engine with --quantization leanserve-2of4
(kernels/vllm_plugin/armor.py) gives the same greedy tokens as HF transformers on the same checkpoint
(kernels.sparse24.armor_model.load_armor_model, float32): the first 64 tokens of the 10 greedy prompts of
tests/support/hf.py. Served without the flag, the engine refuses the checkpoint at start-up instead of serving the
2:4 cores without their wrappers.

The checkpoint is written once by `leanserve prune --method armor` on a small calibration (4 x 128 tokens, 20
iterations per layer: about 2 minutes on 2 cores; quality is not what this checks); one engine serves it (the
default CPU path, `dense`), after the refused start-up.
"""
import json
import subprocess
import sys

import pytest

from kernels.model_prep import default_model_dir, verify
from tests.support.hf import GREEDY_PROMPTS as PROMPTS
from tests.support.hf import engine_greedy_mismatches, hf_greedy
from tests.support import engines

pytestmark = [pytest.mark.integration, pytest.mark.own_engine]

NAME = "smollm2-armor"
N_TOKENS = 64


@pytest.fixture(scope="module")
def armor_dir(tmp_path_factory):
    src = default_model_dir()
    if not verify(src):
        pytest.fail("the default model is not prepared: run `leanserve prepare-model` (make test does)")
    out = tmp_path_factory.mktemp("armor") / "smollm2-armor"
    r = subprocess.run([sys.executable, "-m", "server.cli", "prune", str(src), str(out), "--method", "armor",
                        "--calib", "data/wikitext2/valid.txt", "--samples", "4", "--seqlen", "128", "--iters", "20",
                        "--quiet"], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2:4 check: 210 linear weights in the decoder blocks, 0 groups" in r.stdout, r.stdout
    return out


@pytest.fixture(scope="module")
def marker(armor_dir):
    return json.loads((armor_dir / "config.json").read_text())["leanserve_sparsity"]


@pytest.fixture(scope="module")
def prompt_ids(armor_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(armor_dir)
    return {p: tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS}


@pytest.fixture(scope="module")
def hf_reference(armor_dir, prompt_ids):
    """Greedy continuations (no EOS stop, KV cache as vLLM decodes) of the ARMOR model in HF transformers,
    computed before any engine starts (nothing else on the cores)."""
    import torch

    from kernels.sparse24.armor_model import ArmorLinear, load_armor_model

    model = load_armor_model(armor_dir, dtype=torch.float32)
    assert sum(isinstance(m, ArmorLinear) for m in model.modules()) == 210
    return hf_greedy(model, [prompt_ids[p] for p in PROMPTS], N_TOKENS)


def start_engine(model_dir, extra: str):
    return engines.start_engine(model_dir, NAME, extra)


def test_without_the_flag_the_engine_refuses_the_checkpoint(armor_dir, hf_reference, exclusive_engine):
    """vLLM's Llama loader has no parameter for the wrappers and stops at the first one: the cores alone are never
    served. (Runs before the module's engine starts.)"""
    log = engines.refused_start_log(start_engine(armor_dir, "--max-model-len 1024"))
    assert "There is no module or parameter named" in log and ".armor_a'" in log, log[-3000:]


@pytest.fixture(scope="module")
def engine(armor_dir, hf_reference, exclusive_engine):
    eng = start_engine(armor_dir, "--quantization leanserve-2of4 --max-model-len 1024")
    try:
        eng.wait_healthy(600)
        yield eng
    finally:
        eng.stop()


def test_engine_used_the_armor_method(engine, marker):
    log = "\n".join(engine.tail)
    b = marker["armor"]["block_size"]
    # float32 wrappers: vLLM holds one B per q/k/v and gate/up shard, as the checkpoint stores them.
    added = 4 * marker["armor"]["added_params"]
    want = (f"leanserve-2of4: ARMOR linear layers: 120 (210 checkpoint linears), block size {b}, wrappers add "
            f"{added} parameter bytes ({added / 2**20:.2f} MiB, float32); 2:4 core compute path: CPU: 2:4 checked, "
            "not packed")
    assert want in log, log[-3000:]


def test_greedy_tokens_equal_hf(engine, hf_reference, prompt_ids):
    mismatches = engine_greedy_mismatches(engine.url, NAME, {p: prompt_ids[p] for p in PROMPTS}, hf_reference)
    assert not mismatches, "\n".join(mismatches)
    assert len({tuple(w) for w in hf_reference}) == len(PROMPTS)  # the prompts matter: not a constant output
