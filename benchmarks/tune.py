"""Launch-shape tuning on one GPU: times candidate plans of ``int8_act_gemm`` (decode split-K,
prefill tiles) and of ``kv4_decode`` (tile, warps, stages) against the defaults, so that the
tables in kernels/int4_gemm.py (``gemm_plan``) and kernels/kv4.py (``DecodeTiles``) are chosen by
measurement. Every candidate's output is first checked against the default's (a candidate that
computes something else is reported, not timed). Times are medians of CUDA-graph replays
(``do_bench``), the GEMMs rotating over weight copies larger than L2 as in benchmarks/kernels.py.

    python benchmarks/tune.py --json tune-h200.json [--only gemm-decode gemm-prefill kv4-decode]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}  # Llama-3-8B (K, N)
ROTATE_BYTES = 256 << 20


def _bench_graph(fns) -> float:
    """ms per call: the calls captured in one CUDA graph, replays timed by do_bench (median)."""
    import torch
    import triton.testing
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=40, return_mode="median") / len(fns)


def _try(label: str, fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a failing candidate is reported, the others run
        print(f"  {label}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return None


def gemm_rows(phase: str, Ms: list[int]) -> list[dict]:
    import torch
    import triton

    from rotq.kernels.int4_gemm import GemmPlan, act_quant, gemm_plan, int8_act_gemm
    from rotq.kernels.linear import prepare_triton_weights
    from rotq.kernels.packing import pack_int32
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for name, (K, N) in SHAPES.items():
        prepared = prepare_triton_weights(pack_int32(torch.randint(-8, 8, (N, K), device="cuda"), 4, signed=True),
                                          torch.rand(N, 1, device="cuda") * 0.01)
        copies = [prepared.codes] + [prepared.codes.clone()
                                     for _ in range(min(15, -(-ROTATE_BYTES // prepared.codes.numel()) - 1))]
        for M in Ms:
            a, s = act_quant(torch.randn(M, K, device="cuda", dtype=torch.bfloat16), 0.9, 4)
            default = gemm_plan(M, N, K, K, "cuda")
            bk = default.BLOCK_K
            cands = {"default": default}
            if phase == "decode":
                for bn, per_sm in ((64, 2), (64, 4), (64, 8), (64, 16), (128, 8)):
                    tiles = triton.cdiv(M, 16) * triton.cdiv(N, bn)
                    split = max(1, min(triton.cdiv(per_sm * sms, tiles), K // bk // 2))
                    cands[f"bn {bn} split {split} ({per_sm}/SM)"] = GemmPlan(16, bn, bk, split, 4, 3)
            else:
                for bm, bn, warps, stages in ((128, 128, 8, 3), (256, 128, 8, 3), (128, 256, 8, 3), (256, 256, 8, 3)):
                    cands[f"bm {bm} bn {bn} warps {warps} stages {stages}"] = GemmPlan(bm, bn, bk, 1, warps, stages)
            ref = int8_act_gemm(a, s, prepared.codes, prepared.scale, torch.bfloat16).float()
            t_default = None
            for label, plan in cands.items():
                out = _try(label, lambda: int8_act_gemm(a, s, prepared.codes, prepared.scale, torch.bfloat16, plan))
                if out is None:
                    continue
                err = float((out.float() - ref).norm() / ref.norm())
                if err > 1e-2:
                    print(f"  {label}: output off by {err:.2e}; not timed", flush=True)
                    continue
                ms = _try(label, lambda: _bench_graph([lambda w=w: int8_act_gemm(a, s, w, prepared.scale,
                                                                                  torch.bfloat16, plan)
                                                       for w in copies]))
                if ms is None:
                    continue
                t_default = t_default or ms
                rows.append({"tune": f"gemm-{phase}", "layer": name, "M": M, "N": N, "K": K, "candidate": label,
                             "plan": plan._asdict(), "ms": ms, "vs_default": t_default / ms})
                print(f"| gemm-{phase} | {name} M {M} | {label} | {ms:.4f} | {t_default / ms:.2f} |", flush=True)
        del copies, prepared
        torch.cuda.empty_cache()
    return rows


def kv4_rows(batches: list[int], ctx: int) -> list[dict]:
    import torch
    import triton.testing

    from rotq.kernels.kv4 import DecodeTiles, kv4_decode, new_cache, page_views
    Hq, Hkv, D, page = 32, 8, 128, 16
    gen = torch.Generator("cuda").manual_seed(0)
    rows = []
    for B in batches:
        per_seq = -(-ctx // page)
        cache = new_cache(B * per_seq, page, Hkv, D, "cuda")
        cache.random_(0, 256)
        page_views(cache, D)[1].uniform_(0.01, 0.1)
        tables = torch.randperm(B * per_seq, device="cuda", generator=gen).to(torch.int32).reshape(B, per_seq)
        lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(B, Hq, D, device="cuda", dtype=torch.bfloat16, generator=gen)
        ref = kv4_decode(q, cache, tables, lens, D ** -0.5).float()
        cands = {"default": None}
        for bn, warps, stages in ((64, 4, 3), (64, 2, 2), (128, 4, 2), (128, 2, 2), (32, 2, 2)):
            cands[f"block_n {bn} warps {warps} stages {stages}"] = DecodeTiles(bn, warps, stages)
        t_default = None
        for label, tiles in cands.items():
            out = _try(label, lambda: kv4_decode(q, cache, tables, lens, D ** -0.5, tiles=tiles))
            if out is None:
                continue
            err = float((out.float() - ref).norm() / ref.norm())
            if err > 1e-3:
                print(f"  {label}: output off by {err:.2e}; not timed", flush=True)
                continue
            ms = _try(label, lambda: triton.testing.do_bench_cudagraph(
                lambda: kv4_decode(q, cache, tables, lens, D ** -0.5, tiles=tiles), rep=40, return_mode="median"))
            if ms is None:
                continue
            t_default = t_default or ms
            rows.append({"tune": "kv4-decode", "batch": B, "context": ctx, "candidate": label,
                         "tiles": tiles._asdict() if tiles else None, "ms": ms, "vs_default": t_default / ms})
            print(f"| kv4-decode | batch {B} ctx {ctx} | {label} | {ms:.4f} | {t_default / ms:.2f} |", flush=True)
        del cache
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--only", nargs="+", choices=["gemm-decode", "gemm-prefill", "kv4-decode"],
                   default=["gemm-decode", "gemm-prefill", "kv4-decode"])
    a = p.parse_args()
    import torch
    if not torch.cuda.is_available():
        sys.exit("benchmarks/tune.py needs a CUDA GPU")
    print("| tuning | case | candidate | ms | × default |\n|---|---|---|---|---|", flush=True)
    rows = []
    if "gemm-decode" in a.only:
        rows += gemm_rows("decode", [1, 16])
    if "gemm-prefill" in a.only:
        rows += gemm_rows("prefill", [2048, 8192])
    if "kv4-decode" in a.only:
        rows += kv4_rows([1, 16, 64], 8192)
    meta = {"date": time.strftime("%Y-%m-%d"), "gpu": torch.cuda.get_device_name(), "machine": platform.node(),
            "torch": torch.__version__}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
