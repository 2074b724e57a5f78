"""Model-level quality order of the 2:4 pruners on the real default model: on held-out WikiText-2 text,
dense < SparseGPT < Wanda < magnitude in perplexity (kernels/sparse24/quality.py, the benchmark's own
code, with a small calibration budget: 16 windows x 128 tokens, perplexity on 512 held-out tokens).

Run time (2026-12-02, 2 cores with another job on one of them): 81 s, on one torch thread (with a core
taken by another process, two OpenMP threads made these small ops 2-7x slower, measured)."""
import pytest

from kernels.model_prep import default_model_dir, verify
from kernels.sparse24.quality import DEFAULT_TEXT, compare
from tests.support.hf import one_thread


def test_dense_lt_sparsegpt_lt_wanda_lt_magnitude():
    if not verify(default_model_dir()):
        pytest.fail("the default model is not prepared: run `leanserve prepare-model` (make test does)")
    with one_thread():
        r = compare(default_model_dir(), DEFAULT_TEXT, samples=16, calib_seqlen=128, eval_tokens=512,
                    eval_seqlen=512)
    assert r["eval_tokens"] == 512
    assert r["dense"] < r["sparsegpt"] < r["wanda"] < r["magnitude"], r
