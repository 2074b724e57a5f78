"""`--kv-budget` start-up checks (kernels/vllm_plugin/bounded_kv/config.py, server/serve.py): what the
bounded cache cannot serve fails before the engine starts, with one line. The engine-side checks run
in tests/integration/test_bounded_kv_engine.py."""
import json
import subprocess
import sys

import pytest

from kernels.vllm_plugin.bounded_kv.config import (HF_KEY, BoundedKVConfig, BoundedKVError, engine_args,
                                                   shipped_gates)
from server.config import Settings
from server.serve import ServeError, bounded_kv_args

GATES = shipped_gates("SmolLM2-135M-Instruct")


def model_dir(tmp_path, **cfg):
    base = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_hidden_layers": 30,
            "num_attention_heads": 9, "num_key_value_heads": 3}
    d = tmp_path / "SmolLM2-135M-Instruct"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({**base, **cfg}))
    (d / "model.safetensors").write_bytes(b"")  # never read: the checks fail before any engine starts
    return d


def test_shipped_gates_exist_and_engine_args_carry_them(tmp_path):
    assert GATES is not None
    args = engine_args(model_dir(tmp_path), 128)
    assert args[0] == "--hf-overrides" and "--no-enable-prefix-caching" in args
    ov = json.loads(args[1])
    assert ov["architectures"] == ["BoundedLlamaForCausalLM"]
    assert ov[HF_KEY] == {"budget": 128, "buffer": 128, "gates": str(GATES.resolve()), "sinks": 4}
    assert json.loads(engine_args(model_dir(tmp_path), 64, 32)[1])[HF_KEY]["buffer"] == 32


@pytest.mark.parametrize("cfg,msg", [
    ({"architectures": ["GPT2LMHeadModel"]}, "supports the LlamaForCausalLM architecture, this model is GPT2LMHeadModel"),
    ({"num_hidden_layers": 12}, "were trained for (hidden, layers, kv heads) = (576, 30, 3), this model has (576, 12, 3)"),
    ({"sliding_window": 4096}, "sliding-window"),
])
def test_unsupported_models_fail_with_one_line(tmp_path, cfg, msg):
    with pytest.raises(BoundedKVError) as e:
        engine_args(model_dir(tmp_path, **cfg), 128)
    assert msg in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("extra,msg", [
    ("--enable-prefix-caching", "prefix caching"),
    ("--speculative-config '{\"method\": \"ngram\"}'", "speculative decoding"),
    ("--speculative-config={}", "speculative decoding"),
    ("--tensor-parallel-size 2", "tensor parallelism"),
    ("--hf-overrides {}", "sets --hf-overrides itself"),
])
def test_unsupported_engine_settings_fail_with_one_line(tmp_path, extra, msg):
    with pytest.raises(BoundedKVError) as e:
        engine_args(model_dir(tmp_path), 128, extra_args=extra)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_tensor_parallel_one_is_fine(tmp_path):
    engine_args(model_dir(tmp_path), 128, extra_args="--tensor-parallel-size 1 --max-model-len 4096")


@pytest.mark.parametrize("kw", [{"budget": 0, "buffer": 1}, {"budget": 4, "buffer": 0}, {"budget": 4, "buffer": 4, "sinks": 4},
                                {"budget": True, "buffer": 4}])
def test_bad_budgets_are_refused(kw):
    with pytest.raises(BoundedKVError):
        BoundedKVConfig(gates="", **kw).validate()


def test_missing_gates_dir_is_one_line(tmp_path):
    with pytest.raises(BoundedKVError, match="not a retention-gate checkpoint"):
        engine_args(model_dir(tmp_path), 128, gates=tmp_path / "nope")
    other = tmp_path / "OtherModel"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(BoundedKVError, match="no retention gates ship for OtherModel"):
        engine_args(other, 128)


def test_serve_settings_from_env_and_refusals(tmp_path, monkeypatch):
    monkeypatch.setenv("LEANSERVE_KV_BUDGET", "64")
    monkeypatch.setenv("LEANSERVE_KV_BUFFER", "32")
    monkeypatch.setenv("LEANSERVE_RETENTION_GATES", str(GATES))
    s = Settings()
    assert (s.kv_budget, s.kv_buffer, s.retention_gates) == (64, 32, str(GATES))
    extra, env = bounded_kv_args(s, str(model_dir(tmp_path)))
    assert "BoundedLlamaForCausalLM" in extra and "PROMETHEUS_MULTIPROC_DIR" in env
    with pytest.raises(ServeError, match="prefix caching"):
        bounded_kv_args(s.model_copy(update={"engine_args": "--enable-prefix-caching"}), str(model_dir(tmp_path)))
    with pytest.raises(ServeError, match="need --kv-budget"):
        bounded_kv_args(Settings(kv_budget=0, kv_buffer=0, retention_gates="x"), str(model_dir(tmp_path)))


def test_cli_refusal_is_one_line_and_exit_1(tmp_path):
    r = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir(tmp_path)),
                        "--kv-budget", "64", "--engine-args=--enable-prefix-caching"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("leanserve: --kv-budget cannot be combined with prefix caching"), r.stderr
