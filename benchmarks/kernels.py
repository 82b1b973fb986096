"""Kernel speed: rotq's Triton kernels against the 16-bit baseline, on one GPU.

For Llama-3-8B and SmolLM2-135M linear shapes and decode (M = 1, 16, 128) / prefill M: cuBLAS bf16
``x @ Wᵀ``; ``int8_act_gemm`` on 4-bit (W4A4) and 8-bit (W4A8) activation codes (GEMM only, and
with ``act_quant`` in front; decode rows name their split-K factor); ``w4a16_gemm``; and
``hadamard_act_quant`` against a plain copy of the activation (attention:
benchmarks/attention.py). The GEMM rows are medians of CUDA-graph replays
over weight copies larger than L2 (``_timer``): launch overhead and cached weights would
otherwise decide the decode rows. Each row gives the time, achieved TFLOP/s (or GB/s), the
roofline floor (the larger of FLOPs / peak and bytes / bandwidth; peaks per GPU below: the int8
peak for the int8 loop, the bf16 peak for bf16 and W4A16) and the speed-up over the baseline.
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
ROTATE_BYTES = 256 << 20  # weight copies timed in turn (at most 16): well over an H100's or H200's 50 MB L2


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


def _timer(smoke: bool, rep_ms: int = 100):
    """ms per call of a list of calls: all of them captured in one CUDA graph (no launch overhead,
    as vLLM's decode runs), the graph replayed by ``do_bench`` (which flushes L2 between
    replays), the median divided by the number of calls. The calls rotate over weight copies
    larger than L2 together, so that no GEMM finds its weights cached (a model's layers do not)."""
    if smoke:
        def bench(fns):
            for fn in fns:
                fn()
            t0 = time.perf_counter()
            for fn in fns:
                fn()
            return (time.perf_counter() - t0) * 1e3 / len(fns)
        return bench
    import torch
    import triton.testing

    def bench(fns):
        for fn in fns:  # compile and warm up outside the graph
            fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for fn in fns:
                fn()
        return triton.testing.do_bench(graph.replay, warmup=25, rep=rep_ms, return_mode="median") / len(fns)
    return bench


def _copies(tensor, smoke: bool) -> list:
    """``tensor`` and enough clones of it to total ``ROTATE_BYTES`` (at most 16; one in --smoke)."""
    if smoke:
        return [tensor]
    nbytes = tensor.numel() * tensor.element_size()
    return [tensor] + [tensor.clone() for _ in range(min(15, -(-ROTATE_BYTES // nbytes) - 1))]


def linear_rows(a, peaks):
    import torch

    from rotq.kernels.hadamard import hadamard_act_quant
    from rotq.kernels.int4_gemm import act_quant, gemm_plan, int8_act_gemm, w4a16_gemm
    from rotq.kernels.linear import prepare_triton_weights
    from rotq.kernels.packing import pack_int32

    int8_peak, bf16_peak, bw = peaks
    bench = _timer(a.smoke)
    dev = "cpu" if a.smoke else "cuda"
    rows = []

    def add(row):
        rows.append(row)
        print(_line(row), flush=True)

    def attempt(label, fns):
        """bench(fns), or None after printing why a kernel failed (the other rows still run)."""
        try:
            return bench(fns)
        except Exception as e:  # noqa: BLE001 - a failing kernel is reported, not fatal
            print(f"  {label} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            return None

    for model, shapes in LINEARS.items():
        if model not in a.models or (a.smoke and model != "smollm2-135m"):
            continue
        for name, (K, N) in shapes.items():
            for M in ([1, 16] if a.smoke else [1, 16, 128, 2048, 8192]):
                if model == "square" and M not in (1, 16, int(name)):
                    continue
                x = torch.randn(M, K, device=dev, dtype=torch.float32 if a.smoke else torch.bfloat16)
                w16s = _copies(torch.randn(N, K, device=dev, dtype=x.dtype) * 0.02, a.smoke)
                prepared = prepare_triton_weights(pack_int32(torch.randint(-8, 8, (N, K), device=dev), 4, signed=True),
                                                  torch.rand(N, 1, device=dev) * 0.01)
                codes, ws = _copies(prepared.codes, a.smoke), prepared.scale
                split = gemm_plan(M, N, K, K, dev).split
                flops = 2 * M * N * K
                t_bf16 = bench([lambda w=w: x @ w.T for w in w16s])
                floors = {  # (peak, bytes moved): int8 MMA for the int8 loop, bf16 MMA for W4A16
                    "bf16": (bf16_peak, 2 * (M * K + N * K + M * N)),
                    "int8": (int8_peak, M * K + N * K / 2 + 2 * M * N),
                    "w4a16": (bf16_peak, 2 * M * K + N * K / 2 + 2 * M * N),
                }
                timed = [("bf16 cuBLAS", t_bf16, "bf16")]
                for bits in (4, 8):
                    aq, asc = act_quant(x, ACT_CLIP, bits)
                    label = f"int8_act_gemm W4A{bits}" + (f" split-K {split}" if split > 1 else "")
                    timed.append((label, attempt(label, [lambda w=w: int8_act_gemm(aq, asc, w, ws, out_dtype=x.dtype)
                                                         for w in codes]), "int8"))
                    timed.append((f"act_quant+{label}",
                                  attempt(label, [lambda w=w, b=bits: int8_act_gemm(*act_quant(x, ACT_CLIP, b), w, ws,
                                                                                    out_dtype=x.dtype) for w in codes]),
                                  "int8"))
                timed.append(("w4a16_gemm", attempt("w4a16_gemm", [lambda w=w: w4a16_gemm(x, w, ws) for w in codes]),
                              "w4a16"))
                for kernel, t, kind in timed:
                    if t is None:
                        continue
                    peak, bytes_ = floors[kind]
                    add({"model": model, "layer": name, "M": M, "N": N, "K": K, "kernel": kernel, "ms": t,
                         "tflops": flops / t / 1e9, "floor_ms": max(flops / peak / 1e12, bytes_ / bw / 1e12) * 1e3,
                         "speedup_vs_bf16": t_bf16 / t, "split_k": split if kind == "int8" else 1,
                         "cuda_graph": not a.smoke})
                del w16s, codes, prepared
            if model != "square":
                for M in ([7] if a.smoke else [16, 2048, 8192]):
                    x = torch.randn(M, K, device=dev, dtype=torch.float32 if a.smoke else torch.bfloat16)
                    t_copy = bench([lambda: x.clone()])
                    t_hq = attempt("hadamard_act_quant", [lambda: hadamard_act_quant(x, ACT_CLIP)])
                    if t_hq is None:
                        continue
                    bytes_ = 2 * M * K + M * K + 4 * M  # bf16 in, int8 codes and float32 scales out
                    add({"model": model, "layer": f"{name} input", "M": M, "N": 0, "K": K,
                         "kernel": "hadamard_act_quant", "ms": t_hq, "gbps": bytes_ / t_hq / 1e6,
                         "floor_ms": bytes_ / bw / 1e9, "speedup_vs_bf16": t_copy / t_hq, "baseline": "x.clone()",
                         "cuda_graph": not a.smoke})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--models", nargs="+", choices=list(LINEARS), default=list(LINEARS),
                   help="linear shapes to time (default: all); attention: benchmarks/attention.py")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    a = p.parse_args()
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    if not a.smoke and not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU (or --smoke to check the script on CPU)")
    gpu, peaks = _peaks(a.smoke)
    rows = linear_rows(a, peaks)
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
