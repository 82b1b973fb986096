"""Int4 paged KV cache kernels against their references: the store reproduces the calibration's
KV quantizer bit for bit, the gather dequantizes exactly as the reference does, and decode and
(chunked) prefill attention over the packed cache match float64 attention over the dequantized
cache, with GQA groups 1 to 7, head_dim 64 and 128, odd context lengths, scattered pages and a
cache that is a strided view (as vLLM hands it over); with a full-precision attention prefix
(P sink tokens in front of every request) as well. On a GPU, decode, store and prefill also
run without a host sync and decode replays from a CUDA graph."""

import pytest
import torch

from rotq.kernels.kv4 import (
    DecodeTiles,
    causal_attention,
    decode_tiles,
    dequantize_kv,
    gather_sequence,
    kv4_attention_reference,
    kv4_decode,
    kv4_gather,
    kv4_gather_reference,
    kv4_prefill,
    kv_quant_store,
    kv_store_reference,
    new_cache,
    num_splits,
    page_views,
    row_bytes,
)
from rotq.quant.quantizer import fake_quantize_kv
from rotq.quant.scheme import KVCacheArgs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _strided_cache(num_blocks, block_size, H, D):
    """A cache that is every other block of a larger buffer, as a layer's slice of a
    layer-interleaved allocation is."""
    return new_cache(2 * num_blocks, block_size, H, D, DEVICE)[1::2]


def test_row_layout_and_capacity():
    assert row_bytes(64) == 73 and row_bytes(128) == 137
    assert 2 * 64 * 2 / row_bytes(64) > 3.5  # bf16 K+V bytes per token-head over ours
    cache = new_cache(3, 16, 2, 64)
    codes, scales, zeros = page_views(cache, 64)
    scales[1, 1, 5, 1] = 2.5  # the V scale of head 1, slot 5 in block 1
    zeros[1, 1, 5] = 0x3A
    codes[1, 1, 5, 40] = 7
    page = cache[1].reshape(-1)
    r, S = 1 * 16 + 5, 2 * 16
    assert page[r * 64 + 40] == 7 and page[S * 64 + S * 8 + r] == 0x3A
    assert page[S * 64 + r * 8 + 4: S * 64 + r * 8 + 8].view(torch.float32).item() == 2.5
    assert cache[0].sum() == 0 and cache[2].sum() == 0
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        row_bytes(80)


