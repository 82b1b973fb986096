"""End-to-end speed of a stack of Llama-3-8B-shaped decoder layers on one GPU: bf16 against
rotq's kernels. vLLM does not run on the lent GPU machine, so this is the whole-model speed
figure there.

Three configurations compute the same function (the bf16 weights are the int4 weights
dequantized), each captured in a CUDA graph so that launch overhead does not decide decode:

* ``bf16``: cuBLAS GEMMs, SDPA (FlashAttention) over a bf16 KV cache.
* ``rotq W4A4``: every linear through int8_act_gemm on weights repacked once by
  ``prepare_triton_weights``, its int8 activation codes from the quantizer fused with the op
  before it (kernels/fused.py): the RMSNorms, each with the residual add before it, for
  q/k/v and gate/up; SiLU·mul and the online R4 Hadamard for down_proj; act_quant for o_proj
  (``quantized_linear_triton``). SDPA over a bf16 KV cache.
* ``rotq W4A4KV4``: the same linears, RoPE and the R3 Hadamard on Q and K fused with storing K
  and V into the int4 paged cache (``rope_hadamard_kv_store``; vLLM's page layout, pages of 16)
  and attention over it: kv4_decode for decode, kv4_prefill (dequantizing gather + SDPA) for
  prefill (what the vLLM backend runs: attention always reads the quantized cache).

bf16 runs RMSNorm (QuaRot folds its weight into the next linear), SiLU·mul and RoPE in PyTorch;
rotq W4A4 runs RoPE in PyTorch too. Prefill: one sequence of 2k and 8k tokens, tokens/s.
Decode: one token per sequence for batch 1, 16 and 64 at a context of ``--decode-context``
tokens, tokens/s. The first table row also reports how far rotq's output is from bf16's
(activation and KV quantization on random data; garbage would be ≈ 1.4).

    python benchmarks/layers.py --json benchmarks/results/layers-h200.json
    python benchmarks/layers.py --smoke --json /tmp/layers-smoke.json   # CPU, Triton interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rotq.quant.scheme import ActivationArgs, KVCacheArgs

SHAPES = {
    "llama3-8b": dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, inter=14336),
    "smoke": dict(hidden=128, heads=2, kv_heads=1, head_dim=64, inter=384),
}
ACT, KV_CLIP = ActivationArgs(bits=4), KVCacheArgs.clip_ratio  # the W4A4KV4 scheme's
PAGE = 16
EPS = 1e-5  # RMSNorm's
CONFIGS = ("bf16", "rotq W4A4", "rotq W4A4KV4")


@dataclass
class Layer:
    """One decoder layer's random int4 weights, prepared for rotq's kernels (``TritonWeights``)
    and dequantized for bf16 (the down projection's with the online Hadamard folded in, so that
    both compute one function)."""
    triton: dict
    dense: dict


def make_layer(shape: dict, device, dtype, gen):
    import torch

    from rotq.kernels.hadamard import hadamard
    from rotq.kernels.linear import prepare_triton_weights
    from rotq.kernels.packing import pack_int32

    h, i = shape["hidden"], shape["inter"]
    qkv = (shape["heads"] + 2 * shape["kv_heads"]) * shape["head_dim"]
    dims = {"qkv": (qkv, h), "o": (h, shape["heads"] * shape["head_dim"]), "gate_up": (2 * i, h), "down": (h, i)}
    prepared, dense = {}, {}
    for name, (n, k) in dims.items():
        codes = torch.randint(-8, 8, (n, k), device=device, generator=gen)
        scale = (torch.rand(n, 1, device=device, generator=gen) + 0.5) * (0.5 / k ** 0.5)
        prepared[name] = prepare_triton_weights(pack_int32(codes, 4, signed=True), scale)
        weight = codes.float() * scale
        if name == "down":  # rotq computes (x H) Wᵀ (online R4): the same function is x (W Hᵀ)ᵀ
            weight = weight @ hadamard(torch.eye(k, device=device)).T
        dense[name] = weight.to(dtype)
    return Layer(prepared, dense)


def rope(x, cos, sin):
    """Rotary embedding, half-split convention, on x [T, H, D] with cos/sin [T, D/2]."""
    import torch
    a, b = x.float().chunk(2, dim=-1)
    c, s = cos[:, None], sin[:, None]
    return torch.cat((a * c - b * s, b * c + a * s), dim=-1).to(x.dtype)


def rms(x):
    import torch
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


class Stack:
    """The decoder stack in one configuration, with the caches one scenario needs."""

    def __init__(self, config: str, layers: list[Layer], shape: dict, device, dtype):
        self.config, self.layers, self.shape, self.device, self.dtype = config, layers, shape, device, dtype

    def linear(self, x, layer: Layer, name: str):
        """x Wᵀ for x [T, K] in 16 bits, or as rotq's int8 codes and scales (a fused quantizer's)."""
        from rotq.kernels.int4_gemm import int8_act_gemm
        from rotq.kernels.linear import quantized_linear_triton
        if self.config == "bf16":
            return x @ layer.dense[name].T
        w = layer.triton[name]
        if isinstance(x, tuple):
            return int8_act_gemm(*x, w.codes, w.scale, out_dtype=self.dtype)
        return quantized_linear_triton(x, w, None, ACT, None)

    def norm(self, x, delta):
        """(x + delta, RMSNorm of it) for the residual stream x and a sublayer's output ``delta``
        (None: none to add); rotq's norm is fused with the add and the activation quantizer."""
        from rotq.kernels.fused import rmsnorm_act_quant
        if self.config == "bf16":
            x = x if delta is None else x + delta
            return x, rms(x)
        if delta is None:
            return x, rmsnorm_act_quant(x, None, EPS, ACT.clip_ratio, ACT.bits)
        q, s, x = rmsnorm_act_quant(delta, None, EPS, ACT.clip_ratio, ACT.bits, residual=x)
        return x, (q, s)

    def silu_mul(self, gate_up):
        """down_proj's input: SiLU(gate) · up in bf16; rotq's fused with R4 and the quantizer."""
        import torch.nn.functional as F

        from rotq.kernels.fused import silu_mul_hadamard_act_quant
        if self.config == "bf16":
            gate, up = gate_up.chunk(2, dim=-1)
            return F.silu(gate) * up
        return silu_mul_hadamard_act_quant(gate_up, ACT.clip_ratio, ACT.bits)

    def forward(self, x, attend):
        """x [T, hidden]; ``attend(i, q, k, v)`` → [T, heads·head_dim] runs layer i's attention.
        Each MLP's output is added to the stream by the next layer's first norm, or at the end."""
        sh = self.shape
        H, Hkv, D = sh["heads"], sh["kv_heads"], sh["head_dim"]
        delta = None
        for i, layer in enumerate(self.layers):
            x, h = self.norm(x, delta)
            qkv = self.linear(h, layer, "qkv")
            q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
            a = attend(i, q.reshape(-1, H, D), k.reshape(-1, Hkv, D), v.reshape(-1, Hkv, D))
            x, h = self.norm(x, self.linear(a, layer, "o"))
            delta = self.linear(self.silu_mul(self.linear(h, layer, "gate_up")), layer, "down")
        return x + delta


