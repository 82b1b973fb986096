"""Int4 paged KV cache kernels against their references: the store reproduces the calibration's
KV quantizer bit for bit, attention over the packed cache matches float64 attention over the
dequantized cache, for decode and chunked prefill, with GQA, scattered pages and a cache that
is a strided view (as vLLM hands it over)."""

import pytest
import torch

from rotq.kernels.kv4 import (
    page_views,
    dequantize_kv,
    kv4_attention,
    kv4_attention_reference,
    kv_quant_store,
    query_blocks,
    kv_store_reference,
    new_cache,
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


@pytest.mark.parametrize("lens,Hq,Hkv,D,chunk,splits,max_blocks", [
    ([1, 9], 4, 2, 64, 1, None, 6),         # decode, GQA 2
    ([37, 5, 20], 6, 3, 64, 1, None, 6),    # decode, odd lengths, several pages
    ([23, 11], 4, 1, 128, 7, None, 6),      # chunked prefill: the last 7 tokens of each sequence as queries
    ([37, 5, 20], 6, 3, 64, 1, 3, 6),       # split context: chunks of 32, the third past every sequence
    ([301, 77], 8, 2, 64, 3, 5, 40),        # split long context, a chunk of 3 queries per sequence
    ([45], 12, 12, 64, 2, 2, 6),            # no GQA (group 1, padded to 16 rows)
    ([90, 40], 4, 2, 64, 40, None, 12),     # prefill chunks of 40: runs of 32 + 8 tokens (group 2)
    ([50], 12, 1, 64, 20, 2, 7),            # group 12: runs of 4 tokens × 16 rows, split context
])
@pytest.mark.parametrize("blocked", [False, True], ids=["per-token", "runs"])
def test_attention_matches_float64(lens, Hq, Hkv, D, chunk, splits, max_blocks, blocked):
    g = torch.Generator().manual_seed(sum(lens) + Hq + D)
    block_size = 8
    num_blocks = len(lens) * max_blocks
    cache = _strided_cache(num_blocks, block_size, Hkv, D)
    tables = torch.randperm(num_blocks, generator=g).reshape(len(lens), max_blocks)  # scattered pages
    qs, seq_idx, positions = [], [], []
    for b, n in enumerate(lens):
        k, v = torch.randn(n, Hkv, D, generator=g), torch.randn(n, Hkv, D, generator=g)
        t = torch.arange(n)
        slots = tables[b][t // block_size] * block_size + t % block_size
        kv_quant_store(k.to(DEVICE), v.to(DEVICE), cache, slots.to(DEVICE), 0.95)
        for p in range(max(0, n - chunk), n):
            qs.append(torch.randn(Hq, D, generator=g))
            seq_idx.append(b)
            positions.append(p)
    q = torch.stack(qs)
    seq_idx, positions = torch.tensor(seq_idx), torch.tensor(positions)
    scale = D ** -0.5
    # runs: the query tokens of each sequence share their K/V tiles (as vLLM's query_start_loc gives them)
    starts = torch.tensor([0] + [min(chunk, n) for n in lens]).cumsum(0)
    blocks = query_blocks(starts, Hq // Hkv) if blocked else None
    out = kv4_attention(q.to(DEVICE), cache, tables.to(DEVICE), seq_idx.to(DEVICE), positions.to(DEVICE), scale,
                        splits=splits, q_blocks=None if blocks is None else blocks.to(DEVICE))
    ref = kv4_attention_reference(q, cache.cpu(), tables, seq_idx, positions, scale)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-5)


def test_query_blocks_split_each_request_into_runs():
    from rotq.kernels.kv4 import _block_m
    assert query_blocks(torch.tensor([0, 1, 2, 3]), 4) is None  # decode only: one program per token
    step = _block_m(4)
    blocks = query_blocks(torch.tensor([0, 1, 1 + 2 * step + 3]), 4).tolist()
    assert blocks == [[0, 1], [1, step], [1 + step, step], [1 + 2 * step, 3]]  # the empty request: no run


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_in_half_precision(dtype):
    """q in bfloat16 / float16 (as vLLM serves): the result is the float64 attention of that q,
    rounded once to the output type."""
    g = torch.Generator().manual_seed(5)
    Hq, Hkv, D, n = 8, 2, 128, 70
    cache = _strided_cache(10, 8, Hkv, D)
    k, v = torch.randn(n, Hkv, D, generator=g), torch.randn(n, Hkv, D, generator=g)
    kv_quant_store(k.to(DEVICE), v.to(DEVICE), cache, torch.arange(n).to(DEVICE), 0.95)
    tables = torch.arange(10).reshape(1, 10)
    q = torch.randn(3, Hq, D, generator=g).to(dtype)
    seq, pos = torch.zeros(3, dtype=torch.long), torch.tensor([n - 3, n - 2, n - 1])
    out = kv4_attention(q.to(DEVICE), cache, tables.to(DEVICE), seq.to(DEVICE), pos.to(DEVICE), D ** -0.5)
    assert out.dtype == dtype
    ref = kv4_attention_reference(q.float(), cache.cpu(), tables, seq, pos, D ** -0.5)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=2 ** -7, atol=2 ** -7 * ref.abs().max().item())


@pytest.mark.parametrize("q_gain,v_gain", [(1e8, 1.0), (1e-6, 1.0), (1.0, 1e-6), (1.0, 3e5)])
def test_attention_accuracy_at_extreme_magnitudes(q_gain, v_gain):
    """The float16 parts are taken of q and p·v_scale scaled by powers of two, so queries or
    values far outside float16's range keep float32-grade accuracy."""
    g = torch.Generator().manual_seed(11)
    Hq, Hkv, D, n = 4, 1, 64, 45
    cache = _strided_cache(6, 8, Hkv, D)
    k, v = torch.randn(n, Hkv, D, generator=g), torch.randn(n, Hkv, D, generator=g) * v_gain
    kv_quant_store(k.to(DEVICE), v.to(DEVICE), cache, torch.arange(n).to(DEVICE), 1.0)
    tables = torch.arange(6).reshape(1, 6)
    q = torch.randn(2, Hq, D, generator=g) * q_gain / 64  # large gains: one-hot softmax, no inf
    seq, pos = torch.zeros(2, dtype=torch.long), torch.tensor([n - 2, n - 1])
    out = kv4_attention(q.to(DEVICE), cache, tables.to(DEVICE), seq.to(DEVICE), pos.to(DEVICE), D ** -0.5)
    ref = kv4_attention_reference(q, cache.cpu(), tables, seq, pos, D ** -0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_bad_caches_are_refused():
    with pytest.raises(ValueError, match="block_size, 73"):
        page_views(torch.zeros(2, 1, 4, 64, dtype=torch.uint8), 64)
    odd = torch.zeros(2 * 4 * 73 + 1, dtype=torch.uint8)[1:].reshape(2, 1, 4, 73)
    with pytest.raises(ValueError, match="multiples of 4 bytes"):
        kv_quant_store(torch.zeros(1, 1, 64), torch.zeros(1, 1, 64), odd, torch.zeros(1, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="must be contiguous"):
        page_views(new_cache(2, 4, 2, 64).transpose(1, 2), 64)
