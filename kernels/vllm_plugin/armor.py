"""ARMOR checkpoints in vLLM: the same ``--quantization leanserve-2of4``, an ARMOR linear method per block linear.

A checkpoint written by ``leanserve prune --method armor`` (kernels/sparse24/armor_model.py has the format) stores,
for every block linear ``model.layers.<i>.<...>_proj``, the 2:4 core ``.weight`` C [d_out, d_in], the output wrapper
``.armor_a`` A [d_out/b, b, b] and the input wrapper ``.armor_b`` B [d_in/b, b, b]; the layer computes
y = x (A C B)^T = ((x B^T) C^T) A^T (kernels/sparse24/armor.armor_linear). config.json's marker says
``"method": "armor"`` and ``"armor": {"block_size": b, ...}``. ``Sparse24Config.from_config`` reads it and
``Sparse24Config.get_quant_method`` gives every block linear an ``ArmorLinearMethod``.

vLLM merges layers: ``qkv_proj`` holds the checkpoint's q_proj, k_proj and v_proj (its loader gets shard id
"q"/"k"/"v"), ``gate_up_proj`` holds gate_proj and up_proj (shard id 0/1), ``o_proj`` / ``down_proj`` are plain (no
shard id). The merged layer has S shards of output sizes n_0 .. n_{S-1} and one input. So:

* ``weight``: the dense core [sum n_s, d_in], created (and loaded, shard by shard) exactly as vLLM's unquantized
  method does; the 2:4 method's checks and CPU / CUDA paths then apply to it (kernels/vllm_plugin/sparse24.py).
* ``armor_a`` [sum n_s / b, b, b]: the blocks of shard s start at block (n_0 + .. + n_{s-1}) / b, so each output
  block belongs to one shard: b must divide every n_s (checked at start-up, naming the layer).
* ``armor_b`` [S, d_in / b, b, b]: one B per shard (q, k and v each have their own), all applied to the same input.

apply(x): t_s = x B_s^T (bd_apply), u_s = t_s C_s^T (the shard's rows of the core, through the 2:4 path: CPU
``dense``: the masked dense core through vLLM's CPU GEMM, one prepacked GEMM per shard; ``compressed`` / ``triton``
and CUDA: the packed core through ``kernels.sparse24.ops.sparse24_linear``), u = [u_0 .. u_{S-1}],
y = bd_apply(u, A) over all output blocks at once, then the bias. The wrappers add b (d_out + S d_in) parameters per
layer (logged at start-up).

Tensor parallelism is refused (one line, at start-up). It would be simple in principle (a column-parallel rank owns
whole shards' output blocks and the full input; a row-parallel rank owns input blocks and applies the full A before
vLLM's all-reduce, which is linear), but the loaders would have to narrow A / B by rank and nothing here could test it.

Served without ``--quantization leanserve-2of4``, vLLM's Llama loader stops at the first wrapper tensor
("There is no module or parameter named 'layers.0.mlp.down_proj.armor_a' in LlamaModel"): it never serves the cores
alone (tests/integration/test_armor_engine.py checks it).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vllm.model_executor.layers.linear import LinearMethodBase, QKVParallelLinear, UnquantizedLinearMethod
from vllm.model_executor.utils import set_weight_attrs

from kernels.sparse24.armor import bd_apply
from kernels.sparse24.checkpoint import MARKER_KEY
from kernels.sparse24.format import compress_24, compressed_nbytes

from .sparse24 import NAME, _name, check_24, cpu_mode, log, path_description, sparse24_linear_op

A_NAME, B_NAME = "armor_a", "armor_b"
QKV_IDS = ("q", "k", "v")


def armor_block_size(marker: dict[str, Any]) -> int:
    """The wrapper block size of an ARMOR marker; ValueError when it has none or it is not a multiple of 4."""
    arm = marker.get("armor")
    b = arm.get("block_size") if isinstance(arm, dict) else None
    if not isinstance(b, int) or isinstance(b, bool) or b < 4 or b % 4:
        raise ValueError(
            f"--quantization {NAME}: config.json's {MARKER_KEY} says method \"armor\" but its \"armor\" entry "
            f"{arm!r} has no valid \"block_size\" (a positive multiple of 4); re-run `leanserve prune --method armor`")
    return b


class _CoreShard(nn.Module):
    """One shard's rows of the dense core, for vLLM's CPU GEMM dispatch (which prepacks `weight`)."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = None


