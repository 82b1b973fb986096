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

``kv4_attention`` serves decode and (chunked) prefill alike: every query token carries its
sequence index and absolute position and attends to that sequence's cached tokens 0..position
(its own K/V must be stored first), with GQA (query head h reads KV head h // (H_q / H_kv)).
One program per (query token, KV head, context split) serves the KV head's whole query group
with an online softmax over tiles of 32 cached tokens; long contexts are split across programs
(flash-decoding) and a second kernel merges the splits. The dot products never dequantize: q·k =
k_scale · (q·codes − k_zero · Σq) and p·v likewise, with the codes (exact in float16) and q or
p·v_scale split into two float16 parts on the tensor cores, accurate to float32's level (7× faster
at batch 16 on an H200 than float32 dots on dequantized tiles).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
    """Quantize key and value [T, H_kv, D] into ``cache`` at ``slot_mapping`` [T]."""
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
    """Dequantized K and V [length, H_kv, D] of one sequence's first ``length`` tokens."""
    bs = cache.shape[2]
    blocks = block_table[: (length + bs - 1) // bs].long()
    K, V = _dequantize(*(region[blocks] for region in page_views(cache, head_dim)))
    flat = lambda X: X.permute(0, 2, 1, 3).reshape(-1, X.shape[1], head_dim)[:length]  # noqa: E731
    return flat(K), flat(V)


def kv4_attention_reference(q, cache, block_tables, seq_idx, positions, softmax_scale: float) -> torch.Tensor:
    """float64 attention of each query token [T, H_q, D] over its sequence's cached tokens 0..pos."""
    T, Hq, D = q.shape
    group = Hq // cache.shape[1]
    out = torch.empty(T, Hq, D, dtype=torch.float64)
    for t in range(T):
        k, v = gather_sequence(cache, D, block_tables[int(seq_idx[t])], int(positions[t]) + 1)
        k, v = k.double(), v.double()
        for h in range(Hq):
            s = (k[:, h // group] @ q[t, h].double()) * softmax_scale
            out[t, h] = torch.softmax(s, 0) @ v[:, h // group]
    return out


# ----------------------------------------------------------------------------- store

@triton.jit
def _quantize_row(x_ptr, j, clip, SYMMETRIC: tl.constexpr):
    """Packed codes [D/2] (int32 bytes), scale and zero point of one head vector."""
    xe = tl.load(x_ptr + 2 * j).to(tl.float32)
    xo = tl.load(x_ptr + 2 * j + 1).to(tl.float32)
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
def _kv_store_kernel(k_ptr, v_ptr, cache_ptr, scale_ptr, slot_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_page, clip, H: tl.constexpr, BLOCK_SIZE: tl.constexpr, D: tl.constexpr,
                     SYMMETRIC: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
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


def _float32_view(cache: torch.Tensor) -> torch.Tensor:
    """The cache's bytes from its first element on as float32 (the kernels address a scale at
    float32 index byte_offset / 4)."""
    storage = cache.untyped_storage()
    start = cache.storage_offset()
    return torch.empty(0, dtype=torch.float32, device=cache.device).set_(
        storage, start // 4, ((storage.nbytes() - start) // 4,), (1,))


def kv_quant_store(key: torch.Tensor, value: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
                   clip_ratio: float, symmetric: bool = False) -> None:
    """Quantize key (after RoPE and R3) and value [T, H_kv, D] into ``cache`` at ``slot_mapping``."""
    T, H, D = key.shape
    _check_cache(cache, D)
    if value.shape != key.shape or cache.shape[1] != H:
        raise ValueError(f"key {tuple(key.shape)}, value {tuple(value.shape)} and cache {tuple(cache.shape)} "
                         "disagree")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("key and value need a contiguous head dimension")
    if T:
        _kv_store_kernel[(T, H)](
            key, value, cache, _float32_view(cache), slot_mapping, key.stride(0), key.stride(1), value.stride(0),
            value.stride(1), cache.stride(0), float(clip_ratio), H=H, BLOCK_SIZE=cache.shape[2], D=D,
            SYMMETRIC=symmetric, **EXACT_FLOAT)


# ----------------------------------------------------------------------------- attention

@triton.jit
def _f16_parts(x):
    """x (|x| < 2) as hi + lo, two float16 tensors: about 22 significant bits together."""
    hi = x.to(tl.float16)
    return hi, (x - hi.to(tl.float32)).to(tl.float16)


@triton.jit
def _kv4_attention_kernel(q_ptr, cache_ptr, scale_ptr, bt_ptr, seq_ptr, pos_ptr, qb_ptr, o_ptr, part_ptr, ml_ptr,
                          stride_qt, stride_qh, stride_bt, stride_ot, stride_oh, stride_page, softmax_scale, chunk,
                          H_KV: tl.constexpr, BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCKED: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                          SPLITS: tl.constexpr):
    """Program (query block b, KV head, split): the query tokens of block b (one token when not
    BLOCKED; else the run qb[b] = (first token, count) of up to BLOCK_M consecutive tokens of one
    sequence, at consecutive positions), each with the GROUP query heads sharing that KV head,
    attend to the cached tokens [split · chunk, min((split + 1) · chunk, position + 1)). Rows are
    (token, head) pairs; each K/V tile of codes is loaded once for all of them. With one split
    the output is written directly, else the unnormalised partial and its (max, sum) go to a
    workspace that _kv4_combine_kernel reduces."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    S: tl.constexpr = H_KV * BLOCK_SIZE
    if BLOCKED:
        t0 = tl.load(qb_ptr + 2 * b)
        m = tl.load(qb_ptr + 2 * b + 1)
    else:
        t0 = b
        m = 1
    row = tl.arange(0, BLOCK_M * GROUP_P)
    tok = row // GROUP_P
    g = row % GROUP_P
    t = t0 + tok
    heads = kvh * GROUP + g
    in_group = (g < GROUP) & (tok < m)
    seq = tl.load(seq_ptr + t0)
    pos = tl.load(pos_ptr + t, mask=tok < m, other=0)  # each row's own causal limit
    n = tl.load(pos_ptr + t0 + m - 1) + 1
    j = tl.arange(0, D // 2)
    q_row = q_ptr + t[:, None] * stride_qt + heads[:, None] * stride_qh + 2 * j[None, :]
    q_even = tl.load(q_row, mask=in_group[:, None], other=0.0).to(tl.float32) * softmax_scale
    q_odd = tl.load(q_row + 1, mask=in_group[:, None], other=0.0).to(tl.float32) * softmax_scale
    # q.k = k_scale (q.codes - k_zero sum(q)): the dots run on the integer codes, on tensor cores,
    # with q (scaled below 2 by a power of two) as the sum of two float16 parts: float32-grade accuracy
    q_sum = tl.sum(q_even, axis=1) + tl.sum(q_odd, axis=1)
    q_max = tl.maximum(tl.max(tl.abs(q_even), axis=1), tl.max(tl.abs(q_odd), axis=1))
    q_unit = tl.exp2(tl.floor(tl.log2(tl.maximum(q_max, 1e-30))))
    qe_hi, qe_lo = _f16_parts(q_even / q_unit[:, None])
    qo_hi, qo_lo = _f16_parts(q_odd / q_unit[:, None])
    m_i = tl.full([BLOCK_M * GROUP_P], -float("inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M * GROUP_P], dtype=tl.float32)
    acc_e = tl.zeros([BLOCK_M * GROUP_P, D // 2], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_M * GROUP_P, D // 2], dtype=tl.float32)
    end = tl.minimum(sp * chunk + chunk, n)
    for start in range(sp * chunk, end, BLOCK_N):
        toks = start + tl.arange(0, BLOCK_N)
        valid = toks < end
        blocks = tl.load(bt_ptr + seq * stride_bt + toks // BLOCK_SIZE, mask=valid, other=0)
        page = blocks.to(tl.int64) * stride_page
        r = kvh * BLOCK_SIZE + toks % BLOCK_SIZE
        codes = page + r * D
        sc = (page + S * D) // 4 + r * 2
        zp = tl.load(cache_ptr + page + S * (D + 8) + r, mask=valid, other=0).to(tl.int32)
        kp = tl.load(cache_ptr + codes[:, None] + j[None, :], mask=valid[:, None], other=0).to(tl.int32)
        ks = tl.load(scale_ptr + sc, mask=valid, other=1.0)
        kz = (zp & 0xF).to(tl.float32)
        c_e = (kp & 0xF).to(tl.float32).to(tl.float16)  # codes 0..15: exact in float16
        c_o = (kp >> 4).to(tl.float32).to(tl.float16)
        raw = tl.dot(qe_hi, tl.trans(c_e)) + tl.dot(qe_lo, tl.trans(c_e)) + \
            tl.dot(qo_hi, tl.trans(c_o)) + tl.dot(qo_lo, tl.trans(c_o))
        s = (raw * q_unit[:, None] - q_sum[:, None] * kz[None, :]) * ks[None, :]
        s = tl.where(valid[None, :] & (toks[None, :] <= pos[:, None]), s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a row with nothing visible yet (a later token's split, before its first visible tile)
        # keeps m = -inf: subtract 0 instead, so its weights are exp(-inf) = 0, not NaN
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(s - m_ref[:, None])
        vp = tl.load(cache_ptr + codes[:, None] + D // 2 + j[None, :], mask=valid[:, None], other=0).to(tl.int32)
        vs = tl.load(scale_ptr + sc + 1, mask=valid, other=1.0)
        vz = (zp >> 4).to(tl.float32)
        # p.v = (p v_scale).codes - (p v_scale).v_zero, the weights p v_scale split likewise
        w = p * vs[None, :]
        w_unit = tl.exp2(tl.floor(tl.log2(tl.maximum(tl.max(tl.where(valid, vs, 0.0), axis=0), 1e-30))))
        w_hi, w_lo = _f16_parts(w / w_unit)
        w_z = tl.sum(w * vz[None, :], axis=1)[:, None]
        c_e = (vp & 0xF).to(tl.float32).to(tl.float16)
        c_o = (vp >> 4).to(tl.float32).to(tl.float16)
        acc_e = acc_e * alpha[:, None] + ((tl.dot(w_hi, c_e) + tl.dot(w_lo, c_e)) * w_unit - w_z)
        acc_o = acc_o * alpha[:, None] + ((tl.dot(w_hi, c_o) + tl.dot(w_lo, c_o)) * w_unit - w_z)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    d = tl.arange(0, D)
    if SPLITS == 1:
        out = tl.reshape(tl.join(acc_e / l_i[:, None], acc_o / l_i[:, None]), (BLOCK_M * GROUP_P, D))
        tl.store(o_ptr + t[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=in_group[:, None])
    else:
        ws = (t * (H_KV * GROUP) + heads) * SPLITS + sp  # workspace [T, H_q, SPLITS, ...]
        tl.store(part_ptr + ws[:, None] * D + d[None, :],
                 tl.reshape(tl.join(acc_e, acc_o), (BLOCK_M * GROUP_P, D)), mask=in_group[:, None])
        tl.store(ml_ptr + ws * 2, m_i, mask=in_group)
        tl.store(ml_ptr + ws * 2 + 1, l_i, mask=in_group)


@triton.jit
def _kv4_combine_kernel(part_ptr, ml_ptr, o_ptr, stride_ot, stride_oh, H_Q: tl.constexpr, SPLITS: tl.constexpr,
                        SPLITS_P: tl.constexpr, D: tl.constexpr):
    """out[t, h] = Σ_s e^(m_s − M) acc_s / Σ_s e^(m_s − M) l_s over the splits of (t, h); a split
    past the sequence's end has m = −inf, l = 0 and weighs nothing."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    sp = tl.arange(0, SPLITS_P)
    row = (t * H_Q + h) * SPLITS + sp
    used = sp < SPLITS
    m = tl.load(ml_ptr + row * 2, mask=used, other=-float("inf"))
    l_s = tl.load(ml_ptr + row * 2 + 1, mask=used, other=0.0)
    w = tl.exp(m - tl.max(m, axis=0))
    d = tl.arange(0, D)
    acc = tl.load(part_ptr + row[:, None] * D + d[None, :], mask=used[:, None], other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l_s, axis=0)
    tl.store(o_ptr + t * stride_ot + h * stride_oh + d, out.to(o_ptr.dtype.element_ty))


_BLOCK_N = 32
_MIN_SPLIT_TOKENS = 256
_BLOCK_ROWS = 64  # (query token, head) rows of a program serving a run of prefill tokens


def _block_m(group: int) -> int:
    """Query tokens per program for runs of prefill tokens: 64 rows of (token, head)."""
    return max(1, _BLOCK_ROWS // triton.next_power_of_2(group))


def query_blocks(query_start_loc: torch.Tensor, group: int) -> torch.Tensor | None:
    """(first token, count) [nb, 2] int32 of the runs of at most _block_m(group) query tokens
    that the requests' query ranges (``query_start_loc`` [R + 1], on the CPU) split into; None
    when every request has one query token (decode: one program per token is as good)."""
    starts = query_start_loc.tolist()
    if all(e - s <= 1 for s, e in zip(starts, starts[1:])):
        return None
    step = _block_m(group)
    runs = [(t, min(step, e - t)) for s, e in zip(starts, starts[1:]) for t in range(s, e, step)]
    return torch.tensor(runs, dtype=torch.int32)


def _num_splits(T: int, Hkv: int, max_context: int, device: torch.device) -> int:
    """Enough splits of the context to give every multiprocessor two programs, each split at
    least 256 tokens long; one split for prefill-sized batches and on CPU."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-2 * sms // max(T * Hkv, 1))
    return max(1, min(want, max_context // _MIN_SPLIT_TOKENS))


def kv4_attention(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, seq_idx: torch.Tensor,
                  positions: torch.Tensor, softmax_scale: float, out: torch.Tensor | None = None,
                  splits: int | None = None, q_blocks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q [T, H_q, D] over the int4 paged cache (see the module docstring); writes
    into ``out`` [T, H_q, D] when given. ``splits`` divides each sequence's context among that
    many programs (flash-decoding), reduced by a second kernel; by default it is chosen from the
    GPU's size and the block table's width (no host sync, so the call can be graph-captured).
    ``q_blocks`` (from :func:`query_blocks`, on q's device): runs of consecutive query tokens of
    one request, which then share their K/V tiles instead of each token re-reading its prefix
    (prefill); None: one program per query token (decode)."""
    T, Hq, D = q.shape
    _check_cache(cache, D)
    Hkv = cache.shape[1]
    if Hq % Hkv:
        raise ValueError(f"{Hq} query heads are not a multiple of {Hkv} KV heads")
    out = torch.empty_like(q) if out is None else out
    if not T:
        return out
    block_size = cache.shape[2]
    max_context = block_tables.shape[1] * block_size
    group = Hq // Hkv
    programs = T if q_blocks is None else q_blocks.shape[0]
    splits = splits or _num_splits(programs, Hkv, max_context, q.device)
    chunk = triton.cdiv(triton.cdiv(max_context, splits), _BLOCK_N) * _BLOCK_N
    if splits > 1:
        part = torch.empty(T, Hq, splits, D, dtype=torch.float32, device=q.device)
        ml = torch.empty(T, Hq, splits, 2, dtype=torch.float32, device=q.device)
    else:
        part = ml = out  # unused
    bt = block_tables.to(torch.int32).contiguous()
    seq32 = seq_idx.to(torch.int32)
    if q_blocks is None:  # one token per program: pad its query group to the 16 rows of a dot
        qb, block_m, group_p = seq32, 1, max(16, triton.next_power_of_2(group))
    else:
        qb, block_m, group_p = q_blocks.to(torch.int32), _block_m(group), triton.next_power_of_2(group)
    _kv4_attention_kernel[(programs, Hkv, splits)](
        q, cache, _float32_view(cache), bt, seq32, positions.to(torch.int32), qb, out, part, ml,
        q.stride(0), q.stride(1), bt.stride(0), out.stride(0), out.stride(1), cache.stride(0),
        float(softmax_scale), chunk, H_KV=Hkv, BLOCK_SIZE=block_size, GROUP=group, GROUP_P=group_p,
        BLOCK_M=block_m, BLOCKED=q_blocks is not None, D=D, BLOCK_N=_BLOCK_N, SPLITS=splits)
    if splits > 1:
        _kv4_combine_kernel[(T, Hq)](part, ml, out, out.stride(0), out.stride(1), H_Q=Hq, SPLITS=splits,
                                     SPLITS_P=triton.next_power_of_2(splits), D=D)
    return out
