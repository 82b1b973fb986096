"""The CPU fast path of a quantized linear layer: the activation quantizer's integer codes times
the weights' integer codes through ``torch._int_mm`` (oneDNN: VNNI / AMX on x86), with exact
int32 accumulation and the two scales applied to the sums. The codes are the quantizers' own,
so the result differs from ``kernels.linear.quantized_linear`` only by float rounding in the
scaling and in the online Hadamard (float32 here: a code can differ from calibration's only where
a value lies within float32 rounding of a rounding boundary).
"""

from __future__ import annotations

import functools

import torch

from rotq.kernels.packing import unpack_int32
from rotq.quant.hadamard import apply_hadamard
from rotq.quant.scheme import ActivationArgs, WeightArgs


def int8_supported(weights: WeightArgs, act: ActivationArgs | None) -> tuple[bool, str]:
    """Whether :func:`quantized_linear_int8` covers a scheme, and if not, why: codes of symmetric
    per-token activations against per-channel weight codes, both fitting int8, on a torch with an
    int8 matrix product for this CPU."""
    if act is None:
        return False, "16-bit activations have no integer codes to multiply"
    if act.bits > 8 or not act.symmetric:
        return False, (f"the int8 path takes symmetric activations of at most 8 bits; this checkpoint has "
                       f"{act.bits}-bit {'symmetric' if act.symmetric else 'asymmetric'} ones")
    if weights.bits > (8 if weights.symmetric else 7):  # asymmetric: code - zero point spans 2^bits - 1 each side
        return False, f"{weights.bits}-bit {'symmetric' if weights.symmetric else 'asymmetric'} weight codes do not fit int8"
    if weights.group_size is not None:
        return False, (f"weight groups of {weights.group_size} need one scaled partial sum per group; the int8 "
                       "path takes one scale per output channel")
    return _int_mm_available()


@functools.cache
def _int_mm_available() -> tuple[bool, str]:
    try:
        torch._int_mm(torch.ones(2, 8, dtype=torch.int8), torch.ones(8, 8, dtype=torch.int8))
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        return False, f"this torch has no int8 matrix product on the CPU ({e})"
    return True, ""


def int8_weight_codes(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                      bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel packed weights -> (codes [N, K] int8, centred on zero, float32 scales [N]):
    the operands of :func:`quantized_linear_int8`, built once at load time."""
    codes = unpack_int32(packed, bits, signed=symmetric)
    if zero_point is not None:
        codes = codes - zero_point.reshape(-1, 1)
    return codes.to(torch.int8).contiguous(), scale.reshape(-1).float()


def activation_codes(rows: torch.Tensor, act: ActivationArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [R, K], float32 scales [R, 1]) of symmetric per-token activations: exactly
    ``activation_grid(rows, act)``'s codes and scales (the same operations on the same values:
    scale = (max|x| * clip) / (2^(b-1) - 1), codes = clamp(round(x / scale))), in five passes
    instead of a dozen, because at decode sizes each pass costs more than the arithmetic."""
    half = 2 ** (act.bits - 1)
    scale = torch.linalg.vector_norm(rows, float("inf"), dim=-1, keepdim=True).mul_(act.clip_ratio).div_(half - 1)
    scale.masked_fill_(scale == 0, 1.0)  # an all-zero token: codes 0, scale 1, as the reference
    return torch.div(rows, scale).round_().clamp_(-half, half - 1).to(torch.int8), scale


def int8_activation_input(x: torch.Tensor, act: ActivationArgs, hadamard_size: int | None,
                          input_slice: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (int8 codes [M, K'], float32 per-token scales [M, 1]): the online Hadamard
    and the quantizer on the full row, then this rank's ``input_slice`` of the codes."""
    rows = x.reshape(-1, x.shape[-1]).float()
    if hadamard_size:  # float32: within rounding of calibration's float64 transform, 4-5x faster
        rows = apply_hadamard(rows, hadamard_size, exact=False)
    a, scale = activation_codes(rows, act)
    if input_slice is not None:
        a = a[:, input_slice].contiguous()
    return a, scale


def quantized_linear_int8(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                          act: ActivationArgs, hadamard_size: int | None,
                          input_slice: slice | None = None) -> torch.Tensor:
    """:func:`quantized_linear` in integers: the per-token activation codes (of the full row,
    then this rank's ``input_slice``) times the weight ``codes`` [N, K] in int32, scaled by the
    token's and the channel's scale [N]."""
    a, a_scale = int8_activation_input(x, act, hadamard_size, input_slice)
    y = (torch._int_mm(a, codes.t()) * a_scale).mul_(scale)  # int32 * float32 -> float32
    if bias is not None:
        y.add_(bias)
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)
