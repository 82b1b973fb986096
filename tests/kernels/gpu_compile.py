"""Compile every Triton kernel for a real GPU (Hopper, sm_90) with the tile configurations and
constants that production launches use; prints one line per case and exits 1 on any failure.

Run by tests/kernels/test_cuda_compile.py in a subprocess without TRITON_INTERPRET (under the
interpreter, @triton.jit yields functions the compiler cannot take). Compiling to a cubin needs
no GPU, only Triton's bundled ptxas.

    python tests/kernels/gpu_compile.py
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("gpu_compile.py compiles for a GPU: unset TRITON_INTERPRET")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from rotq.kernels import hadamard as hk  # noqa: E402
from rotq.kernels import int4_gemm, kv4  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)


def compile_for_gpu(fn, types: dict, constexprs: dict, **options):
    """A cubin for ``fn`` (a JIT function) with argument ``types`` and ``constexprs``."""
    signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
    missing = [n for n, t in signature.items() if t == "constexpr" and n not in constexprs]
    if missing:
        raise ValueError(f"no value for constexpr arguments {missing}")
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=HOPPER,
                            options=options)
    if not kernel.asm["cubin"]:
        raise RuntimeError("empty cubin")
    return kernel


def _ints(*names):
    return {n: "i32" for n in names}


GEMM_INTS = _ints("M", "N", "K", "stride_a", "stride_x", "stride_w", "stride_ws", "stride_c", "M_BUCKET")
KV_INTS = _ints("stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_page", "stride_qt", "stride_qh",
                "stride_bt", "stride_ot", "stride_oh")


def cases():
    """(name, kernel, argument types, constexprs, compile options) for every production variant."""
    for x in ("*bf16", "*fp16", "*fp32"):
        yield (f"act_quant {x}", int4_gemm._act_quant_kernel,
               {"x_ptr": x, "q_ptr": "*u8", "s_ptr": "*fp32", **_ints("K", "stride_x", "stride_q"), "clip": "fp32"},
               {"BLOCK": 4096}, {"num_warps": 8})
    for c in int4_gemm._TILES:
        opts = {"num_warps": c.num_warps, "num_stages": c.num_stages}
        for block_k, grouped in ((128, False), (64, False), (64, True)):
            yield (f"w4a4_gemm {c.kwargs} BLOCK_K {block_k} grouped {grouped}", int4_gemm._w4a4_kernel,
                   {"a_ptr": "*u8", "as_ptr": "*fp32", "w_ptr": "*i32", "ws_ptr": "*fp32", "c_ptr": "*bf16",
                    **GEMM_INTS},
                   {**c.kwargs, "GROUP": 128 if grouped else 4096, "GROUPED": grouped, "BLOCK_K": block_k}, opts)
        for x in ("*bf16", "*fp16", "*fp32"):
            yield (f"w4a16_gemm {c.kwargs} {x}", int4_gemm._w4a16_kernel,
                   {"x_ptr": x, "w_ptr": "*i32", "ws_ptr": "*fp32", "c_ptr": x, **GEMM_INTS},
                   {**c.kwargs, "GROUP": 128, "BLOCK_K": 64, "PRECISION": "ieee" if x == "*fp32" else "tf32"}, opts)
    for n in (64, 128, 576, 1536, 14336):
        k, p, kp, at = hk._plan(n, "cpu")
        consts = {"KP": kp, "P": p, "LOG_P": p.bit_length() - 1, "HAS_A": at is not None}
        warps = {"num_warps": hk.num_warps(kp * p)}
        common = {"at_ptr": "*fp32", "K": "i32", "stride_x": "i32", "inv_sqrt_n": "fp32"}
        yield (f"hadamard {n}", hk._hadamard_kernel,
               {"x_ptr": "*bf16", "y_ptr": "*bf16", "stride_y": "i32", **common}, consts, warps)
        yield (f"hadamard_act_quant {n}", hk._hadamard_quant_kernel,
               {"x_ptr": "*bf16", "q_ptr": "*u8", "s_ptr": "*fp32", "stride_q": "i32", "clip": "fp32", **common},
               consts, warps)
    for d in (64, 128):
        for symmetric in (False, True):
            yield (f"kv_quant_store D {d} symmetric {symmetric}", kv4._kv_store_kernel,
                   {"k_ptr": "*bf16", "v_ptr": "*bf16", "cache_ptr": "*u8", "scale_ptr": "*fp32",
                    "slot_ptr": "*i64", "clip": "fp32", **KV_INTS},
                   {"H": 8, "BLOCK_SIZE": 16, "D": d, "SYMMETRIC": symmetric}, kv4.EXACT_FLOAT)
        for splits, blocked in ((1, False), (8, False), (1, True), (8, True)):
            yield (f"kv4_attention D {d} splits {splits} blocked {blocked}", kv4._kv4_attention_kernel,
                   {"q_ptr": "*bf16", "cache_ptr": "*u8", "scale_ptr": "*fp32", "bt_ptr": "*i32", "seq_ptr": "*i32",
                    "pos_ptr": "*i32", "qb_ptr": "*i32", "o_ptr": "*bf16", "part_ptr": "*fp32", "ml_ptr": "*fp32",
                    "softmax_scale": "fp32", "chunk": "i32", **KV_INTS},
                   {"H_KV": 8, "BLOCK_SIZE": 16, "GROUP": 4, "GROUP_P": 4 if blocked else 16,
                    "BLOCK_M": kv4._block_m(4) if blocked else 1, "BLOCKED": blocked, "D": d, "BLOCK_N": 32,
                    "SPLITS": splits}, {})
        yield (f"kv4 combine D {d}", kv4._kv4_combine_kernel,
               {"part_ptr": "*fp32", "ml_ptr": "*fp32", "o_ptr": "*bf16", "stride_ot": "i32", "stride_oh": "i32"},
               {"H_Q": 32, "SPLITS": 6, "SPLITS_P": 8, "D": d}, {})


_NOT_CONSTEXPR = 3.0


@triton.jit
def _reads_a_plain_global(x_ptr):
    tl.store(x_ptr, _NOT_CONSTEXPR)


def main() -> int:
    failed = 0
    for name, fn, types, consts, opts in cases():
        try:
            kernel = compile_for_gpu(fn, types, consts, **opts)
            if name.startswith("kv_quant_store") and "fma." in kernel.asm["ptx"]:
                raise RuntimeError("fused multiply-adds in the KV quantizer: its codes would differ from "
                                   "calibration's")
            print(f"ok   {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - every failure is listed, then the exit status says it
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''}", flush=True)
    try:  # the check itself must be able to fail
        compile_for_gpu(_reads_a_plain_global, {"x_ptr": "*fp32"}, {})
        print("FAIL a kernel reading a plain global compiled: the check cannot catch that bug")
        failed += 1
    except Exception:  # noqa: BLE001
        print("ok   a kernel reading a plain global is refused")
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