@pytest.mark.parametrize("T,H,D,symmetric", [(1, 1, 64, False), (7, 3, 64, True), (37, 2, 128, False)])
def test_store_equals_the_calibration_quantizer(T, H, D, symmetric):
    g = torch.Generator().manual_seed(T * H + D)
    k = torch.randn(T, H, D, generator=g) * 2 + 0.5
    v = torch.randn(T, H, D, generator=g) * 0.01
    k[0, 0] = 0.0
    slots = torch.randperm(8 * 16, generator=g)[:T]
    args = KVCacheArgs(bits=4, symmetric=symmetric, clip_ratio=0.95)
    # The reference runs on the CPU, as calibration does (on CUDA, torch divides by a scalar
    # through its reciprocal, which moves a few codes).
    for store, device in ((kv_quant_store, DEVICE), (kv_store_reference, "cpu")):
        cache = new_cache(16, 16, H, D, device)[1::2]
        store(k.to(device), v.to(device), cache, slots.to(device), 0.95, symmetric)
        K, V = dequantize_kv(cache.cpu(), D)
        flat = lambda X: X.permute(0, 2, 1, 3).reshape(-1, H, D)[slots]  # noqa: E731
        assert torch.equal(flat(K), fake_quantize_kv(k, args))
        assert torch.equal(flat(V), fake_quantize_kv(v, args))
        written = torch.zeros(8, H, 16, dtype=torch.bool)
        written[slots // 16, :, slots % 16] = True
        codes, scales, zeros = page_views(cache.cpu(), D)
        assert not codes[~written].any() and not scales[~written].any() and not zeros[~written].any()
    ref = new_cache(16, 16, H, D)[1::2]
    kv_store_reference(k, v, ref, slots, 0.95, symmetric)
    cache = _strided_cache(8, 16, H, D)
    kv_quant_store(k.to(DEVICE), v.to(DEVICE), cache, slots.to(DEVICE), 0.95, symmetric)
    assert torch.equal(cache.cpu(), ref)  # byte for byte, meta included


def _filled_cache(lens, Hkv, D, block_size, max_blocks, g):
    """A strided cache holding random K/V for sequences of ``lens`` tokens on scattered pages."""
    num_blocks = len(lens) * max_blocks
    cache = _strided_cache(num_blocks, block_size, Hkv, D)
    tables = torch.randperm(num_blocks, generator=g).reshape(len(lens), max_blocks)
    for b, n in enumerate(lens):
        k, v = torch.randn(n, Hkv, D, generator=g), torch.randn(n, Hkv, D, generator=g)
        t = torch.arange(n)
        slots = tables[b][t // block_size] * block_size + t % block_size
        kv_quant_store(k.to(DEVICE), v.to(DEVICE), cache, slots.to(DEVICE), 0.95)
    return cache, tables


@pytest.mark.parametrize("lens,Hq,Hkv,D,block_size,last,splits,max_blocks", [
    ([1, 9], 4, 2, 64, 8, 1, None, 6),          # decode, GQA 2
    ([37, 5, 20], 28, 4, 64, 8, 1, None, 6),    # group 7, odd lengths, several pages
    ([23, 11], 4, 1, 128, 16, 3, None, 3),      # rows at each sequence's last 3 positions share its pages
    ([37, 5, 20], 6, 3, 64, 8, 1, 3, 6),        # split context, the shortest sequence's later splits empty
    ([301, 77], 8, 2, 64, 16, 2, 5, 20),        # split long context, several tiles per split
    ([45], 12, 12, 64, 8, 2, 2, 6),             # no GQA (group 1, padded to 16 rows)
    ([130, 3], 28, 4, 128, 32, 1, 4, 5),        # group 7, D 128, pages of 32, 130 = 4 pages + 2
])
def test_decode_matches_float64(lens, Hq, Hkv, D, block_size, last, splits, max_blocks):
    g = torch.Generator().manual_seed(sum(lens) + Hq + D)
    cache, tables = _filled_cache(lens, Hkv, D, block_size, max_blocks, g)
    rows = [(b, p + 1) for b, n in enumerate(lens) for p in range(max(0, n - last), n)]
    row_tables = tables[[b for b, _ in rows]]
    row_lens = torch.tensor([n for _, n in rows], dtype=torch.int32)
    q = torch.randn(len(rows), Hq, D, generator=g)
    scale = D ** -0.5
    out = kv4_decode(q.to(DEVICE), cache, row_tables.to(DEVICE), row_lens.to(DEVICE), scale, splits=splits)
    ref = kv4_attention_reference(q, cache.cpu(), row_tables, row_lens, scale)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tiles", [DecodeTiles(64, 2, 2), DecodeTiles(128, 4, 2), DecodeTiles(32, 4, 3)])
def test_decode_tile_shapes_match_float64(tiles):
    """Every launch shape that decode_tiles picks (and a smaller one) computes the same attention:
    several tiles per split, a split boundary inside a tile of 128, a partial last tile."""
    lens, Hq, Hkv, D = [301, 130], 8, 2, 64
    g = torch.Generator().manual_seed(tiles.block_n)
    cache, tables = _filled_cache(lens, Hkv, D, 16, 20, g)
    row_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), Hq, D, generator=g)
    for splits in (1, 3):
        out = kv4_decode(q.to(DEVICE), cache, tables.to(DEVICE), row_lens.to(DEVICE), D ** -0.5, splits=splits,
                         tiles=tiles)
        ref = kv4_attention_reference(q, cache.cpu(), tables, row_lens, D ** -0.5)
        torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-5)


def test_decode_tiles_follow_the_context_per_split():
    assert decode_tiles(8192, 33) == DecodeTiles(128, 4, 2)  # batch 1 on an H200: 249 tokens per split
    assert decode_tiles(8192, 3) == decode_tiles(8192, 1) == DecodeTiles(64, 2, 2)


