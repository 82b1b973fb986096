"""Kernel speed: rotq's Triton kernels against the 16-bit baseline, on one GPU.

For Llama-3-8B and SmolLM2-135M linear shapes and decode (M ≤ 16) / prefill M, times with
``triton.testing.do_bench``: cuBLAS bf16 ``x @ Wᵀ``; ``w4a4_gemm`` (GEMM only, and with
``act_quant`` in front); ``w4a16_gemm``; ``hadamard_act_quant`` against a plain copy of the
activation; and ``kv4_attention`` decode at 8k/32k context against SDPA over a bf16 cache.
Each row gives the time, achieved TFLOP/s (or GB/s), the roofline floor (the larger of
FLOPs / peak and bytes / bandwidth; peaks per GPU below) and the speed-up over the baseline.
Needs only torch, triton and this repository (it runs on the lent GPU machine, which has no
vLLM). ``--smoke`` runs tiny shapes on CPU under the Triton interpreter, to check the script.

    python benchmarks/kernels.py --json benchmarks/results/kernels-h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from rotq.quant.scheme import ActivationArgs

ACT_CLIP = ActivationArgs.clip_ratio  # the W4A4 scheme's activation clip

# (int8 dense TOPS, bf16 dense TFLOPS, memory TB/s); H100 SXM and H200 datasheet figures
PEAKS = {"H100": (1979.0, 989.0, 3.35), "H200": (1979.0, 989.0, 4.8)}
LINEARS = {
    "llama3-8b": {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)},
    "smollm2-135m": {"qkv": (576, 960), "o": (576, 576), "gate_up": (576, 3072), "down": (1536, 576)},
    "square": {"4096": (4096, 4096), "8192": (8192, 8192)},
}


def _timer(smoke: bool):
    if smoke:
        def bench(fn):
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return bench
    import triton.testing
    return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100)


def _peaks(smoke: bool):
    import torch
    if smoke or not torch.cuda.is_available():
        return "cpu-interpreter", PEAKS["H100"]
    name = torch.cuda.get_device_name()
    key = next((k for k in PEAKS if k in name), "H100")
    return name, PEAKS[key]


def _line(r: dict) -> str:
    rate = f"{r['tflops']:.1f} TF" if "tflops" in r else f"{r['gbps']:.0f} GB/s"
    return (f"| {r['model']} | {r['layer']} | {r['M']} | {r['N']} | {r['K']} | {r['kernel']} | {r['ms']:.4f} | "
            f"{rate} | {r['floor_ms']:.4f} | {r['speedup_vs_bf16']:.2f} |")


def linear_rows(a, bench, peaks):
    import torch

    from rotq.kernels.hadamard import hadamard_act_quant
    from rotq.kernels.int4_gemm import act_quant, w4a4_gemm, w4a16_gemm
    from rotq.kernels.packing import pack_int32

    int8_peak, bf16_peak, bw = peaks
    dev = "cpu" if a.smoke else "cuda"
    rows = []
    for model, shapes in LINEARS.items():
        if model not in a.models or (a.smoke and model != "smollm2-135m"):
            continue
        for name, (K, N) in shapes.items():
            for M in ([1, 16] if a.smoke else [1, 16, 128, 2048, 8192]):
                if model == "square" and M not in (16, int(name)):
                    continue
                x = torch.randn(M, K, device=dev, dtype=torch.float32 if a.smoke else torch.bfloat16)
                w16 = torch.randn(N, K, device=dev, dtype=x.dtype) * 0.02
                wp = pack_int32(torch.randint(-8, 8, (N, K), device=dev), 4, signed=True)
                ws = torch.rand(N, 1, device=dev) * 0.01
                aq, asc = act_quant(x, ACT_CLIP)
                flops = 2 * M * N * K
                t_bf16 = bench(lambda: x @ w16.T)
                t_gemm = bench(lambda: w4a4_gemm(aq, asc, wp, ws, out_dtype=x.dtype))
                t_full = bench(lambda: w4a4_gemm(*act_quant(x, ACT_CLIP), wp, ws, out_dtype=x.dtype))
                t_w16 = bench(lambda: w4a16_gemm(x, wp, ws))
                floor_bf16 = max(flops / bf16_peak / 1e12, (2 * (M * K + N * K + M * N)) / bw / 1e12) * 1e3
                floor_w4a4 = max(flops / int8_peak / 1e12, (M * K / 2 + N * K / 2 + 2 * M * N) / bw / 1e12) * 1e3
                for kernel, t, floor in (("bf16 cuBLAS", t_bf16, floor_bf16), ("w4a4_gemm", t_gemm, floor_w4a4),
                                         ("act_quant+w4a4_gemm", t_full, floor_w4a4),
                                         ("w4a16_gemm", t_w16, floor_w4a4)):
                    rows.append({"model": model, "layer": name, "M": M, "N": N, "K": K, "kernel": kernel,
                                 "ms": t, "tflops": flops / t / 1e9, "floor_ms": floor,
                                 "speedup_vs_bf16": t_bf16 / t})
                    print(_line(rows[-1]), flush=True)
            if model != "square":
                for M in ([7] if a.smoke else [16, 2048, 8192]):
                    x = torch.randn(M, K, device=dev, dtype=torch.float32 if a.smoke else torch.bfloat16)
                    t_copy = bench(lambda: x.clone())
                    t_hq = bench(lambda: hadamard_act_quant(x, ACT_CLIP))
                    bytes_ = 2 * M * K + M * K / 2
                    rows.append({"model": model, "layer": f"{name} input", "M": M, "N": 0, "K": K,
                                 "kernel": "hadamard_act_quant", "ms": t_hq, "gbps": bytes_ / t_hq / 1e6,
                                 "floor_ms": bytes_ / bw / 1e9, "speedup_vs_bf16": t_copy / t_hq,
                                 "baseline": "x.clone()"})
                    print(_line(rows[-1]), flush=True)
    return rows


def kv_rows(a, bench, peaks):
    import torch
    import torch.nn.functional as F

    from rotq.kernels.kv4 import kv4_attention, kv_quant_store, new_cache, row_bytes

    bw = peaks[2]
    dev = "cpu" if a.smoke else "cuda"
    rows = []
    for model, (Hq, Hkv, D) in {"llama3-8b": (32, 8, 128), "smollm2-135m": (9, 3, 64)}.items():
        for ctx in ([64] if a.smoke else [8192, 32768]):
            for B in ([1] if a.smoke else [1, 16]):
                bs = 16
                nblk = B * ctx // bs
                cache = new_cache(nblk, bs, Hkv, D, dev)
                slots = torch.arange(nblk * bs, device=dev)
                kv = torch.randn(nblk * bs, Hkv, D, device=dev)
                kv_quant_store(kv, kv, cache, slots, 0.95)
                tables = torch.arange(nblk, device=dev).reshape(B, -1)
                q = torch.randn(B, Hq, D, device=dev, dtype=torch.float32 if a.smoke else torch.bfloat16)
                seq, pos = torch.arange(B, device=dev), torch.full((B,), ctx - 1, device=dev)
                t_kv4 = bench(lambda: kv4_attention(q, cache, tables, seq, pos, D ** -0.5))
                k16 = torch.randn(B, Hkv, ctx, D, device=dev, dtype=q.dtype)
                t_sdpa = bench(lambda: F.scaled_dot_product_attention(q[:, :, None], k16, k16, enable_gqa=True))
                bytes_kv4 = B * ctx * Hkv * row_bytes(D)
                rows.append({"model": model, "layer": f"decode ctx {ctx}", "M": B, "N": Hq, "K": D,
                             "kernel": "kv4_attention", "ms": t_kv4, "gbps": bytes_kv4 / t_kv4 / 1e6,
                             "floor_ms": bytes_kv4 / bw / 1e9, "speedup_vs_bf16": t_sdpa / t_kv4,
                             "baseline": "SDPA over a bf16 cache (GQA)"})
                print(_line(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--models", nargs="+", choices=list(LINEARS), default=list(LINEARS),
                   help="linear shapes to time (default: all); the KV rows always run")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    a = p.parse_args()
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    if not a.smoke and not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU (or --smoke to check the script on CPU)")
    gpu, peaks = _peaks(a.smoke)
    bench = _timer(a.smoke)
    rows = linear_rows(a, bench, peaks) + kv_rows(a, bench, peaks)
    print(f"GPU: {gpu}")
    print("| model | layer | M | N | K | kernel | ms | TFLOP/s or GB/s | floor ms | × baseline |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(_line(r))
    meta = {"date": time.strftime("%Y-%m-%d"), "gpu": gpu, "machine": platform.node(),
            "torch": torch.__version__, "smoke": a.smoke}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
