"""Compile every Triton kernel for a real GPU (Hopper, sm_90) with the tile configurations and
constants that production launches use; prints one line per case and exits 1 on any failure.
Pointer and stride arguments that production passes 16-aligned are compiled as such (Triton
specializes on it at launch), so the PTX is the one that runs; the GEMM cases then assert on it
what the int8 main loop is designed to be (see ``check_int8_loop``).

Run by tests/kernels/test_cuda_compile.py in a subprocess without TRITON_INTERPRET (under the
interpreter, @triton.jit yields functions the compiler cannot take). Compiling to a cubin needs
no GPU, only Triton's bundled ptxas.

    python tests/kernels/gpu_compile.py
"""

from __future__ import annotations

import os
import re
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


def compile_for_gpu(fn, types: dict, constexprs: dict, aligned=(), **options):
    """A cubin for ``fn`` (a JIT function) with argument ``types`` and ``constexprs``; the
    arguments named in ``aligned`` are multiples of 16 (as Triton specializes them at launch)."""
    signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
    missing = [n for n, t in signature.items() if t == "constexpr" and n not in constexprs]
    if missing:
        raise ValueError(f"no value for constexpr arguments {missing}")
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned if n in fn.arg_names}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=HOPPER, options=options)
    if not kernel.asm["cubin"]:
        raise RuntimeError("empty cubin")
    return kernel


def _ints(*names):
    return {n: "i32" for n in names}


GEMM_INTS = _ints("M", "N", "K", "stride_a", "stride_x", "stride_w", "stride_ws", "stride_c")
# 16-aligned at launch for Llama-shaped layers (torch allocations, N and K multiples of 16)
GEMM_ALIGNED = ("a_ptr", "x_ptr", "w_ptr", "c_ptr", "as_ptr", "ws_ptr", "N", "K", "stride_a", "stride_x", "stride_w",
                "stride_c")
KV_INTS = _ints("stride_kt", "stride_kh", "stride_vt", "stride_vh", "stride_page", "stride_qt", "stride_qh",
                "stride_bt", "stride_ot", "stride_oh")


