"""The quantized linear layer's arithmetic and the choice of how to run it.

``quantized_linear`` computes exactly what calibration simulated (``rotq.quant.online``):
optional online Hadamard of the whole input row, dynamic per-token fake quantization, then a
GEMM with the dequantized integer weights. It is the reference every fast path must match, and
the path that runs where none applies.

The fast paths, chosen once per layer by :func:`choose_linear_path`:

- ``triton`` (CUDA): the Triton kernels on int4 weight codes repacked once at load time
  (:func:`prepare_triton_weights`, kernels/int4_gemm.py);
- ``int8`` (CPU): integer activation codes times integer weight codes through
  ``torch._int_mm`` (kernels/cpu_int8.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from rotq.kernels.cpu_int8 import int8_supported
from rotq.kernels.packing import unpack_int32
from rotq.quant.hadamard import apply_hadamard
from rotq.quant.quantizer import fake_quantize_activation
from rotq.quant.scheme import ActivationArgs, WeightArgs

class LinearPath(NamedTuple):
    """How a quantized linear layer runs, and why not on a faster path (empty when it does)."""

    name: str
    reason: str = ""


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                      bits: int, symmetric: bool) -> torch.Tensor:
    """float32 weight [N, K] from packed codes [N, K / f] and scales (and zero points) [N, K / G]."""
    codes = unpack_int32(packed, bits, signed=symmetric).float()
    N, K = codes.shape
    groups = scale.shape[-1]
    codes = codes.reshape(N, groups, K // groups)
    if zero_point is not None:
        codes = codes - zero_point.float().unsqueeze(-1)
    return (codes * scale.float().unsqueeze(-1)).reshape(N, K)


def quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     act: ActivationArgs | None, hadamard_size: int | None,
                     input_slice: slice | None = None) -> torch.Tensor:
    """y = Q_act(x H) Wᵀ + b. ``input_slice`` selects this rank's input columns after the
    transform (tensor parallelism: x is the full row, ``weight`` holds the slice's columns)."""
    if hadamard_size:
        x = apply_hadamard(x, hadamard_size)
    if act is not None:
        x = fake_quantize_activation(x, act)
    if input_slice is not None:
        x = x[..., input_slice]
    return F.linear(x, weight, bias)


def choose_linear_path(device: torch.device | str, weights: WeightArgs, act: ActivationArgs | None) -> LinearPath:
    """The fastest path that computes exactly ``quantized_linear`` for this scheme on this
    device; ``reason`` says why a faster one does not apply (the plugin logs it once)."""
    kind = torch.device(device).type
    if kind == "cuda":
        ok, reason = triton_supported(weights, act)
        return LinearPath("triton") if ok else LinearPath("dequant", reason)
    if kind == "cpu":
        ok, reason = int8_supported(weights, act)
        return LinearPath("int8") if ok else LinearPath("dequant", reason)
    return LinearPath("dequant", f"no quantized kernel for {kind} devices")


def triton_supported(weights: WeightArgs, act: ActivationArgs | None) -> tuple[bool, str]:
    """Whether :func:`quantized_linear_triton` covers a scheme (int4 symmetric per-channel or
    grouped weights with 16-bit activations or 4/8-bit symmetric per-token ones: the int8 codes of
    both go through one kernel), and if not, why."""
    if weights.bits != 4 or not weights.symmetric:
        return False, (f"the Triton kernels take int4 symmetric weights; this checkpoint has {weights.bits}-bit "
                       f"{'symmetric' if weights.symmetric else 'asymmetric'} weights")
    if act is not None and (act.bits not in (4, 8) or not act.symmetric):
        return False, (f"the Triton kernels take 16-bit or 4/8-bit symmetric activations; this checkpoint has "
                       f"{act.bits}-bit {'symmetric' if act.symmetric else 'asymmetric'} ones")
    return True, ""


class TritonWeights(NamedTuple):
    """A layer's weights as the Triton kernels read them, built once at load time by
    :func:`prepare_triton_weights`: codes int8 [N, K/2] in the GEMMs' tile layout
    (``int4_gemm.repack_weights_for_int8_loop``), float32 scales [N, 1] or [N, K/G]."""

    codes: torch.Tensor
    scale: torch.Tensor


def prepare_triton_weights(packed: torch.Tensor, scale: torch.Tensor) -> TritonWeights:
    """The checkpoint's int32-packed int4 weights [N, K/8] and scales [N, K/G] → the layout both
    Triton GEMMs (int8 activations and 16-bit ones) read, repacked once instead of per step."""
    from rotq.kernels.int4_gemm import repack_weights_for_int8_loop

    return TritonWeights(repack_weights_for_int8_loop(packed, scale.shape[-1]), scale.float().contiguous())


def quantized_linear_triton(x: torch.Tensor, weights: TritonWeights, bias: torch.Tensor | None,
                            act: ActivationArgs | None, hadamard_size: int | None,
                            input_slice: slice | None = None) -> torch.Tensor:
    """:func:`quantized_linear` on the Triton kernels (int4 weights, no dequantized copy): the
    online Hadamard fused with the activation quantizer (int8 codes of 4 or 8 bits), then
    int8_act_gemm; or w4a16_gemm for 16-bit activations."""
    from rotq.kernels.hadamard import hadamard, hadamard_act_quant
    from rotq.kernels.int4_gemm import act_quant, int8_act_gemm, w4a16_gemm

    lead = x.shape[:-1]
    if act is None:
        if hadamard_size:
            x = hadamard(x, hadamard_size)
        if input_slice is not None:
            x = x[..., input_slice]
        y = w4a16_gemm(x, weights.codes, weights.scale)
    else:
        if hadamard_size == x.shape[-1]:
            q, s = hadamard_act_quant(x, act.clip_ratio, act.bits)
        else:
            q, s = act_quant(hadamard(x, hadamard_size) if hadamard_size else x, act.clip_ratio, act.bits)
        if input_slice is not None:  # per-token scales came from the full row; keep our columns
            q = q[:, input_slice]
        y = int8_act_gemm(q, s, weights.codes, weights.scale, out_dtype=x.dtype).reshape(*lead, -1)
    return y if bias is None else y + bias
