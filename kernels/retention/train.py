"""Training of retention gates for a frozen HF model, with the authors' objective (TRIM-KV):

    loss = (CE(next token) + KL(teacher || gated)) / 2 + cap_weight * L_cap

The gated model adds log beta_k * (q - k) to every attention logit (the soft form of forgetting);
the teacher is the same model without gates. L_cap (reference.capacity_loss) asks that the expected
number of retained tokens S_t = sum_i beta_i^(t-i) stays within the budget M at every step.
Training state (gates, optimiser, step, losses) is saved every `checkpoint_every` steps and on
Ctrl-C; running again with the same OUT_DIR resumes. objective="rank" trains the served eviction rule against
hindsight instead (rank.py; ours, not the authors').
"""
from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import TokenPool, read_documents
from .gate import GateMeta, GateSet, config_sha256, widen_into
from .llama import Parts, check_supported, forward_full
from . import evict, rank
from .ops import capacity_sum
from .reference import capacity_loss

STATE = "train_state.pt"


@dataclass
class TrainConfig:
    model_dir: str
    out_dir: str
    sources: list[dict] = field(default_factory=list)  # [{"path", "slice": [a, b], "exclude_ids_from", "weight"}]
    budget: int = 128
    buffer: int = 128
    seq_len: int = 1024
    batch: int = 1
    steps: int = 400
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.0
    gate_width: int = 128
    bias_init: float = 8.0
    cap_weight: float = 1.0
    checkpoint_every: int = 25
    seed: int = 0
    init_from: str = ""              # start from these gates (e.g. trained on shorter sequences)
    recompute: bool = False          # recompute layers in the backward pass (long sequences)
    sinks: int = 4                   # the first positions of every sequence are never forgotten, as served
    threads: int = 0
    objective: str = "trimkv"        # "trimkv": the authors' loss; "rank": rank.py against hindsight; "evict": evict.py
    rank_budgets: list[int] = field(default_factory=lambda: [64, 128, 256])  # budgets of the rank and evict objectives
    rank_starts: int = 8             # compaction starts sampled per sequence (rank objective)
    evict_temperature: float = 0.1   # softness of the relaxed eviction (evict objective)

    def check(self) -> None:
        if self.objective not in ("trimkv", "rank", "evict"):
            raise ValueError(f"unknown objective {self.objective!r}: trimkv, rank or evict")
        if self.objective in ("rank", "evict") and (min(self.rank_budgets) <= self.sinks or self.rank_starts < 1):
            raise ValueError("rank budgets must exceed --sinks and --rank-starts must be >= 1")
        if self.objective == "evict" and (max(self.rank_budgets) + self.buffer >= self.seq_len
                                          or self.evict_temperature <= 0):
            raise ValueError("evict: every budget + buffer must be below --seq-len, and the temperature above 0")
        if self.seq_len < 4 * self.budget:
            raise ValueError(f"--seq-len {self.seq_len} must be at least 4x the budget ({4 * self.budget})")
        if min(self.budget, self.buffer, self.batch, self.steps, self.gate_width) < 1:
            raise ValueError("budget, buffer, batch, steps and gate width must be >= 1")
        if not self.sources:
            raise ValueError("no training text given")

    def same_run(self, other: dict) -> list[str]:
        """Fields that differ from a saved run's config (what may not change on resume)."""
        fixed = ("model_dir", "budget", "seq_len", "batch", "gate_width", "bias_init", "seed", "sources", "init_from",
                 "sinks", "objective", "rank_budgets", "rank_starts", "evict_temperature")
        # A field newer than the saved run is taken at its default there.
        return [k for k in fixed if other.get(k, getattr(TrainConfig, k, None)) != asdict(self)[k]]


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def losses(parts: Parts, gates: GateSet, ids: torch.Tensor, budget: int,
           recompute: bool = False, sinks: int = 0) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        teacher, _ = forward_full(parts, ids)
        t_logp = F.log_softmax(teacher[:, :-1].float(), -1)
        del teacher
    student, log_betas = forward_full(parts, ids, gates, bias=True, checkpoint=recompute, sinks=sinks)
    s_logp = F.log_softmax(student[:, :-1].float(), -1)
    del student
    ce = F.nll_loss(s_logp.flatten(0, 1), ids[:, 1:].flatten())
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    cap = capacity_loss(capacity_sum(torch.stack(log_betas, 1)), budget)
    return {"ce": ce, "kl": kl, "cap": cap, "task": (ce + kl) / 2}


