"""The packed integer layout shared by the checkpoint formats, the vLLM plugin and the kernels.

Integer codes of ``bits`` ≤ 8 are stored in containers of 4 bits (codes of 2 to 4 bits) or 8
bits (5 to 8 bits), ``32 // container`` of them per int32 along the last axis, element j of each
int32 in bits ``container·j`` and up (lowest index in the lowest bits). Signed codes
q ∈ [−2^(b−1), 2^(b−1) − 1] are stored offset by 2^(container−1) (uint4b8 for int4), unsigned
codes as they are. This is byte-identical to compressed-tensors' ``pack_to_int32`` for 4 and 8
bits, so the same tensors serve the rotq format and compressed-tensors ``pack-quantized``.

The int4 KV cache holds codes two per byte instead (:func:`pack_int4`): uint8 [..., K / 2],
element 2j in the low nibble and 2j + 1 in the high one, the same nibble order as in the int32
words; signed codes again stored as q + 8 (uint4b8). (The GEMMs' activations are int8 codes, one
per byte, and their weights are repacked for the int8 loop: kernels/int4_gemm.py.)
"""

from __future__ import annotations

import torch


def container_bits(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise ValueError(f"only 2..8-bit codes can be packed, got {bits}")
    return 4 if bits <= 4 else 8


def pack_factor(bits: int) -> int:
    """Codes per int32."""
    return 32 // container_bits(bits)


def pack_int32(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Pack integer codes [..., K] (any integer or integral float dtype) into int32 [..., K / f]."""
    c = container_bits(bits)
    f = 32 // c
    if codes.shape[-1] % f:
        raise ValueError(f"the last dimension ({codes.shape[-1]}) must be a multiple of {f} to pack "
                         f"{bits}-bit codes into int32")
    u = codes.to(torch.int64) + (2 ** (c - 1) if signed else 0)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if u.numel() and (codes.min() < lo or codes.max() > hi):
        raise ValueError(f"codes outside the {'signed' if signed else 'unsigned'} {bits}-bit range "
                         f"[{lo}, {hi}]")
    u = u.reshape(*codes.shape[:-1], -1, f)
    shifts = torch.arange(f, dtype=torch.int64, device=codes.device) * c
    packed = (u << shifts).sum(-1)
    # two's-complement wrap of the top nibble into int32's sign bit
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 [..., K / f] → int32 codes [..., K]."""
    c = container_bits(bits)
    f = 32 // c
    shifts = torch.arange(f, dtype=torch.int32, device=packed.device) * c
    u = (packed.unsqueeze(-1) >> shifts) & (2**c - 1)
    u = u.reshape(*packed.shape[:-1], packed.shape[-1] * f)
    return u - 2 ** (c - 1) if signed else u


def pack_int4(codes: torch.Tensor, signed: bool) -> torch.Tensor:
    """Pack int4 codes [..., K] (K even; any integer dtype; signed: [−8, 7], else [0, 15]) into
    uint8 [..., K / 2], element 2j in the low nibble, signed codes stored as q + 8. Codes out of
    range are not checked (this runs on the serving path); they wrap."""
    if codes.shape[-1] % 2:
        raise ValueError(f"the last dimension ({codes.shape[-1]}) must be even to pack int4 codes two per byte")
    u = (codes.to(torch.int16) + 8).to(torch.uint8) if signed else codes.to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 [..., K / 2] → codes [..., K], int8 in [−8, 7] when
    signed, else uint8 in [0, 15]."""
    lo, hi = packed & 0xF, packed >> 4
    if signed:
        lo, hi = lo.to(torch.int8) - 8, hi.to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
