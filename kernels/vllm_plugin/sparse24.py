"""2:4 sparse linear layers in vLLM: ``--quantization leanserve-2of4``.

Serve a checkpoint written by ``leanserve prune`` (its config.json carries the
``leanserve_sparsity`` marker) with::

    python -m vllm.entrypoints.openai.api_server --model PRUNED_DIR --quantization leanserve-2of4 ...

Selection. Importing this module registers ``Sparse24Config`` with vLLM's
``register_quantization_config``, which also appends the name to the platform's
``supported_quantization`` allow-list when the platform has one (CUDA/CPU have none,
ROCm/XPU do). leanserve's general plugin (``kernels.vllm_plugin:register``, entry
point ``vllm.general_plugins``) imports it in every vLLM process (API server, engine
core, workers). The checkpoint's config.json has no ``quantization_config`` (HF
transformers would then look for a quantizer named leanserve-2of4 and refuse to load
it), so vLLM uses the method only when asked with ``--quantization leanserve-2of4``;
``get_config_filenames`` then makes vLLM hand us config.json, from which
``from_config`` reads the marker. Without the flag the same checkpoint is served as
an ordinary dense model (its zeros are then just stored and multiplied).

ARMOR checkpoints (``leanserve prune --method armor``: marker method "armor") are served with the same flag:
every block linear then gets ``kernels/vllm_plugin/armor.ArmorLinearMethod`` (the 2:4 core through the paths
below, between its block-diagonal wrappers ``armor_a`` / ``armor_b``; see that module).

Which layers, the marker and the compute rule are defined once in ``kernels/sparse24/``
(``checkpoint.is_block_linear``, ``checkpoint.read_marker``, ``ops.sparse24_linear``):
every ``LinearBase`` inside the decoder blocks - the merged ``qkv_proj`` and ``gate_up_proj``
included (the 2:4 groups run along the input dimension, so stacking output rows keeps them
intact) - gets ``Sparse24LinearMethod``; other linear layers stay ``UnquantizedLinearMethod``;
embeddings and lm_head get no method from us (vLLM keeps them dense).

What a layer does.
* create_weights: the dense ``weight`` parameter exactly as vLLM's unquantized method
  creates it, with the layer's own weight_loader, so the merged QKV / gate-up loaders
  fill their shards as usual.
* process_weights_after_loading: checks 2:4 (a clear error naming the layer if not), then
  - CUDA: packs the weight (values [N, K/2] + 4-bit metadata: 56.25% of dense bf16) and keeps
    only the packed form; apply() runs ``ops.sparse24_linear`` (the Triton kernel: gather GEMV
    for M <= 16, tl.dot tiles above; a transient dense weight + cuBLAS from DENSE_MIN_M rows),
    wrapped in a custom op (``torch.ops.vllm.leanserve_sparse24_linear``) so torch.compile /
    CUDA graphs see one opaque call.
  - CPU, ``LEANSERVE_SPARSE24_CPU=dense`` (default): does *not* pack. A CPU has no 2:4
    instructions, so the fastest correct GEMM is vLLM's own CPU GEMM (oneDNN / sgl prepack) on
    the masked dense weight, which is what the layer keeps; packing it only to unpack it again
    would cost load time for nothing. Same speed and memory as the dense model.
  - CPU, ``LEANSERVE_SPARSE24_CPU=compressed``: keeps only the packed form and decompresses it
    on every call (53-56% of the weight memory, slower; the packed format end to end).
  - CPU, ``LEANSERVE_SPARSE24_CPU=triton``: keeps only the packed form and runs the Triton kernel
    on CPU tensors, which needs ``TRITON_INTERPRET=1`` (very slow: for testing the kernel inside
    vLLM on a tiny model).

The CUDA path has been tested only through the kernel tests (TRITON_INTERPRET=1, the H200
benchmark) and the CPU ``triton`` mode, never inside a CUDA vLLM (none was available): the
custom-op wrapping and graph capture are unverified there.
"""
import logging
import os
from typing import Any, Optional

import torch

from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.utils.torch_utils import direct_register_custom_op

