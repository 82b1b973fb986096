"""Triton kernels for int4 linear layers, each beside its pure-PyTorch reference.

* ``act_quant``: per-token symmetric int4 quantization (scale = clip · max|x| / 7, codes
  round-half-even, clamped to [−8, 7]) packed two per byte, element 2j in the low nibble, stored
  as q + 8 — the same uint4b8 convention as the weights (``packing.pack_int4``).
* ``w4a4_gemm``: packed int4 activations × packed int4 weights [N, K/8]: both unpacked to int8
  in registers, int8 ``tl.dot`` with int32 accumulation, then per-token × per-channel scales
  (per group: each K-block's int32 partial sum is scaled by its group's scales).
* ``w4a16_gemm``: 16/32-bit activations × packed int4 weights dequantized in registers.

Hopper has no int4 MMA and ``tl.dot`` takes no int4 operands, hence int8 after unpacking
(docs/design.md, "Numerics that must agree"). The references compute in float64 so kernels are
compared against exact arithmetic. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (tests); vLLM calls
them only on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rotq.kernels.packing import unpack_int4, unpack_int32
from rotq.quant.quantizer import activation_grid
from rotq.quant.scheme import ActivationArgs

_RINT = tl.constexpr(12582912.0)  # 1.5 * 2**23: (v + c) - c rounds half to even in float32 for |v| < 2**22


def _blocks(M: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): small M is decode (weight-bandwidth bound), large M prefill."""
    if M <= 16:
        return 16, 64, 128
    if M <= 64:
        return 32, 64, 128
    return 64, 128, 64


# ----------------------------------------------------------------------------- act_quant

