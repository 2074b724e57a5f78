"""leanserve's Triton 2:4 GEMM inside a real vLLM engine, once: a tiny random Llama (2 decoder blocks,
hidden size 128) saved as a HF checkpoint, pruned 2:4, served by vLLM CPU with --quantization
leanserve-2of4 and LEANSERVE_SPARSE24_CPU=triton under TRITON_INTERPRET=1 (the kernel runs in the
Triton interpreter on CPU tensors: what the GPU runs, slowly). Its greedy tokens must equal those of the
masked dense checkpoint in HF transformers."""
import collections
import shutil

import pytest

from kernels.model_prep import default_model_dir
from server.supervisor import EngineProcess, cpu_engine, engine_command, engine_env
from tests.support.hf import engine_greedy_mismatches, hf_greedy
from tests.support.servers import free_port

pytestmark = [pytest.mark.integration, pytest.mark.own_engine]

NAME = "tiny-llama-2of4"
N_TOKENS = 8
PROMPTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4, 5,"]


@pytest.fixture(scope="module")
def tiny_pruned(tmp_path_factory):
    """A 2-block random Llama with the default model's tokenizer (so vLLM serves it like any model),
    magnitude-pruned to 2:4 by the code `leanserve prune` runs."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kernels.sparse24.prune import prune_model

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    # Large initial weights make the next-token distribution peaked, so greedy ties (which float
    # rounding could break either way) do not occur.
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                      initializer_range=0.5, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    root = tmp_path_factory.mktemp("tiny")
    dense = root / "dense"
    LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(dense)
    tok.save_pretrained(dense)
    pruned = root / "pruned"
    prune_model(str(dense), str(pruned), "magnitude", progress=False)
    shutil.rmtree(dense)
    return pruned, {p: tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS}


@pytest.fixture(scope="module")
def hf_reference(tiny_pruned):
    """Computed before the engine starts, so the two do not share the cores."""
    model_dir, ids = tiny_pruned
    return hf_greedy(model_dir, [ids[p] for p in PROMPTS], N_TOKENS)


@pytest.fixture(scope="module")
def triton_engine(tiny_pruned, hf_reference, exclusive_engine):
    model_dir, _ = tiny_pruned
    port, cpu = free_port(), cpu_engine()
    # Small batch limits: vLLM's warm-up step runs max_num_batched_tokens rows through the interpreter.
    extra = "--quantization leanserve-2of4 --max-model-len 128 --max-num-batched-tokens 128 --max-num-seqs 2"
    env = {**engine_env(cpu), "TRITON_INTERPRET": "1", "LEANSERVE_SPARSE24_CPU": "triton"}
    eng = EngineProcess(engine_command(str(model_dir), NAME, port, "float32", extra, cpu), env, port)
    eng.tail = collections.deque(maxlen=5000)
    eng.start()
    try:
        eng.wait_healthy(600)
        yield eng
    finally:
        eng.stop()


def test_vllm_runs_the_triton_kernel_and_matches_hf(triton_engine, tiny_pruned, hf_reference):
    _, ids = tiny_pruned
    log = "\n".join(triton_engine.tail)
    assert "leanserve-2of4: 2:4 linear layers; compute path: packed weights, Triton 2:4 kernel" in log, log[-3000:]
    mismatches = engine_greedy_mismatches(triton_engine.url, NAME, {p: ids[p] for p in PROMPTS}, hf_reference)
    assert not mismatches, "\n".join(mismatches)
    assert len({tuple(w) for w in hf_reference}) == len(PROMPTS)  # the prompts matter: not a constant output
