"""What a 2:4 checkpoint is, in one place: which weights are 2:4 (the linear layers inside the decoder
blocks), the marker `leanserve prune` writes into config.json, and the read-back check of a written
checkpoint. The pruner, the CLI and the vLLM method all use these definitions."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .format import compressed_nbytes, count_24_violations

MARKER_KEY = "leanserve_sparsity"
FORMAT = "2:4"
# A module inside decoder block i: HF "model.layers.<i>.mlp.down_proj", vLLM "model.layers.<i>.mlp.gate_up_proj".
_IN_BLOCK = re.compile(r"(^|\.)layers\.\d+\.")


def is_block_linear(module_name: str) -> bool:
    """True for the (name of a) linear layer that is 2:4 sparse: one inside a decoder block.
    Embeddings and lm_head stay dense."""
    return bool(_IN_BLOCK.search(module_name))


def read_marker(config: dict[str, Any]) -> dict[str, Any] | None:
    """The marker of a parsed config.json, or None when it is not a 2:4 checkpoint of ours."""
    marker = config.get(MARKER_KEY)
    return dict(marker) if isinstance(marker, dict) and marker.get("format") == FORMAT else None


def write_marker(out_dir: str | Path, marker: dict[str, Any]) -> None:
    path = Path(out_dir) / "config.json"
    cfg = json.loads(path.read_text())
    cfg[MARKER_KEY] = {"format": FORMAT, **marker}
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def check_pruned(out_dir: str | Path) -> dict:
    """Read a 2:4 checkpoint back: 2:4 violations, zeros, and dense vs packed (values + meta) bytes of
    every block linear weight, in the checkpoint's dtype and, for comparison, in bfloat16."""
    res = {"tensors": 0, "bad_groups": 0, "weights": 0, "zeros": 0, "bad": [], "dtype": None,
           "dense_bytes": 0, "packed_bytes": 0, "dense_bytes_bf16": 0, "packed_bytes_bf16": 0}
    for f in sorted(Path(out_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if not name.endswith(".weight") or not is_block_linear(name):
                    continue
                w = st.get_tensor(name)
                if w.dim() != 2:
                    continue  # norms
                n, k = w.shape
                bad = count_24_violations(w)
                res["tensors"] += 1
                res["bad_groups"] += bad
                res["weights"] += w.numel()
                res["zeros"] += int((w == 0).sum())
                res["dtype"] = str(w.dtype).removeprefix("torch.")
                res["dense_bytes"] += w.numel() * w.element_size()
                res["packed_bytes"] += compressed_nbytes(n, k, w.dtype)
                res["dense_bytes_bf16"] += w.numel() * 2
                res["packed_bytes_bf16"] += compressed_nbytes(n, k, torch.bfloat16)
                if bad:
                    res["bad"].append(name)
    res["ratio"] = res["packed_bytes"] / max(res["dense_bytes"], 1)
    res["ratio_bf16"] = res["packed_bytes_bf16"] / max(res["dense_bytes_bf16"], 1)
    return res