def act_quant_reference(x: torch.Tensor, clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [M, K] in [−8, 7], scale float32 [M]) of rows of x, computed in float32: the
    calibration's activation quantizer (``rotq.quant.quantizer.activation_grid``, symmetric int4);
    ``pack_int4(codes, signed=True)`` is what :func:`act_quant` stores."""
    rows = x.float().reshape(-1, x.shape[-1])
    grid = activation_grid(rows, ActivationArgs(bits=4, symmetric=True, clip_ratio=clip_ratio))
    return grid.quantize(rows).to(torch.int8), grid.scale.reshape(-1)


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, clip,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_x
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.math.div_rn(tl.max(amax, axis=0) * clip, 7.0)
    scale = tl.where(scale > 0, scale, 1.0)
    tl.store(s_ptr + row, scale)
    half = K // 2
    for j0 in range(0, half, BLOCK // 2):
        j = j0 + tl.arange(0, BLOCK // 2)
        mask = j < half
        xe = tl.load(x_row + 2 * j, mask=mask, other=0.0).to(tl.float32)
        xo = tl.load(x_row + 2 * j + 1, mask=mask, other=0.0).to(tl.float32)
        qe = tl.minimum(tl.maximum((tl.math.div_rn(xe, scale) + _RINT) - _RINT, -8.0), 7.0) + 8.0
        qo = tl.minimum(tl.maximum((tl.math.div_rn(xo, scale) + _RINT) - _RINT, -8.0), 7.0) + 8.0
        byte = qe.to(tl.int32) | (qo.to(tl.int32) << 4)
        tl.store(q_ptr + row * stride_q + j, byte.to(tl.uint8), mask=mask)


def act_quant(x: torch.Tensor, clip_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed int4 codes uint8 [M, K/2] and float32 scales [M] of x [..., K] (K even)."""
    K = x.shape[-1]
    if K % 2:
        raise ValueError(f"act_quant needs an even number of features, got {K}")
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    q = torch.empty(M, K // 2, dtype=torch.uint8, device=x.device)
    s = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        BLOCK = min(4096, triton.next_power_of_2(K))
        _act_quant_kernel[(M,)](x2, q, s, K, x2.stride(0), q.stride(0), float(clip_ratio), BLOCK=BLOCK,
                                num_warps=max(4, BLOCK // 512))
    return q, s


# ----------------------------------------------------------------------------- GEMMs

def w4a4_gemm_reference(a_packed, a_scale, w_packed, w_scale) -> torch.Tensor:
    """float64 [M, N] = (a_codes · s_tok) @ (w_codes · s_w)ᵀ, with w_scale [N, K/G]."""
    a = unpack_int4(a_packed, signed=True).double() * a_scale.double()[:, None]
    w = unpack_int32(w_packed, 4, signed=True).double()
    N, K = w.shape
    G = K // w_scale.shape[1]
    w = (w.reshape(N, -1, G) * w_scale.double()[:, :, None]).reshape(N, K)
    return a @ w.T


def w4a16_gemm_reference(x, w_packed, w_scale) -> torch.Tensor:
    w = unpack_int32(w_packed, 4, signed=True).double()
    N, K = w.shape
    G = K // w_scale.shape[1]
    w = (w.reshape(N, -1, G) * w_scale.double()[:, :, None]).reshape(N, K)
    return x.double().reshape(-1, K) @ w.T


@triton.jit
def _unpack_weight_tile(w_ptr, offs_n, k0, N, stride_w, BLOCK_K: tl.constexpr):
    """int32-packed weights [N, K/8] → int8 codes [BLOCK_N, BLOCK_K] for columns k0.."""
    cols = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    packed = tl.load(w_ptr + offs_n[:, None] * stride_w + cols[None, :], mask=offs_n[:, None] < N, other=0)
    shifts = tl.arange(0, 8) * 4
    nib = (packed[:, :, None] >> shifts[None, None, :]) & 0xF
    return tl.reshape(nib, (packed.shape[0], BLOCK_K)).to(tl.int8) - 8


@triton.jit
def _w4a4_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, c_ptr, M, N, K, stride_a, stride_w, stride_ws, stride_c,
                 M_BUCKET, GROUP: tl.constexpr, GROUPED: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    acc_f = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        ap = tl.load(a_ptr + offs_m[:, None] * stride_a + cols[None, :], mask=offs_m[:, None] < M, other=0x88)
        ap = ap.to(tl.int32)
        a = tl.reshape(tl.join(ap & 0xF, ap >> 4), (BLOCK_M, BLOCK_K)).to(tl.int8) - 8
        w = _unpack_weight_tile(w_ptr, offs_n, k0, N, stride_w, BLOCK_K)
        part = tl.dot(a, tl.trans(w), out_dtype=tl.int32)
        if GROUPED:
            gs = tl.load(ws_ptr + offs_n * stride_ws + k0 // GROUP, mask=offs_n < N, other=0.0)
            acc_f += part.to(tl.float32) * gs[None, :]
        else:
            acc_i += part
    s_tok = tl.load(as_ptr + offs_m, mask=offs_m < M, other=0.0)
    if GROUPED:
        out = acc_f * s_tok[:, None]
    else:
        s_ch = tl.load(ws_ptr + offs_n * stride_ws, mask=offs_n < N, other=0.0)
        out = acc_i.to(tl.float32) * s_tok[:, None] * s_ch[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptr + offs_m[:, None] * stride_c + offs_n[None, :], out.to(c_ptr.dtype.element_ty), mask=mask)


# CUDA: tile shapes autotuned per (M bucket, N, K); decode buckets favour narrow M tiles.
_TILES = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
          for bm, bn, w, st in [(16, 64, 4, 4), (16, 128, 4, 4), (16, 256, 8, 3), (32, 128, 4, 4),
                                (64, 128, 4, 3), (64, 256, 8, 3), (128, 128, 8, 3), (128, 256, 8, 3)]]
_w4a4_tuned = triton.autotune(_TILES, key=["M_BUCKET", "N", "K"])(_w4a4_kernel)


def _launch(kernel, tuned, M, N, blocks, args, **meta):
    """The autotuned kernel on CUDA; fixed tiles by M elsewhere (the interpreter)."""
    bucket = min(triton.next_power_of_2(max(M, 1)), 8192)
    if args[0].is_cuda:
        grid = lambda m: (triton.cdiv(M, m["BLOCK_M"]), triton.cdiv(N, m["BLOCK_N"]))  # noqa: E731
        tuned[grid](*args, bucket, **meta)
    else:
        BLOCK_M, BLOCK_N = blocks
        kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))](*args, bucket, BLOCK_M=BLOCK_M,
                                                                   BLOCK_N=BLOCK_N, **meta)