def _rope_tables(positions, D, device):
    import torch
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
    ang = positions.float()[:, None] * inv[None]
    return ang.cos(), ang.sin()


def kv4_attend(caches, tables, seq_lens, slots, cos, sin, prompt=None):
    """Layer i's attention through the int4 cache: RoPE and R3 on Q and K fused with storing the
    new K/V at ``slots`` (rope_hadamard_kv_store), attention over pages ``tables`` as the vLLM
    backend does: kv4_decode for one token per sequence, kv4_prefill (gather + SDPA) for a
    prompt of ``prompt`` tokens."""
    import torch

    from rotq.kernels.fused import rope_hadamard_kv_store
    from rotq.kernels.kv4 import kv4_decode, kv4_prefill
    cos_sin = torch.cat([cos, sin], dim=-1)  # token t's row t
    rows = torch.arange(cos.shape[0], device=cos.device)

    def attend(i, q, k, v):
        D = q.shape[-1]
        q = rope_hadamard_kv_store(q, k, v, rows, cos_sin, caches[i], slots, KV_CLIP)
        if prompt is None:
            o = kv4_decode(q, caches[i], tables, seq_lens, D ** -0.5)
        else:
            o = kv4_prefill(q, caches[i], tables, seq_lens, [0, prompt], [prompt], D ** -0.5)
        return o.reshape(q.shape[0], -1)
    return attend


