"""Triton activation quantizers fused with the op before them, each beside its PyTorch reference.

* ``rmsnorm_act_quant``: RMSNorm (optionally after the residual add) then the per-token quantizer
  of ``int4_gemm.act_quant``: the inputs of q/k/v_proj and gate/up_proj.
* ``silu_mul_hadamard_act_quant``: SiLU(gate) · up of the merged gate_up_proj output, the online
  R4 Hadamard (``hadamard.hadamard_tile``) and the quantizer: down_proj's input.
* ``rope_hadamard_kv_store``: RoPE (neox, as Llama) and the R3 Hadamard on Q and K, then K and V
  quantized into the int4 paged cache exactly as ``kv4.kv_quant_store`` stores them; Q returned.

One program per row (per token and head for RoPE) holds it in registers: the input is read once
and the int8 codes and scale (or the cache bytes) written once; the norm's, SiLU·mul's and RoPE's
16-bit outputs never go through global memory (the residual stream, which the next layer needs,
and the rotated Q are the 16-bit writes).

Numerics are the served model's (vLLM's CUDA kernels and HF's Llama, which calibration runs, agree):
RMSNorm in float32, x · rsqrt(mean(x²) + eps), rounded to the activation dtype, times the weight,
rounded again (the residual sum is rounded before it is normalized); SiLU in float32 rounded to
the dtype, times up, rounded again. The quantizer then reads those 16-bit values as act_quant
would. Two choices make the codes a function of the row alone, so tests compare them exactly:
mean(x²) is accumulated in float64 and rounded once to float32 (float32 sums depend on the
reduction order, which already differs between torch and vLLM), and rsqrt is a correctly rounded
square root then division, as torch computes it on CPUs. SiLU's exp is Triton's, within a few
float32 ulps of torch's: after rounding to 16 bits the same value except within those ulps of a
rounding boundary. RoPE is computed in float32 from the cos/sin table it is given (vLLM's
cos_sin_cache, in the activation dtype in vLLM) and rounded once, with no fused multiply-add (as
PyTorch computes float32, and as the KV quantizer needs to be bit-exact): HF's eager bfloat16 RoPE
rounds each product too, so its Q and K can differ from this by one bfloat16 step. R3's output is
rounded to the activation dtype before K is quantized, as calibration and the unfused kernels do.
Roundings to bfloat16 are integer operations on the bits (half to even): Triton's interpreter
truncates float32 → bfloat16 casts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from rotq.kernels.hadamard import hadamard_tile, num_warps, plan
from rotq.kernels.int4_gemm import act_qmax, act_quant_reference, quantize_codes
from rotq.kernels.kv4 import EXACT_FLOAT, float32_view, kv_codes, kv_store_reference, row_bytes
from rotq.quant.hadamard import apply_hadamard

MAX_NORM_ROW = 32768  # rmsnorm_act_quant holds a row in registers: 32 warps × 32 float32 values
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- references

def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm of the rows of x in x's dtype, as HF's LlamaRMSNorm and vLLM compute it, with the
    mean of squares in float64 rounded once to float32 (the kernel's)."""
    ms = x.double().pow(2).mean(-1, keepdim=True).float()
    y = (x.float() * torch.rsqrt(ms + eps)).to(x.dtype)
    return y if weight is None else y * weight


