"""End-to-end distillation of a 2:4-pruned model to its dense original: the stage after a calibrated pruner.

SparseGPT and ARMOR each fit one linear to its own inputs; their errors compound through the blocks, and what
the served model loses most (its chat answers, its facts) is in no single layer's loss. This stage trains what
the pruner chose on the model's own output: the kept values of every 2:4 weight (its mask fixed, so the result
is still 2:4) and, for ARMOR, the wrappers A and B, to minimise the mean over tokens of KL(dense || pruned) on
non-overlapping windows of the same calibration files (all of them by default, far more than the pruner's
few). Embeddings, norms and the head stay frozen.

A few windows are held out: the weights kept are those of the lowest held-out KL seen (measured before the
first step too), so the stage never returns a model worse on it than the pruner's.
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn

from .checkpoint import is_block_linear


def sparse_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter, torch.Tensor | None]]:
    """(name, parameter, mask) of what distillation trains: every decoder-block linear's weight with its 2:4
    mask (nonzero entries), and the ARMOR wrappers (dense block-diagonal factors, mask None)."""
    from .armor_model import ArmorLinear

    out = []
    for name, mod in model.named_modules():
        if not is_block_linear(name):
            continue
        if isinstance(mod, ArmorLinear):
            out.append((name + ".weight", mod.weight, mod.weight.detach() != 0))
            out.append((name + ".armor_a", mod.armor_a, None))
            out.append((name + ".armor_b", mod.armor_b, None))
        elif isinstance(mod, nn.Linear):
            out.append((name + ".weight", mod.weight, mod.weight.detach() != 0))
    if not out:
        raise ValueError("no decoder-block linear layers to distill")
    return out


def token_kl(student_logits: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student); logits [..., vocab], teacher given as log-probabilities."""
    s = student_logits.float().log_softmax(-1).flatten(0, -2)
    t = teacher_logp.flatten(0, -2)
    return (t.exp() * (t - s)).sum(-1).mean()


@torch.no_grad()
def _teacher_logp(teacher, ids):
    return teacher(input_ids=ids, use_cache=False).logits.float().log_softmax(-1)


@torch.no_grad()
def held_out_kl(student, teacher, windows: torch.Tensor, batch: int) -> float:
    total = 0.0
    for i in range(0, len(windows), batch):
        ids = windows[i:i + batch]
        total += token_kl(student(input_ids=ids, use_cache=False).logits, _teacher_logp(teacher, ids)).item() * len(ids)
    return total / len(windows)