def cases():
    """(name, kernel, argument types, constexprs, compile options) for every production variant."""
    for x in ("*bf16", "*fp16", "*fp32"):
        for bits in (4, 8):
            yield (f"act_quant {x} {bits}-bit", int4_gemm._act_quant_kernel,
                   {"x_ptr": x, "q_ptr": "*i8", "s_ptr": "*fp32", **_ints("K", "stride_x", "stride_q"), "clip": "fp32"},
                   {"QMAX": int4_gemm.act_qmax(bits), "BLOCK": 4096}, {"num_warps": 8})
    # the plans of Llama-3-8B's q/k/v projection (N 6144, K 4096) at each M bucket, split K where
    # production splits it, per channel and grouped (groups of 128; and BLOCK_K 64 for groups of 64)
    for M in (1, 16, 32, 64, 2048):
        for group in (4096, 128, 64):
            plan = int4_gemm.gemm_plan(M, 6144, 4096, group, "cpu")
            tiles = {"BLOCK_M": plan.BLOCK_M, "BLOCK_N": plan.BLOCK_N, "BLOCK_K": plan.BLOCK_K}
            opts = {"num_warps": plan.num_warps, "num_stages": plan.num_stages, "aligned": GEMM_ALIGNED}
            grouped = group < 4096
            for atomic in sorted({False, plan.split > 1}):
                out = "*fp32" if atomic else "*bf16"
                yield (f"int8_act_gemm M {M} {tiles} group {group} split {plan.split if atomic else 1}",
                       int4_gemm._int8_act_kernel,
                       {"a_ptr": "*i8", "as_ptr": "*fp32", "w_ptr": "*i8", "ws_ptr": "*fp32", "c_ptr": out,
                        "split": "i32", **GEMM_INTS},
                       {**tiles, "GROUP": group, "GROUPED": grouped, "ATOMIC": atomic, "ASM": True}, opts)
            if group == 64:
                continue
            for x in ("*bf16", "*fp16", "*fp32"):
                yield (f"w4a16_gemm M {M} {tiles} group {group} {x}", int4_gemm._w4a16_kernel,
                       {"x_ptr": x, "w_ptr": "*i8", "ws_ptr": "*fp32", "c_ptr": x, **GEMM_INTS},
                       {**tiles, "GROUP": group, "PRECISION": "ieee" if x == "*fp32" else "tf32", "ASM": True}, opts)
    for n in (64, 128, 576, 1536, 14336):
        k, p, kp, at = hk.plan(n, "cpu")
        consts = {"KP": kp, "P": p, "LOG_P": p.bit_length() - 1, "HAS_A": at is not None}
        warps = {"num_warps": hk.num_warps(kp * p)}
        common = {"at_ptr": "*fp32", "K": "i32", "stride_x": "i32", "inv_sqrt_n": "fp32"}
        yield (f"hadamard {n}", hk._hadamard_kernel,
               {"x_ptr": "*bf16", "y_ptr": "*bf16", "stride_y": "i32", **common}, consts, warps)
        for bits in (4, 8):
            yield (f"hadamard_act_quant {n} {bits}-bit", hk._hadamard_quant_kernel,
                   {"x_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp32", "stride_q": "i32", "clip": "fp32", **common},
                   {**consts, "QMAX": int4_gemm.act_qmax(bits)}, warps)
    for d in (64, 128):
        for symmetric in (False, True):
            yield (f"kv_quant_store D {d} symmetric {symmetric}", kv4._kv_store_kernel,
                   {"k_ptr": "*bf16", "v_ptr": "*bf16", "cache_ptr": "*u8", "scale_ptr": "*fp32",
                    "slot_ptr": "*i64", "clip": "fp32", **KV_INTS},
                   {"H": 8, "BLOCK_SIZE": 16, "D": d, "SYMMETRIC": symmetric}, kv4.EXACT_FLOAT)
        # without a prefix, then with one of 5 tokens in bfloat16 and of 33 in float32 (full-precision
        # prefix tiles of 16 and 64)
        for h_kv, group, splits, prefix, p in ((8, 4, 1, "*bf16", 0), (8, 4, 33, "*bf16", 0), (4, 7, 8, "*bf16", 0),
                                               (32, 1, 1, "*bf16", 0), (8, 4, 1, "*bf16", 5), (8, 4, 33, "*fp32", 33)):
            tiles = kv4.decode_tiles(8192, splits)  # both production shapes: 128-token tiles at 33 splits
            yield (f"kv4_decode D {d} group {group} splits {splits} {tiles}" + (f" prefix {p} {prefix}" if p else ""),
                   kv4._kv4_decode_kernel,
                   {"q_ptr": "*bf16", "cache_ptr": "*u8", "scale_ptr": "*fp32", "bt_ptr": "*i32", "len_ptr": "*i32",
                    "pk_ptr": prefix, "pv_ptr": prefix, "o_ptr": "*bf16", "part_ptr": "*fp32", "ml_ptr": "*fp32",
                    "softmax_scale": "fp32", **KV_INTS},
                   {"H_KV": h_kv, "BLOCK_SIZE": 16, "GROUP": group, "GROUP_P": 16, "D": d,
                    "BLOCK_N": tiles.block_n, "SPLITS": splits, "P": p, "BLOCK_P": kv4._prefix_block(p)},
                   {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages})
        yield (f"kv4 combine D {d}", kv4._kv4_combine_kernel,
               {"part_ptr": "*fp32", "ml_ptr": "*fp32", "o_ptr": "*bf16", "stride_ot": "i32", "stride_oh": "i32"},
               {"H_Q": 32, "SPLITS": 33, "SPLITS_P": 64, "D": d}, {})
        # prefix tiles smaller than (16) and as large as (64) the gather's
        for prefix, p in (("*bf16", 0), ("*bf16", 5), ("*fp32", 33)):
            yield (f"kv4_gather D {d}" + (f" prefix {p} {prefix}" if p else ""), kv4._kv4_gather_kernel,
                   {"cache_ptr": "*u8", "scale_ptr": "*fp32", "bt_ptr": "*i32", "len_ptr": "*i32",
                    "start_ptr": "*i32", "pk_ptr": prefix, "pv_ptr": prefix, "k_ptr": "*bf16", "v_ptr": "*bf16",
                    "stride_sh": "i32", **KV_INTS},
                   {"H_KV": 8, "BLOCK_SIZE": 16, "D": d, "BLOCK_N": kv4._GATHER_N, "P": p,
                    "BLOCK_P": kv4._prefix_block(p)}, {})
    from rotq.kernels import fused  # the quantizers fused with the op before them
    for x in ("*bf16", "*fp16", "*fp32"):
        for residual, weight in ((False, False), (True, False), (True, True)):
            yield (f"rmsnorm_act_quant {x} residual {residual} weight {weight}", fused._rmsnorm_quant_kernel,
                   {"x_ptr": x, "r_ptr": x, "h_ptr": x, "w_ptr": x, "q_ptr": "*i8", "s_ptr": "*fp32", "eps": "fp32",
                    "clip": "fp32", **_ints("K", "stride_x", "stride_r", "stride_h", "stride_q")},
                   {"HAS_RESIDUAL": residual, "HAS_WEIGHT": weight, "QMAX": 7, "BLOCK": 4096},
                   {"num_warps": hk.num_warps(4096)})
    for n in (1408, 1536, 14336):
        k, p, kp, at = hk.plan(n, "cpu")
        for bits in (4, 8):
            yield (f"silu_mul_hadamard_act_quant {n} {bits}-bit", fused._silu_mul_hadamard_quant_kernel,
                   {"x_ptr": "*bf16", "q_ptr": "*i8", "s_ptr": "*fp32", "at_ptr": "*fp32", "inv_sqrt_n": "fp32",
                    "clip": "fp32", **_ints("K", "stride_x", "stride_q")},
                   {"KP": kp, "P": p, "LOG_P": p.bit_length() - 1, "HAS_A": at is not None,
                    "QMAX": int4_gemm.act_qmax(bits)}, {"num_warps": hk.num_warps(kp * p)})
    for d in (64, 128):
        for symmetric in (False, True):
            yield (f"rope_hadamard_kv_store D {d} symmetric {symmetric}", fused._rope_r3_kv_store_kernel,
                   {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "o_ptr": "*bf16", "pos_ptr": "*i64",
                    "cs_ptr": "*bf16", "cache_ptr": "*u8", "scale_ptr": "*fp32", "slot_ptr": "*i64",
                    "inv_sqrt_n": "fp32", "clip": "fp32", "stride_cs": "i32", **KV_INTS},
                   {"H_Q": 32, "H": 8, "BLOCK_SIZE": 16, "D": d, "LOG_D": d.bit_length() - 1,
                    "SYMMETRIC": symmetric}, kv4.EXACT_FLOAT)


