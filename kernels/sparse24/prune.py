"""Offline 2:4 pruning of Llama-style HF checkpoints: magnitude, Wanda, SparseGPT, ARMOR (kernels/sparse24/armor.py).

Every nn.Linear inside the decoder blocks (checkpoint.is_block_linear; model.model.layers[*])
is pruned to 2:4 along its input dimension (each group of 4 consecutive input columns of each output
row keeps 2 weights). Embeddings and lm_head are left dense. Calibration is
sequential as in the SparseGPT / Wanda reference code: the inputs of block i+1 are
the outputs of the already pruned block i. All math is float32 on CPU.
"""
from __future__ import annotations

import json
import os
import time

import torch
from torch import nn

from .checkpoint import is_block_linear, write_marker
from .format import count_24_violations

METHODS = ("magnitude", "wanda", "sparsegpt", "armor")
ARMOR_PROXIES = ("nowag", "hessian")  # kernels/sparse24/armor.py: the authors' diagonal loss, or the full X X^T


# ----------------------------------------------------------------------------- per-layer pruners

def mask_24(score: torch.Tensor) -> torch.Tensor:
    """Keep-mask [N, K] (bool) keeping the 2 highest scores of each group of 4 along K."""
    n, k = score.shape
    if k % 4:
        raise ValueError(f"2:4 pruning needs in_features to be a multiple of 4, got {k}")
    top = score.reshape(n, k // 4, 4).topk(2, dim=-1).indices
    keep = torch.zeros(n, k // 4, 4, dtype=torch.bool, device=score.device)
    return keep.scatter_(-1, top, True).reshape(n, k)


def prune_magnitude(w: torch.Tensor) -> torch.Tensor:
    """Drop the 2 smallest |w| of each group of 4."""
    return w * mask_24(w.abs())


def prune_wanda(w: torch.Tensor, act_sq: torch.Tensor) -> torch.Tensor:
    """Wanda: score |W_ij| * ||X_j||_2; act_sq[j] = sum of x_j^2 over calibration tokens."""
    return w * mask_24(w.abs() * act_sq.float().sqrt()[None, :])


@torch.no_grad()
def prune_sparsegpt(w: torch.Tensor, hessian: torch.Tensor, blocksize: int = 128,
                    percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT with prune_n=2, prune_m=4 (Frantar & Alistarh 2023, reference implementation).

    hessian: X X^T (any positive scale) over calibration tokens, [K, K].
    Within each group of 4 the 2 weights with the smallest w^2 / [H^-1]_jj^2 are
    pruned (H^-1 in its upper Cholesky form), and the OBS update spreads their
    error over the columns not processed yet.
    """
    if blocksize % 4:
        raise ValueError("blocksize must be a multiple of 4")
    W = w.detach().clone().float()
    H = hessian.detach().clone().float()
    ncols = W.shape[1]
    if ncols % 4:
        raise ValueError(f"2:4 pruning needs in_features to be a multiple of 4, got {ncols}")
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H += damp * torch.eye(ncols, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(Hinv)
    Hinv = torch.linalg.cholesky(Hinv, upper=True)

    for i1 in range(0, ncols, blocksize):
        i2 = min(i1 + blocksize, ncols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)
        prune1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if i % 4 == 0:  # choose this group's mask from the current (updated) weights
                score = W1[:, i:i + 4] ** 2 / d1[i:i + 4].reshape(1, -1) ** 2
                prune1.scatter_(1, i + score.topk(2, dim=1, largest=False).indices, True)
            w_col = W1[:, i]
            q = w_col.masked_fill(prune1[:, i], 0.0)
            Q1[:, i] = q
            err = (w_col - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(w.dtype)


class LinearStats:
    """Accumulates what a pruner needs from the inputs of one nn.Linear."""

    def __init__(self, in_features: int, method: str, full: bool = False):
        """full: keep X X^T (SparseGPT does; ARMOR with the full proxy) rather than only its diagonal."""
        self.method = method
        self.tokens = 0
        self.full = full or method == "sparsegpt"
        if self.full:
            self.H = torch.zeros(in_features, in_features)
        elif method in ("wanda", "armor"):
            self.sq = torch.zeros(in_features)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        if self.full:
            self.H += x.t() @ x
        elif self.method in ("wanda", "armor"):
            self.sq += (x * x).sum(0)

    def prune(self, w: torch.Tensor, blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
        if self.method == "armor":
            raise ValueError("ARMOR replaces the layer rather than its weight: prune_model_inplace runs armor_prune")
        if self.method == "magnitude":
            return prune_magnitude(w)
        if self.method == "wanda":
            return prune_wanda(w, self.sq)
        return prune_sparsegpt(w, self.H / max(self.tokens, 1), blocksize, percdamp)


# ----------------------------------------------------------------------------- sequential block loop

def block_linears(block: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    """The linears of one decoder block that become 2:4, by full module name (prefix: the block's)."""
    return {f"{prefix}.{name}": m for name, m in block.named_modules()
            if isinstance(m, nn.Linear) and is_block_linear(f"{prefix}.{name}")}


class _Stop(Exception):
    pass


def _capture_block0_inputs(model, layers, calib_ids):
    """Run the model on each sample up to block 0 and keep that block's (args, kwargs)."""
    captured = []

    def hook(_module, args, kwargs):
        captured.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for j in range(calib_ids.shape[0]):
            try:
                model(calib_ids[j:j + 1], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _run_block(layer, args, kwargs, hidden):
    if args:
        out = layer(hidden, *args[1:], **kwargs)
    else:
        out = layer(**{**kwargs, "hidden_states": hidden})
    return out[0] if isinstance(out, (tuple, list)) else out


def armor_block_size(model, block: int | None) -> int:
    """The ARMOR block size for this model: `block` checked against every block linear, or the automatic one."""
    from .armor import auto_block, check_block

    dims = [(m.out_features, m.in_features) for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and is_block_linear(name)]
    if block is None:
        return auto_block(dims)
    for o, i in dims:
        check_block(block, o, i)
    return block


@torch.no_grad()
def prune_model_inplace(model, method: str, calib_ids: torch.Tensor | None = None,
                        progress: bool = True, blocksize: int = 128,
                        percdamp: float = 0.01, armor: dict | None = None) -> dict[str, int]:
    """Prune every nn.Linear of model.model.layers to 2:4. calib_ids: [samples, seqlen] token ids
    (ignored for magnitude). armor: options of kernels/sparse24/armor.armor_prune (block, iters, lr, seed) and
    "proxy" (ARMOR_PROXIES; "hessian" starts each layer from SparseGPT's result); with method "armor" each linear is
    replaced by an ArmorLinear and `armor["report"]` collects per-layer losses.
    Returns {linear name: number of weights}."""
    from tqdm.auto import tqdm

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    layers = model.model.layers
    pruned: dict[str, int] = {}
    if method == "armor":
        armor = {} if armor is None else armor  # filled in place: the caller reads back "block" and "report"
        armor["block"] = armor_block_size(model, armor.get("block"))
        armor.setdefault("report", {})
        if armor.setdefault("proxy", "nowag") not in ARMOR_PROXIES:
            raise ValueError(f"unknown ARMOR proxy {armor['proxy']!r}; choose from {', '.join(ARMOR_PROXIES)}")
    bar = tqdm(range(len(layers)), desc=f"2:4 {method}", disable=not progress)

    if method == "magnitude":
        for i in bar:
            for name, lin in block_linears(layers[i], f"model.layers.{i}").items():
                lin.weight.data = prune_magnitude(lin.weight.data.float()).to(lin.weight.dtype)
                pruned[name] = lin.weight.numel()
        return pruned

    if calib_ids is None:
        raise ValueError(f"method {method!r} needs calibration token ids")
    captured = _capture_block0_inputs(model, layers, calib_ids)
    hidden = [args[0] if args else kw["hidden_states"] for args, kw in captured]
    for i in bar:
        layer = layers[i]
        linears = block_linears(layer, f"model.layers.{i}")
        full = method == "armor" and armor["proxy"] == "hessian"
        stats = {name: LinearStats(lin.in_features, method, full) for name, lin in linears.items()}
        hooks = [lin.register_forward_hook(lambda _m, inp, _o, s=stats[name]: s.add(inp[0]))
                 for name, lin in linears.items()]
        try:
            for (args, kw), h in zip(captured, hidden):
                _run_block(layer, args, kw, h)
        finally:
            for hk in hooks:
                hk.remove()
        for name, lin in linears.items():
            if method == "armor":
                _armor_linear(model, name, lin, stats[name], armor, bar)
            else:
                new_w = stats[name].prune(lin.weight.data.float(), blocksize, percdamp)
                lin.weight.data = new_w.to(lin.weight.dtype)
            pruned[name] = lin.weight.numel()
        # The next block calibrates on the outputs of this pruned block.
        hidden = [_run_block(layer, args, kw, h) for (args, kw), h in zip(captured, hidden)]
    return pruned


def _armor_linear(model, name: str, lin: nn.Linear, stats: LinearStats, opts: dict, bar) -> None:
    """ARMOR on one linear; the model then computes with the factored layer (the next block calibrates on it)."""
    from .armor import armor_prune
    from .armor_model import ArmorLinear, replace_linear

    short = name.split(".", 2)[-1]

    def on_iter(it, loss):
        if it % 50 == 0:
            bar.set_postfix_str(f"{short} iter {it} loss {loss:.4g}", refresh=True)

    w = lin.weight.data.float()
    if stats.full:  # the full proxy starts from SparseGPT's 2:4 weight on the same statistics
        hess = stats.H / max(stats.tokens, 1)
        kw = {"hessian": hess, "start": prune_sparsegpt(w, hess)}
        sq = None
    else:
        kw, sq = {}, stats.sq
    res = armor_prune(w, sq, opts["block"], iters=opts.get("iters", 1000), lr=opts.get("lr", 1e-4),
                      seed=opts.get("seed", 0), on_iter=on_iter, **kw)
    dt = lin.weight.dtype
    replace_linear(model, name, ArmorLinear(res.core.to(dt), res.a.to(dt), res.b.to(dt),
                                            None if lin.bias is None else lin.bias.data))
    opts["report"][name] = {"loss_init": round(res.loss_init, 6), "loss": round(res.loss, 6), "iters": res.iters}


# ----------------------------------------------------------------------------- calibration data, checkpoint

def calibration_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`samples` random windows of `seqlen` tokens from a 1-D id tensor (seeded) -> [samples, seqlen]."""
    if ids.numel() <= seqlen:
        raise ValueError(f"calibration text has {ids.numel()} tokens, need more than seqlen={seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (samples,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def save_like(model, tokenizer, src_dir: str, out_dir: str) -> None:
    """Save model + tokenizer to out_dir (safetensors) in src_dir's half-precision dtype, if it had one (the
    pruners and distillation compute in float32)."""
    with open(os.path.join(src_dir, "config.json")) as f:
        cfg = json.load(f)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.get("dtype") or cfg.get("torch_dtype"))
    if dtype is not None:
        model.to(dtype)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def prune_model(model_dir: str, out_dir: str, method: str, calib_path: str | list[str] | None = None,
                samples: int = 128, seqlen: int = 2048, progress: bool = True,
                seed: int = 0, armor: dict | None = None) -> dict:
    """Prune a HF Llama-style checkpoint to 2:4 and save it (safetensors + tokenizer) to out_dir.

    calib_path: text (.txt) or conversations (.jsonl, rendered through the chat template), or a list of them
    (kernels/calibration.py). config.json gets the marker (checkpoint.MARKER_KEY): {"format": "2:4", "method",
    "samples", "seqlen", "calib"}, plus "armor": {"block_size", "iters", "lr", "proxy", "added_params"} for ARMOR, whose
    wrappers are stored beside each core (kernels/sparse24/armor_model.py). Returns a summary dict.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kernels.calibration import calibration_ids

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method != "magnitude" and not calib_path:
        raise ValueError(f"method {method!r} needs a calibration text file (--calib)")
    paths = [calib_path] if isinstance(calib_path, str) else list(calib_path or [])
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    calib = None
    if method != "magnitude":
        calib = calibration_windows(calibration_ids(tokenizer, paths), samples, seqlen, seed)
    armor = dict(armor or {}) if method == "armor" else None
    pruned = prune_model_inplace(model, method, calib, progress=progress, armor=armor)

    params = dict(model.named_parameters())
    bad = {n: count_24_violations(params[n + ".weight"]) for n in pruned}
    bad = {n: v for n, v in bad.items() if v}
    if bad:
        raise RuntimeError(f"pruned weights are not 2:4: {bad}")

    save_like(model, tokenizer, model_dir, out_dir)
    marker = {"method": method,
              "samples": samples if calib is not None else 0,
              "seqlen": seqlen if calib is not None else 0,
              "calib": ",".join(os.path.basename(p) for p in paths) if calib is not None else None}
    summary = {}
    if armor is not None:
        from .armor import added_params
        extra = sum(added_params(params[n + ".weight"].shape[0], params[n + ".weight"].shape[1], armor["block"])
                    for n in pruned)
        report = armor["report"]
        marker["armor"] = {"block_size": armor["block"], "iters": armor.get("iters", 1000), "lr": armor.get("lr", 1e-4),
                           "proxy": armor["proxy"], "added_params": extra}
        summary = {"added_params": extra, "dense_block_params": sum(pruned.values()),
                   "model_params": sum(p.numel() for p in model.parameters()) - extra,
                   "loss_init": sum(r["loss_init"] for r in report.values()) / len(report),
                   "loss": sum(r["loss"] for r in report.values()) / len(report),
                   "worse_than_init": [n for n, r in report.items() if r["loss"] > r["loss_init"]]}
        with open(os.path.join(out_dir, "armor_report.json"), "w") as f:
            json.dump(report, f, indent=1)
    write_marker(out_dir, marker)
    return {**marker, **summary, "out_dir": out_dir, "linears": len(pruned),
            "pruned_weights": sum(pruned.values()) // 2, "seconds": round(time.time() - t0, 1)}
