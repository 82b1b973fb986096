"""Int4 paged KV cache: quantize-and-store, and attention over the packed cache (Triton),
each with a PyTorch reference.

Cache layout (per layer): ``k_cache``/``v_cache`` uint8 [num_blocks, block_size, H_kv, D/2]
(two codes per byte, element 2j in the low nibble), ``k_meta``/``v_meta`` float32
[num_blocks, block_size, H_kv, 2] holding (scale, zero point) per (token, head). Token t of a
sequence lives in block ``block_table[t // block_size]`` at slot ``t % block_size``;
``slot_mapping`` gives each new token's flat slot (block · block_size + offset).

Quantization is the calibration's KV quantizer (``rotq.quant.quantizer.fake_quantize_kv``):
asymmetric per (token, head) over the head dimension, range [min(x, 0), max(x, 0)] · clip on 16
levels, scale = range / 15, zero = round(−min / scale), q = clamp(round(x / s) + zero, 0, 15).

``kv4_attention`` serves decode and (chunked) prefill alike: every query token carries its
sequence index and absolute position and attends to that sequence's cached tokens 0..position
(its own K/V must be stored first), with GQA (query head h reads KV head h // (H_q / H_kv)).
One program per (query token, query head), an online softmax over blocks of cached tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_RINT = 12582912.0


# ----------------------------------------------------------------------------- references

def kv_quantize_reference(x: torch.Tensor, clip_ratio: float):
    """(codes uint8 [..., D] in 0..15, scale [...], zero [...]) of x [..., D], in float32."""
    x = x.float()
    xmin = torch.clamp(x.amin(-1), max=0) * clip_ratio
    xmax = torch.clamp(x.amax(-1), min=0) * clip_ratio
    scale = (xmax - xmin) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-xmin / scale)
    q = torch.clamp(torch.round(x / scale[..., None]) + zero[..., None], 0, 15)
    return q.to(torch.uint8), scale, zero


def dequantize_cache(cache: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """float32 [num_blocks, block_size, H, D] from a packed cache and its (scale, zero)."""
    q = torch.stack([cache & 0xF, cache >> 4], dim=-1).reshape(*cache.shape[:-1], -1).float()
    return (q - meta[..., 1:2]) * meta[..., 0:1]


def kv4_attention_reference(q, k_cache, k_meta, v_cache, v_meta, block_tables, seq_idx, positions,
                            softmax_scale: float) -> torch.Tensor:
    """float64 attention of each query token [T, H_q, D] over its sequence's cached tokens 0..pos."""
    K, V = dequantize_cache(k_cache, k_meta).double(), dequantize_cache(v_cache, v_meta).double()
    bs = k_cache.shape[1]
    T, Hq, D = q.shape
    group = Hq // k_cache.shape[2]
    out = torch.empty(T, Hq, D, dtype=torch.float64)
    for t in range(T):
        n = int(positions[t]) + 1
        toks = torch.arange(n)
        blocks = block_tables[int(seq_idx[t])][toks // bs]
        k, v = K[blocks, toks % bs], V[blocks, toks % bs]  # [n, H_kv, D]
        for h in range(Hq):
            s = (k[:, h // group] @ q[t, h].double()) * softmax_scale
            out[t, h] = torch.softmax(s, 0) @ v[:, h // group]
    return out


# ----------------------------------------------------------------------------- store

@triton.jit
def _kv_store_kernel(x_ptr, cache_ptr, meta_ptr, slot_ptr, stride_xt, stride_xh, clip,
                     H: tl.constexpr, D: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t)
    j = tl.arange(0, D // 2)
    base = x_ptr + t * stride_xt + h * stride_xh
    xe = tl.load(base + 2 * j).to(tl.float32)
    xo = tl.load(base + 2 * j + 1).to(tl.float32)
    xmin = tl.minimum(tl.min(tl.minimum(xe, xo), axis=0), 0.0) * clip
    xmax = tl.maximum(tl.max(tl.maximum(xe, xo), axis=0), 0.0) * clip
    scale = (xmax - xmin) / 15.0
    scale = tl.where(scale > 0, scale, 1.0)
    zero = ((-xmin / scale) + _RINT) - _RINT
    qe = tl.minimum(tl.maximum((((xe / scale) + _RINT) - _RINT) + zero, 0.0), 15.0)
    qo = tl.minimum(tl.maximum((((xo / scale) + _RINT) - _RINT) + zero, 0.0), 15.0)
    byte = qe.to(tl.int32) | (qo.to(tl.int32) << 4)
    row = slot * H + h
    tl.store(cache_ptr + row * (D // 2) + j, byte.to(tl.uint8))
    tl.store(meta_ptr + row * 2, scale)
    tl.store(meta_ptr + row * 2 + 1, zero)


def kv_quant_store(x: torch.Tensor, cache: torch.Tensor, meta: torch.Tensor, slot_mapping: torch.Tensor,
                   clip_ratio: float) -> None:
    """Quantize x [T, H_kv, D] (K after RoPE and R3, or V) into ``cache``/``meta`` at the slots."""
    T, H, D = x.shape
    if D % 2 or D & (D - 1):
        raise ValueError(f"head_dim must be a power of two, got {D}")
    if T:
        _kv_store_kernel[(T, H)](x, cache, meta, slot_mapping, x.stride(0), x.stride(1), float(clip_ratio),
                                 H=H, D=D)


# ----------------------------------------------------------------------------- attention

@triton.jit
def _kv4_attention_kernel(q_ptr, kc_ptr, km_ptr, vc_ptr, vm_ptr, bt_ptr, seq_ptr, pos_ptr, o_ptr,
                          stride_qt, stride_qh, stride_bt, stride_ot, stride_oh, softmax_scale,
                          BLOCK_SIZE: tl.constexpr, H_KV: tl.constexpr, GROUP: tl.constexpr,
                          D: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    seq = tl.load(seq_ptr + t)
    n = tl.load(pos_ptr + t) + 1
    d = tl.arange(0, D)
    j = tl.arange(0, D // 2)
    q = tl.load(q_ptr + t * stride_qt + h * stride_qh + d).to(tl.float32) * softmax_scale
    q_even, q_odd = tl.split(tl.reshape(q, (D // 2, 2)))
    m_i = -float("inf")
    l_i = 0.0
    acc_e = tl.zeros([D // 2], dtype=tl.float32)
    acc_o = tl.zeros([D // 2], dtype=tl.float32)
    for start in range(0, n, BLOCK_N):
        toks = start + tl.arange(0, BLOCK_N)
        valid = toks < n
        blocks = tl.load(bt_ptr + seq * stride_bt + toks // BLOCK_SIZE, mask=valid, other=0)
        rows = (blocks.to(tl.int64) * BLOCK_SIZE + toks % BLOCK_SIZE) * H_KV + kvh
        kp = tl.load(kc_ptr + rows[:, None] * (D // 2) + j[None, :], mask=valid[:, None], other=0).to(tl.int32)
        ks = tl.load(km_ptr + rows * 2, mask=valid, other=1.0)
        kz = tl.load(km_ptr + rows * 2 + 1, mask=valid, other=0.0)
        k_e = ((kp & 0xF).to(tl.float32) - kz[:, None]) * ks[:, None]
        k_o = ((kp >> 4).to(tl.float32) - kz[:, None]) * ks[:, None]
        s = tl.sum(k_e * q_even[None, :] + k_o * q_odd[None, :], axis=1)
        s = tl.where(valid, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new)
        vp = tl.load(vc_ptr + rows[:, None] * (D // 2) + j[None, :], mask=valid[:, None], other=0).to(tl.int32)
        vs = tl.load(vm_ptr + rows * 2, mask=valid, other=1.0)
        vz = tl.load(vm_ptr + rows * 2 + 1, mask=valid, other=0.0)
        v_e = ((vp & 0xF).to(tl.float32) - vz[:, None]) * vs[:, None]
        v_o = ((vp >> 4).to(tl.float32) - vz[:, None]) * vs[:, None]
        acc_e = acc_e * alpha + tl.sum(p[:, None] * v_e, axis=0)
        acc_o = acc_o * alpha + tl.sum(p[:, None] * v_o, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    out = tl.reshape(tl.join(acc_e / l_i, acc_o / l_i), (D,))
    tl.store(o_ptr + t * stride_ot + h * stride_oh + d, out.to(o_ptr.dtype.element_ty))


def kv4_attention(q: torch.Tensor, k_cache, k_meta, v_cache, v_meta, block_tables: torch.Tensor,
                  seq_idx: torch.Tensor, positions: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """Attention of q [T, H_q, D] over the int4 paged cache (see the module docstring)."""
    T, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} KV heads")
    out = torch.empty_like(q)
    if T:
        bt = block_tables.to(torch.int32).contiguous()
        _kv4_attention_kernel[(T, Hq)](
            q, k_cache, k_meta, v_cache, v_meta, bt, seq_idx.to(torch.int32), positions.to(torch.int32), out,
            q.stride(0), q.stride(1), bt.stride(0), out.stride(0), out.stride(1), float(softmax_scale),
            BLOCK_SIZE=k_cache.shape[1], H_KV=Hkv, GROUP=Hq // Hkv, D=D, BLOCK_N=32)
    return out
