"""Int4 paged KV cache: quantize-and-store, and attention over the packed cache (Triton),
each with a PyTorch reference.

Page layout. vLLM allocates each layer's cache as pages of H_kv · block_size · (D + 9) bytes
and hands them over as uint8 [num_blocks, H_kv, block_size, D + 9] (any stride between pages;
a page's bytes contiguous). rotq reads a page as three regions, with S = H_kv · block_size
(token, head) rows, row r = head · block_size + slot:

    codes   uint8   [S, D]   K codes (D/2 bytes, element 2j in the low nibble, 2j + 1 in the
                             high: ``packing.pack_int4``, unsigned) then V codes, the same way
    scales  float32 [S, 2]   K scale, V scale
    zeros   uint8   [S]      K zero point (low nibble), V zero point (high nibble)

73 bytes per token and head at D = 64 against 256 in bfloat16 (3.51x the tokens in the same
memory; 3.74x at D = 128). The scales stay float32, so the stored grid is exactly the one
calibration simulated. Token t of a sequence lives in block ``block_table[t // block_size]`` at
slot ``t % block_size``; ``slot_mapping`` gives each new token's flat slot (block · block_size +
slot).

Quantization is the calibration's KV quantizer (``rotq.quant.quantizer.kv_grid``): per (token,
head) over the head dimension; asymmetric: range [min(x, 0), max(x, 0)] · clip on 16 levels,
zero = round(−min / scale), code = clamp(round(x / scale) + zero, 0, 15); symmetric: scale =
clip · max|x| / 7, code = clamp(round(x / scale), −8, 7) + 8, stored with zero point 8.

Attention has two paths, both causal with GQA (query head h reads KV head h // (H_q / H_kv)):

* decode (``kv4_decode``, memory-bound): one program per (query row, KV head, context split)
  serves the KV head's whole query group with an online softmax over tiles of 64 cached tokens;
  each row's context is divided among the splits (flash-decoding) and a second kernel merges
  them. The dot products never dequantize: q·k = k_scale · (q·codes − k_zero · Σq) and p·v
  likewise, with the codes (exact in float16, made from the nibbles by integer ops on the
  mantissa of 1024.0) and q or p·v_scale split into two float16 parts on the tensor cores,
  accurate to float32's level.
* prefill (``kv4_prefill``, compute-bound): one Triton pass dequantizes the prefill requests'
  pages into a 16-bit scratch, then PyTorch's SDPA (FlashAttention on CUDA) runs each request's
  causal attention over it, aligned bottom-right when the queries continue a cached prefix
  (chunked prefill, prefix caching).

Both paths (and the float64 reference) take an optional full-precision attention prefix
(PrefixQuant, IntactKV): the K and V [H_kv, P, D] of a few sink tokens computed once per layer,
never stored in the pages, in front of every request's tokens and visible to all its queries.
Decode's split 0 opens its online softmax with them; prefill's gather copies them in front of
each request's rows.

Host-side inputs (query and context lengths of prefill requests) come from vLLM's host
metadata; nothing here reads a device tensor on the host, so decode can be graph-captured.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention.bias import causal_lower_right

from rotq.kernels.packing import pack_int4, unpack_int4
from rotq.quant.quantizer import kv_grid
from rotq.quant.scheme import KVCacheArgs

META_BYTES = 9  # float32 K and V scales, one byte of K|V zero points
# Bit-exact with calibration's quantizer: no fused multiply-add (on an H200 the compiler fused
# (max·clip) − (min·clip) into one FMA, so a few codes differed from calibration's).
EXACT_FLOAT = {"enable_fp_fusion": False}
_RINT = tl.constexpr(12582912.0)  # 1.5 * 2^23: (x + _RINT) - _RINT rounds half to even, as torch.round


def row_bytes(head_dim: int) -> int:
    """Bytes per (token, KV head) in the cache: K and V codes, their scales and zero points."""
    _check_head_dim(head_dim)
    return head_dim + META_BYTES


def _check_head_dim(D: int) -> None:
    if D % 2 or D & (D - 1):
        raise ValueError(f"the int4 KV cache needs a power-of-two head_dim, got {D}")


def _check_cache(cache: torch.Tensor, D: int) -> None:
    _check_head_dim(D)
    if cache.dtype != torch.uint8 or cache.dim() != 4 or cache.shape[-1] != row_bytes(D):
        raise ValueError(f"expected a uint8 cache [blocks, heads, block_size, {row_bytes(D)}], got "
                         f"{cache.dtype} {tuple(cache.shape)}")
    _, H, N, C = cache.shape
    if cache.stride()[1:] != (N * C, C, 1):
        raise ValueError(f"each page of the int4 KV cache must be contiguous, got strides {cache.stride()}")
    if (H * N * D) % 4 or cache.stride(0) % 4 or cache.storage_offset() % 4:
        raise ValueError("the int4 KV cache's pages and scale regions must start at multiples of 4 bytes "
                         f"(block_size {N}, page stride {cache.stride(0)}, offset {cache.storage_offset()})")


def _check_prefix(prefix, kv_heads: int, D: int) -> int:
    """P, the prefix's token count (0 without one): its K and V must be [H_kv, P ≥ 1, D]."""
    if prefix is None:
        return 0
    Kp, Vp = prefix
    if Kp.shape != Vp.shape or Kp.dim() != 3 or Kp.shape[0] != kv_heads or Kp.shape[2] != D or not Kp.shape[1]:
        raise ValueError(f"a prefix needs K and V [{kv_heads}, P >= 1, {D}], got {tuple(Kp.shape)} and "
                         f"{tuple(Vp.shape)}")
    return Kp.shape[1]


