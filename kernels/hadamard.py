"""Triton online Hadamard transform, alone or fused with per-token int4 / int8 quantization.

Each program transforms one row of length n = K · P (P = 2^m, K = 1 or a Paley order; the
matrices of ``rotq.quant.hadamard``): viewed as X [K, P], x (A ⊗ H_P) / √n = Aᵀ X H_P / √n,
with H_P applied by m butterfly stages in registers (reshape / split / join) and Aᵀ by one
``tl.dot`` in IEEE float32 (K padded to a power of two ≥ 16). The fused variant quantizes the
transformed row like ``int4_gemm.act_quant`` (int8 codes) without writing it back: the R4
rotation before down_proj and its activation quantizer in one pass over the activation.

Reference: ``rotq.quant.hadamard.apply_hadamard`` (and ``int4_gemm.act_quant_reference``).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from rotq.kernels.int4_gemm import act_qmax, quantize_codes
from rotq.quant.hadamard import base_factor, split_size


@triton.jit
def hadamard_tile(x, at_ptr, inv_sqrt_n, KP: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr,
                  HAS_A: tl.constexpr):
    """The transform of one row held in registers as float32 x [KP, P] (rows ≥ K zero), with
    :func:`plan`'s constants: public so that kernels/fused.py applies it to values it computed."""
    rk = tl.arange(0, KP)
    for s in tl.static_range(LOG_P):
        y = tl.permute(tl.reshape(x, (KP, P // (2 << s), 2, 1 << s)), (0, 1, 3, 2))
        a, b = tl.split(y)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2)), (KP, P))
    if HAS_A:
        at = tl.load(at_ptr + rk[:, None] * KP + rk[None, :])
        x = tl.dot(at, x, input_precision="ieee")
    return x * inv_sqrt_n


@triton.jit
def _transform_row(x_ptr, at_ptr, row, stride_x, K, inv_sqrt_n,
                   KP: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr, HAS_A: tl.constexpr):
    rk = tl.arange(0, KP)
    rp = tl.arange(0, P)
    x = tl.load(x_ptr + row * stride_x + rk[:, None] * P + rp[None, :], mask=rk[:, None] < K, other=0.0)
    return hadamard_tile(x.to(tl.float32), at_ptr, inv_sqrt_n, KP, P, LOG_P, HAS_A)


@triton.jit
def _hadamard_kernel(x_ptr, y_ptr, at_ptr, K, stride_x, stride_y, inv_sqrt_n,
                     KP: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr, HAS_A: tl.constexpr):
    row = tl.program_id(0)
    y = _transform_row(x_ptr, at_ptr, row, stride_x, K, inv_sqrt_n, KP, P, LOG_P, HAS_A)
    rk = tl.arange(0, KP)
    rp = tl.arange(0, P)
    tl.store(y_ptr + row * stride_y + rk[:, None] * P + rp[None, :], y.to(y_ptr.dtype.element_ty),
             mask=rk[:, None] < K)


@triton.jit
def _hadamard_quant_kernel(x_ptr, q_ptr, s_ptr, at_ptr, K, stride_x, stride_q, inv_sqrt_n, clip,
                           KP: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr, HAS_A: tl.constexpr,
                           QMAX: tl.constexpr):
    row = tl.program_id(0)
    y = _transform_row(x_ptr, at_ptr, row, stride_x, K, inv_sqrt_n, KP, P, LOG_P, HAS_A)
    scale = tl.math.div_rn(tl.max(tl.max(tl.abs(y), axis=1), axis=0) * clip, QMAX * 1.0)
    scale = tl.where(scale > 0, scale, 1.0)
    tl.store(s_ptr + row, scale)
    q = quantize_codes(y, scale, QMAX)
    rk = tl.arange(0, KP)
    rp = tl.arange(0, P)
    tl.store(q_ptr + row * stride_q + rk[:, None] * P + rp[None, :], q, mask=rk[:, None] < K)


def plan(n: int, device) -> tuple[int, int, int, torch.Tensor | None]:
    """(K, P, padded K, Aᵀ on ``device`` or None) for size n = K·P, made once per size and
    device: a host-to-device copy per call would also break CUDA graph capture."""
    return _plan_cached(n, str(torch.device(device)))


@functools.lru_cache(maxsize=None)
def _plan_cached(n: int, device: str) -> tuple[int, int, int, torch.Tensor | None]:
    split = split_size(n)
    if split is None:
        raise ValueError(f"no Hadamard matrix of size {n} (need 2^m · K, K in 1, 12, 20, 28, 36, ...)")
    k, p = split
    if k > 1 and p < 16:
        raise ValueError(f"Hadamard size {n} = {k} · {p}: the Triton kernel needs a power-of-two part ≥ 16")
    kp = max(16, triton.next_power_of_2(k)) if k > 1 else 1
    at = None
    if k > 1:
        at = torch.zeros(kp, kp, dtype=torch.float32)
        at[:k, :k] = base_factor(k).T.float()
        at = at.to(device)
    return k, p, kp, at


def num_warps(elements: int) -> int:
    """Warps for a program that holds ``elements`` float32 values in registers: about 16 per
    thread, so that a 14336-wide row (32 × 512 after padding) does not spill."""
    return max(4, min(32, triton.next_power_of_2(elements) // 512))


def _rows(x: torch.Tensor, n: int) -> torch.Tensor:
    if x.shape[-1] % n:
        raise ValueError(f"Hadamard size {n} does not divide the last dimension {x.shape[-1]} of x")
    return x.reshape(-1, n).contiguous()


def hadamard(x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """x @ (H_n / √n) along the last dim (block-diagonal when n divides it); x's dtype."""
    n = n or x.shape[-1]
    k, p, kp, at = plan(n, x.device)
    rows = _rows(x, n)
    y = torch.empty_like(rows)
    if rows.shape[0]:
        _hadamard_kernel[(rows.shape[0],)](rows, y, at if at is not None else rows, k, rows.stride(0), y.stride(0),
                                           1.0 / math.sqrt(n), KP=kp, P=p, LOG_P=p.bit_length() - 1,
                                           HAS_A=at is not None, num_warps=num_warps(kp * p))
    return y.reshape(x.shape)


def hadamard_act_quant(x: torch.Tensor, clip_ratio: float, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``act_quant(hadamard(x), clip_ratio, bits)`` in one pass: int8 codes [M, n] and float32
    scales [M] for rows x [..., n] (the transform spans the whole row, as R4 does)."""
    qmax = act_qmax(bits)
    n = x.shape[-1]
    k, p, kp, at = plan(n, x.device)
    rows = _rows(x, n)
    M = rows.shape[0]
    q = torch.empty(M, n, dtype=torch.int8, device=x.device)
    s = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        _hadamard_quant_kernel[(M,)](rows, q, s, at if at is not None else rows, k, rows.stride(0), q.stride(0),
                                     1.0 / math.sqrt(n), float(clip_ratio), KP=kp, P=p,
                                     LOG_P=p.bit_length() - 1, HAS_A=at is not None, QMAX=qmax,
                                     num_warps=num_warps(kp * p))
    return q, s