class Trainer:
    def __init__(self, cfg: TrainConfig, progress: bool = True, log=print):
        cfg.check()
        self.cfg, self.progress, self.log = cfg, progress, log
        self.out = Path(cfg.out_dir)
        self.stop_after: int | None = None  # stop (and save) after this step, as Ctrl-C would

    # ---- setup --------------------------------------------------------------------------------
    def _load_model(self):
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        config = AutoConfig.from_pretrained(self.cfg.model_dir)
        check_supported(config)  # before loading any weights
        model = AutoModelForCausalLM.from_pretrained(self.cfg.model_dir, dtype=torch.float32).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model, AutoTokenizer.from_pretrained(self.cfg.model_dir)

    def _pools(self, tok) -> list[tuple[TokenPool, float]]:
        from .data import read_ids

        pools = []
        for src in self.cfg.sources:
            excl = read_ids(src["exclude_ids_from"]) if src.get("exclude_ids_from") else set()
            docs = read_documents(src["path"], tuple(src.get("slice", (0.0, 1.0))), excl)
            pools.append((TokenPool(tok, docs, Path(src["path"]).name), float(src.get("weight", 1.0))))
        return pools

    def batch(self, pools, step: int) -> torch.Tensor:
        """The same batch for the same (seed, step): a resumed run sees the data it would have seen."""
        rng = np.random.default_rng([self.cfg.seed, step])
        w = np.asarray([wt for _, wt in pools])
        rows = [pools[rng.choice(len(pools), p=w / w.sum())][0].window(rng, self.cfg.seq_len)
                for _ in range(self.cfg.batch)]
        return torch.from_numpy(np.stack(rows))

    def initial_gates(self, model) -> GateSet:
        cfg, mc = self.cfg, model.config
        meta = GateMeta(hidden_size=mc.hidden_size, num_layers=mc.num_hidden_layers,
                        num_kv_heads=mc.num_key_value_heads, intermediate_size=cfg.gate_width,
                        bias_init=cfg.bias_init, model=Path(cfg.model_dir).name,
                        model_config_sha256=config_sha256(cfg.model_dir), budget=cfg.budget, buffer=cfg.buffer,
                        sinks=cfg.sinks)
        torch.manual_seed(cfg.seed)
        gates = GateSet(meta)
        if cfg.init_from:
            start = GateSet.load(cfg.init_from)
            start.meta.check_model(meta.hidden_size, meta.num_layers, meta.num_kv_heads)
            widen_into(gates, start)
            meta.bias_init = start.meta.bias_init  # the start's, not this run's unused --bias-init
            meta.training = {"init_from": {"model": start.meta.model, "budget": start.meta.budget,
                                           "training": start.meta.training}}
        return gates

    # ---- run ----------------------------------------------------------------------------------
    def run(self) -> GateSet:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        model, tok = self._load_model()
        parts = Parts(model)
        gates = self.initial_gates(model)
        meta = gates.meta
        opt = torch.optim.AdamW(gates.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        history, step, seconds = [], 0, 0.0
        state_path = self.out / STATE
        if state_path.exists():
            st = torch.load(state_path, weights_only=False)
            diff = cfg.same_run(st["config"])
            if diff:
                raise ValueError(f"{self.out} holds a run with other settings ({', '.join(diff)}); "
                                 "use another OUT_DIR or delete it")
            gates.load_state_dict(st["gates"])
            opt.load_state_dict(st["optimizer"])
            history, step, seconds = st["history"], st["step"], st["seconds"]
            self.log(f"resuming {self.out} at step {step}/{cfg.steps}")
        self.out.mkdir(parents=True, exist_ok=True)
        pools = self._pools(tok)
        self.log("training text: " + ", ".join(f"{p.name} ({p.tokens:,} tokens)" for p, _ in pools))
        self.log(f"gates: {gates.num_parameters():,} parameters "
                 f"({100 * gates.num_parameters() / sum(p.numel() for p in model.parameters()):.2f}% of the model)")

        stop = {"now": False}
        old = signal.getsignal(signal.SIGINT)

        def on_int(signum, frame):  # finish the step, save, exit; a second Ctrl-C aborts at once
            if stop["now"]:
                raise KeyboardInterrupt
            stop["now"] = True
            self.log("interrupted: saving after this step (Ctrl-C again to abort)")
        signal.signal(signal.SIGINT, on_int)

        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=step, desc="train-gates", unit="step", dynamic_ncols=True)
        try:
            while step < cfg.steps and not stop["now"]:
                t0 = time.perf_counter()
                for g in opt.param_groups:
                    g["lr"] = lr_at(cfg, step)
                if cfg.objective == "rank":
                    starts = rank.sample_starts(np.random.default_rng([cfg.seed, step, 1]), cfg.seq_len,
                                                cfg.rank_budgets, cfg.buffer, cfg.rank_starts)
                    parts_ = rank.losses(parts, gates, self.batch(pools, step), cfg.rank_budgets, cfg.buffer,
                                         cfg.sinks, starts)
                    loss = parts_["rank"]
                elif cfg.objective == "evict":  # one budget per step, in turn
                    m = cfg.rank_budgets[step % len(cfg.rank_budgets)]
                    parts_ = evict.losses(parts, gates, self.batch(pools, step), m, cfg.buffer, cfg.sinks,
                                          cfg.evict_temperature, cfg.recompute)
                    loss = parts_["kl"]
                else:
                    parts_ = losses(parts, gates, self.batch(pools, step), cfg.budget, cfg.recompute, cfg.sinks)
                    loss = parts_["task"] + cfg.cap_weight * parts_["cap"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                seconds += time.perf_counter() - t0
                rec = {"step": step, "loss": float(loss.detach()), **{k: float(v.detach()) for k, v in parts_.items()},
                       "lr": lr_at(cfg, step - 1), "seconds": round(seconds, 1)}
                history.append(rec)
                if self.stop_after is not None and step >= self.stop_after:
                    stop["now"] = True
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{rec[k]:.4f}" for k in self.curve_keys()[1:]}, loss=f"{rec['loss']:.4f}")
                if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop["now"]:
                    self._save_state(gates, opt, history, step, seconds)
        finally:
            signal.signal(signal.SIGINT, old)
            if bar is not None:
                bar.close()
        if step < cfg.steps:
            self.log(f"stopped at step {step}/{cfg.steps}; run the same command again to resume")
            return gates
        meta.training = {
            **meta.training,
            "steps": step, "seq_len": cfg.seq_len, "batch": cfg.batch, "lr": cfg.lr, "warmup": cfg.warmup,
            "cap_weight": cfg.cap_weight, "sinks": cfg.sinks, "seed": cfg.seed, "wall_seconds": round(seconds, 1),
            "threads": torch.get_num_threads(),
            "sources": [{k: (Path(v).name if k in ("path", "exclude_ids_from") else v) for k, v in s.items()}
                        for s in cfg.sources],
            "objective": cfg.objective, **({"rank_budgets": cfg.rank_budgets, "rank_starts": cfg.rank_starts}
                                           if cfg.objective == "rank" else {}),
            **({"budgets": cfg.rank_budgets, "evict_temperature": cfg.evict_temperature}
               if cfg.objective == "evict" else {}),
            "final": {k: round(float(np.mean([h[k] for h in history[-20:]])), 5) for k in history[-1]
                      if k not in ("step", "lr", "seconds")},
        }
        gates.meta = meta
        gates.save(self.out)
        self.write_curve(history)
        self.log(f"wrote {self.out} ({step} steps, {seconds / 60:.1f} min)")
        return gates

    def _save_state(self, gates, opt, history, step, seconds) -> None:
        tmp = self.out / (STATE + ".tmp")
        torch.save({"config": asdict(self.cfg), "gates": gates.state_dict(), "optimizer": opt.state_dict(),
                    "history": history, "step": step, "seconds": seconds}, tmp)
        tmp.replace(self.out / STATE)
        (self.out / "history.json").write_text(json.dumps(history) + "\n")

    def curve_keys(self) -> tuple[str, ...]:
        return {"rank": ("loss", "agree"), "evict": ("loss", "kl")}.get(self.cfg.objective, ("loss", "kl", "cap"))

    def write_curve(self, history: list[dict]) -> Path:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [h["step"] for h in history]
        titles = {"loss": "total loss", "kl": "KL(teacher || gated)", "cap": "capacity loss",
                  "agree": "share of the hindsight set kept"}
        keys = self.curve_keys()
        fig, ax = plt.subplots(1, len(keys), figsize=(4.4 * len(keys), 3.6))
        for a, key in zip(ax, keys):
            title = titles[key]
            y = np.asarray([h[key] for h in history])
            a.plot(steps, y, lw=0.6, alpha=0.5)
            if len(y) >= 10:
                k = max(5, len(y) // 25)
                a.plot(steps[k - 1:], np.convolve(y, np.ones(k) / k, mode="valid"), lw=1.5)
            a.set_title(title)
            a.set_xlabel("step")
            a.set_yscale("log" if key in ("kl", "cap") and (y > 0).all() else "linear")
        fig.suptitle(f"train-gates: budget {self.cfg.budget}, {self.cfg.seq_len} tokens per sequence")
        fig.tight_layout()
        path = self.out / "loss.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
