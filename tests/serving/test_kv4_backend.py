"""The int4 KV cache backend's computation, without an engine: metadata from vLLM's own
CommonAttentionMetadata for a step that mixes decodes, a prefill chunk that continues a cached
prefix, and a fresh prompt (decodes first, as vLLM orders them for this backend, and not);
both compute paths (PyTorch reference, the Triton kernels and Triton R3 that CUDA uses, here
under the interpreter) against float64 attention over the quantized K/V."""

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm.v1.attention.backend import CommonAttentionMetadata  # noqa: E402

from rotq.kernels.kv4 import new_cache, page_views  # noqa: E402
from rotq.quant.hadamard import apply_hadamard  # noqa: E402
from rotq.quant.quantizer import fake_quantize_kv  # noqa: E402
from rotq.quant.scheme import KVCacheArgs, preset  # noqa: E402
from rotq.serving.kv4_attention import build_kv4_metadata, kv4_forward, kv4_store  # noqa: E402


def _common(cached, new, block_size, tables):
    qsl = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor([c + n for c, n in zip(cached, new)], dtype=torch.int32)
    slots = torch.cat([tables[r][torch.arange(c, c + n) // block_size] * block_size + torch.arange(c, c + n) % block_size
                       for r, (c, n) in enumerate(zip(cached, new))])
    return CommonAttentionMetadata(
        query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_lens, num_reqs=len(new),
        num_actual_tokens=int(qsl[-1]), max_query_len=max(new), max_seq_len=int(seq_lens.max()),
        block_table_tensor=tables.to(torch.int32), slot_mapping=slots)


@pytest.mark.parametrize("triton", [False, True])
@pytest.mark.parametrize("cached,new,decodes", [
    ([40, 70, 33, 0], [1, 1, 15, 7], 2),  # two decodes, a chunk after a cached prefix, a new prompt
    ([33, 40, 0], [15, 1, 7], 0),         # a decode after a prefill: served by the prefill path
])
def test_mixed_step_matches_float64(triton, cached, new, decodes):
    g = torch.Generator().manual_seed(1)
    Hq, Hkv, D, bs = 6, 2, 64, 32
    scheme = preset("w4a4kv4", "hadamard")
    layer = SimpleNamespace(quant_config=SimpleNamespace(scheme=scheme))
    kv: KVCacheArgs = scheme.kv_cache
    n = len(new)
    tables = torch.randperm(4 * n, generator=g).reshape(n, 4)
    cache = new_cache(8 * n, bs, Hkv, D)[::2]  # strided pages, as vLLM's layer views are
    total = [c + m for c, m in zip(cached, new)]
    keys = [torch.randn(m, Hkv, D, generator=g) * 3 for m in total]
    values = [torch.randn(m, Hkv, D, generator=g) for m in total]
    # earlier steps stored the cached prefixes
    earlier = _common([0] * n, cached, bs, tables)
    kv4_store(layer, torch.cat([k[:c] for k, c in zip(keys, cached)]),
              torch.cat([v[:c] for v, c in zip(values, cached)]), cache, earlier.slot_mapping, triton)
    step = _common(cached, new, bs, tables)
    kv4_store(layer, torch.cat([k[c:] for k, c in zip(keys, cached)]),
              torch.cat([v[c:] for v, c in zip(values, cached)]), cache, step.slot_mapping, triton)
    meta = build_kv4_metadata(step)
    assert meta.num_decodes == decodes and meta.seq_lens_host == total
    q = torch.randn(meta.num_actual_tokens, Hq, D, generator=g)
    out = torch.full((meta.num_actual_tokens + 3, Hq * D), float("nan"))  # padded, as vLLM's buffers
    kv4_forward(layer, q, cache, meta, D ** -0.5, out, triton)
    assert out[meta.num_actual_tokens:].isnan().all()

    rows = []
    for r, (c, m) in enumerate(zip(cached, new)):
        K = fake_quantize_kv(apply_hadamard(keys[r]), kv).double()  # what calibration simulates
        V = fake_quantize_kv(values[r], kv).double()
        for i in range(m):
            qi = apply_hadamard(q[int(step.query_start_loc[r]) + i]).double()  # R3 on Q too
            s = torch.einsum("hd,nhd->hn", qi, K[: c + i + 1].repeat_interleave(Hq // Hkv, 1)) * D ** -0.5
            rows.append(torch.einsum("hn,nhd->hd", s.softmax(-1), V[: c + i + 1].repeat_interleave(Hq // Hkv, 1)))
    ref = torch.stack(rows).reshape(len(rows), -1)
    torch.testing.assert_close(out[: meta.num_actual_tokens].double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("triton", [False, True])
def test_padded_slots_are_skipped(triton):
    layer = SimpleNamespace()
    cache = new_cache(2, 32, 1, 64)
    k = torch.randn(3, 1, 64)
    kv4_store(layer, k, k, cache, torch.tensor([5, -1, 7]), triton)
    codes, scales, _ = page_views(cache, 64)
    assert scales[0, 0].any(-1).nonzero().flatten().tolist() == [5, 7] and not cache[1].any()
    assert codes[0, 0].any(-1).nonzero().flatten().tolist() == [5, 7]