from kernels.sparse24.checkpoint import MARKER_KEY, is_block_linear, read_marker
from kernels.sparse24.format import compress_24, compressed_nbytes, count_24_violations
from kernels.sparse24.ops import DENSE_MIN_M, sparse24_linear

NAME = "leanserve-2of4"
CPU_MODE_ENV = "LEANSERVE_SPARSE24_CPU"
CPU_MODES = ("dense", "compressed", "triton")

# Inside vLLM's logger namespace so its handler prints these lines.
log = logging.getLogger("vllm.leanserve.sparse24")


def cpu_mode() -> str:
    mode = os.environ.get(CPU_MODE_ENV, "dense").strip().lower() or "dense"
    if mode not in CPU_MODES:
        raise ValueError(f"{CPU_MODE_ENV}={mode!r}: choose one of {', '.join(CPU_MODES)}")
    if mode == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"{CPU_MODE_ENV}=triton runs the Triton kernel on CPU tensors, which only the Triton "
                         "interpreter can do: set TRITON_INTERPRET=1 (for tests; it is very slow)")
    return mode


# ----------------------------------------------------------------------------- the compute op

def _sparse24_linear_impl(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                          bias: Optional[torch.Tensor], use_triton: bool, dense_min_m: int) -> torch.Tensor:
    return sparse24_linear(x, values, meta, bias, triton=use_triton, dense_min_m=dense_min_m)


def _sparse24_linear_fake(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                          bias: Optional[torch.Tensor], use_triton: bool, dense_min_m: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], values.shape[0]))


direct_register_custom_op("leanserve_sparse24_linear", _sparse24_linear_impl, fake_impl=_sparse24_linear_fake)


def sparse24_linear_op(x, values, meta, bias=None, *, use_triton: bool, dense_min_m: int | None = None) -> torch.Tensor:
    return torch.ops.vllm.leanserve_sparse24_linear(
        x, values, meta, bias, use_triton, DENSE_MIN_M if dense_min_m is None else dense_min_m)


# ----------------------------------------------------------------------------- config + method

@register_quantization_config(NAME)
class Sparse24Config(QuantizationConfig):
    """2:4 semi-structured sparse weights (leanserve prune), packed at load time."""

    def __init__(self, marker: dict[str, Any] | None = None):
        super().__init__()
        self.marker = dict(marker or {})
        self.layers = 0  # filled in while weights are processed (for the log line)
        self.dense_bytes = 0
        self.packed_bytes = 0
        self.armor_layers = 0  # ARMOR checkpoints: filled in by create_weights (for the start-up line)
        self.armor_shards = 0  # the checkpoint's linears in them (q/k/v, gate/up are merged in vLLM)
        self.armor_added_bytes = 0

    @property
    def is_armor(self) -> bool:
        return self.marker.get("method") == "armor"

    def __repr__(self) -> str:
        return f"Sparse24Config(marker={self.marker})"

    def get_name(self) -> str:
        return NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # bf16 tl.dot needs Ampere; not consulted on CPU (no device capability there)

    @staticmethod
    def get_config_filenames() -> list[str]:
        # vLLM keeps the *.json files of the model dir whose path ends with one of these.
        # "config.json" alone would also match generation_config.json and tokenizer_config.json.
        return [os.sep + "config.json"]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Sparse24Config":
        marker = read_marker(config)
        if marker is None:
            raise ValueError(
                f"--quantization {NAME} serves checkpoints written by `leanserve prune`, whose config.json "
                f"has \"{MARKER_KEY}\": {{\"format\": \"2:4\", ...}}; this one has "
                f"{MARKER_KEY}={config.get(MARKER_KEY)!r}. "
                "Prune the model first (leanserve prune MODEL_DIR OUT_DIR --method ...) or serve it without "
                "--quantization.")
        cfg = cls(marker)
        if cfg.is_armor:
            from .armor import armor_block_size
            armor_block_size(marker)  # a clear error now rather than one per layer
        return cfg

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, LinearBase):
            if is_block_linear(prefix):
                if self.is_armor:
                    from .armor import ArmorLinearMethod
                    return ArmorLinearMethod(self, prefix)
                return Sparse24LinearMethod(self)
            return UnquantizedLinearMethod()
        return None  # embeddings, lm_head, attention: vLLM's defaults