def prefill_step(stack: Stack, L: int):
    """A closure running one L-token prompt through the stack (K/V written to the cache)."""
    import torch
    import torch.nn.functional as F

    from rotq.kernels.kv4 import new_cache
    sh, dev = stack.shape, stack.device
    H, Hkv, D = sh["heads"], sh["kv_heads"], sh["head_dim"]
    pos = torch.arange(L, device=dev)
    cos, sin = _rope_tables(pos, D, dev)
    x = torch.randn(L, sh["hidden"], device=dev, generator=torch.Generator(dev).manual_seed(L)).to(stack.dtype)
    n = len(stack.layers)
    if stack.config == "rotq W4A4KV4":
        caches = [new_cache(L // PAGE + 1, PAGE, Hkv, D, dev) for _ in range(n)]
        tables = torch.arange(L // PAGE + 1, device=dev, dtype=torch.int32)[None]
        lens = torch.tensor([L], dtype=torch.int32, device=dev)
        attend = kv4_attend(caches, tables, lens, pos, cos, sin, prompt=L)
    else:
        caches = [torch.empty(2, Hkv, L, D, device=dev, dtype=stack.dtype) for _ in range(n)]

        def attend(i, q, k, v):
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            caches[i][0].copy_(k.transpose(0, 1))
            caches[i][1].copy_(v.transpose(0, 1))
            o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], caches[i][0][None], caches[i][1][None],
                                               is_causal=True, enable_gqa=True)
            return o[0].transpose(0, 1).reshape(L, H * D)
    return lambda: stack.forward(x, attend)


def decode_step(stack: Stack, B: int, ctx: int, gen):
    """A closure running one decode step for B sequences that hold ``ctx - 1`` cached tokens."""
    import torch
    import torch.nn.functional as F

    from rotq.kernels.kv4 import kv_quant_store, new_cache
    sh, dev, dt = stack.shape, stack.device, stack.dtype
    H, Hkv, D = sh["heads"], sh["kv_heads"], sh["head_dim"]
    pos = torch.full((B,), ctx - 1, device=dev)
    cos, sin = _rope_tables(pos, D, dev)
    x = torch.randn(B, sh["hidden"], device=dev, dtype=dt, generator=gen)
    n = len(stack.layers)
    if stack.config == "rotq W4A4KV4":
        per_seq = -(-ctx // PAGE)
        caches, slots_all = [], torch.arange(B * per_seq * PAGE, device=dev)
        for _ in range(n):
            cache = new_cache(B * per_seq, PAGE, Hkv, D, dev)
            kv = torch.randn(len(slots_all), Hkv, D, device=dev, generator=gen)
            kv_quant_store(kv, kv, cache, slots_all, KV_CLIP)
            caches.append(cache)
        tables = torch.arange(B * per_seq, device=dev, dtype=torch.int32).reshape(B, per_seq)
        slots = torch.arange(B, device=dev) * per_seq * PAGE + ctx - 1
        lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
        attend = kv4_attend(caches, tables, lens, slots, cos, sin)
    else:
        caches = [torch.randn(2, B, Hkv, ctx, D, device=dev, dtype=dt, generator=gen) for _ in range(n)]

        def attend(i, q, k, v):
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            caches[i][0][:, :, ctx - 1] = k
            caches[i][1][:, :, ctx - 1] = v
            o = F.scaled_dot_product_attention(q[:, :, None], caches[i][0], caches[i][1], enable_gqa=True)
            return o.reshape(B, H * D)
    return lambda: stack.forward(x, attend)


def timed(fn, smoke: bool):
    """(ms per call, whether a CUDA graph was used): the step captured in a graph and its
    replays timed with do_bench; eager timing where capture fails (the reason is printed)."""
    import torch
    fn()
    fn()
    if smoke:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3, False
    import triton.testing
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return triton.testing.do_bench(graph.replay, warmup=50, rep=300, return_mode="median"), True
    except Exception as e:  # noqa: BLE001 - reported, then timed without a graph
        print(f"  CUDA graph capture failed ({type(e).__name__}: {str(e)[:160]}); timing eagerly", flush=True)
        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"), False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--layers", type=int, default=4, help="decoder layers in the stack (default 4)")
    p.add_argument("--prefill", type=int, nargs="+", default=[2048, 8192], help="prompt lengths")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64], help="decode batch sizes")
    p.add_argument("--decode-context", type=int, default=4096, help="tokens each decoding sequence attends to")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    a = p.parse_args()
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        a.layers, a.prefill, a.batch, a.decode_context = 1, [37], [1, 3], 40
    import torch
    if not a.smoke and not torch.cuda.is_available():
        sys.exit("benchmarks/layers.py needs a CUDA GPU (or --smoke to check the script on CPU)")
    dev = "cpu" if a.smoke else "cuda"
    dtype = torch.float32 if a.smoke else torch.bfloat16
    shape = SHAPES["smoke" if a.smoke else "llama3-8b"]
    gen = torch.Generator(device=dev).manual_seed(0)
    layers = [make_layer(shape, dev, dtype, gen) for _ in range(a.layers)]
    gpu = "cpu-interpreter" if a.smoke else torch.cuda.get_device_name()
    rows = []
    with torch.inference_mode():
        for L in a.prefill:
            ref = None
            for config in CONFIGS:  # bf16 first: the reference of the other two
                try:
                    step = prefill_step(Stack(config, layers, shape, dev, dtype), L)
                    out = step().float()
                    err = None
                    if ref is None:
                        ref = out
                    else:
                        err = float((out - ref).norm() / ref.norm())
                    ms, graph = timed(step, a.smoke)
                except Exception as e:  # noqa: BLE001 - a failing configuration is reported, the others run
                    print(f"prefill {L:>5} | {config:<13} | failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                rows.append({"scenario": f"prefill {L}", "config": config, "tokens": L, "ms": ms,
                             "tokens_per_s": L / ms * 1e3, "cuda_graph": graph, "rel_err_vs_bf16": err})
                print(f"prefill {L:>5} | {config:<13} | {ms:9.3f} ms | {L / ms * 1e3:12.0f} tok/s"
                      + (f" | rel. err. vs bf16 {err:.3f}" if err is not None else ""), flush=True)
            del ref, out, step
            if not a.smoke:
                torch.cuda.empty_cache()
        for B in a.batch:
            for config in CONFIGS:
                try:
                    step = decode_step(Stack(config, layers, shape, dev, dtype), B, a.decode_context, gen)
                    ms, graph = timed(step, a.smoke)
                except Exception as e:  # noqa: BLE001 - a failing configuration is reported, the others run
                    print(f"decode b{B:<3} | {config:<13} | failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                rows.append({"scenario": f"decode batch {B} ctx {a.decode_context}", "config": config, "tokens": B,
                             "ms": ms, "tokens_per_s": B / ms * 1e3, "cuda_graph": graph})
                print(f"decode b{B:<3} | {config:<13} | {ms:9.3f} ms | {B / ms * 1e3:12.0f} tok/s", flush=True)
                del step
                if not a.smoke:
                    torch.cuda.empty_cache()
    base = {r["scenario"]: r["ms"] for r in rows if r["config"] == "bf16"}
    print(f"\nGPU: {gpu}; a stack of {a.layers} Llama-3-8B-shaped layers (random int4 weights)")
    print("| scenario | configuration | ms per step | tokens/s | × bf16 | CUDA graph |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        r["speedup_vs_bf16"] = base[r["scenario"]] / r["ms"] if r["scenario"] in base else float("nan")
        print(f"| {r['scenario']} | {r['config']} | {r['ms']:.3f} | {r['tokens_per_s']:.0f} | "
              f"{r['speedup_vs_bf16']:.2f} | {'yes' if r['cuda_graph'] else 'no'} |")
    meta = {"date": time.strftime("%Y-%m-%d"), "gpu": gpu, "machine": platform.node(), "torch": torch.__version__,
            "layers": a.layers, "shape": shape, "decode_context": a.decode_context, "smoke": a.smoke}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
