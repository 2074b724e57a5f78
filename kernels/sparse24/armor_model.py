"""An ARMOR checkpoint in HF transformers: the layer module, the swap into a Llama model, save and load.

Stored format (written by `leanserve prune --method armor`): a normal HF checkpoint in which every block linear
`model.layers.<i>.<...>_proj` keeps its name and has
  * `.weight`   the 2:4 core C [d_out, d_in] (an ordinary 2:4 weight: `check_pruned` and the 2:4 GEMM read it as is),
  * `.armor_a`  the output wrapper A, d_out/b diagonal blocks [d_out/b, b, b] (row norms folded in),
  * `.armor_b`  the input wrapper B, [d_in/b, b, b] (column norms folded in),
so the layer computes y = x (A C B)^T = ((x B^T) C^T) A^T (kernels/sparse24/armor.armor_linear); and config.json's
marker has "method": "armor" and "armor": {"block_size": b, ...}. Plain AutoModelForCausalLM would load only the
cores (and warn about the unused wrappers): load it with `load_armor_model` (kernels.perplexity.load_model does).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .armor import armor_linear
from .checkpoint import is_block_linear, read_marker

A_SUFFIX, B_SUFFIX = "armor_a", "armor_b"


class ArmorLinear(nn.Module):
    """y = x (A C B)^T + bias with C 2:4 and A, B block-diagonal; parameter names match the stored tensors."""

    def __init__(self, core: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = core.shape
        self.weight = nn.Parameter(core, requires_grad=False)
        self.armor_a = nn.Parameter(a, requires_grad=False)
        self.armor_b = nn.Parameter(b, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def block_size(self) -> int:
        return self.armor_a.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return armor_linear(x, self.armor_a.to(x.dtype), self.weight.to(x.dtype), self.armor_b.to(x.dtype),
                            None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block_size={self.block_size}"


def replace_linear(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def is_armor_marker(marker: dict | None) -> bool:
    return bool(marker) and marker.get("method") == "armor"


def checkpoint_marker(model_dir: str | Path) -> dict | None:
    path = Path(model_dir) / "config.json"
    return read_marker(json.loads(path.read_text())) if path.is_file() else None


def load_armor_model(model_dir: str | Path, dtype=torch.float32):
    """The HF model of an ARMOR checkpoint with every block linear an ArmorLinear (eval mode)."""
    import transformers
    from transformers import AutoModelForCausalLM

    marker = checkpoint_marker(model_dir)
    if not is_armor_marker(marker):
        raise ValueError(f"{model_dir} is not an ARMOR checkpoint (config.json marker: {marker!r})")
    wrappers: dict[str, dict[str, torch.Tensor]] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                mod, _, leaf = key.rpartition(".")
                if leaf in (A_SUFFIX, B_SUFFIX):
                    wrappers.setdefault(mod, {})[leaf] = st.get_tensor(key).to(dtype)
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the wrappers are "unexpected keys" to the plain Llama class
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    finally:
        transformers.logging.set_verbosity(level)
    swapped = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and is_block_linear(name):
            w = wrappers.get(name, {})
            if A_SUFFIX not in w or B_SUFFIX not in w:
                raise ValueError(f"{model_dir}: ARMOR checkpoint lacks {name}.{A_SUFFIX} / .{B_SUFFIX}")
            replace_linear(model, name, ArmorLinear(mod.weight.data, w[A_SUFFIX], w[B_SUFFIX],
                                                    None if mod.bias is None else mod.bias.data))
            swapped += 1
    if not swapped:
        raise ValueError(f"{model_dir}: no decoder-block linear layers found")
    return model.eval()
