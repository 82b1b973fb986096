"""Attention over rotq's int4 paged KV cache against a fair 16-bit baseline, on one GPU.

Decode (Llama-3-8B heads: 32 query heads, 8 KV heads, head_dim 128; pages of 16 tokens; batch
1/16/64 × context 2k/8k/32k, every sequence at full context): ``kv4_decode`` against a paged
bf16 decode kernel of the same design (below: program per (row, KV head, context split), GQA
group in one dot, 64-token tiles read through the block table, the same split heuristic and
combine kernel), with separate K and V caches of their own pages, so both read every byte of
their cache from HBM. For reference, SDPA over contiguous per-sequence K and V (no paging, the
best case a dense bf16 cache gets) is timed too.

Prefill (one sequence of 2k / 8k tokens; and a 2k-token chunk after a 6k-token cached prefix):
``kv4_prefill`` (dequantizing gather into a bf16 scratch, then causal SDPA) against causal SDPA
over bf16 K/V already contiguous, plus the gather alone.

Every row is timed inside a CUDA graph (``triton.testing.do_bench_cudagraph``, median), so
launch overhead does not decide decode. Each row gives the time, the bytes of KV cache read and
achieved GB/s (decode) or TFLOP/s (prefill), and the speed-up over the paged bf16 kernel (decode)
or bf16 SDPA (prefill). Needs torch, triton and this repository (no vLLM). ``--smoke`` runs tiny
shapes on CPU under the Triton interpreter, to check the script.

    python benchmarks/attention.py --json benchmarks/results/attention-h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HEADS = (32, 8, 128)  # Llama-3-8B: query heads, KV heads, head_dim
PAGE = 16
KV_CLIP = 0.95


def _paged_bf16_kernel():
    """The baseline's Triton kernel (built on first use: @triton.jit needs TRITON_INTERPRET set
    before it runs under --smoke)."""
    import triton
    import triton.language as tl

    @triton.jit
    def paged_decode(q_ptr, k_ptr, v_ptr, bt_ptr, len_ptr, o_ptr, part_ptr, ml_ptr, stride_qt, stride_qh,
                     stride_bt, stride_ot, stride_oh, stride_page, softmax_scale, H_KV: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr, D: tl.constexpr,
                     BLOCK_N: tl.constexpr, SPLITS: tl.constexpr):
        """kv4.py's decode kernel over 16-bit pages [blocks, H_KV, BLOCK_SIZE, D] of K and of V."""
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)
        g = tl.arange(0, GROUP_P)
        heads = kvh * GROUP + g
        in_group = g < GROUP
        n = tl.load(len_ptr + b)
        chunk = tl.cdiv(tl.cdiv(n, SPLITS), BLOCK_N) * BLOCK_N
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=in_group[:, None],
                    other=0.0)
        q = (q.to(tl.float32) * softmax_scale).to(k_ptr.dtype.element_ty)
        m_i = tl.full([GROUP_P], -float("inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_P], dtype=tl.float32)
        acc = tl.zeros([GROUP_P, D], dtype=tl.float32)
        end = tl.minimum(sp * chunk + chunk, n)
        for start in range(sp * chunk, end, BLOCK_N):
            toks = start + tl.arange(0, BLOCK_N)
            valid = toks < end
            blocks = tl.load(bt_ptr + b * stride_bt + toks // BLOCK_SIZE, mask=valid, other=0)
            rows = blocks.to(tl.int64) * stride_page + (kvh * BLOCK_SIZE + toks % BLOCK_SIZE) * D
            k = tl.load(k_ptr + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            s = tl.where(valid[None, :], tl.dot(q, tl.trans(k)), -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            v = tl.load(v_ptr + rows[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        if SPLITS == 1:
            tl.store(o_ptr + b * stride_ot + heads[:, None] * stride_oh + d[None, :],
                     (acc / l_i[:, None]).to(o_ptr.dtype.element_ty), mask=in_group[:, None])
        else:
            ws = (b * (H_KV * GROUP) + heads) * SPLITS + sp
            tl.store(part_ptr + ws[:, None] * D + d[None, :], acc, mask=in_group[:, None])
            tl.store(ml_ptr + ws * 2, m_i, mask=in_group)
            tl.store(ml_ptr + ws * 2 + 1, l_i, mask=in_group)

    return paged_decode


def paged_bf16_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, splits=None):
    """Decode over 16-bit paged K and V caches [blocks, H_kv, PAGE, D] with kv4_decode's design."""
    import torch
    import triton

    from rotq.kernels import kv4

    B, Hq, D = q.shape
    _, Hkv, bs, _ = k_cache.shape
    if splits is None:
        splits = 1 if q.device.type != "cuda" else kv4.num_splits(
            B, Hkv, block_tables.shape[1] * bs, torch.cuda.get_device_properties(q.device).multi_processor_count)
    out = torch.empty_like(q)
    part = torch.empty(B, Hq, splits, D, dtype=torch.float32, device=q.device) if splits > 1 else out
    ml = torch.empty(B, Hq, splits, 2, dtype=torch.float32, device=q.device) if splits > 1 else out
    group = Hq // Hkv
    _paged_bf16_kernel_cached()[(B, Hkv, splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, part, ml, q.stride(0), q.stride(1), block_tables.stride(0),
        out.stride(0), out.stride(1), k_cache.stride(0), scale, H_KV=Hkv, BLOCK_SIZE=bs, GROUP=group,
        GROUP_P=max(16, triton.next_power_of_2(group)), D=D, BLOCK_N=64, SPLITS=splits)
    if splits > 1:
        kv4._kv4_combine_kernel[(B, Hq)](part, ml, out, out.stride(0), out.stride(1), H_Q=Hq, SPLITS=splits,
                                         SPLITS_P=triton.next_power_of_2(splits), D=D)
    return out


_KERNEL = []


def _paged_bf16_kernel_cached():
    if not _KERNEL:
        _KERNEL.append(_paged_bf16_kernel())
    return _KERNEL[0]


def _timer(smoke: bool):
    if smoke:
        def bench(fn):
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return bench
    import triton.testing

    def bench(fn):
        """The median, or NaN after printing why the kernel failed (the other rows still run)."""
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        except Exception as e:  # noqa: BLE001 - a failing kernel is reported, not fatal
            print(f"  failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            return float("nan")
    return bench


def _random_kv4_cache(num_blocks, Hkv, D, dev):
    """Random codes and zero points, positive scales: attention reads it as it reads real data."""
    from rotq.kernels.kv4 import new_cache, page_views
    cache = new_cache(num_blocks, PAGE, Hkv, D, dev)
    cache.random_(0, 256)
    _, scales, _ = page_views(cache, D)
    scales.uniform_(0.01, 0.1)
    return cache


def _time_kv4(bench, q, tables, lens, Hkv):
    from rotq.kernels.kv4 import kv4_decode
    D = q.shape[-1]
    cache = _random_kv4_cache(tables.numel(), Hkv, D, q.device)
    return bench(lambda: kv4_decode(q, cache, tables, lens, D ** -0.5))


def _time_paged_bf16(bench, q, tables, lens, Hkv, gen, check: bool):
    """The baseline's time; with ``check``, first its agreement with SDPA over its gathered pages."""
    import torch
    import torch.nn.functional as F
    (B, _, D), ctx = q.shape, int(lens.max())
    k_pages, v_pages = (torch.randn(tables.numel(), Hkv, PAGE, D, device=q.device, dtype=q.dtype, generator=gen)
                        for _ in range(2))
    if check:
        K, V = (X[tables.long()].permute(0, 2, 1, 3, 4).reshape(B, Hkv, -1, D)[:, :, :ctx].float()
                for X in (k_pages, v_pages))
        ref = F.scaled_dot_product_attention(q.float()[:, :, None], K, V, enable_gqa=True)[:, :, 0]
        err = (paged_bf16_decode(q, k_pages, v_pages, tables, lens, D ** -0.5).float() - ref).abs().max()
        if not err <= 0.02 * ref.abs().max():
            raise RuntimeError(f"the paged bf16 baseline is off by {float(err)} at batch {B}, context {ctx}")
    return bench(lambda: paged_bf16_decode(q, k_pages, v_pages, tables, lens, D ** -0.5))


def _time_sdpa(bench, q, ctx, Hkv, gen):
    import torch
    import torch.nn.functional as F
    B, _, D = q.shape
    k16, v16 = (torch.randn(B, Hkv, ctx, D, device=q.device, dtype=q.dtype, generator=gen) for _ in range(2))
    return bench(lambda: F.scaled_dot_product_attention(q[:, :, None], k16, v16, enable_gqa=True))


def decode_rows(a, bench, bw):
    import torch

    from rotq.kernels.kv4 import row_bytes

    Hq, Hkv, D = a.heads
    dev = "cpu" if a.smoke else "cuda"
    dt = torch.float32 if a.smoke else torch.bfloat16
    gen = torch.Generator(dev).manual_seed(0)
    rows = []
    for ctx in a.contexts:
        for B in a.batches:
            per_seq = -(-ctx // PAGE)
            tables = torch.randperm(B * per_seq, device=dev, generator=gen).to(torch.int32).reshape(B, per_seq)
            lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
            q = torch.randn(B, Hq, D, device=dev, dtype=dt, generator=gen)
            t_kv4 = _time_kv4(bench, q, tables, lens, Hkv)
            # the baseline is checked where its float32 reference fits comfortably
            t_paged = _time_paged_bf16(bench, q, tables, lens, Hkv, gen, check=B * ctx <= 16 * 8192)
            t_sdpa = _time_sdpa(bench, q, ctx, Hkv, gen)
            bytes_kv4, bytes_16 = B * ctx * Hkv * row_bytes(D), B * ctx * Hkv * D * 2 * 2
            for kernel, t, nbytes in (("kv4_decode (int4 paged)", t_kv4, bytes_kv4),
                                      ("bf16 paged (same design)", t_paged, bytes_16),
                                      ("bf16 SDPA, contiguous K/V", t_sdpa, bytes_16)):
                rows.append({"phase": "decode", "batch": B, "context": ctx, "kernel": kernel, "ms": t,
                             "kv_bytes": nbytes, "gbps": nbytes / t / 1e6, "floor_ms": nbytes / bw / 1e9,
                             "speedup_vs_bf16": t_paged / t})
                print(_line(rows[-1]), flush=True)
    return rows


def prefill_rows(a, bench, peak_tflops):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    from rotq.kernels.kv4 import kv4_gather, kv4_prefill

    Hq, Hkv, D = a.heads
    dev = "cpu" if a.smoke else "cuda"
    dt = torch.float32 if a.smoke else torch.bfloat16
    gen = torch.Generator(dev).manual_seed(1)
    rows = []
    cases = [(0, L) for L in a.prefill] + [(a.prefix, a.chunk)]
    for cached, n in cases:
        L = cached + n
        per_seq = -(-L // PAGE)
        cache = _random_kv4_cache(per_seq, Hkv, D, dev)
        table = torch.randperm(per_seq, device=dev, generator=gen).to(torch.int32)[None]
        lens = torch.tensor([L], dtype=torch.int32, device=dev)
        q = torch.randn(n, Hq, D, device=dev, dtype=dt, generator=gen)
        t_kv4 = bench(lambda: kv4_prefill(q, cache, table, lens, [0, n], [L], D ** -0.5))
        t_gather = bench(lambda: kv4_gather(cache, D, table, lens, L, L, dt))
        k16 = torch.randn(Hkv, L, D, device=dev, dtype=dt, generator=gen)
        v16 = torch.randn(Hkv, L, D, device=dev, dtype=dt, generator=gen)
        qt, k16, v16 = q.transpose(0, 1)[None], k16[None], v16[None]  # 4-D: FlashAttention's layout
        if cached:
            mask = causal_lower_right(n, L)
            t_sdpa = bench(lambda: F.scaled_dot_product_attention(qt, k16, v16, attn_mask=mask, enable_gqa=True))
        else:
            t_sdpa = bench(lambda: F.scaled_dot_product_attention(qt, k16, v16, is_causal=True, enable_gqa=True))
        flops = 4 * Hq * D * (n * cached + n * (n + 1) / 2)  # QK^T and PV over the visible keys
        scenario = f"prompt {n}" if not cached else f"chunk {n} after {cached}"
        for kernel, t in (("kv4_prefill (gather + SDPA)", t_kv4), ("kv4_gather alone", t_gather),
                          ("bf16 SDPA, contiguous K/V", t_sdpa)):
            rows.append({"phase": "prefill", "batch": 1, "context": L, "scenario": scenario, "kernel": kernel,
                         "ms": t, "tflops": flops / t / 1e9, "floor_ms": flops / peak_tflops / 1e9,
                         "speedup_vs_bf16": t_sdpa / t})
            print(_line(rows[-1]), flush=True)
    return rows


def _line(r: dict) -> str:
    rate = f"{r['gbps']:.0f} GB/s" if "gbps" in r else f"{r['tflops']:.1f} TF"
    what = r.get("scenario", f"batch {r['batch']}")
    return (f"| {r['phase']} | {what} | {r['context']} | {r['kernel']} | {r['ms']:.4f} | {rate} | "
            f"{r['floor_ms']:.4f} | {r['speedup_vs_bf16']:.2f} |")


# (bf16 dense TFLOPS, memory TB/s): H100 SXM and H200 datasheet figures
PEAKS = {"H100": (989.0, 3.35), "H200": (989.0, 4.8)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, help="write the rows and the machine's description here")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--prefill", type=int, nargs="+", default=[2048, 8192], help="prompt lengths")
    p.add_argument("--prefix", type=int, default=6144, help="cached tokens before the prefill chunk row")
    p.add_argument("--chunk", type=int, default=2048, help="query tokens of the prefill chunk row")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    a = p.parse_args()
    a.heads = HEADS
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        a.heads, a.batches, a.contexts, a.prefill, a.prefix, a.chunk = (4, 2, 64), [1, 2], [70], [40], 20, 9
    import torch
    if not a.smoke and not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA GPU (or --smoke to check the script on CPU)")
    gpu = "cpu-interpreter" if a.smoke else torch.cuda.get_device_name()
    tflops, bw = PEAKS[next((k for k in PEAKS if k in gpu), "H100")]
    bench = _timer(a.smoke)
    print(f"GPU: {gpu}")
    print("| phase | batch / scenario | context | kernel | ms | GB/s or TFLOP/s | floor ms | × bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    rows = decode_rows(a, bench, bw) + prefill_rows(a, bench, tflops)
    if a.json:
        meta = {"date": time.strftime("%Y-%m-%d"), "gpu": gpu, "machine": platform.node(),
                "torch": torch.__version__, "smoke": a.smoke, "heads": a.heads, "page": PAGE,
                "timing": "perf_counter" if a.smoke else "do_bench_cudagraph median",
                "decode_baseline": "bf16 paged decode, kv4_decode's design, separate K and V pages"}
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