def _prefix_block(P: int) -> int:
    """The prefix's tile height: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(P))


def new_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, device=None) -> torch.Tensor:
    return torch.zeros(num_blocks, num_kv_heads, block_size, row_bytes(head_dim), dtype=torch.uint8,
                       device=device)


def page_views(cache: torch.Tensor, head_dim: int):
    """The regions of every page as views: codes uint8 [B, H, N, D], scales float32 [B, H, N, 2],
    zeros uint8 [B, H, N]."""
    _check_cache(cache, head_dim)
    B, H, N, _ = cache.shape
    D, S, page, base = head_dim, H * N, cache.stride(0), cache.storage_offset()
    codes = cache.as_strided((B, H, N, D), (page, N * D, D, 1), base)
    zeros = cache.as_strided((B, H, N), (page, N, 1), base + S * (D + 8))
    f32 = torch.empty(0, dtype=torch.float32, device=cache.device).set_(
        cache.untyped_storage(), 0, (cache.untyped_storage().nbytes() // 4,), (1,))
    scales = f32.as_strided((B, H, N, 2), (page // 4, N * 2, 2, 1), (base + S * D) // 4)
    return codes, scales, zeros


# ----------------------------------------------------------------------------- references

def kv_quantize_reference(x: torch.Tensor, clip_ratio: float, symmetric: bool = False):
    """(codes uint8 [..., D] in 0..15, scale [...], zero [...]) of x [..., D], in float32."""
    rows = x.float().reshape(-1, x.shape[-1])
    grid = kv_grid(rows, KVCacheArgs(bits=4, symmetric=symmetric, clip_ratio=clip_ratio))
    codes = grid.quantize(rows)
    if symmetric:
        codes, zero = codes + 8, torch.full_like(grid.scale, 8.0)
    else:
        zero = grid.zero_point
    lead = x.shape[:-1]
    return codes.to(torch.uint8).reshape(x.shape), grid.scale.reshape(lead), zero.reshape(lead)


def kv_store_reference(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
                       clip_ratio: float, symmetric: bool = False) -> None:
    """Quantize key and value [T, H_kv, D] into ``cache`` at ``slot_mapping`` [T] (a slot of −1 is
    skipped)."""
    keep = slot_mapping >= 0
    key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    D = key.shape[-1]
    codes, scales, zeros = page_views(cache, D)
    bs = cache.shape[2]
    blocks, slots = slot_mapping // bs, slot_mapping % bs
    kq, ks, kz = kv_quantize_reference(key, clip_ratio, symmetric)
    vq, vs, vz = kv_quantize_reference(value, clip_ratio, symmetric)
    codes[blocks, :, slots] = torch.cat([pack_int4(kq, signed=False), pack_int4(vq, signed=False)], dim=-1)
    scales[blocks, :, slots] = torch.stack([ks, vs], dim=-1)
    zeros[blocks, :, slots] = kz.to(torch.uint8) | (vz.to(torch.uint8) << 4)


def _dequantize(codes, scales, zeros):
    half = codes.shape[-1] // 2
    kz, vz = (zeros & 0xF).float()[..., None], (zeros >> 4).float()[..., None]
    K = (unpack_int4(codes[..., :half], signed=False).float() - kz) * scales[..., 0:1]
    V = (unpack_int4(codes[..., half:], signed=False).float() - vz) * scales[..., 1:2]
    return K, V


def dequantize_kv(cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 K and V [num_blocks, H_kv, block_size, D] from a packed cache."""
    return _dequantize(*page_views(cache, head_dim))