class ArmorLinearMethod(LinearMethodBase):
    """y = ((x B_s^T) C_s^T per shard, concatenated) A^T + bias; see the module docstring."""

    def __init__(self, config, prefix: str = ""):
        self.config = config
        self.prefix = prefix
        self.block = armor_block_size(config.marker)
        self._dense = UnquantizedLinearMethod()

    # ------------------------------------------------------------------ weights

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs):
        name, b = self.prefix or _name(layer), self.block
        tp = getattr(layer, "tp_size", 1) or 1
        if tp > 1:
            raise ValueError(f"{name}: --quantization {NAME} serves ARMOR checkpoints with tensor parallel size 1 "
                             f"only (got {tp}); use --tensor-parallel-size 1 (pipeline parallelism works)")
        if input_size_per_partition % 4:
            raise ValueError(f"{name}: 2:4 sparsity needs the input size to be a multiple of 4, got "
                             f"{input_size_per_partition}")
        sizes = [int(n) for n in output_partition_sizes]
        labels = list(QKV_IDS) if isinstance(layer, QKVParallelLinear) and len(sizes) == 3 else list(range(len(sizes)))
        bad = [f"{lab!r}: {n}" if len(sizes) > 1 else str(n) for lab, n in zip(labels, sizes) if n % b]
        if bad:
            what = f"the output size of shard(s) {', '.join(bad)} (shard sizes {sizes})" if len(sizes) > 1 else \
                f"the output size {bad[0]}"
            raise ValueError(f"{name}: ARMOR block size {b} (config.json {MARKER_KEY}.armor.block_size) does not "
                             f"divide {what}; each output block of A must belong to one shard")
        if input_size_per_partition % b:
            raise ValueError(f"{name}: ARMOR block size {b} (config.json {MARKER_KEY}.armor.block_size) does not "
                             f"divide the input size {input_size_per_partition}")
        self._dense.create_weights(layer, input_size_per_partition, output_partition_sizes, input_size,
                                   output_size, params_dtype, **extra_weight_attrs)
        layer.armor_sizes = sizes
        layer.armor_labels = labels
        layer.armor_offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        layer.armor_loaded = set()
        a = nn.Parameter(torch.empty(sum(sizes) // b, b, b, dtype=params_dtype), requires_grad=False)
        bw = nn.Parameter(torch.empty(len(sizes), input_size_per_partition // b, b, b, dtype=params_dtype),
                          requires_grad=False)
        layer.register_parameter(A_NAME, a)
        layer.register_parameter(B_NAME, bw)
        set_weight_attrs(a, {"weight_loader": lambda p, w, sid=None: self._load(layer, "a", p, w, sid)})
        set_weight_attrs(bw, {"weight_loader": lambda p, w, sid=None: self._load(layer, "b", p, w, sid)})
        self.config.armor_layers += 1
        self.config.armor_shards += len(sizes)
        self.config.armor_added_bytes += (a.numel() + bw.numel()) * a.element_size()

    def _shards(self, layer: nn.Module, sid) -> list[int]:
        """The shard indices a checkpoint tensor with this shard id fills (None: all of them, a fused tensor)."""
        n = len(layer.armor_sizes)
        if sid is None:
            return list(range(n))
        if isinstance(sid, str) and sid in layer.armor_labels:
            return [layer.armor_labels.index(sid)]
        if isinstance(sid, int) and not isinstance(sid, bool) and 0 <= sid < n and sid in layer.armor_labels:
            return [sid]
        if isinstance(sid, tuple) and sid and all(isinstance(i, int) and 0 <= i < n for i in sid) and \
                list(sid) == list(range(sid[0], sid[0] + len(sid))):
            return list(sid)
        raise ValueError(f"{self.prefix or _name(layer)}: unknown shard id {sid!r} (shards {layer.armor_labels})")

    def _load(self, layer: nn.Module, which: str, param: torch.Tensor, w: torch.Tensor, sid=None) -> None:
        if sid is None:
            sid = getattr(w, "shard_id", None)  # vLLM's WeightsMapper tags stacked tensors
        shards = self._shards(layer, sid)
        b, name = self.block, self.prefix or _name(layer)
        d_in = param.shape[1] * b if which == "b" else None
        if which == "a":
            rows = sum(layer.armor_sizes[i] for i in shards)
            want = [(rows // b, b, b)]
        else:
            want = [(d_in // b, b, b), (len(shards), d_in // b, b, b)]
        if tuple(w.shape) not in want:
            hint = ""
            if w.dim() >= 3 and w.shape[-1] == w.shape[-2] and w.shape[-1] != b:
                hint = f": the checkpoint's blocks are {w.shape[-1]} x {w.shape[-1]}, the marker says {b}"
            tensor = f"{name}.{A_NAME if which == 'a' else B_NAME}" + (f" (shard {sid!r})" if sid is not None else "")
            raise ValueError(f"{tensor} has shape {tuple(w.shape)}, expected {want[0]} for ARMOR block size {b} "
                             f"(config.json {MARKER_KEY}.armor.block_size){hint}")
        with torch.no_grad():
            if which == "a":
                start = layer.armor_offsets[shards[0]] // b
                param.data[start:start + w.shape[0]].copy_(w)
            else:
                w = w.reshape(-1, *w.shape[-3:]).expand(len(shards), -1, -1, -1)
                for j, s in enumerate(shards):
                    param.data[s].copy_(w[j])
        layer.armor_loaded.update((which, s) for s in shards)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        name = self.prefix or _name(layer)
        missing = [f"{A_NAME if w == 'a' else B_NAME}[{layer.armor_labels[s]!r}]"
                   for w in ("a", "b") for s in range(len(layer.armor_sizes)) if (w, s) not in layer.armor_loaded]
        if missing:
            raise ValueError(f"{name}: the ARMOR checkpoint has no {', '.join(missing)} for this layer (every "
                             f"block linear needs .{A_NAME} and .{B_NAME}; re-run `leanserve prune --method armor`)")
        w = check_24(layer, name)
        n, k = w.shape
        mode = "triton" if w.is_cuda else cpu_mode()
        layer.sparse24_path = mode
        self._account(layer, mode, compressed_nbytes(n, k, w.dtype), w.numel() * w.element_size())
        sizes, offs = layer.armor_sizes, layer.armor_offsets
        if mode == "dense":
            if len(sizes) == 1:
                shards = [layer]  # vLLM's CPU GEMM on the layer's own weight
            else:
                shards = [_CoreShard(w[o:o + s].clone()) for o, s in zip(offs, sizes)]
            for sh in shards:
                self._dense.process_weights_after_loading(sh)  # CPU GEMM dispatch (prepack)
            layer.armor_core = shards  # a plain list: not submodules (vLLM is iterating the modules now)
            if len(sizes) == 1:
                return
        else:
            values, meta = compress_24(w)
            layer.register_buffer("sparse24_values", values, persistent=False)
            layer.register_buffer("sparse24_meta", meta, persistent=False)
        layer.weight = nn.Parameter(torch.empty(0, dtype=w.dtype, device=w.device), requires_grad=False)
        del w

    # ------------------------------------------------------------------ compute

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        sizes, offs = layer.armor_sizes, layer.armor_offsets
        outs = []
        for s in range(len(sizes)):
            t = bd_apply(x, layer.armor_b[s])
            if layer.sparse24_path == "dense":
                outs.append(self._dense.apply(layer.armor_core[s], t))
            else:
                o, n = offs[s], sizes[s]
                outs.append(sparse24_linear_op(t, layer.sparse24_values[o:o + n], layer.sparse24_meta[o:o + n],
                                               None, use_triton=layer.sparse24_path == "triton"))
        u = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        y = bd_apply(u, layer.armor_a)
        return y if bias is None else y + bias

    def _account(self, layer: nn.Module, mode: str, packed_b: int, dense_b: int) -> None:
        cfg = self.config
        if cfg.layers == 0:
            log.info("%s: ARMOR linear layers: %d (%d checkpoint linears), block size %d, wrappers add %d parameter "
                     "bytes (%.2f MiB, %s); 2:4 core compute path: %s", NAME, cfg.armor_layers, cfg.armor_shards,
                     self.block, cfg.armor_added_bytes,
                     cfg.armor_added_bytes / 2**20, str(layer.armor_a.dtype).removeprefix("torch."),
                     path_description(mode))
        cfg.layers += 1
        cfg.dense_bytes += dense_b
        cfg.packed_bytes += packed_b