def _prefix(Hkv, P, D, g, dtype=torch.float32):
    """A random prefix K, V [Hkv, P, D] on DEVICE; its keys are larger than the cache's so that the
    prefix takes a real share of the attention, as sink tokens do."""
    return tuple((torch.randn(Hkv, P, D, generator=g) * s).to(DEVICE, dtype) for s in (3.0, 1.0))


@pytest.mark.parametrize("lens,Hq,Hkv,D,block_size,last,splits,max_blocks,P", [
    ([1, 9, 37], 3, 1, 64, 16, 1, None, 3, 1),    # group 3, one prefix token, 37 = 2 pages + 5
    ([23, 11, 7], 12, 4, 128, 16, 3, None, 2, 3),  # group 3, D 128, 9 rows at the sequences' last positions
    ([37, 5, 20], 6, 2, 128, 32, 1, 3, 2, 33),    # 33 prefix tokens (a tile of 64), the shortest's later splits empty
    ([301], 4, 4, 64, 16, 1, 5, 20, 5),           # batch 1, five splits (the prefix in split 0 only), group 1
])
def test_decode_with_a_prefix_matches_float64(lens, Hq, Hkv, D, block_size, last, splits, max_blocks, P):
    g = torch.Generator().manual_seed(sum(lens) + Hq + D + P)
    cache, tables = _filled_cache(lens, Hkv, D, block_size, max_blocks, g)
    rows = [(b, p + 1) for b, n in enumerate(lens) for p in range(max(0, n - last), n)]
    row_tables = tables[[b for b, _ in rows]]
    row_lens = torch.tensor([n for _, n in rows], dtype=torch.int32)
    q = torch.randn(len(rows), Hq, D, generator=g)
    prefix = _prefix(Hkv, P, D, g)
    scale = D ** -0.5
    out = kv4_decode(q.to(DEVICE), cache, row_tables.to(DEVICE), row_lens.to(DEVICE), scale, splits=splits,
                     prefix=prefix)
    ref = kv4_attention_reference(q, cache.cpu(), row_tables, row_lens, scale, prefix=prefix)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-5)
    assert (ref - kv4_attention_reference(q, cache.cpu(), row_tables, row_lens, scale)).abs().max() > 0.1


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_of_an_empty_row_is_the_prefix_attention(splits):
    """A row with no cached token (vLLM never sends one) attends to the prefix alone."""
    g = torch.Generator().manual_seed(splits)
    Hq, Hkv, D = 6, 2, 64
    cache, tables = _filled_cache([40, 0], Hkv, D, 16, 3, g)
    q = torch.randn(3, Hq, D, generator=g)
    lens = torch.tensor([0, 40, 0], dtype=torch.int32)
    tables = tables[[1, 0, 1]]
    prefix = _prefix(Hkv, 3, D, g)
    out = kv4_decode(q.to(DEVICE), cache, tables.to(DEVICE), lens.to(DEVICE), D ** -0.5, splits=splits,
                     prefix=prefix)
    ref = kv4_attention_reference(q, cache.cpu(), tables, lens, D ** -0.5, prefix=prefix)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-5)