def main_loop(ptx: str) -> str:
    """The PTX of the kernel's innermost loop (from its header label to the branch back to it)."""
    lines = ptx.splitlines()
    heads = [i for i, line in enumerate(lines) if "Inner Loop Header" in line]
    if len(heads) != 1:
        raise RuntimeError(f"expected one inner loop in the GEMM, found {len(heads)}")
    label = lines[heads[0]].split(":")[0]
    back = [i for i, line in enumerate(lines) if re.search(rf"\bbra(\.uni)?\s+{re.escape(label)};", line)]
    return "\n".join(lines[heads[0]:max(back) + 1])


# wgmma with its A operand (the weights: C^T = W A^T) in registers: {accumulators}, {A registers}, B descriptor
_WGMMA_REG_A = r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k\d+\.{}\s+\{{[^}}]*\}},\s*\{{[^}}]*\}},\s*%rd"


def check_int8_loop(name: str, ptx: str) -> None:
    """What the GEMMs' design needs, on their PTX for sm_90: Hopper's MMA (wgmma; int8 ×
    int8 → int32 for int8_act_gemm, 16-bit × 16-bit → float32 for w4a16_gemm) with the unpacked
    weights as its register operand; loads pipelined with cp.async; no st.shared in the main loop
    but, for grouped weights, one 32-bit store (the group scales' change of layout: the weight tile
    itself never returns to shared memory); split K adds its float32 partials with red.global."""
    kind = "s32\\.s8\\.s8" if name.startswith("int8_act_gemm") else "f32\\.(bf16\\.bf16|f16\\.f16)"
    if not re.search(_WGMMA_REG_A.format(kind), ptx):
        mma = sorted(set(re.findall(r"(?:wgmma\.mma_async|mma\.sync)[\w.]*", ptx)))
        raise RuntimeError(f"no wgmma {kind} with the weights in registers; MMAs: {mma}")
    if "cp.async.cg.shared.global" not in ptx and "cp.async.ca.shared.global" not in ptx:
        raise RuntimeError("the main loop's loads are not pipelined (no cp.async)")
    stores = re.findall(r"st\.shared[\w.]*", main_loop(ptx))
    allowed = ["st.shared.b32"] if "group 4096 " not in name else []
    if stores and stores != allowed:
        raise RuntimeError(f"stores to shared memory in the main loop: {stores}")
    split = re.search(r"split (\d+)$", name)
    if split and int(split.group(1)) > 1 and not re.search(r"(red|atom)\.global[\w.]*\.add[\w.]*f32", ptx):
        raise RuntimeError("split K without float32 atomic adds")


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
            if name.startswith("int8_act_gemm") or (name.startswith("w4a16_gemm") and not name.endswith("*fp32")):
                check_int8_loop(name, kernel.asm["ptx"])
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