def w4a4_gemm(a_packed: torch.Tensor, a_scale: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor,
              out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """[M, N] = dequant(a) @ dequant(w)ᵀ from act_quant's output and packed int4 weights.
    ``w_scale`` is [N, 1] (per channel) or [N, K/G] with G a multiple of the K block."""
    M, K = a_packed.shape[0], a_packed.shape[1] * 2
    N = w_packed.shape[0]
    if w_packed.shape[1] * 8 != K:
        raise ValueError(f"activations have K = {K}, weights K = {w_packed.shape[1] * 8}")
    BLOCK_M, BLOCK_N, BLOCK_K = _blocks(M)
    groups = w_scale.shape[1]
    G = K // groups
    grouped = groups > 1
    if grouped:
        BLOCK_K = min(BLOCK_K, G)
        if G % BLOCK_K or BLOCK_K < 16:
            raise ValueError(f"group size {G} must be a multiple of 16 for w4a4_gemm")
    while BLOCK_K > 16 and K % BLOCK_K:
        BLOCK_K //= 2
    if K % BLOCK_K:
        raise ValueError(f"K = {K} must be a multiple of 16 for w4a4_gemm")
    c = torch.empty(M, N, dtype=out_dtype, device=a_packed.device)
    ws = w_scale.float().contiguous()
    if M:
        _launch(_w4a4_kernel, _w4a4_tuned, M, N, (BLOCK_M, BLOCK_N),
                (a_packed, a_scale, w_packed, ws, c, M, N, K, a_packed.stride(0), w_packed.stride(0),
                 ws.stride(0), c.stride(0)), GROUP=G, GROUPED=grouped, BLOCK_K=BLOCK_K)
    return c


@triton.jit
def _w4a16_kernel(x_ptr, w_ptr, ws_ptr, c_ptr, M, N, K, stride_x, stride_w, stride_ws, stride_c,
                  M_BUCKET, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  PRECISION: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_x + offs_k[None, :], mask=offs_m[:, None] < M, other=0.0)
        w = _unpack_weight_tile(w_ptr, offs_n, k0, N, stride_w, BLOCK_K).to(tl.float32)
        s = tl.load(ws_ptr + offs_n * stride_ws + k0 // GROUP, mask=offs_n < N, other=0.0)
        w = (w * s[:, None]).to(x.dtype)
        acc += tl.dot(x, tl.trans(w), out_dtype=tl.float32, input_precision=PRECISION)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptr + offs_m[:, None] * stride_c + offs_n[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


_w4a16_tuned = triton.autotune(_TILES, key=["M_BUCKET", "N", "K"])(_w4a16_kernel)


def w4a16_gemm(x: torch.Tensor, w_packed: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ dequant(w)ᵀ → [..., N] in x's dtype; scales [N, 1] or [N, K/G]."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K).contiguous()
    M, N = x2.shape[0], w_packed.shape[0]
    BLOCK_M, BLOCK_N, BLOCK_K = _blocks(M)
    G = K // w_scale.shape[1]
    BLOCK_K = min(BLOCK_K, G)
    while BLOCK_K > 16 and (K % BLOCK_K or G % BLOCK_K):
        BLOCK_K //= 2
    if K % BLOCK_K or G % BLOCK_K:
        raise ValueError(f"K = {K} and group size {G} must be multiples of 16 for w4a16_gemm")
    c = torch.empty(M, N, dtype=x.dtype, device=x.device)
    ws = w_scale.float().contiguous()
    if M:
        _launch(_w4a16_kernel, _w4a16_tuned, M, N, (BLOCK_M, BLOCK_N),
                (x2, w_packed, ws, c, M, N, K, x2.stride(0), w_packed.stride(0), ws.stride(0), c.stride(0)),
                GROUP=G, BLOCK_K=BLOCK_K, PRECISION="ieee" if x2.dtype == torch.float32 else "tf32")
    return c.reshape(*x.shape[:-1], N)
