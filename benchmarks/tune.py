"""Launch-shape tuning on one GPU: times candidate plans of ``int8_act_gemm`` (decode split-K,
prefill tiles) and of ``kv4_decode`` (tile, warps, stages) against the defaults, so that the
tables in kernels/int4_gemm.py (``gemm_plan``) and kernels/kv4.py (``decode_tiles``) are chosen by
measurement. Every candidate's output is first checked against the default's (a candidate that
fails or computes something else is reported, not timed). GEMMs are timed as in
benchmarks/kernels.py (its CUDA-graph timer, weight copies larger than L2); attention by
``do_bench_cudagraph``; medians. ``--smoke`` runs tiny shapes and two candidates of each kind on
CPU under the Triton interpreter, to check the script.

    python benchmarks/tune.py --json tune-h200.json [--only gemm-decode gemm-prefill kv4-decode]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}  # Llama-3-8B (K, N)
SMOKE_SHAPES = {"down": (1536, 576)}  # SmolLM2-135M


def _kernels_benchmark():
    """benchmarks/kernels.py as a module, for its GEMM timer and weight rotation."""
    spec = importlib.util.spec_from_file_location("rotq_kernels_benchmark", Path(__file__).with_name("kernels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _measure(label: str, run, ref, tol: float, time_it):
    """``time_it()`` in ms once ``run()`` has matched ``ref`` within ``tol`` (relative norm);
    None, with the reason printed, when the candidate fails or computes something else."""
    try:
        out = run()
        err = float((out.float() - ref).norm() / ref.norm())
        if not err <= tol:
            print(f"  {label}: output off by {err:.2e}; not timed", flush=True)
            return None
        return time_it()
    except Exception as e:  # noqa: BLE001 - a failing candidate is reported, the others run
        print(f"  {label}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return None


def _gemm_candidates(phase: str, M: int, N: int, K: int, bk: int, sms: int) -> dict:
    import triton

    from rotq.kernels.int4_gemm import GemmPlan
    cands = {}
    if phase == "decode":
        for bn, per_sm in ((64, 2), (64, 4), (64, 8), (64, 16), (128, 8)):
            split = max(1, min(triton.cdiv(per_sm * sms, triton.cdiv(M, 16) * triton.cdiv(N, bn)), K // bk // 2))
            cands[f"bn {bn} split {split} ({per_sm}/SM)"] = GemmPlan(16, bn, bk, split, 4, 3)
    else:
        for bm, bn, warps, stages in ((128, 128, 8, 3), (256, 128, 8, 3), (128, 256, 8, 3), (256, 256, 8, 3)):
            cands[f"bm {bm} bn {bn} warps {warps} stages {stages}"] = GemmPlan(bm, bn, bk, 1, warps, stages)
    return cands


def gemm_rows(phase: str, Ms: list[int], smoke: bool) -> list[dict]:
    import torch

    from rotq.kernels.int4_gemm import _num_sms, act_quant, gemm_plan, int8_act_gemm
    from rotq.kernels.linear import prepare_triton_weights
    from rotq.kernels.packing import pack_int32
    kb = _kernels_benchmark()
    bench = kb._timer(smoke, rep_ms=40)
    dev = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    rows = []
    for name, (K, N) in (SMOKE_SHAPES if smoke else SHAPES).items():
        prepared = prepare_triton_weights(pack_int32(torch.randint(-8, 8, (N, K), device=dev), 4, signed=True),
                                          torch.rand(N, 1, device=dev) * 0.01)
        copies = kb._copies(prepared.codes, smoke)
        for M in Ms:
            a, s = act_quant(torch.randn(M, K, device=dev, dtype=dtype), 0.9, 4)
            default = gemm_plan(M, N, K, K, dev)
            cands = {"default": default, **_gemm_candidates(phase, M, N, K, default.BLOCK_K, _num_sms(dev))}
            if smoke:
                cands = dict(list(cands.items())[:3])
            ref = int8_act_gemm(a, s, prepared.codes, prepared.scale, dtype).float()
            t_default = None
            for label, plan in cands.items():
                ms = _measure(label, lambda: int8_act_gemm(a, s, prepared.codes, prepared.scale, dtype, plan), ref,
                              1e-2, lambda: bench([lambda w=w: int8_act_gemm(a, s, w, prepared.scale, dtype, plan)
                                                   for w in copies]))
                if ms is None:
                    continue
                t_default = t_default or ms
                rows.append({"tune": f"gemm-{phase}", "layer": name, "M": M, "N": N, "K": K, "candidate": label,
                             "plan": plan._asdict(), "ms": ms, "vs_default": t_default / ms})
                print(f"| gemm-{phase} | {name} M {M} | {label} | {ms:.4f} | {t_default / ms:.2f} |", flush=True)
        del copies, prepared
        if not smoke:
            torch.cuda.empty_cache()
    return rows


def kv4_rows(batches: list[int], ctx: int, heads: tuple[int, int, int], smoke: bool) -> list[dict]:
    import torch

    from rotq.kernels.kv4 import DecodeTiles, kv4_decode, new_cache, page_views
    Hq, Hkv, D = heads
    page, dev = 16, "cpu" if smoke else "cuda"
    gen = torch.Generator(dev).manual_seed(0)
    if smoke:
        def bench(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    else:
        import triton.testing

        def bench(fn):
            return triton.testing.do_bench_cudagraph(fn, rep=40, return_mode="median")
    rows = []
    for B in batches:
        per_seq = -(-ctx // page)
        cache = new_cache(B * per_seq, page, Hkv, D, dev)
        cache.random_(0, 256)
        page_views(cache, D)[1].uniform_(0.01, 0.1)
        tables = torch.randperm(B * per_seq, device=dev, generator=gen).to(torch.int32).reshape(B, per_seq)
        lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
        q = torch.randn(B, Hq, D, device=dev, dtype=torch.float32 if smoke else torch.bfloat16, generator=gen)
        ref = kv4_decode(q, cache, tables, lens, D ** -0.5).float()
        cands = {"default": None}
        for bn, warps, stages in ((64, 4, 3), (64, 2, 2), (128, 4, 2), (128, 2, 2), (32, 2, 2)):
            cands[f"block_n {bn} warps {warps} stages {stages}"] = DecodeTiles(bn, warps, stages)
        if smoke:
            cands = dict(list(cands.items())[:3])
        t_default = None
        for label, tiles in cands.items():
            def run(tiles=tiles):
                return kv4_decode(q, cache, tables, lens, D ** -0.5, tiles=tiles)
            ms = _measure(label, run, ref, 1e-3, lambda: bench(run))
            if ms is None:
                continue
            t_default = t_default or ms
            rows.append({"tune": "kv4-decode", "batch": B, "context": ctx, "candidate": label,
                         "tiles": tiles._asdict() if tiles else None, "ms": ms, "vs_default": t_default / ms})
            print(f"| kv4-decode | batch {B} ctx {ctx} | {label} | {ms:.4f} | {t_default / ms:.2f} |", flush=True)
        del cache
        if not smoke:
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--only", nargs="+", choices=["gemm-decode", "gemm-prefill", "kv4-decode"],
                   default=["gemm-decode", "gemm-prefill", "kv4-decode"])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    a = p.parse_args()
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    if not a.smoke and not torch.cuda.is_available():
        sys.exit("benchmarks/tune.py needs a CUDA GPU (or --smoke to check the script on CPU)")
    print("| tuning | case | candidate | ms | × default |\n|---|---|---|---|---|", flush=True)
    rows = []
    if "gemm-decode" in a.only:
        rows += gemm_rows("decode", [1] if a.smoke else [1, 16], a.smoke)
    if "gemm-prefill" in a.only:
        rows += gemm_rows("prefill", [37] if a.smoke else [2048, 8192], a.smoke)
    if "kv4-decode" in a.only:
        rows += kv4_rows([3] if a.smoke else [1, 16, 64], 200 if a.smoke else 8192,
                         (4, 2, 64) if a.smoke else (32, 8, 128), a.smoke)
    gpu = "cpu-interpreter" if a.smoke else torch.cuda.get_device_name()
    meta = {"date": time.strftime("%Y-%m-%d"), "gpu": gpu, "machine": platform.node(), "torch": torch.__version__,
            "smoke": a.smoke}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
