"""Which part of a 2:4 copy costs the chat skill? Put the dense weights back into some of its linears.

    python -m bench.restore_dense PRUNED_DIR DENSE_DIR OUT_DIR --kind mlp          # every MLP dense again
    python -m bench.restore_dense PRUNED_DIR DENSE_DIR OUT_DIR --layers 0 1 28 29  # whole blocks dense again

The result is a plain HF checkpoint (the 2:4 marker is dropped: it is no longer 2:4 everywhere) that
`python -m bench.pruning_quality --checkpoints OUT_DIR` scores. The pruned weights elsewhere are kept as they
are, calibrated on the outputs of the pruned layers before them, so this measures what a layer's sparsity costs
in that copy, not what pruning only the other layers would give. Plain 2:4 checkpoints only (not ARMOR's).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

WEIGHTS = "model.safetensors"
LINEAR = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.\w+\.weight$")


def restore(pruned: dict, dense: dict, kinds: set[str], layers: set[int]) -> tuple[dict, float]:
    """Tensors of `pruned` with the chosen block linears taken from `dense`; the share of linear weights restored."""
    out, moved, total = dict(pruned), 0, 0
    for name, w in pruned.items():
        m = LINEAR.match(name)
        if not m:
            continue
        total += w.numel()
        if m.group(2) in kinds or int(m.group(1)) in layers:
            if dense[name].shape != w.shape:
                raise ValueError(f"{name}: dense {tuple(dense[name].shape)} vs pruned {tuple(w.shape)}")
            out[name] = dense[name].to(w.dtype).contiguous()
            moved += w.numel()
    if not total:
        raise ValueError("no decoder-block linear weights found (model.layers.N.self_attn/mlp.*.weight)")
    return out, moved / total


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import load_file, save_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pruned_dir")
    ap.add_argument("dense_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--kind", nargs="*", default=[], choices=["self_attn", "mlp"], help="restore these linears")
    ap.add_argument("--layers", nargs="*", type=int, default=[], help="restore every linear of these blocks")
    a = ap.parse_args(argv)
    if not a.kind and not a.layers:
        ap.error("name --kind and/or --layers")
    pruned_dir, out = Path(a.pruned_dir), Path(a.out_dir)
    for d in (pruned_dir, Path(a.dense_dir)):
        if not (d / WEIGHTS).is_file():
            ap.error(f"{d / WEIGHTS} not found (one-file safetensors checkpoints only)")
    cfg = json.loads((pruned_dir / "config.json").read_text())
    if cfg.get("leanserve_sparsity", {}).get("method") == "armor":
        ap.error("ARMOR checkpoints keep wrappers beside the core; restoring dense weights there is not defined")
    tensors, share = restore(load_file(str(pruned_dir / WEIGHTS)), load_file(str(Path(a.dense_dir) / WEIGHTS)),
                             set(a.kind), set(a.layers))
    out.mkdir(parents=True, exist_ok=True)
    for f in pruned_dir.iterdir():
        if f.is_file() and f.name not in (WEIGHTS, "config.json"):
            shutil.copy(f, out / f.name)
    cfg.pop("leanserve_sparsity", None)
    cfg["leanserve_restored_dense"] = {"from": str(pruned_dir), "kind": a.kind, "layers": a.layers,
                                       "share_of_linear_weights": round(share, 4)}
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    print(f"{out}: {share:.1%} of the decoder-block linear weights dense again")
    return 0


if __name__ == "__main__":
    sys.exit(main())