def test_a_prefix_of_cached_tokens_is_exactly_those_tokens():
    """The reference's prefix semantics: a prefix made of a sequence's first P dequantized tokens,
    in front of the rest of the sequence stored on its own pages (the store quantizes each token
    alone, so those pages hold the same bytes), gives the whole sequence's attention bit for bit;
    decode and prefill with that prefix match decode and prefill over the whole sequence."""
    g = torch.Generator().manual_seed(7)
    Hq, Hkv, D, bs, P, m = 6, 2, 64, 16, 5, 40
    k, v = torch.randn(P + m, Hkv, D, generator=g), torch.randn(P + m, Hkv, D, generator=g)
    cache = _strided_cache(8, bs, Hkv, D)
    whole, rest = torch.tensor([[5, 0, 7, 2]]), torch.tensor([[3, 6, 1, 4]])
    for table, first in ((whole, 0), (rest, P)):
        t = torch.arange(P + m - first)
        kv_quant_store(k[first:].to(DEVICE), v[first:].to(DEVICE), cache, (table[0][t // bs] * bs + t % bs).to(DEVICE),
                       0.95)
    prefix = tuple(x.transpose(0, 1).to(DEVICE) for x in gather_sequence(cache, D, whole[0].to(DEVICE), P))
    q = torch.randn(3, Hq, D, generator=g)
    lens = torch.tensor([1, 17, m], dtype=torch.int32)
    scale = D ** -0.5
    ref = kv4_attention_reference(q, cache.cpu(), whole.expand(3, -1), lens + P, scale)
    assert torch.equal(kv4_attention_reference(q, cache.cpu(), rest.expand(3, -1), lens, scale, prefix=prefix), ref)
    for splits in (1, 3):
        with_prefix = kv4_decode(q.to(DEVICE), cache, rest.expand(3, -1).to(DEVICE), lens.to(DEVICE), scale,
                                 splits=splits, prefix=prefix)
        torch.testing.assert_close(with_prefix.cpu().double(), ref, rtol=1e-4, atol=1e-5)
    out = kv4_prefill(q.to(DEVICE), cache, rest.to(DEVICE), torch.tensor([m]).to(DEVICE), [0, 3], [m], scale,
                      prefix=prefix)
    torch.testing.assert_close(out.cpu().double(), kv4_attention_reference(
        q, cache.cpu(), whole.expand(3, -1), torch.tensor([m + P - 2, m + P - 1, m + P]), scale), rtol=1e-4,
        atol=1e-5)


def test_a_prefix_out_of_reach_changes_nothing():
    """Prefix keys that score about −1250 against every query (a huge negative projection on a
    coordinate where every query is positive) get zero weight: decode, prefill and the reference
    give the attention without a prefix."""
    g = torch.Generator().manual_seed(9)
    lens, Hq, Hkv, D = [30, 70, 3], 9, 3, 64
    cache, tables = _filled_cache(lens, Hkv, D, 16, 5, g)
    q = torch.randn(3, Hq, D, generator=g)
    q[..., 0] = q[..., 0].abs() + 1
    Kp = torch.zeros(Hkv, 5, D)
    Kp[..., 0] = -1e4
    prefix = (Kp.to(DEVICE), torch.randn(Hkv, 5, D, generator=g).to(DEVICE))
    lens_t, scale = torch.tensor(lens, dtype=torch.int32), D ** -0.5
    ref = kv4_attention_reference(q, cache.cpu(), tables, lens_t, scale)
    torch.testing.assert_close(kv4_attention_reference(q, cache.cpu(), tables, lens_t, scale, prefix=prefix), ref)
    for splits in (1, 2):
        out = kv4_decode(q.to(DEVICE), cache, tables.to(DEVICE), lens_t.to(DEVICE), scale, splits=splits,
                         prefix=prefix)
        torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-5)
    out = kv4_prefill(q.to(DEVICE), cache, tables.to(DEVICE), lens_t.to(DEVICE), [0, 1, 2, 3], lens, scale,
                      prefix=prefix)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-5)