def gather_sequence(cache: torch.Tensor, head_dim: int, block_table: torch.Tensor, length: int):
    """Dequantized K and V [length, H_kv, D] (float32) of one sequence's first ``length`` tokens."""
    bs = cache.shape[2]
    blocks = block_table[: (length + bs - 1) // bs].long()
    K, V = _dequantize(*(region[blocks] for region in page_views(cache, head_dim)))
    flat = lambda X: X.permute(0, 2, 1, 3).reshape(-1, X.shape[1], head_dim)[:length]  # noqa: E731
    return flat(K), flat(V)


def kv4_attention_reference(q, cache, block_tables, seq_lens, softmax_scale: float, prefix=None) -> torch.Tensor:
    """float64 attention of each query row q[t] [H_q, D] over the first ``seq_lens[t]`` cached
    tokens of the sequence in ``block_tables[t]`` (a prefill token at position p is a row with
    seq_len p + 1), preceded by the ``prefix`` tokens' K and V [H_kv, P, D] when given (a
    full-precision attention prefix: in every row's past, so all visible)."""
    T, Hq, D = q.shape
    group = Hq // cache.shape[1]
    out = torch.empty(T, Hq, D, dtype=torch.float64)
    for t in range(T):
        k, v = gather_sequence(cache, D, block_tables[t], int(seq_lens[t]))
        if prefix is not None:
            k, v = (torch.cat([p.transpose(0, 1).to(x), x]) for p, x in zip(prefix, (k, v)))
        k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
        s = torch.einsum("hd,nhd->hn", q[t].double(), k) * softmax_scale
        out[t] = torch.einsum("hn,nhd->hd", torch.softmax(s, -1), v)
    return out


def kv4_gather_reference(cache: torch.Tensor, head_dim: int, block_tables: torch.Tensor, seq_lens: list[int],
                         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kv4_gather`'s result in PyTorch: K and V [H_kv, Σ seq_lens, D] in ``dtype``."""
    parts = [gather_sequence(cache, head_dim, block_tables[r], n) for r, n in enumerate(seq_lens)]
    K, V = (torch.cat([p[i] for p in parts]) if parts else
            torch.empty(0, cache.shape[1], head_dim) for i in (0, 1))
    return K.transpose(0, 1).to(dtype), V.transpose(0, 1).to(dtype)


# ----------------------------------------------------------------------------- store

@triton.jit
def kv_codes(xe, xo, clip, SYMMETRIC: tl.constexpr):
    """Packed codes [D/2] (int32 bytes), scale and zero point of one head vector given as its even
    and odd elements in registers (also used by kernels/fused.py after RoPE and R3)."""
    xmin = tl.minimum(tl.min(tl.minimum(xe, xo), axis=0), 0.0) * clip
    xmax = tl.maximum(tl.max(tl.maximum(xe, xo), axis=0), 0.0) * clip
    if SYMMETRIC:
        scale = tl.math.div_rn(tl.maximum(-xmin, xmax), 7.0)
        scale = tl.where(scale > 0, scale, 1.0)
        zero = 8.0
        qe = tl.minimum(tl.maximum((tl.math.div_rn(xe, scale) + _RINT) - _RINT, -8.0), 7.0) + 8.0
        qo = tl.minimum(tl.maximum((tl.math.div_rn(xo, scale) + _RINT) - _RINT, -8.0), 7.0) + 8.0
    else:
        scale = tl.math.div_rn(xmax - xmin, 15.0)
        scale = tl.where(scale > 0, scale, 1.0)
        zero = (tl.math.div_rn(-xmin, scale) + _RINT) - _RINT
        qe = tl.minimum(tl.maximum(((tl.math.div_rn(xe, scale) + _RINT) - _RINT) + zero, 0.0), 15.0)
        qo = tl.minimum(tl.maximum(((tl.math.div_rn(xo, scale) + _RINT) - _RINT) + zero, 0.0), 15.0)
    return qe.to(tl.int32) | (qo.to(tl.int32) << 4), scale, zero.to(tl.int32)


@triton.jit
def _quantize_row(x_ptr, j, clip, SYMMETRIC: tl.constexpr):
    """:func:`kv_codes` of the head vector at x_ptr."""
    return kv_codes(tl.load(x_ptr + 2 * j).to(tl.float32), tl.load(x_ptr + 2 * j + 1).to(tl.float32), clip, SYMMETRIC)


@triton.jit
def _kv_store_kernel(k_ptr, v_ptr, cache_ptr, scale_ptr, slot_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_page, clip, H: tl.constexpr, BLOCK_SIZE: tl.constexpr, D: tl.constexpr,
                     SYMMETRIC: tl.constexpr):
    """Program (token, KV head). A token with slot −1 (vLLM's padding) writes nothing: skipping
    it here spares the host a look at the slots."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        page = (slot // BLOCK_SIZE) * stride_page
        r = h * BLOCK_SIZE + slot % BLOCK_SIZE
        S: tl.constexpr = H * BLOCK_SIZE
        j = tl.arange(0, D // 2)
        kq, ks, kz = _quantize_row(k_ptr + t * stride_kt + h * stride_kh, j, clip, SYMMETRIC)
        vq, vs, vz = _quantize_row(v_ptr + t * stride_vt + h * stride_vh, j, clip, SYMMETRIC)
        tl.store(cache_ptr + page + r * D + j, kq.to(tl.uint8))
        tl.store(cache_ptr + page + r * D + D // 2 + j, vq.to(tl.uint8))
        sc = (page + S * D) // 4 + r * 2
        tl.store(scale_ptr + sc, ks)
        tl.store(scale_ptr + sc + 1, vs)
        tl.store(cache_ptr + page + S * (D + 8) + r, (kz | (vz << 4)).to(tl.uint8))


def float32_view(cache: torch.Tensor) -> torch.Tensor:
    """The cache's bytes from its first element on as float32 (the kernels address a scale at
    float32 index byte_offset / 4)."""
    storage = cache.untyped_storage()
    start = cache.storage_offset()
    return torch.empty(0, dtype=torch.float32, device=cache.device).set_(
        storage, start // 4, ((storage.nbytes() - start) // 4,), (1,))


def kv_quant_store(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
                   clip_ratio: float, symmetric: bool = False) -> None:
    """Quantize key (after RoPE and R3) and value [T, H_kv, D] into ``cache`` at ``slot_mapping``
    (a slot of −1 is skipped)."""
    T, H, D = key.shape
    _check_cache(cache, D)
    if value.shape != key.shape or cache.shape[1] != H:
        raise ValueError(f"key {tuple(key.shape)}, value {tuple(value.shape)} and cache {tuple(cache.shape)} "
                         "disagree")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("key and value need a contiguous head dimension")
    if T:
        _kv_store_kernel[(T, H)](
            key, value, cache, float32_view(cache), slot_mapping, key.stride(0), key.stride(1), value.stride(0),
            value.stride(1), cache.stride(0), float(clip_ratio), H=H, BLOCK_SIZE=cache.shape[2], D=D,
            SYMMETRIC=symmetric, **EXACT_FLOAT)


# ----------------------------------------------------------------------------- decode

@triton.jit
def _f16_parts(x):
    """x (|x| < 2) as hi + lo, two float16 tensors: about 22 significant bits together."""
    hi = x.to(tl.float16)
    return hi, (x - hi.to(tl.float32)).to(tl.float16)


@triton.jit
def _nibbles(b):
    """The low and high nibbles of bytes ``b`` as float16 codes 0..15: each nibble ORed into the
    mantissa of 1024.0 (0x6400) is 1024 + code, minus 1024 exactly; integer ops and a float16
    subtract instead of two conversions (int -> float32 -> float16) per code."""
    w = b.to(tl.int16)
    lo = ((w & 0xF) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    hi = ((w >> 4) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    return lo, hi


@triton.jit
def _token_offsets(bt_row_ptr, toks, valid, kvh, stride_page, H_KV: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   D: tl.constexpr):
    """Where the cached tokens ``toks`` (``valid`` ones only) of the sequence whose block table row
    is at bt_row_ptr live for KV head kvh: byte offsets of their codes and zero points and the
    float32 index of their K scale (V's is next), from the page layout of the module docstring."""
    S: tl.constexpr = H_KV * BLOCK_SIZE
    blocks = tl.load(bt_row_ptr + toks // BLOCK_SIZE, mask=valid, other=0)
    page = blocks.to(tl.int64) * stride_page
    r = kvh * BLOCK_SIZE + toks % BLOCK_SIZE
    return page + r * D, page + S * (D + 8) + r, (page + S * D) // 4 + r * 2


@triton.jit
def _prefix_softmax(q_even, q_odd, pk_ptr, pv_ptr, j, P: tl.constexpr, BLOCK_P: tl.constexpr, D: tl.constexpr):
    """The online softmax's first state (max, sum, Σ p·v's even and odd halves) of the scaled
    queries over P full-precision prefix tokens pk, pv [P, D] of any float type: IEEE float32
    dots, as exact as the reference needs and cheap for a few tokens read once per row."""
    t = tl.arange(0, BLOCK_P)
    in_p = (t < P)[:, None]
    row = t[:, None] * D + 2 * j[None, :]
    ke = tl.load(pk_ptr + row, mask=in_p, other=0.0).to(tl.float32)
    ko = tl.load(pk_ptr + row + 1, mask=in_p, other=0.0).to(tl.float32)
    s = tl.dot(q_even, tl.trans(ke), input_precision="ieee") + tl.dot(q_odd, tl.trans(ko), input_precision="ieee")
    s = tl.where(t[None, :] < P, s, -float("inf"))
    m = tl.max(s, axis=1)
    p = tl.exp(s - m[:, None])
    ve = tl.load(pv_ptr + row, mask=in_p, other=0.0).to(tl.float32)
    vo = tl.load(pv_ptr + row + 1, mask=in_p, other=0.0).to(tl.float32)
    return m, tl.sum(p, axis=1), tl.dot(p, ve, input_precision="ieee"), tl.dot(p, vo, input_precision="ieee")


@triton.jit
def _kv4_decode_kernel(q_ptr, cache_ptr, scale_ptr, bt_ptr, len_ptr, pk_ptr, pv_ptr, o_ptr, part_ptr, ml_ptr,
                       stride_qt, stride_qh, stride_bt, stride_ot, stride_oh, stride_page, softmax_scale,
                       H_KV: tl.constexpr, BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
                       D: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, P: tl.constexpr,
                       BLOCK_P: tl.constexpr):
    """Program (query row b, KV head, split): the GROUP query heads of row b sharing that KV head
    (padded to GROUP_P ≥ 16 rows of a dot) attend to split ``sp`` of the first len[b] tokens of
    block table row b; the row's context is cut into SPLITS chunks of whole tiles, so every split
    has work whatever the block table's width. With a prefix (P > 0 tokens at pk, pv [H_KV, P, D]),
    split 0 starts from the prefix's softmax state, so the prefix counts once per row. With one
    split the output is written directly, else the unnormalised partial and its (max, sum) go to
    a workspace that _kv4_combine_kernel reduces."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    g = tl.arange(0, GROUP_P)
    heads = kvh * GROUP + g
    in_group = g < GROUP
    n = tl.load(len_ptr + b)
    chunk = tl.cdiv(tl.cdiv(n, SPLITS), BLOCK_N) * BLOCK_N
    j = tl.arange(0, D // 2)
    q_row = q_ptr + b * stride_qt + heads[:, None] * stride_qh + 2 * j[None, :]
    q_even = tl.load(q_row, mask=in_group[:, None], other=0.0).to(tl.float32) * softmax_scale
    q_odd = tl.load(q_row + 1, mask=in_group[:, None], other=0.0).to(tl.float32) * softmax_scale
    # q.k = k_scale (q.codes - k_zero sum(q)): the dots run on the integer codes, on tensor cores,
    # with q (scaled below 2 by a power of two) as the sum of two float16 parts: float32-grade accuracy
    q_sum = tl.sum(q_even, axis=1) + tl.sum(q_odd, axis=1)
    q_max = tl.maximum(tl.max(tl.abs(q_even), axis=1), tl.max(tl.abs(q_odd), axis=1))
    q_unit = tl.exp2(tl.floor(tl.log2(tl.maximum(q_max, 1e-30))))
    qe_hi, qe_lo = _f16_parts(q_even / q_unit[:, None])
    qo_hi, qo_lo = _f16_parts(q_odd / q_unit[:, None])
    m_i = tl.full([GROUP_P], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_P], dtype=tl.float32)
    acc_e = tl.zeros([GROUP_P, D // 2], dtype=tl.float32)
    acc_o = tl.zeros([GROUP_P, D // 2], dtype=tl.float32)
    if P > 0:
        if sp == 0:
            m_i, l_i, acc_e, acc_o = _prefix_softmax(q_even, q_odd, pk_ptr + kvh * P * D, pv_ptr + kvh * P * D, j,
                                                     P, BLOCK_P, D)
    end = tl.minimum(sp * chunk + chunk, n)
    for start in range(sp * chunk, end, BLOCK_N):  # every tile holds at least one visible token
        toks = start + tl.arange(0, BLOCK_N)
        valid = toks < end
        codes, zeros, sc = _token_offsets(bt_ptr + b * stride_bt, toks, valid, kvh, stride_page, H_KV, BLOCK_SIZE, D)
        zp = tl.load(cache_ptr + zeros, mask=valid, other=0).to(tl.int32)
        kp = tl.load(cache_ptr + codes[:, None] + j[None, :], mask=valid[:, None], other=0)
        ks = tl.load(scale_ptr + sc, mask=valid, other=1.0)
        kz = (zp & 0xF).to(tl.float32)
        c_e, c_o = _nibbles(kp)
        raw = tl.dot(qe_hi, tl.trans(c_e)) + tl.dot(qe_lo, tl.trans(c_e)) + \
            tl.dot(qo_hi, tl.trans(c_o)) + tl.dot(qo_lo, tl.trans(c_o))
        s = (raw * q_unit[:, None] - q_sum[:, None] * kz[None, :]) * ks[None, :]
        s = tl.where(valid[None, :], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        vp = tl.load(cache_ptr + codes[:, None] + D // 2 + j[None, :], mask=valid[:, None], other=0)
        vs = tl.load(scale_ptr + sc + 1, mask=valid, other=1.0)
        vz = (zp >> 4).to(tl.float32)
        # p.v = (p v_scale).codes - (p v_scale).v_zero, the weights p v_scale split likewise
        w = p * vs[None, :]
        w_unit = tl.exp2(tl.floor(tl.log2(tl.maximum(tl.max(tl.where(valid, vs, 0.0), axis=0), 1e-30))))
        w_hi, w_lo = _f16_parts(w / w_unit)
        w_z = tl.sum(w * vz[None, :], axis=1)[:, None]
        c_e, c_o = _nibbles(vp)
        acc_e = acc_e * alpha[:, None] + ((tl.dot(w_hi, c_e) + tl.dot(w_lo, c_e)) * w_unit - w_z)
        acc_o = acc_o * alpha[:, None] + ((tl.dot(w_hi, c_o) + tl.dot(w_lo, c_o)) * w_unit - w_z)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    d = tl.arange(0, D)
    if SPLITS == 1:
        out = tl.reshape(tl.join(acc_e / l_i[:, None], acc_o / l_i[:, None]), (GROUP_P, D))
        tl.store(o_ptr + b * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=in_group[:, None])
    else:
        ws = (b * (H_KV * GROUP) + heads) * SPLITS + sp  # workspace [B, H_q, SPLITS, ...]
        tl.store(part_ptr + ws[:, None] * D + d[None, :],
                 tl.reshape(tl.join(acc_e, acc_o), (GROUP_P, D)), mask=in_group[:, None])
        tl.store(ml_ptr + ws * 2, m_i, mask=in_group)
        tl.store(ml_ptr + ws * 2 + 1, l_i, mask=in_group)


@triton.jit
def _kv4_combine_kernel(part_ptr, ml_ptr, o_ptr, stride_ot, stride_oh, H_Q: tl.constexpr, SPLITS: tl.constexpr,
                        SPLITS_P: tl.constexpr, D: tl.constexpr):
    """out[b, h] = Σ_s e^(m_s − M) acc_s / Σ_s e^(m_s − M) l_s over the splits of (b, h); a split
    past the row's context has m = −inf, l = 0, acc = 0 and weighs nothing."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, SPLITS_P)
    row = (b * H_Q + h) * SPLITS + sp
    used = sp < SPLITS
    m = tl.load(ml_ptr + row * 2, mask=used, other=-float("inf"))
    l_s = tl.load(ml_ptr + row * 2 + 1, mask=used, other=0.0)
    w = tl.exp(m - tl.max(m, axis=0))
    d = tl.arange(0, D)
    acc = tl.load(part_ptr + row[:, None] * D + d[None, :], mask=used[:, None], other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l_s, axis=0)
    tl.store(o_ptr + b * stride_ot + h * stride_oh + d, out.to(o_ptr.dtype.element_ty))


class DecodeTiles(NamedTuple):
    """Launch shape of :func:`kv4_decode`: cached tokens per tile, warps and pipeline stages
    (:func:`decode_tiles` chooses it)."""

    block_n: int
    num_warps: int
    num_stages: int


_MIN_SPLIT_TOKENS = 128


def decode_tiles(max_context: int, splits: int) -> DecodeTiles:
    """Tiles of 128 tokens and 4 warps where each split holds at most 512 tokens (batch 1 at 8k
    context: 1.28x tiles of 64), else 64 tokens and 2 warps (batch 64: 1.53x 4 warps, batch 16
    equal); 2 stages. Measured on an H200 with Llama-3-8B heads (benchmarks/tune.py)."""
    if -(-max_context // splits) <= 512:
        return DecodeTiles(128, 4, 2)
    return DecodeTiles(64, 2, 2)


def num_splits(rows: int, kv_heads: int, max_context: int, multiprocessors: int) -> int:
    """Context splits for ``rows`` decode rows: enough programs (rows · KV heads · splits) for two
    per multiprocessor (an H100/H200's 132 SMs: 33 splits at batch 1 with 8 KV heads), no more
    splits than ``max_context`` has 128-token pieces."""
    want = -(-2 * multiprocessors // max(rows * kv_heads, 1))
    return max(1, min(want, -(-max_context // _MIN_SPLIT_TOKENS)))


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def kv4_decode(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
               softmax_scale: float, out: torch.Tensor | None = None, splits: int | None = None,
               prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
               tiles: DecodeTiles | None = None) -> torch.Tensor:
    """Attention of each query row q[b] [H_q, D] over the first ``seq_lens[b]`` cached tokens of
    ``block_tables[b]`` (decode: the row's own K/V stored first), and over the full-precision
    ``prefix`` K and V [H_kv, P, D] (float32 or q's dtype) in front of them when given; writes
    into ``out`` [B, H_q, D] when given. ``splits`` divides each row's context among that many
    programs, merged by a second kernel; by default it is chosen from the GPU's size and the
    block table's width (shapes only: no host sync, so the call can be graph-captured). A row
    with seq_len 0 (padding) gets NaN, or the prefix's attention. ``tiles`` overrides the launch
    shape (benchmarks/tune.py times candidates)."""
    B, Hq, D = q.shape
    _check_cache(cache, D)
    Hkv = cache.shape[1]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} KV heads")
    if q.stride(-1) != 1:
        raise ValueError("q needs a contiguous head dimension")
    if block_tables.shape[0] < B or seq_lens.shape[0] < B:
        raise ValueError(f"{B} query rows but block tables {tuple(block_tables.shape)} and seq_lens "
                         f"{tuple(seq_lens.shape)}")
    P = _check_prefix(prefix, Hkv, D)
    out = torch.empty_like(q) if out is None else out
    if not B:
        return out
    block_size = cache.shape[2]
    if splits is None:
        splits = 1 if q.device.type != "cuda" else num_splits(
            B, Hkv, block_tables.shape[1] * block_size, _multiprocessors(q.device))
    tiles = tiles or decode_tiles(block_tables.shape[1] * block_size, splits)
    if splits > 1:
        part = torch.empty(B, Hq, splits, D, dtype=torch.float32, device=q.device)
        ml = torch.empty(B, Hq, splits, 2, dtype=torch.float32, device=q.device)
    else:
        part = ml = out  # unused
    bt = block_tables.to(torch.int32)
    group = Hq // Hkv
    pk, pv = (q, q) if prefix is None else (x.contiguous() for x in prefix)  # q: unused
    _kv4_decode_kernel[(B, Hkv, splits)](
        q, cache, float32_view(cache), bt, seq_lens.to(torch.int32), pk, pv, out, part, ml,
        q.stride(0), q.stride(1), bt.stride(0), out.stride(0), out.stride(1), cache.stride(0),
        float(softmax_scale), H_KV=Hkv, BLOCK_SIZE=block_size, GROUP=group,
        GROUP_P=max(16, triton.next_power_of_2(group)), D=D, BLOCK_N=tiles.block_n, SPLITS=splits, P=P,
        BLOCK_P=_prefix_block(P), num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    if splits > 1:
        _kv4_combine_kernel[(B, Hq)](part, ml, out, out.stride(0), out.stride(1), H_Q=Hq, SPLITS=splits,
                                     SPLITS_P=triton.next_power_of_2(splits), D=D)
    return out


# ----------------------------------------------------------------------------- prefill

@triton.jit
def _kv4_gather_kernel(cache_ptr, scale_ptr, bt_ptr, len_ptr, start_ptr, pk_ptr, pv_ptr, k_ptr, v_ptr, stride_bt,
                       stride_page, stride_sh, H_KV: tl.constexpr, BLOCK_SIZE: tl.constexpr, D: tl.constexpr,
                       BLOCK_N: tl.constexpr, P: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (request r, tile, KV head): dequantize tokens [tile · BLOCK_N, +BLOCK_N) ∩ [0, len[r])
    of block table row r into the scratch K and V [H_KV, total, D] at rows start[r] + token, as
    (code − zero) · scale in float32 (the reference's arithmetic), rounded once to the scratch's type.
    With a prefix (P > 0 tokens at pk, pv [H_KV, P, D]), tile 0 also copies it to rows start[r] − P
    onward, just before the request's."""
    rq = tl.program_id(0)
    tile = tl.program_id(1)
    kvh = tl.program_id(2)
    n = tl.load(len_ptr + rq)
    first = tl.load(start_ptr + rq).to(tl.int64)
    toks = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = toks < n
    codes, zeros, sc = _token_offsets(bt_ptr + rq * stride_bt, toks, valid, kvh, stride_page, H_KV, BLOCK_SIZE, D)
    zp = tl.load(cache_ptr + zeros, mask=valid, other=0).to(tl.int32)
    j = tl.arange(0, D // 2)
    kp = tl.load(cache_ptr + codes[:, None] + j[None, :], mask=valid[:, None], other=0).to(tl.int32)
    vp = tl.load(cache_ptr + codes[:, None] + D // 2 + j[None, :], mask=valid[:, None], other=0).to(tl.int32)
    ks = tl.load(scale_ptr + sc, mask=valid, other=0.0)[:, None]
    vs = tl.load(scale_ptr + sc + 1, mask=valid, other=0.0)[:, None]
    kz = (zp & 0xF).to(tl.float32)[:, None]
    vz = (zp >> 4).to(tl.float32)[:, None]
    k = tl.join(((kp & 0xF).to(tl.float32) - kz) * ks, ((kp >> 4).to(tl.float32) - kz) * ks)
    v = tl.join(((vp & 0xF).to(tl.float32) - vz) * vs, ((vp >> 4).to(tl.float32) - vz) * vs)
    d = tl.arange(0, D)
    dst = kvh.to(tl.int64) * stride_sh + (first + toks)[:, None] * D + d[None, :]
    tl.store(k_ptr + dst, tl.reshape(k, (BLOCK_N, D)).to(k_ptr.dtype.element_ty), mask=valid[:, None])
    tl.store(v_ptr + dst, tl.reshape(v, (BLOCK_N, D)).to(v_ptr.dtype.element_ty), mask=valid[:, None])
    if P > 0:
        if tile == 0:
            t = tl.arange(0, BLOCK_P)
            in_p = (t < P)[:, None]
            src = (kvh * P + t[:, None]) * D + d[None, :]
            # not `dst`: Triton would carry that [BLOCK_N, D] name through the branch as [BLOCK_P, D]
            p_dst = kvh.to(tl.int64) * stride_sh + (first - P + t)[:, None] * D + d[None, :]
            tl.store(k_ptr + p_dst, tl.load(pk_ptr + src, mask=in_p).to(k_ptr.dtype.element_ty), mask=in_p)
            tl.store(v_ptr + p_dst, tl.load(pv_ptr + src, mask=in_p).to(v_ptr.dtype.element_ty), mask=in_p)


_GATHER_N = 64


def kv4_gather(cache: torch.Tensor, head_dim: int, block_tables: torch.Tensor, seq_lens: torch.Tensor,
               max_len: int, total: int, dtype: torch.dtype,
               prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized K and V [H_kv, total, D] in ``dtype`` of the first ``seq_lens[r]`` tokens of each
    ``block_tables[r]``, request after request (``total`` = Σ seq_lens and ``max_len`` = max
    seq_lens, given by the caller from its host-side lengths), in one pass over the pages. With a
    ``prefix`` (K and V [H_kv, P, D]), each request's rows are preceded by the prefix's P rows
    ([H_kv, total + R · P, D]), so that its attention needs no concatenation."""
    _check_cache(cache, head_dim)
    Hkv, R = cache.shape[1], seq_lens.shape[0]
    P = _check_prefix(prefix, Hkv, head_dim)
    rows = total + R * P
    scratch = torch.empty(2, Hkv, rows, head_dim, dtype=dtype, device=cache.device)
    tiles = max(triton.cdiv(max_len, _GATHER_N), min(P, 1))  # tile 0 writes the prefix
    if R and tiles:
        lens = seq_lens.to(torch.int32)
        starts = torch.cumsum(lens + P, 0, dtype=torch.int32) - lens
        bt = block_tables.to(torch.int32)
        pk, pv = (scratch, scratch) if prefix is None else (x.contiguous() for x in prefix)  # scratch: unused
        _kv4_gather_kernel[(R, tiles, Hkv)](
            cache, float32_view(cache), bt, lens, starts, pk, pv, scratch[0], scratch[1], bt.stride(0),
            cache.stride(0), rows * head_dim, H_KV=Hkv, BLOCK_SIZE=cache.shape[2], D=head_dim, BLOCK_N=_GATHER_N,
            P=P, BLOCK_P=_prefix_block(P))
    return scratch[0], scratch[1]


def _causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, prefix=None) -> torch.Tensor:
    """Causal SDPA of q [H_q, n, D] over k, v [H_kv, L, D] (L ≥ n), aligned bottom-right: query i
    sits at position L − n + i. is_causal (FlashAttention on CUDA) when n = L; else, in 16 bits on
    CUDA, torch's lower-right CausalBias (FlashAttention with its bottom-right mask), elsewhere
    an explicit mask. A ``prefix`` (K and V [H_kv, P, D]) goes in front of k and v: it lies
    below every query's diagonal, so the same bottom-right mask lets every query see all of it."""
    if prefix is not None:
        k, v = (torch.cat([p.to(x), x], 1) for p, x in zip(prefix, (k, v)))
    n, L = q.shape[1], k.shape[1]
    if q.is_cuda:  # FlashAttention takes 4-D inputs only (3-D ones ran the math kernel, 32-52x slower);
        q, k, v = q[None], k[None], v[None]  # the CPU keeps 3-D, the numerics vLLM's CPU tests were set on
    if n == L:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            mask = causal_lower_right(n, L)
        else:
            mask = torch.ones(n, L, dtype=torch.bool, device=q.device).tril(L - n)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return o[0] if q.is_cuda else o


def causal_attention(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, query_starts: list[int],
                     seq_lens: list[int], softmax_scale: float, out: torch.Tensor,
                     prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Request r's query tokens q[query_starts[r]:query_starts[r + 1]] [n, H_q, D] are the last n
    of its seq_lens[r] tokens, whose K and V are rows [Σ seq_lens[:r], +seq_lens[r]) of K, V
    [H_kv, total, D]; causal SDPA per request into ``out`` [T, H_q, D], every query also seeing
    all of ``prefix`` (K and V [H_kv, P, D], in front of each request's tokens) when given. Host
    lists: no sync."""
    kv0 = 0
    for r, length in enumerate(seq_lens):
        q0, q1 = query_starts[r], query_starts[r + 1]
        if q1 > q0:
            o = _causal_sdpa(q[q0:q1].transpose(0, 1), K[:, kv0:kv0 + length], V[:, kv0:kv0 + length],
                             softmax_scale, prefix)
            out[q0:q1] = o.transpose(0, 1)
        kv0 += length
    return out


def kv4_prefill(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                query_starts: list[int], seq_lens_host: list[int], softmax_scale: float,
                out: torch.Tensor | None = None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal attention of prefill requests (see :func:`causal_attention`, ``prefix`` included)
    over the int4 pages: :func:`kv4_gather` into a scratch of q's dtype, then SDPA. ``seq_lens``
    (device) and ``seq_lens_host`` hold the same lengths; ``query_starts`` [R + 1] is relative to
    q."""
    T, Hq, D = q.shape
    out = torch.empty_like(q) if out is None else out
    if len(query_starts) != len(seq_lens_host) + 1 or query_starts[-1] - query_starts[0] > T:
        raise ValueError(f"{len(seq_lens_host)} requests need {len(seq_lens_host) + 1} query starts within "
                         f"{T} tokens, got {query_starts}")
    if Hq % cache.shape[1]:
        raise ValueError(f"{Hq} query heads are not a multiple of {cache.shape[1]} KV heads")
    P = _check_prefix(prefix, cache.shape[1], D)
    K, V = kv4_gather(cache, D, block_tables, seq_lens, max(seq_lens_host, default=0), sum(seq_lens_host),
                      q.dtype, prefix)
    # the scratch holds each request's tokens behind its own copy of the prefix: plain causal
    # attention over P more tokens is the prefix's attention
    return causal_attention(q, K, V, query_starts, [P + n for n in seq_lens_host], softmax_scale, out)
