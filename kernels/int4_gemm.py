"""Triton kernels for int4 linear layers, each beside its pure-PyTorch reference.

* ``act_quant``: per-token symmetric quantization of 4 or 8 bits (scale = clip · max|x| / qmax,
  qmax = 2^(b−1) − 1, codes round-half-even, clamped to [−qmax − 1, qmax]) written as int8 codes
  [M, K]: the GEMM reads them as they are, with no unpacking in its main loop.
* ``repack_weights_for_int8_loop``: the checkpoint's int32-packed int4 weights [N, K/8],
  rearranged once at load time into int8 [N, K/2] in K tiles of ``block_k`` (:func:`int8_loop_block_k`):
  byte j of a tile holds k = j in its low nibble and k = j + block_k/2 in its high one, both two's
  complement. Unpacking sign-extends both nibbles of four bytes per 32-bit instruction on GPUs
  (inline PTX, ``_signed_nibbles``), by arithmetic shifts of int8s under the interpreter.
* ``int8_act_gemm``: int8 activation codes × repacked weights: per K tile, the two halves
  unpacked and joined back into k order in registers (byte permutes, no shared memory), one int8
  ``tl.dot`` with int32 sums, then per-token × per-channel scales (grouped weights: each tile's
  int32 partial sum is scaled by its group's scale; tiles never straddle groups). It computes
  Cᵀ = W Aᵀ ("swap AB"): the weights, unpacked in registers, are the register operand of
  Hopper's wgmma and never go back to shared memory, and M ≤ 16 still fills the 64-row MMA.
  Small grids split K (``gemm_plan``): scaled float32 partials added atomically, so those
  outputs may differ run to run in the last float32 bits (the order of the additions).
* ``w4a16_gemm``: 16/32-bit activations × the same repacked weights dequantized in registers.

Hopper has no int4 MMA and ``tl.dot`` takes no int4 operands, hence int8 (docs/design.md,
"Numerics that must agree"). The references compute in float64 so kernels are compared against
exact arithmetic. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests); vLLM calls
them only on CUDA.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from rotq.kernels.packing import unpack_int32
from rotq.quant.quantizer import activation_grid
from rotq.quant.scheme import ActivationArgs

_RINT = tl.constexpr(12582912.0)  # 1.5 * 2**23: (v + c) - c rounds half to even in float32 for |v| < 2**22
_CPU_SMS = 132  # split-K sizing where there is no GPU to ask (the interpreter): an H100/H200


# ----------------------------------------------------------------------------- weight layout

def int8_loop_block_k(K: int, group: int) -> int:
    """The K tile of the repacked layout (and of the GEMMs' main loop): the largest of 128, 64,
    32 dividing both K and the group size, so that no tile straddles a group."""
    for bk in (128, 64, 32):
        if K % bk == 0 and group % bk == 0:
            return bk
    raise ValueError(f"K = {K} and group size {group} must be multiples of 32 for the int4 Triton kernels")


def repack_weights_for_int8_loop(w_packed: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """int32-packed signed int4 weights [N, K/8] (uint4b8, ``packing.pack_int32``) → int8 [N, K/2]
    in the tile layout of the module docstring, for weights with ``groups`` scales per row."""
    codes = unpack_int32(w_packed, 4, signed=True)
    N, K = codes.shape
    if K % groups:
        raise ValueError(f"{groups} weight groups do not divide K = {K}")
    bk = int8_loop_block_k(K, K // groups)
    tiles = codes.reshape(N, K // bk, 2, bk // 2)
    byte = (tiles[:, :, 0] & 0xF) | ((tiles[:, :, 1] & 0xF) << 4)
    return byte.to(torch.uint8).view(torch.int8).reshape(N, K // 2).contiguous()


def unpack_int8_loop_weights(w: torch.Tensor, block_k: int) -> torch.Tensor:
    """Inverse of :func:`repack_weights_for_int8_loop` (the reference of the layout): int8
    [N, K/2] → int8 codes [N, K] in [−8, 7]."""
    N = w.shape[0]
    u = w.to(torch.int16) & 0xFF
    lo, hi = u & 0xF, u >> 4
    lo, hi = torch.where(lo >= 8, lo - 16, lo), torch.where(hi >= 8, hi - 16, hi)
    tiles = torch.stack([lo.reshape(N, -1, block_k // 2), hi.reshape(N, -1, block_k // 2)], dim=2)
    return tiles.reshape(N, -1).to(torch.int8)


def _dequantized_weights(w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """float64 [N, K] of repacked weights and their scales [N, K/G]."""
    N, K = w.shape[0], w.shape[1] * 2
    G = K // w_scale.shape[1]
    codes = unpack_int8_loop_weights(w, int8_loop_block_k(K, G)).double()
    return (codes.reshape(N, -1, G) * w_scale.double()[:, :, None]).reshape(N, K)


# ----------------------------------------------------------------------------- act_quant

def act_quant_reference(x: torch.Tensor, clip_ratio: float, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [M, K], scale float32 [M]) of rows of x, computed in float32: the calibration's
    activation quantizer (``rotq.quant.quantizer.activation_grid``, symmetric), what
    :func:`act_quant` writes."""
    rows = x.float().reshape(-1, x.shape[-1])
    grid = activation_grid(rows, ActivationArgs(bits=bits, symmetric=True, clip_ratio=clip_ratio))
    return grid.quantize(rows).to(torch.int8), grid.scale.reshape(-1)


def act_qmax(bits: int) -> int:
    """The largest code of the Triton activation quantizers (4 or 8 bits)."""
    if bits not in (4, 8):
        raise ValueError(f"the Triton activation quantizer takes 4 or 8 bits, got {bits}")
    return 2 ** (bits - 1) - 1


@triton.jit
def quantize_codes(x, scale, QMAX: tl.constexpr):
    """float32 x / scale rounded half to even, clamped to the signed grid, as int8 (the
    activation quantizers' codes; also used by ``hadamard.hadamard_act_quant``)."""
    q = (tl.math.div_rn(x, scale) + _RINT) - _RINT
    return tl.minimum(tl.maximum(q, -QMAX - 1.0), QMAX * 1.0).to(tl.int8)


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, clip, QMAX: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_x
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.math.div_rn(tl.max(amax, axis=0) * clip, QMAX * 1.0)
    scale = tl.where(scale > 0, scale, 1.0)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        tl.store(q_ptr + row * stride_q + offs, quantize_codes(x, scale, QMAX), mask=offs < K)


def act_quant(x: torch.Tensor, clip_ratio: float, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [M, K] and float32 scales [M] of x [..., K], per token, ``bits`` 4 or 8."""
    qmax = act_qmax(bits)
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    q = torch.empty(M, K, dtype=torch.int8, device=x.device)
    s = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        BLOCK = min(4096, triton.next_power_of_2(K))
        _act_quant_kernel[(M,)](x2, q, s, K, x2.stride(0), q.stride(0), float(clip_ratio), QMAX=qmax, BLOCK=BLOCK,
                                num_warps=max(4, BLOCK // 512))
    return q, s


# ----------------------------------------------------------------------------- GEMMs

class GemmPlan(NamedTuple):
    """Tiles and K split of one launch. BLOCK_N is the MMA's M side (swap AB): a multiple of 64."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    split: int
    num_warps: int
    num_stages: int


# (largest M, BLOCK_M, BLOCK_N, warps, stages): decode first (weight-bandwidth bound), then prefill.
# With the 32-bit nibble unpacking, prefill tiles of 128 tokens beat 256 (1.07-2.0x on three of
# Llama-3-8B's four shapes at M = 2048 and 8192, equal on gate_up; H200, benchmarks/tune.py).
_TILES = ((16, 16, 64, 4, 3), (32, 32, 128, 4, 4), (64, 64, 128, 4, 3), (None, 128, 128, 8, 3))


def _ptx() -> bool:
    """Whether kernels compile to PTX (inline assembly allowed): not under the interpreter."""
    return os.environ.get("TRITON_INTERPRET") != "1"


@functools.cache
def _num_sms(device: str) -> int:
    dev = torch.device(device)
    return torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else _CPU_SMS


def gemm_plan(M: int, N: int, K: int, group: int, device, split_k: bool = True) -> GemmPlan:
    """Tiles by M, and K split when the output tiles are too few to keep the weight loads in
    flight: at decode (M ≤ 16) up to 4 programs per SM of at least 2 K tiles each (on Llama-3-8B
    shapes, H200: 1.06x 8 per SM over a layer's four GEMMs, 1.0-1.2x 2 per SM of 4 tiles), else up
    to 2 per SM of 4 tiles."""
    bm, bn, warps, stages = next((bm, bn, w, s) for top, bm, bn, w, s in _TILES if top is None or M <= top)
    bk = int8_loop_block_k(K, group)
    tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    split = 1
    if split_k:
        per_sm, min_tiles = (4, 2) if M <= 16 else (2, 4)
        split = max(1, min(triton.cdiv(per_sm * _num_sms(str(torch.device(device))), tiles), K // bk // min_tiles))
    return GemmPlan(bm, bn, bk, split, warps, stages)


def int8_act_gemm_reference(a_codes, a_scale, w, w_scale) -> torch.Tensor:
    """float64 [M, N] = (a_codes · s_tok) @ (w_codes · s_w)ᵀ; w repacked, w_scale [N, K/G]."""
    return (a_codes.double() * a_scale.double()[:, None]) @ _dequantized_weights(w, w_scale).T


def w4a16_gemm_reference(x, w, w_scale) -> torch.Tensor:
    """float64 x [..., K] @ dequant(w)ᵀ, rows flattened; w repacked, w_scale [N, K/G]."""
    return x.double().reshape(-1, x.shape[-1]) @ _dequantized_weights(w, w_scale).T


# Sign extension of both nibbles of four bytes in one 32-bit register: per byte, a two's-complement
# nibble n is (n ^ 8) − 8 = ((n ^ 0x88) − 0x08) ^ 0x80, and n ^ 0x88 ≥ 0x80 so no borrow crosses a byte.
_LOW_NIBBLES = tl.constexpr("{ .reg .b32 t; and.b32 t, $1, 0x0F0F0F0F; xor.b32 t, t, 0x88888888; "
                            "sub.u32 t, t, 0x08080808; xor.b32 $0, t, 0x80808080; }")
_HIGH_NIBBLES = tl.constexpr("{ .reg .b32 t; shr.u32 t, $1, 4; and.b32 t, t, 0x0F0F0F0F; xor.b32 t, t, 0x88888888; "
                             "sub.u32 t, t, 0x08080808; xor.b32 $0, t, 0x80808080; }")


@triton.jit
def _signed_nibbles(b, ASM: tl.constexpr):
    """(low, high) two's-complement nibbles of the int8 bytes b, each sign-extended to int8. On a
    GPU (``ASM``) four bytes per instruction (above); Triton lowers int8 shifts byte by byte
    through 16-bit registers, about five times the instructions. The interpreter runs no PTX:
    arithmetic shifts there, the same values."""
    if ASM:
        lo = tl.inline_asm_elementwise(_LOW_NIBBLES, "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)
        hi = tl.inline_asm_elementwise(_HIGH_NIBBLES, "=r,r", [b], dtype=tl.int8, is_pure=True, pack=4)
    else:
        lo = (b << 4) >> 4
        hi = b >> 4
    return lo, hi


@triton.jit
def _weight_tile(w_ptr, offs_n, t, N, stride_w, BLOCK_K: tl.constexpr, ASM: tl.constexpr):
    """K tile t of the repacked weights as int8 codes [BLOCK_N, BLOCK_K] in k order: the low
    nibbles (k < BLOCK_K/2) then the high ones."""
    cols = t * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    b = tl.load(w_ptr + offs_n[:, None] * stride_w + cols[None, :], mask=offs_n[:, None] < N, other=0)
    lo, hi = _signed_nibbles(b, ASM)
    halves = tl.join(lo, hi)  # [BLOCK_N, BLOCK_K/2, 2]
    return tl.reshape(tl.permute(halves, (0, 2, 1)), (offs_n.shape[0], BLOCK_K))


@triton.jit
def _int8_act_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, c_ptr, M, N, K, stride_a, stride_w, stride_ws, stride_c, split,
                     GROUP: tl.constexpr, GROUPED: tl.constexpr, ATOMIC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ASM: tl.constexpr):
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = a_ptr + offs_m[:, None] * stride_a
    m_ok = offs_m[:, None] < M
    acc_i = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.int32)
    acc_f = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    tiles = K // BLOCK_K
    for t in range(pid_k * tiles // split, (pid_k + 1) * tiles // split):
        w = _weight_tile(w_ptr, offs_n, t, N, stride_w, BLOCK_K, ASM)
        a = tl.load(a_rows + (t * BLOCK_K + offs_k)[None, :], mask=m_ok, other=0)
        if GROUPED:
            part = tl.dot(w, tl.trans(a), out_dtype=tl.int32)
        else:
            acc_i = tl.dot(w, tl.trans(a), acc_i, out_dtype=tl.int32)
        if GROUPED:
            gs = tl.load(ws_ptr + offs_n * stride_ws + t * BLOCK_K // GROUP, mask=offs_n < N, other=0.0)
            acc_f += part.to(tl.float32) * gs[:, None]
    s_tok = tl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)
    if GROUPED:
        out = acc_f * s_tok[None, :]
    else:
        s_ch = tl.load(ws_ptr + offs_n * stride_ws, mask=offs_n < N, other=0.0)
        out = acc_i.to(tl.float32) * s_ch[:, None] * s_tok[None, :]
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    c = c_ptr + offs_m[None, :] * stride_c + offs_n[:, None]
    if ATOMIC:  # K split: float32 partials into a zeroed output
        tl.atomic_add(c, out, mask=mask, sem="relaxed")
    else:
        tl.store(c, out.to(c_ptr.dtype.element_ty), mask=mask)


def _check_weights(w: torch.Tensor, w_scale: torch.Tensor, K: int, name: str) -> int:
    """The group size of repacked weights w [N, K/2] with scales [N, K/G], checked against K."""
    if w.dtype != torch.int8 or w.shape[1] * 2 != K:
        raise ValueError(f"{name} takes weights repacked by repack_weights_for_int8_loop (int8 [N, K/2] = "
                         f"[N, {K // 2}]), got {w.dtype} {list(w.shape)}")
    if w_scale.shape[0] != w.shape[0] or K % w_scale.shape[1]:
        raise ValueError(f"{name}: weight scales {list(w_scale.shape)} do not fit weights [{w.shape[0]}, K = {K}]")
    return K // w_scale.shape[1]


def int8_act_gemm(a_codes: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                  out_dtype: torch.dtype = torch.float16, plan: GemmPlan | None = None) -> torch.Tensor:
    """[M, N] = (a_codes · a_scale) @ dequant(w)ᵀ from :func:`act_quant`'s int8 codes [M, K] (4 or
    8 bits: one kernel) and weights repacked by :func:`repack_weights_for_int8_loop`, scales
    [N, 1] (per channel) or [N, K/G]. ``plan`` overrides :func:`gemm_plan` (benchmarks/tune.py
    times candidates; its BLOCK_K must be the layout's)."""
    M, K = a_codes.shape
    N = w.shape[0]
    G = _check_weights(w, w_scale, K, "int8_act_gemm")
    if a_codes.dtype != torch.int8 or a_codes.stride(1) != 1:
        raise ValueError(f"int8_act_gemm takes int8 activation codes with unit column stride, got {a_codes.dtype} "
                         f"with strides {a_codes.stride()}")
    plan = plan or gemm_plan(M, N, K, G, a_codes.device)
    if plan.BLOCK_K != int8_loop_block_k(K, G):
        raise ValueError(f"int8_act_gemm: BLOCK_K {plan.BLOCK_K} is not the weight layout's {int8_loop_block_k(K, G)}")
    ws = w_scale.float().contiguous()
    if plan.split > 1:
        c = torch.zeros(M, N, dtype=torch.float32, device=a_codes.device)
    else:
        c = torch.empty(M, N, dtype=out_dtype, device=a_codes.device)
    if M:
        grid = (triton.cdiv(N, plan.BLOCK_N), triton.cdiv(M, plan.BLOCK_M), plan.split)
        _int8_act_kernel[grid](a_codes, a_scale, w, ws, c, M, N, K, a_codes.stride(0), w.stride(0), ws.stride(0),
                               c.stride(0), plan.split, GROUP=G, GROUPED=ws.shape[1] > 1, ATOMIC=plan.split > 1,
                               BLOCK_M=plan.BLOCK_M, BLOCK_N=plan.BLOCK_N, BLOCK_K=plan.BLOCK_K, ASM=_ptx(),
                               num_warps=plan.num_warps, num_stages=plan.num_stages)
    return c.to(out_dtype)


@triton.jit
def _w4a16_kernel(x_ptr, w_ptr, ws_ptr, c_ptr, M, N, K, stride_x, stride_w, stride_ws, stride_c,
                  GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  PRECISION: tl.constexpr, ASM: tl.constexpr):
    pid_n, pid_m = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + offs_m[:, None] * stride_x
    m_ok = offs_m[:, None] < M
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for t in range(0, K // BLOCK_K):
        x = tl.load(x_rows + (t * BLOCK_K + offs_k)[None, :], mask=m_ok, other=0.0)
        w = _weight_tile(w_ptr, offs_n, t, N, stride_w, BLOCK_K, ASM).to(tl.float32)
        s = tl.load(ws_ptr + offs_n * stride_ws + t * BLOCK_K // GROUP, mask=offs_n < N, other=0.0)
        acc = tl.dot((w * s[:, None]).to(x.dtype), tl.trans(x), acc, input_precision=PRECISION)
    mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    tl.store(c_ptr + offs_m[None, :] * stride_c + offs_n[:, None], acc.to(c_ptr.dtype.element_ty), mask=mask)


def w4a16_gemm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ dequant(w)ᵀ → [..., N] in x's dtype; w repacked by
    :func:`repack_weights_for_int8_loop`, scales [N, 1] or [N, K/G]."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M, N = x2.shape[0], w.shape[0]
    G = _check_weights(w, w_scale, K, "w4a16_gemm")
    plan = gemm_plan(M, N, K, G, x.device, split_k=False)
    c = torch.empty(M, N, dtype=x.dtype, device=x.device)
    ws = w_scale.float().contiguous()
    if M:
        grid = (triton.cdiv(N, plan.BLOCK_N), triton.cdiv(M, plan.BLOCK_M))
        _w4a16_kernel[grid](x2, w, ws, c, M, N, K, x2.stride(0), w.stride(0), ws.stride(0), c.stride(0), GROUP=G,
                            BLOCK_M=plan.BLOCK_M, BLOCK_N=plan.BLOCK_N, BLOCK_K=plan.BLOCK_K,
                            PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", ASM=_ptx(),
                            num_warps=plan.num_warps, num_stages=plan.num_stages)
    return c.reshape(*x.shape[:-1], N)