class Sparse24LinearMethod(LinearMethodBase):
    """Dense weight at load time, 2:4-packed after loading (see the module docstring)."""

    def __init__(self, config: Sparse24Config | None = None):
        self.config = config
        self._dense = UnquantizedLinearMethod()  # loading, and the CPU dense path

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int,
                       output_partition_sizes: list[int], input_size: int, output_size: int,
                       params_dtype: torch.dtype, **extra_weight_attrs):
        if input_size_per_partition % 4:
            raise ValueError(
                f"{_name(layer)}: 2:4 sparsity needs the input size per partition to be a multiple of 4, "
                f"got {input_size_per_partition} (input size {input_size}; lower the tensor-parallel size)")
        self._dense.create_weights(layer, input_size_per_partition, output_partition_sizes, input_size,
                                   output_size, params_dtype, **extra_weight_attrs)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        w = check_24(layer)
        n, k = w.shape
        packed_b, dense_b = compressed_nbytes(n, k, w.dtype), w.numel() * w.element_size()
        layer.sparse24_bytes = (packed_b, dense_b)
        mode = "triton" if w.is_cuda else cpu_mode()
        layer.sparse24_path = mode
        self._account(layer, mode, packed_b, dense_b)
        if mode == "dense":  # see the module docstring: on CPU the masked dense weight is the fast form
            self._dense.process_weights_after_loading(layer)  # vLLM's CPU GEMM dispatch (prepack)
            return
        values, meta = compress_24(w)
        layer.register_buffer("sparse24_values", values, persistent=False)
        layer.register_buffer("sparse24_meta", meta, persistent=False)
        # Free the dense weight; keep an empty parameter of the right dtype, as vLLM's CPU path does.
        layer.weight = torch.nn.Parameter(torch.empty(0, dtype=w.dtype, device=w.device), requires_grad=False)
        del w

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if layer.sparse24_path == "dense":
            return self._dense.apply(layer, x, bias)
        return sparse24_linear_op(x, layer.sparse24_values, layer.sparse24_meta, bias,
                                  use_triton=layer.sparse24_path == "triton")

    def _account(self, layer, mode: str, packed_b: int, dense_b: int) -> None:
        cfg = self.config
        if cfg is None:
            return
        if cfg.layers == 0:
            log.info("%s: 2:4 linear layers; compute path: %s", NAME, path_description(mode))
        cfg.layers += 1
        cfg.dense_bytes += dense_b
        cfg.packed_bytes += packed_b
        log.debug("%s: %s %s packed %d of %d bytes (running total %d layers, %.1f of %.1f MiB)", NAME,
                  _name(layer), tuple(layer.weight.shape), packed_b, dense_b, cfg.layers,
                  cfg.packed_bytes / 2**20, cfg.dense_bytes / 2**20)


def check_24(layer: torch.nn.Module, name: str | None = None) -> torch.Tensor:
    """The layer's loaded dense weight, checked to be 2:4 (a clear error naming the layer otherwise)."""
    name = name or _name(layer)
    w = layer.weight.data
    if w.is_meta:
        raise ValueError(f"{name}: weight was never loaded (meta tensor)")
    n, k = w.shape
    bad = count_24_violations(w)
    if bad:
        raise ValueError(
            f"{name}: weight [{n}, {k}] is not 2:4 sparse ({bad} of {n * k // 4} groups of 4 "
            f"input columns have more than 2 nonzeros). --quantization {NAME} needs a checkpoint pruned "
            "by `leanserve prune`.")
    return w


def path_description(mode: str) -> str:
    """The start-up log's words for a compute path."""
    return {"triton": f"packed weights, Triton 2:4 kernel (a transient dense weight for M >= {DENSE_MIN_M})",
            "dense": "CPU: 2:4 checked, not packed: the masked dense weight through vLLM's CPU GEMM (a CPU "
                     f"has no 2:4 instructions; {CPU_MODE_ENV}=compressed keeps only the packed form)",
            "compressed": "CPU: packed weights only, decompressed on every call (slow)"}[mode]


def _name(layer: torch.nn.Module) -> str:
    return getattr(layer, "prefix", "") or type(layer).__name__
