"""The bounded KV cache's settings and the checks that must fail at start, never mid-request.

Torch-free and vLLM-free: `leanserve serve` (the gateway, which imports neither) uses it to build the
engine's arguments, and the engine reads the same settings back from the HF config, where
`--hf-overrides` put them (key HF_KEY), so every vLLM process sees one configuration.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

HF_KEY = "leanserve_bounded_kv"
# HF architecture -> the bounded variant registered by the plugin (model.py).
ARCHITECTURES = {"LlamaForCausalLM": "BoundedLlamaForCausalLM"}
DEFAULT_BUFFER = 128
DEFAULT_SINKS = 4
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # vLLM's /metrics aggregates every process's gauges from here


class BoundedKVError(ValueError):
    """A model or configuration the bounded cache cannot serve (one line, shown at start)."""


@dataclass(frozen=True)
class BoundedKVConfig:
    budget: int          # M: tokens kept per (layer, KV head) after a compaction
    buffer: int          # B: tokens appended between compactions
    gates: str           # retention-gate checkpoint directory
    sinks: int = DEFAULT_SINKS

    @property
    def capacity(self) -> int:
        """C = M + B: the ring's slots per (layer, KV head), one vLLM block per request."""
        return self.budget + self.buffer

    def ring_count(self, n: int) -> int:
        """Valid slots after n tokens: compaction to M happens exactly when the ring reaches C
        (reference.BoundedCache.pieces), so the count depends on n alone."""
        return n if n < self.capacity else self.budget + (n - self.budget) % self.buffer

    def to_hf(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf(cls, hf_config) -> "BoundedKVConfig":
        raw = getattr(hf_config, HF_KEY, None)
        if not isinstance(raw, dict):
            raise BoundedKVError(f"the bounded model needs {HF_KEY!r} in --hf-overrides "
                                 "(leanserve serve --kv-budget sets it)")
        try:
            cfg = cls(**raw)
        except TypeError as e:
            raise BoundedKVError(f"{HF_KEY}: {e}") from None
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in ("budget", "buffer"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise BoundedKVError(f"kv {name} must be an integer >= 1, got {v!r}")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or not 0 <= self.sinks < self.budget:
            raise BoundedKVError(f"kv sinks must be an integer in [0, budget), got {self.sinks!r}")


def read_gate_meta(gate_dir: str | Path) -> dict:
    p = Path(gate_dir) / "gates.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise BoundedKVError(f"{gate_dir} is not a retention-gate checkpoint (no gates.json)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise BoundedKVError(f"cannot read {p}: {e}") from None


def shipped_gates(model_dir: str | Path) -> Path | None:
    """kernels/retention/gates/<model directory name>, if leanserve ships gates for it."""
    d = Path(__file__).resolve().parents[2] / "retention" / "gates" / Path(model_dir).name
    return d if (d / "gates.json").is_file() else None


def check_model(model_dir: str | Path, gate_dir: str | Path) -> str:
    """The bounded architecture for this model; raises BoundedKVError with one line otherwise."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BoundedKVError(f"cannot read {model_dir}/config.json: {e}") from None
    archs = cfg.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise BoundedKVError(f"--kv-budget supports the {', '.join(ARCHITECTURES)} architecture, "
                             f"this model is {', '.join(archs) or 'unknown'}")
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", True):
        raise BoundedKVError("--kv-budget does not support sliding-window attention models")
    meta = read_gate_meta(gate_dir)
    heads = cfg.get("num_key_value_heads", cfg.get("num_attention_heads"))
    got = (cfg.get("hidden_size"), cfg.get("num_hidden_layers"), heads)
    want = (meta.get("hidden_size"), meta.get("num_layers"), meta.get("num_kv_heads"))
    if got != want:
        raise BoundedKVError(f"the retention gates in {gate_dir} were trained for (hidden, layers, kv heads) = "
                             f"{want}, this model has {got}")
    return ARCHITECTURES[archs[0]]


_REFUSED = {
    "--enable-prefix-caching": "prefix caching (a ring holds a request's own evicted history, not a shareable prefix)",
    "--speculative-config": "speculative decoding (drafts would be written into an evicting ring before acceptance)",
    "--kv-transfer-config": "KV transfer connectors",
    "--pipeline-parallel-size": "pipeline parallelism", "-pp": "pipeline parallelism",
    "--tensor-parallel-size": "tensor parallelism", "-tp": "tensor parallelism",
}


def check_engine_args(args: list[str]) -> None:
    sizes = ("--tensor-parallel-size", "-tp", "--pipeline-parallel-size", "-pp")
    for i, a in enumerate(args):
        flag, eq, value = a.partition("=")
        if flag not in _REFUSED:
            continue
        if flag in sizes:
            value = value if eq else (args[i + 1] if i + 1 < len(args) else "")
            if value == "1":
                continue
        raise BoundedKVError(f"--kv-budget cannot be combined with {_REFUSED[flag]} ({flag})")
    if "--hf-overrides" in args or any(a.startswith("--hf-overrides=") for a in args):
        raise BoundedKVError("--kv-budget sets --hf-overrides itself; pass the other overrides without --kv-budget")


def engine_args(model_dir: str | Path, budget: int, buffer: int | None = None, gates: str | Path | None = None,
                extra_args: str = "") -> list[str]:
    """vLLM arguments that serve model_dir with the bounded cache; every refusal is raised here."""
    gate_dir = Path(gates).expanduser() if gates else shipped_gates(model_dir)
    if gate_dir is None:
        raise BoundedKVError(f"no retention gates ship for {Path(model_dir).name}: train them with "
                             "`leanserve train-gates` and pass --retention-gates DIR")
    meta = read_gate_meta(gate_dir)
    cfg = BoundedKVConfig(budget=budget, buffer=buffer or int(meta.get("buffer") or DEFAULT_BUFFER),
                          gates=str(gate_dir.resolve()), sinks=int(meta.get("sinks", DEFAULT_SINKS)))
    cfg.validate()
    arch = check_model(model_dir, gate_dir)
    check_engine_args(shlex.split(extra_args))
    overrides = {"architectures": [arch], HF_KEY: cfg.to_hf()}
    return ["--hf-overrides", json.dumps(overrides), "--no-enable-prefix-caching"]