def test_split_count_fills_an_h200():
    """Two programs per SM of an H100/H200 (132) at small batch, never more splits than 128-token
    pieces of the context, one split once the batch fills the GPU."""
    assert num_splits(1, 8, 32768, 132) == 33
    assert 1 * 8 * num_splits(1, 8, 2048, 132) >= 128  # 16 splits of 128 tokens
    assert num_splits(16, 8, 8192, 132) == 3
    assert num_splits(64, 8, 32768, 132) == 1
    assert num_splits(1, 8, 100, 132) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_equals_the_reference(dtype):
    g = torch.Generator().manual_seed(3)
    lens, Hkv, D = [70, 1, 0, 33], 3, 128
    cache, tables = _filled_cache(lens, Hkv, D, 16, 5, g)
    lens_dev = torch.tensor(lens).to(DEVICE)
    K, V = kv4_gather(cache, D, tables.to(DEVICE), lens_dev, max(lens), sum(lens), dtype)
    K_ref, V_ref = kv4_gather_reference(cache.cpu(), D, tables, lens, dtype)
    assert K.shape == (Hkv, sum(lens), D) and K.dtype == dtype
    if dtype == torch.float32 or DEVICE == "cuda":
        assert torch.equal(K.cpu(), K_ref) and torch.equal(V.cpu(), V_ref)
    else:  # Triton's interpreter rounds float32 -> bfloat16 toward zero: one unit in the last place
        for X, X_ref in ((K, K_ref), (V, V_ref)):
            torch.testing.assert_close(X.cpu(), X_ref, rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lens", [[70, 0, 33], [0, 0]])
def test_gather_with_a_prefix_puts_it_before_each_request(lens, dtype):
    """Each request's rows follow their own copy of the prefix (rounded once to the scratch's type),
    also for requests with no cached token and when no request has one."""
    g = torch.Generator().manual_seed(len(lens))
    Hkv, D, P = 3, 128, 5
    cache, tables = _filled_cache(lens, Hkv, D, 16, 5, g)
    prefix = _prefix(Hkv, P, D, g)
    K, V = kv4_gather(cache, D, tables.to(DEVICE), torch.tensor(lens).to(DEVICE), max(lens), sum(lens), dtype,
                      prefix=prefix)
    parts = [kv4_gather_reference(cache.cpu(), D, tables[r:r + 1], [n], dtype) for r, n in enumerate(lens)]
    for i, X in enumerate((K, V)):
        X_ref = torch.cat([t for part in parts for t in (prefix[i].cpu().to(dtype), part[i])], dim=1)
        assert X.shape == (Hkv, sum(lens) + len(lens) * P, D)
        if dtype == torch.float32 or DEVICE == "cuda":
            assert torch.equal(X.cpu(), X_ref)
        else:  # the interpreter's float32 -> bfloat16 rounds toward zero, as in the test above
            torch.testing.assert_close(X.cpu(), X_ref, rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("cached,new,Hq,Hkv,D,block_size", [
    ([0, 13], [21, 9], 28, 4, 128, 16),     # a fresh prompt, a chunk after a cached prefix; group 7
    ([40, 0, 5], [7, 1, 30], 4, 4, 64, 8),  # group 1; a one-token prompt; chunks after prefixes
    ([17], [50], 8, 2, 64, 32),             # 67 tokens on pages of 32
])
def test_prefill_matches_float64(cached, new, Hq, Hkv, D, block_size):
    g = torch.Generator().manual_seed(sum(cached) + sum(new) + D)
    lens = [c + n for c, n in zip(cached, new)]
    cache, tables = _filled_cache(lens, Hkv, D, block_size, -(-max(lens) // block_size) + 1, g)
    starts = [0, *torch.tensor(new).cumsum(0).tolist()]
    q = torch.randn(starts[-1], Hq, D, generator=g)
    scale = D ** -0.5
    out = kv4_prefill(q.to(DEVICE), cache, tables.to(DEVICE), torch.tensor(lens).to(DEVICE), starts, lens, scale)
    rows = [(r, c + i + 1) for r, (c, n) in enumerate(zip(cached, new)) for i in range(n)]
    ref = kv4_attention_reference(q, cache.cpu(), tables[[r for r, _ in rows]], [n for _, n in rows], scale)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cached,new,Hq,Hkv,D,block_size,P", [
    ([0, 13, 4], [21, 9, 1], 6, 2, 128, 16, 5),  # a fresh prompt, a chunk after cached tokens, one token; group 3
    ([40], [7], 4, 4, 64, 32, 33),               # group 1, 33 prefix tokens, pages of 32
    ([5, 0, 17], [30, 1, 50], 3, 1, 64, 16, 1),  # group 3, a one-token prompt, one prefix token
    ([17], [50], 8, 2, 64, 32, 3),               # 67 tokens on pages of 32
])
def test_prefill_with_a_prefix_matches_float64(cached, new, Hq, Hkv, D, block_size, P):
    """Both prefill paths: the Triton gather (prefix copied in front of each request) + SDPA, and
    PyTorch's gather + causal_attention (prefix concatenated per request)."""
    g = torch.Generator().manual_seed(sum(cached) + sum(new) + D + P)
    lens = [c + n for c, n in zip(cached, new)]
    cache, tables = _filled_cache(lens, Hkv, D, block_size, -(-max(lens) // block_size) + 1, g)
    starts = [0, *torch.tensor(new).cumsum(0).tolist()]
    q = torch.randn(starts[-1], Hq, D, generator=g)
    prefix = _prefix(Hkv, P, D, g)
    scale = D ** -0.5
    rows = [(r, c + i + 1) for r, (c, n) in enumerate(zip(cached, new)) for i in range(n)]
    ref = kv4_attention_reference(q, cache.cpu(), tables[[r for r, _ in rows]], [n for _, n in rows], scale,
                                  prefix=prefix)
    out = kv4_prefill(q.to(DEVICE), cache, tables.to(DEVICE), torch.tensor(lens).to(DEVICE), starts, lens, scale,
                      prefix=prefix)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-5)
    K, V = kv4_gather_reference(cache, D, tables.to(DEVICE), lens, torch.float32)
    out = causal_attention(q.to(DEVICE), K, V, starts, lens, scale, torch.empty_like(q, device=DEVICE),
                           prefix=prefix)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("prefix_dtype", [None, torch.float32, "q"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_in_half_precision(dtype, prefix_dtype):
    """q in bfloat16 / float16 (as vLLM serves): decode gives the float64 attention of that q
    rounded once to the output type; prefill (over a scratch of that type) stays within its
    rounding. Likewise with a prefix in float32 or in q's type."""
    g = torch.Generator().manual_seed(5)
    Hq, Hkv, D, n = 8, 2, 128, 70
    cache, tables = _filled_cache([n], Hkv, D, 8, 10, g)
    q = torch.randn(3, Hq, D, generator=g).to(dtype)
    prefix = None if prefix_dtype is None else _prefix(Hkv, 3, D, g, dtype if prefix_dtype == "q" else prefix_dtype)
    lens = torch.tensor([n - 2, n - 1, n])
    rows = tables.expand(3, -1)
    ref = kv4_attention_reference(q.float(), cache.cpu(), rows, lens, D ** -0.5, prefix=prefix)
    tol = dict(rtol=2 ** -7, atol=2 ** -7 * ref.abs().max().item())
    out = kv4_decode(q.to(DEVICE), cache, rows.to(DEVICE), lens.to(DEVICE), D ** -0.5, prefix=prefix)
    assert out.dtype == dtype
    torch.testing.assert_close(out.cpu().double(), ref, **tol)
    out = kv4_prefill(q.to(DEVICE), cache, tables.to(DEVICE), torch.tensor([n]).to(DEVICE), [0, 3], [n], D ** -0.5,
                      prefix=prefix)
    assert out.dtype == dtype
    torch.testing.assert_close(out.cpu().double(), ref, rtol=2 ** -6, atol=2 ** -6 * ref.abs().max().item())


@pytest.mark.parametrize("q_gain,v_gain", [(1e8, 1.0), (1e-6, 1.0), (1.0, 1e-6), (1.0, 3e5)])
def test_decode_accuracy_at_extreme_magnitudes(q_gain, v_gain):
    """The float16 parts are taken of q and p·v_scale scaled by powers of two, so queries or
    values far outside float16's range keep float32-grade accuracy."""
    g = torch.Generator().manual_seed(11)
    Hq, Hkv, D, n = 4, 1, 64, 45
    cache = _strided_cache(6, 8, Hkv, D)
    k, v = torch.randn(n, Hkv, D, generator=g), torch.randn(n, Hkv, D, generator=g) * v_gain
    kv_quant_store(k.to(DEVICE), v.to(DEVICE), cache, torch.arange(n).to(DEVICE), 1.0)
    tables = torch.arange(6).reshape(1, 6).expand(2, -1)
    q = torch.randn(2, Hq, D, generator=g) * q_gain / 64  # large gains: one-hot softmax, no inf
    lens = torch.tensor([n - 1, n])
    out = kv4_decode(q.to(DEVICE), cache, tables.to(DEVICE), lens.to(DEVICE), D ** -0.5)
    ref = kv4_attention_reference(q, cache.cpu(), tables, lens, D ** -0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_padded_slots_are_skipped():
    """vLLM pads a step's tokens with slot −1: neither store writes anything for them."""
    k = torch.randn(3, 2, 64)
    slots = torch.tensor([5, -1, 40])
    ref = new_cache(4, 16, 2, 64)
    kv_store_reference(k, k, ref, slots, 1.0)
    cache = _strided_cache(4, 16, 2, 64)
    kv_quant_store(k.to(DEVICE), k.to(DEVICE), cache, slots.to(DEVICE), 1.0)
    assert torch.equal(cache.cpu(), ref)
    _, scales, _ = page_views(ref, 64)
    assert scales.any(-1).nonzero().tolist() == [[0, 0, 5], [0, 1, 5], [2, 0, 8], [2, 1, 8]]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="block_size, 73"):
        page_views(torch.zeros(2, 1, 4, 64, dtype=torch.uint8), 64)
    odd = torch.zeros(2 * 4 * 73 + 1, dtype=torch.uint8)[1:].reshape(2, 1, 4, 73)
    with pytest.raises(ValueError, match="multiples of 4 bytes"):
        kv_quant_store(torch.zeros(1, 1, 64), torch.zeros(1, 1, 64), odd, torch.zeros(1, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="must be contiguous"):
        page_views(new_cache(2, 4, 2, 64).transpose(1, 2), 64)
    cache, one = new_cache(2, 4, 2, 64), torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="3 query heads are not a multiple of 2"):
        kv4_decode(torch.zeros(1, 3, 64), cache, one[None], one, 1.0)
    with pytest.raises(ValueError, match="2 query rows but block tables"):
        kv4_decode(torch.zeros(2, 4, 64), cache, one[None], one, 1.0)
    with pytest.raises(ValueError, match="1 requests need 2 query starts"):
        kv4_prefill(torch.zeros(1, 4, 64), cache, one[None], one, [0], [1], 1.0)
    for Kp, Vp in ((torch.zeros(1, 3, 64), torch.zeros(1, 3, 64)), (torch.zeros(2, 0, 64), torch.zeros(2, 0, 64)),
                   (torch.zeros(2, 3, 64), torch.zeros(2, 4, 64))):
        with pytest.raises(ValueError, match="a prefix needs K and V"):
            kv4_decode(torch.zeros(1, 4, 64), cache, one[None], one, 1.0, prefix=(Kp, Vp))
        with pytest.raises(ValueError, match="a prefix needs K and V"):
            kv4_prefill(torch.zeros(1, 4, 64), cache, one[None], one, [0, 1], [1], 1.0, prefix=(Kp, Vp))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs and CUDA graphs need a GPU")
def test_cuda_paths_do_not_sync_and_decode_replays_from_a_graph():
    """Store and decode (what a graph-captured decode step runs) and prefill, with and without a
    prefix, make no host sync; a captured decode replays to the eager result after its inputs
    change in place."""
    from rotq.kernels.hadamard import hadamard
    g = torch.Generator().manual_seed(2)
    Hq, Hkv, D, B, bs = 32, 8, 128, 4, 16
    cache, tables = _filled_cache([300, 20, 77, 1], Hkv, D, bs, 20, g)
    tables = tables.to(DEVICE, torch.int32)
    lens = torch.tensor([301, 21, 78, 2], device=DEVICE, dtype=torch.int32)
    slots = (tables[torch.arange(B, device=DEVICE), (lens - 1) // bs] * bs + (lens - 1) % bs).long()
    q = torch.randn(B, Hq, D, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(B, Hkv, D, device=DEVICE, dtype=torch.bfloat16)
    out, out_prefix = torch.empty_like(q), torch.empty_like(q)
    prefix = _prefix(Hkv, 5, D, g, torch.bfloat16)

    def step():
        kv_quant_store(hadamard(k, D), k, cache, slots, 0.95)
        kv4_decode(hadamard(q, D), cache, tables, lens, D ** -0.5, out=out)
        kv4_decode(hadamard(q, D), cache, tables, lens, D ** -0.5, out=out_prefix, prefix=prefix)

    torch.cuda.set_sync_debug_mode("error")
    try:
        step()  # compiles and plans outside the capture
        kv4_prefill(q, cache, tables, lens, [0, 1, 2, 3, 4], [301, 21, 78, 2], D ** -0.5)  # bottom-right mask
        kv4_prefill(q, cache, tables, lens, [0, 1, 2, 3, 4], [301, 21, 78, 2], D ** -0.5, prefix=prefix)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    q.copy_(torch.randn_like(q))
    graph.replay()
    replayed = out.clone(), out_prefix.clone()
    step()
    torch.testing.assert_close(replayed, (out, out_prefix), rtol=0, atol=0)