def _lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over the first 5% of the steps, then cosine down to a tenth."""
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    x = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * x)))


def distill(student: nn.Module, teacher: nn.Module, windows: torch.Tensor, steps: int, lr: float = 1e-4,
            batch_tokens: int = 1024, held_out: int | None = None, evals: int = 10, seed: int = 0,
            progress: bool = True) -> dict:
    """Train `student` (in place) towards `teacher` on token windows [n, seqlen]; returns a report.

    held_out: windows kept out of training for the KL that picks the kept weights (default n // 8, between 1
    and 16; 0 keeps the last step's weights). evals: held-out measurements over the run (plus one before it)."""
    from tqdm.auto import tqdm

    if steps < 1:
        raise ValueError("distillation needs steps >= 1")
    n, seqlen = windows.shape
    held_out = min(16, max(1, n // 8)) if held_out is None else held_out
    if held_out >= n:
        raise ValueError(f"distillation needs more calibration windows ({n}) than held-out ones ({held_out})")
    train, val = windows[:n - held_out], windows[n - held_out:]
    batch = min(max(1, batch_tokens // seqlen), len(train))
    params = sparse_parameters(student)
    for p in student.parameters():
        p.requires_grad_(False)
    for _, p, _ in params:
        p.requires_grad_(True)
    masks = [(p, m) for _, p, m in params if m is not None]
    opt = torch.optim.Adam([p for _, p, _ in params], lr=lr)
    teacher.eval()
    student.eval()  # no dropout either way; gradients flow in eval mode

    def snapshot():
        return [p.detach().clone() for _, p, _ in params]

    t0 = time.time()
    best = held_out_kl(student, teacher, val, batch) if held_out else math.inf
    report = {"steps": steps, "lr": lr, "batch_windows": batch, "train_windows": len(train),
              "held_out_windows": held_out, "held_out_kl_init": None if not held_out else round(best, 6),
              "best_step": 0, "history": []}
    kept = snapshot() if held_out else None
    every = max(1, steps // max(1, evals))
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    bar = tqdm(range(steps), desc="distill", disable=not progress)
    running = None
    for step in bar:
        if len(order) < batch:
            order += torch.randperm(len(train), generator=g).tolist()
        idx, order = order[:batch], order[batch:]
        ids = train[idx]
        for grp in opt.param_groups:
            grp["lr"] = _lr_at(step, steps, lr)
        loss = token_kl(student(input_ids=ids, use_cache=False).logits, _teacher_logp(teacher, ids))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for p, m in masks:  # the pruned entries get no update: the weight stays 2:4
            p.grad.mul_(m)
        opt.step()
        with torch.no_grad():
            for p, m in masks:
                p.mul_(m)
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if held_out and ((step + 1) % every == 0 or step + 1 == steps):
            kl = held_out_kl(student, teacher, val, batch)
            report["history"].append({"step": step + 1, "train_kl": round(running, 6), "held_out_kl": round(kl, 6)})
            if kl < best:
                best, kept, report["best_step"] = kl, snapshot(), step + 1
            bar.set_postfix_str(f"train KL {running:.4f} held-out KL {kl:.4f} (best {best:.4f})", refresh=True)
        else:
            bar.set_postfix_str(f"train KL {running:.4f}", refresh=False)
    with torch.no_grad():
        if kept is not None:
            for (_, p, _), v in zip(params, kept):
                p.copy_(v)
    for _, p, _ in params:
        p.requires_grad_(False)
        p.grad = None
    report["held_out_kl"] = None if not held_out else round(best, 6)
    report["seconds"] = round(time.time() - t0, 1)
    return report


def disjoint_windows(ids: torch.Tensor, samples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`samples` (0: all) of the non-overlapping `seqlen`-token windows of a 1-D id stream, in a seeded random
    order -> [samples, seqlen]. Unlike the pruners' random windows they never overlap, so the windows that
    distill() holds out share no token with those it trains on."""
    n = ids.numel() // seqlen
    if n < 2:
        raise ValueError(f"calibration text has {ids.numel()} tokens: need at least two windows of {seqlen}")
    if samples > n:
        raise ValueError(f"calibration text has {n} windows of {seqlen} tokens, fewer than --samples {samples}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples or n]
    return ids[:n * seqlen].view(n, seqlen)[order]


def distill_checkpoint(model_dir: str, pruned_dir: str, out_dir: str, calib_paths: list[str], steps: int,
                       lr: float = 1e-4, samples: int = 0, seqlen: int = 512, seed: int = 0,
                       progress: bool = True) -> dict:
    """Distil the 2:4 checkpoint pruned_dir (any method; ARMOR with its wrappers) to its dense model_dir on
    disjoint windows of the calibration files (disjoint_windows: `samples` of them, 0 = all); writes out_dir in
    pruned_dir's format, its marker extended by "distill" (and distill_report.json). Returns the report."""
    import json
    import os
    import shutil

    from transformers import AutoModelForCausalLM

    from kernels.calibration import calibration_ids
    from kernels.perplexity import load_model

    from .checkpoint import read_marker, write_marker
    from .format import count_24_violations
    from .prune import save_like

    with open(os.path.join(pruned_dir, "config.json")) as f:
        marker = read_marker(json.load(f))
    if marker is None:
        raise ValueError(f"{pruned_dir} is not a 2:4 checkpoint of `leanserve prune` (no marker in config.json)")
    tokenizer, student = load_model(pruned_dir)
    teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if teacher.config.vocab_size != student.config.vocab_size or \
            teacher.config.num_hidden_layers != student.config.num_hidden_layers:
        raise ValueError(f"{pruned_dir} was not pruned from {model_dir} (vocabulary or layer count differs)")
    windows = disjoint_windows(calibration_ids(tokenizer, list(calib_paths)), samples, seqlen, seed)
    report = distill(student, teacher, windows, steps, lr=lr, seed=seed, progress=progress)
    del teacher
    bad = [n for n, p, m in sparse_parameters(student) if m is not None and count_24_violations(p)]
    if bad:
        raise RuntimeError(f"distilled weights are not 2:4: {bad[:5]}")
    save_like(student, tokenizer, pruned_dir, out_dir)
    for extra in ("armor_report.json",):  # the pruner's own report stays with the checkpoint
        if os.path.exists(os.path.join(pruned_dir, extra)):
            shutil.copy(os.path.join(pruned_dir, extra), os.path.join(out_dir, extra))
    marker.pop("format", None)
    marker["distill"] = {"steps": steps, "lr": lr, "calib": ",".join(os.path.basename(p) for p in calib_paths),
                         "samples": len(windows), "seqlen": seqlen,
                         **{k: report[k] for k in ("held_out_kl_init", "held_out_kl", "best_step")}}
    write_marker(out_dir, marker)
    with open(os.path.join(out_dir, "distill_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report