def rmsnorm_act_quant_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float, clip_ratio: float,
                                bits: int = 4, residual: torch.Tensor | None = None):
    """What :func:`rmsnorm_act_quant` returns, in PyTorch: the residual sum in x's dtype, its
    RMSNorm (:func:`rmsnorm_reference`), ``act_quant_reference`` of that."""
    if residual is not None:
        x = x + residual
    codes, scale = act_quant_reference(rmsnorm_reference(x, weight, eps), clip_ratio, bits)
    return (codes, scale) if residual is None else (codes, scale, x)


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) · up of gate_up [..., 2I] in its dtype (SiLU rounded, then the product): HF's
    LlamaMLP and vLLM's SiluAndMul."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul_hadamard_act_quant_reference(gate_up: torch.Tensor, clip_ratio: float,
                                          bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`silu_mul_reference`, calibration's Hadamard of the whole row in float64, then
    ``act_quant_reference`` (which rounds the transform to float32)."""
    h = silu_mul_reference(gate_up)
    return act_quant_reference(apply_hadamard(h.double().reshape(-1, h.shape[-1])), clip_ratio, bits)


def rope_reference(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """Neox RoPE of x [T, H, D] at ``positions`` [T] from cos_sin_cache [max_position, D] (cos then
    sin, vLLM's layout) in float32, rounded once to x's dtype."""
    cos, sin = cos_sin_cache[positions.long()].float().chunk(2, dim=-1)
    c, s = cos[:, None], sin[:, None]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rope_hadamard_kv_store_reference(q, k, v, positions, cos_sin_cache, cache, slot_mapping, clip_ratio: float,
                                     symmetric: bool = False) -> torch.Tensor:
    """:func:`rope_reference`, calibration's R3 (float64, rounded to the dtype) on Q and K, then
    ``kv4.kv_store_reference``; returns Q."""
    q, k = (apply_hadamard(rope_reference(x, positions, cos_sin_cache)) for x in (q, k))
    kv_store_reference(k, v, cache, slot_mapping, clip_ratio, symmetric)
    return q


# ----------------------------------------------------------------------------- kernels

@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """float32 x rounded to DTYPE (half to even), as float32; bfloat16 by integer operations on the
    bits (Triton's interpreter truncates that cast)."""
    if DTYPE == tl.bfloat16:
        b = x.to(tl.int32, bitcast=True)
        b = (b + (0x7FFF + ((b >> 16) & 1))) & -65536
        return b.to(tl.float32, bitcast=True)
    else:
        return x.to(DTYPE).to(tl.float32)


@triton.jit
def _token_scale(amax, clip, QMAX: tl.constexpr):
    """act_quant's per-token scale: clip · max|x| / qmax, 1 for an all-zero token."""
    scale = tl.math.div_rn(amax * clip, QMAX * 1.0)
    return tl.where(scale > 0, scale, 1.0)


@triton.jit
def _rmsnorm_quant_kernel(x_ptr, r_ptr, h_ptr, w_ptr, q_ptr, s_ptr, K, stride_x, stride_r, stride_h, stride_q,
                          eps, clip, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, QMAX: tl.constexpr,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        x = round_to(x + r, x_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_h + offs, x.to(h_ptr.dtype.element_ty), mask=mask)
    x64 = x.to(tl.float64)
    ms = (tl.sum(x64 * x64, axis=0) / K).to(tl.float32)
    y = round_to(x * tl.math.div_rn(1.0, tl.sqrt_rn(ms + eps)), x_ptr.dtype.element_ty)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = round_to(y * w, x_ptr.dtype.element_ty)
    scale = _token_scale(tl.max(tl.abs(y), axis=0), clip, QMAX)
    tl.store(s_ptr + row, scale)
    tl.store(q_ptr + row * stride_q + offs, quantize_codes(y, scale, QMAX), mask=mask)


@triton.jit
def _silu_mul_hadamard_quant_kernel(x_ptr, q_ptr, s_ptr, at_ptr, K, stride_x, stride_q, inv_sqrt_n, clip,
                                    KP: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr, HAS_A: tl.constexpr,
                                    QMAX: tl.constexpr):
    """Program = row: gate is x[row, :K·P] and up x[row, K·P:], both loaded as [KP, P] tiles in
    the layout hadamard_tile transforms."""
    row = tl.program_id(0)
    rk = tl.arange(0, KP)
    rp = tl.arange(0, P)
    offs = rk[:, None] * P + rp[None, :]
    mask = rk[:, None] < K
    gate_ptr = x_ptr + row * stride_x + offs
    g = tl.load(gate_ptr, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gate_ptr + K * P, mask=mask, other=0.0).to(tl.float32)
    a = round_to(tl.math.div_rn(g, 1.0 + tl.exp(-g)), x_ptr.dtype.element_ty)
    y = hadamard_tile(round_to(a * u, x_ptr.dtype.element_ty), at_ptr, inv_sqrt_n, KP, P, LOG_P, HAS_A)
    scale = _token_scale(tl.max(tl.max(tl.abs(y), axis=1), axis=0), clip, QMAX)
    tl.store(s_ptr + row, scale)
    tl.store(q_ptr + row * stride_q + offs, quantize_codes(y, scale, QMAX), mask=mask)


@triton.jit
def _rope_r3(x_ptr, d, c, s_signed, inv_sqrt_n, D: tl.constexpr, LOG_D: tl.constexpr):
    """One head vector [D] after RoPE (x · cos + rotate_half(x) · sin, the sign of rotate_half in
    ``s_signed``) and R3, rounded to its dtype, as float32."""
    x = tl.load(x_ptr + d).to(tl.float32)
    partner = tl.load(x_ptr + (d + D // 2) % D).to(tl.float32)
    r = round_to(x * c + partner * s_signed, x_ptr.dtype.element_ty)
    y = hadamard_tile(tl.reshape(r, (1, D)), x_ptr, inv_sqrt_n, 1, D, LOG_D, False)
    return round_to(tl.reshape(y, (D,)), x_ptr.dtype.element_ty)


@triton.jit
def _rope_r3_kv_store_kernel(q_ptr, k_ptr, v_ptr, o_ptr, pos_ptr, cs_ptr, cache_ptr, scale_ptr, slot_ptr,
                             stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                             stride_cs, stride_page, inv_sqrt_n, clip, H_Q: tl.constexpr, H: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, D: tl.constexpr, LOG_D: tl.constexpr,
                             SYMMETRIC: tl.constexpr):
    """Program (token, head): heads below H_Q are query heads (RoPE, R3, written out), the rest KV
    heads (RoPE and R3 on K, then K and V stored in the page layout of kv4; a slot of −1 writes
    nothing)."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, D)
    cs_row = cs_ptr + tl.load(pos_ptr + t).to(tl.int64) * stride_cs
    c = tl.load(cs_row + d % (D // 2)).to(tl.float32)
    s_signed = tl.load(cs_row + D // 2 + d % (D // 2)).to(tl.float32) * tl.where(d < D // 2, -1.0, 1.0)
    if h < H_Q:
        y = _rope_r3(q_ptr + t * stride_qt + h * stride_qh, d, c, s_signed, inv_sqrt_n, D, LOG_D)
        tl.store(o_ptr + t * stride_ot + h * stride_oh + d, y.to(o_ptr.dtype.element_ty))
    else:
        kvh = h - H_Q
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            y = _rope_r3(k_ptr + t * stride_kt + kvh * stride_kh, d, c, s_signed, inv_sqrt_n, D, LOG_D)
            ke, ko = tl.split(tl.reshape(y, (D // 2, 2)))
            kq, ks, kz = kv_codes(ke, ko, clip, SYMMETRIC)
            j = tl.arange(0, D // 2)
            v_row = v_ptr + t * stride_vt + kvh * stride_vh
            vq, vs, vz = kv_codes(tl.load(v_row + 2 * j).to(tl.float32), tl.load(v_row + 2 * j + 1).to(tl.float32),
                                   clip, SYMMETRIC)
            page = (slot // BLOCK_SIZE) * stride_page
            r = kvh * BLOCK_SIZE + slot % BLOCK_SIZE
            S: tl.constexpr = H * BLOCK_SIZE
            tl.store(cache_ptr + page + r * D + j, kq.to(tl.uint8))
            tl.store(cache_ptr + page + r * D + D // 2 + j, vq.to(tl.uint8))
            sc = (page + S * D) // 4 + r * 2
            tl.store(scale_ptr + sc, ks)
            tl.store(scale_ptr + sc + 1, vs)
            tl.store(cache_ptr + page + S * (D + 8) + r, (kz | (vz << 4)).to(tl.uint8))


# ----------------------------------------------------------------------------- launchers

def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dtype not in _DTYPES:
        raise ValueError(f"{name} takes float16, bfloat16 or float32 activations, got {x.dtype}")
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rmsnorm_act_quant(x: torch.Tensor, weight: torch.Tensor | None, eps: float, clip_ratio: float, bits: int = 4,
                      residual: torch.Tensor | None = None):
    """int8 codes [M, K] and float32 scales [M] of RMSNorm(x) [..., K] (``weight`` [K] in x's
    dtype, or None where QuaRot folded it into the next linear), ``bits`` 4 or 8. With
    ``residual``: h = x + residual (rounded to x's dtype) is normalized and returned third, as
    vLLM's fused_add_rms_norm does in place."""
    qmax = act_qmax(bits)
    K = x.shape[-1]
    if K > MAX_NORM_ROW:
        raise ValueError(f"rmsnorm_act_quant holds a row in registers: at most {MAX_NORM_ROW} features, got {K}")
    if weight is not None and (weight.shape != (K,) or weight.dtype != x.dtype):
        raise ValueError(f"the norm weight must be [{K}] in x's dtype {x.dtype}, got {weight.dtype} "
                         f"{list(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual {residual.dtype} {list(residual.shape)} does not match x {x.dtype} "
                         f"{list(x.shape)}")
    rows = _rows(x, "rmsnorm_act_quant")
    M = rows.shape[0]
    q = torch.empty(M, K, dtype=torch.int8, device=x.device)
    s = torch.empty(M, dtype=torch.float32, device=x.device)
    res = h = rows  # unused without a residual
    if residual is not None:
        res = residual.reshape(-1, K)
        res = res if res.stride(-1) == 1 else res.contiguous()
        h = torch.empty_like(rows)
    if M:
        BLOCK = triton.next_power_of_2(K)
        _rmsnorm_quant_kernel[(M,)](rows, res, h, rows if weight is None else weight, q, s, K, rows.stride(0),
                                    res.stride(0), h.stride(0), q.stride(0), float(eps), float(clip_ratio),
                                    HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, QMAX=qmax,
                                    BLOCK=BLOCK, num_warps=num_warps(BLOCK))
    return (q, s) if residual is None else (q, s, h.reshape(x.shape))


def silu_mul_hadamard_act_quant(gate_up: torch.Tensor, clip_ratio: float, bits: int = 4,
                                hadamard_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes [M, I] and float32 scales [M] of (SiLU(gate) · up) H_I / √I for gate_up
    [..., 2I] (vLLM's merged gate_up_proj output), ``bits`` 4 or 8. The R4 Hadamard spans the
    whole row: ``hadamard_size``, when given (the checkpoint's), must be I."""
    qmax = act_qmax(bits)
    two_i = gate_up.shape[-1]
    n = two_i // 2
    if two_i % 2 or (hadamard_size is not None and hadamard_size != n):
        raise ValueError(f"gate_up [..., {two_i}] needs an even last dimension 2I with the Hadamard over the whole "
                         f"row (size I = {n}), got Hadamard size {hadamard_size}")
    k, p, kp, at = plan(n, gate_up.device)
    rows = _rows(gate_up, "silu_mul_hadamard_act_quant")
    M = rows.shape[0]
    q = torch.empty(M, n, dtype=torch.int8, device=gate_up.device)
    s = torch.empty(M, dtype=torch.float32, device=gate_up.device)
    if M:
        _silu_mul_hadamard_quant_kernel[(M,)](rows, q, s, at if at is not None else rows, k, rows.stride(0),
                                              q.stride(0), 1.0 / math.sqrt(n), float(clip_ratio), KP=kp, P=p,
                                              LOG_P=p.bit_length() - 1, HAS_A=at is not None, QMAX=qmax,
                                              num_warps=num_warps(kp * p), **EXACT_FLOAT)
    return q, s


def rope_hadamard_kv_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                           cos_sin_cache: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
                           clip_ratio: float, symmetric: bool = False) -> torch.Tensor:
    """Q [T, H_q, D] after RoPE and R3 (a new tensor in q's dtype); K [T, H_kv, D] after RoPE and R3
    and V quantized into the int4 paged ``cache`` at ``slot_mapping`` (−1 skipped), as
    ``kv4.kv_quant_store`` stores them. RoPE is neox style over the whole head, at ``positions``
    [T] of ``cos_sin_cache`` [max_position, D] (cos then sin); q, k, v may be strided views of
    the qkv projection's output."""
    T, Hq, D = q.shape
    H = k.shape[1]
    if cache.dtype != torch.uint8 or cache.dim() != 4 or cache.shape[1] != H or cache.shape[-1] != row_bytes(D):
        raise ValueError(f"expected a uint8 cache [blocks, {H}, block_size, {row_bytes(D)}] for K/V heads of {D}, "
                         f"got {cache.dtype} {tuple(cache.shape)}")
    if k.shape != (T, H, D) or v.shape != k.shape or q.dtype != k.dtype or v.dtype != k.dtype:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} (dtypes {q.dtype}, "
                         f"{k.dtype}, {v.dtype}) disagree")
    if q.dtype not in _DTYPES:
        raise ValueError(f"rope_hadamard_kv_store takes float16, bfloat16 or float32 heads, got {q.dtype}")
    if cos_sin_cache.shape[-1] != D:
        raise ValueError(f"cos_sin_cache [..., {cos_sin_cache.shape[-1]}]: RoPE must span the whole head ({D})")
    if min(q.stride(-1), k.stride(-1), v.stride(-1), cos_sin_cache.stride(-1)) != 1:
        raise ValueError("q, k, v and cos_sin_cache need a contiguous last dimension")
    N, C = cache.shape[2], cache.shape[3]
    if cache.stride()[1:] != (N * C, C, 1) or (H * N * D) % 4 or cache.stride(0) % 4 or cache.storage_offset() % 4:
        raise ValueError("the int4 KV cache's pages must be contiguous, their scale regions 4-byte aligned")
    out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    if T:
        _rope_r3_kv_store_kernel[(T, Hq + H)](
            q, k, v, out, positions, cos_sin_cache, cache, float32_view(cache), slot_mapping, q.stride(0),
            q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
            cos_sin_cache.stride(0), cache.stride(0), 1.0 / math.sqrt(D), float(clip_ratio), H_Q=Hq, H=H,
            BLOCK_SIZE=N, D=D, LOG_D=D.bit_length() - 1, SYMMETRIC=symmetric, **EXACT_FLOAT)
    return out
