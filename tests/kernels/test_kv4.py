"""Int4 paged KV cache kernels against their references: the store reproduces the calibration's
KV quantizer bit for bit, attention over the packed cache matches float64 attention over the
dequantized cache, for decode and chunked prefill, with GQA and scattered pages."""

import pytest
import torch

from rotq.kernels.kv4 import (
    dequantize_cache,
    kv4_attention,
    kv4_attention_reference,
    kv_quant_store,
    kv_quantize_reference,
)
from rotq.quant.quantizer import fake_quantize_kv
from rotq.quant.scheme import KVCacheArgs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cache(num_blocks, block_size, H, D):
    cache = torch.zeros(num_blocks, block_size, H, D // 2, dtype=torch.uint8, device=DEVICE)
    meta = torch.zeros(num_blocks, block_size, H, 2, dtype=torch.float32, device=DEVICE)
    return cache, meta


@pytest.mark.parametrize("T,H,D", [(1, 1, 64), (7, 3, 64), (37, 2, 128)])
def test_store_equals_the_calibration_quantizer(T, H, D):
    g = torch.Generator().manual_seed(T * H + D)
    x = torch.randn(T, H, D, generator=g) * 2 + 0.5
    x[0, 0] = 0.0
    cache, meta = _cache(8, 16, H, D)
    slots = torch.randperm(8 * 16, generator=g)[:T]
    kv_quant_store(x.to(DEVICE), cache, meta, slots.to(DEVICE), 0.95)
    deq = dequantize_cache(cache.cpu(), meta.cpu()).reshape(-1, H, D)[slots]
    ref = fake_quantize_kv(x, KVCacheArgs(bits=4, clip_ratio=0.95))
    torch.testing.assert_close(deq, ref, rtol=0, atol=1e-6)
    codes, scale, zero = kv_quantize_reference(x, 0.95)
    assert torch.equal(meta.cpu().reshape(-1, H, 2)[slots][..., 0], scale)
    assert torch.equal(meta.cpu().reshape(-1, H, 2)[slots][..., 1], zero)


@pytest.mark.parametrize("lens,Hq,Hkv,D,chunk", [
    ([1, 9], 4, 2, 64, 1),        # decode, GQA 2
    ([37, 5, 20], 6, 3, 64, 1),   # decode, odd lengths, several pages
    ([23, 11], 4, 1, 128, 7),     # chunked prefill: the last 7 tokens of each sequence as queries
])
def test_attention_matches_float64(lens, Hq, Hkv, D, chunk):
    g = torch.Generator().manual_seed(sum(lens) + Hq + D)
    block_size, max_blocks = 8, 6
    num_blocks = len(lens) * max_blocks
    kc, km = _cache(num_blocks, block_size, Hkv, D)
    vc, vm = _cache(num_blocks, block_size, Hkv, D)
    tables = torch.randperm(num_blocks, generator=g).reshape(len(lens), max_blocks)  # scattered pages
    qs, seq_idx, positions = [], [], []
    for b, n in enumerate(lens):
        k, v = torch.randn(n, Hkv, D, generator=g), torch.randn(n, Hkv, D, generator=g)
        t = torch.arange(n)
        slots = tables[b][t // block_size] * block_size + t % block_size
        kv_quant_store(k.to(DEVICE), kc, km, slots.to(DEVICE), 0.95)
        kv_quant_store(v.to(DEVICE), vc, vm, slots.to(DEVICE), 0.95)
        for p in range(max(0, n - chunk), n):
            qs.append(torch.randn(Hq, D, generator=g))
            seq_idx.append(b)
            positions.append(p)
    q = torch.stack(qs)
    seq_idx, positions = torch.tensor(seq_idx), torch.tensor(positions)
    scale = D ** -0.5
    out = kv4_attention(q.to(DEVICE), kc, km, vc, vm, tables.to(DEVICE), seq_idx.to(DEVICE),
                        positions.to(DEVICE), scale)
    ref = kv4_attention_reference(q, kc.cpu(), km.cpu(), vc.cpu(), vm.cpu(), tables, seq_idx, positions, scale)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-5)
