"""Retention gates (TRIM-KV): per decoder layer, an MLP on the post-input_layernorm hidden state
(the q/k/v input, before RoPE) that gives log beta in (-inf, 0] per KV head:

    log_beta = logsigmoid(W2 silu(W1 x + c) + b)        shape [tokens, n_kv_heads]

A token i then counts with retention beta_i^(t - i) at step t. b starts large so that beta ~ 1
(nothing is forgotten) when training begins. A gate checkpoint is a folder with
gates.safetensors (layer{i}.w1 / .c1 / .w2 / .b) and gates.json (shapes and provenance).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS = "gates.safetensors"
META = "gates.json"
FORMAT = "leanserve-retention-gates/1"


class GateError(ValueError):
    """A gate checkpoint that cannot be used (missing, malformed, wrong model)."""


@dataclass
class GateMeta:
    hidden_size: int
    num_layers: int
    num_kv_heads: int
    intermediate_size: int
    bias_init: float = 10.0
    model: str = ""                # name of the model the gates were trained for
    model_config_sha256: str = ""  # of the model's config.json, to refuse a mismatched model
    budget: int = 0                # training budget M (tokens per layer and KV head)
    buffer: int = 0                # eviction buffer the gates are meant to be served with
    sinks: int = 4                 # first positions always kept when serving (reference.py)
    training: dict = field(default_factory=dict)  # data, steps, sequence length, losses, wall time

    def check_model(self, hidden_size: int, num_layers: int, num_kv_heads: int) -> None:
        got = (hidden_size, num_layers, num_kv_heads)
        want = (self.hidden_size, self.num_layers, self.num_kv_heads)
        if got != want:
            raise GateError(f"retention gates were trained for a model with (hidden, layers, kv heads) = {want}, "
                            f"this model has {got}")


class RetentionGate(nn.Module):
    def __init__(self, hidden_size: int, num_kv_heads: int, intermediate_size: int, bias_init: float = 10.0):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, intermediate_size, bias=True)
        self.w2 = nn.Linear(intermediate_size, num_kv_heads, bias=False)
        self.b = nn.Parameter(torch.empty(num_kv_heads))
        self.reset_parameters(bias_init)

    def reset_parameters(self, bias_init: float) -> None:
        nn.init.normal_(self.w1.weight, std=0.02)
        nn.init.zeros_(self.w1.bias)
        nn.init.normal_(self.w2.weight, std=0.02)
        nn.init.constant_(self.b, bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., hidden] -> log beta [..., n_kv_heads], float32."""
        z = self.w2(F.silu(self.w1(x.to(self.w1.weight.dtype)))) + self.b
        return F.logsigmoid(z.float())


class GateSet(nn.Module):
    """One RetentionGate per decoder layer."""

    def __init__(self, meta: GateMeta):
        super().__init__()
        self.meta = meta
        self.layers = nn.ModuleList(
            RetentionGate(meta.hidden_size, meta.num_kv_heads, meta.intermediate_size, meta.bias_init)
            for _ in range(meta.num_layers))

    def __getitem__(self, i: int) -> RetentionGate:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- checkpoint --------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, g in enumerate(self.layers):
            out[f"layer{i}.w1"] = g.w1.weight
            out[f"layer{i}.c1"] = g.w1.bias
            out[f"layer{i}.w2"] = g.w2.weight
            out[f"layer{i}.b"] = g.b
        return {k: v.detach().contiguous().cpu() for k, v in out.items()}

    def save(self, out_dir: str | Path) -> Path:
        """Write gates.safetensors + gates.json atomically (temp names, then rename)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp_w, tmp_m = out / (WEIGHTS + ".tmp"), out / (META + ".tmp")
        save_file(self.tensors(), str(tmp_w), metadata={"format": FORMAT})
        tmp_m.write_text(json.dumps({"format": FORMAT, **asdict(self.meta)}, indent=2) + "\n")
        tmp_w.replace(out / WEIGHTS)
        tmp_m.replace(out / META)
        return out

    @classmethod
    def load(cls, gate_dir: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> "GateSet":
        from safetensors.torch import load_file

        d = Path(gate_dir)
        meta = read_meta(d)
        try:
            tensors = load_file(str(d / WEIGHTS), device=str(device))
        except (OSError, RuntimeError) as e:
            raise GateError(f"cannot read {d / WEIGHTS}: {e}") from e
        gates = cls(meta)
        sd = {}
        for i in range(meta.num_layers):
            for ours, theirs in (("w1.weight", "w1"), ("w1.bias", "c1"), ("w2.weight", "w2"), ("b", "b")):
                key = f"layer{i}.{theirs}"
                if key not in tensors:
                    raise GateError(f"{d / WEIGHTS} has no tensor {key}")
                sd[f"layers.{i}.{ours}"] = tensors[key]
        try:
            gates.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise GateError(f"{d / WEIGHTS} does not match {d / META}: {e}") from e
        return gates.to(device=device, dtype=dtype)


@torch.no_grad()
def widen_into(gates: GateSet, start: GateSet) -> None:
    """Copy `start` into `gates`, which may be wider: the extra hidden units keep their fresh input weights and get
    zero output weights, so the widened gates compute exactly what `start` does (training can then use them)."""
    w_new, w_old = gates.meta.intermediate_size, start.meta.intermediate_size
    if w_new < w_old:
        raise GateError(f"--init-from gates have width {w_old}; cannot narrow them to {w_new} (pass --gate-width {w_old})")
    for g, s in zip(gates.layers, start.layers):
        g.w1.weight[:w_old] = s.w1.weight
        g.w1.bias[:w_old] = s.w1.bias
        g.w2.weight.zero_()
        g.w2.weight[:, :w_old] = s.w2.weight
        g.b.copy_(s.b)


def read_meta(gate_dir: str | Path) -> GateMeta:
    d = Path(gate_dir)
    try:
        raw = json.loads((d / META).read_text())
    except FileNotFoundError:
        raise GateError(f"{d} is not a retention-gate checkpoint (no {META})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise GateError(f"cannot read {d / META}: {e}") from e
    if raw.pop("format", None) != FORMAT:
        raise GateError(f"{d / META} is not in the {FORMAT} format")
    try:
        return GateMeta(**raw)
    except TypeError as e:
        raise GateError(f"{d / META}: {e}") from e


def config_sha256(model_dir: str | Path) -> str:
    import hashlib

    return hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest()
