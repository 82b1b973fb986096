"""Triton int4 kernels against their float64 / float32 references on fresh random inputs,
awkward shapes included (M = 1, 3, 7, 16, 37; K = 576, 1536; N not a multiple of the block;
grouped weights; split K). On CPU they run under TRITON_INTERPRET=1 (set before triton is
imported: see conftest)."""

import pytest
import torch

from rotq.kernels import int4_gemm
from rotq.kernels.int4_gemm import (
    act_quant,
    act_quant_reference,
    gemm_plan,
    int8_act_gemm,
    int8_act_gemm_reference,
    int8_loop_block_k,
    repack_weights_for_int8_loop,
    unpack_int8_loop_weights,
    w4a16_gemm,
    w4a16_gemm_reference,
)
from rotq.kernels.packing import pack_int32
from rotq.quant.quantizer import fake_quantize_activation
from rotq.quant.scheme import ActivationArgs, WeightArgs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weights(N, K, groups, g):
    """(int32-packed codes as in the checkpoint, repacked codes, scales [N, groups], codes)."""
    codes = torch.randint(-8, 8, (N, K), generator=g)
    scale = torch.rand(N, groups, generator=g) * 0.02 + 1e-3
    packed = pack_int32(codes, 4, signed=True).to(DEVICE)
    return packed, repack_weights_for_int8_loop(packed, groups), scale.to(DEVICE), codes


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M,K", [(1, 576), (7, 1536), (37, 64), (5, 6)])
def test_act_quant_matches_reference_and_calibration(M, K, bits):
    g = torch.Generator().manual_seed(M * K + bits)
    x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 4
    x[0, :3] = 0.0
    if M > 1:
        x[1] = 0.0  # an all-zero token gets scale 1 and codes 0
    q, s = act_quant(x.to(DEVICE), 0.9, bits)
    codes, scale = act_quant_reference(x, 0.9, bits)
    assert q.dtype == torch.int8 and q.shape == (M, K)
    torch.testing.assert_close(s.cpu(), scale, rtol=0, atol=0)
    assert torch.equal(q.cpu(), codes)
    assert int(q.min()) >= -2 ** (bits - 1) and int(q.max()) <= 2 ** (bits - 1) - 1
    # and it is exactly the calibration's simulated quantizer
    fake = fake_quantize_activation(x, ActivationArgs(bits=bits, clip_ratio=0.9))
    torch.testing.assert_close(q.cpu().float() * s.cpu()[:, None], fake, rtol=0, atol=0)


def test_act_quant_refuses_other_widths():
    with pytest.raises(ValueError, match="4 or 8 bits"):
        act_quant(torch.zeros(2, 64, device=DEVICE), 0.9, bits=6)


@pytest.mark.parametrize("N,K,groups", [(70, 576, 1), (3, 1536, 12), (5, 256, 8), (4, 96, 1)])
def test_repack_round_trips(N, K, groups):
    g = torch.Generator().manual_seed(N + K + groups)
    _, w, _, codes = _weights(N, K, groups, g)
    bk = int8_loop_block_k(K, K // groups)
    assert w.dtype == torch.int8 and w.shape == (N, K // 2)
    assert torch.equal(unpack_int8_loop_weights(w.cpu(), bk), codes.to(torch.int8))
    # byte j of a tile: code j in the low nibble, code j + bk/2 in the high one, two's complement
    byte = int(w[0, 0]) & 0xFF
    lo, hi = byte & 0xF, byte >> 4
    assert (lo - 16 if lo >= 8 else lo, hi - 16 if hi >= 8 else hi) == (int(codes[0, 0]), int(codes[0, bk // 2]))


def _run_ptx(asm: str, word: int) -> int:
    """The 32-bit PTX of the GPU path's nibble unpacking, executed instruction by instruction."""
    ops = {"and.b32": lambda a, b: a & b, "xor.b32": lambda a, b: a ^ b, "sub.u32": lambda a, b: a - b,
           "shr.u32": lambda a, b: a >> b}
    regs = {"$1": word}
    for ins in asm.strip("{} ").split(";"):
        ins = ins.strip()
        if not ins or ins.startswith(".reg"):
            continue
        op, args = ins.split(None, 1)
        dst, a, b = (x.strip() for x in args.split(","))
        regs[dst] = ops[op](regs[a], regs[b] if b in regs else int(b, 0)) & 0xFFFFFFFF
    return regs["$0"]


def test_gpu_nibble_unpacking_equals_arithmetic_shifts():
    """Every byte value in every lane of a 32-bit word: the inline PTX that GPUs run gives the
    sign-extended nibbles that the interpreter's shifts give."""
    b = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(torch.int8)
    lo, hi = ((b << 4) >> 4), b >> 4
    for lane in range(4):
        for asm, want in ((int4_gemm._LOW_NIBBLES.value, lo), (int4_gemm._HIGH_NIBBLES.value, hi)):
            words = [(int(v) & 0xFF) << (8 * lane) | (0x5A << (8 * ((lane + 1) % 4))) for v in b]
            got = torch.tensor([(_run_ptx(asm, w) >> (8 * lane)) & 0xFF for w in words]).to(torch.uint8)
            assert torch.equal(got.view(torch.int8), want)


def test_layout_refuses_k_without_a_tile():
    with pytest.raises(ValueError, match="multiples of 32"):
        repack_weights_for_int8_loop(pack_int32(torch.zeros(2, 48, dtype=torch.int32), 4, signed=True))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M,N,K,groups", [(1, 100, 576, 1), (3, 192, 1536, 12), (7, 1535, 576, 1),
                                          (16, 70, 1536, 1), (37, 70, 576, 9), (130, 64, 256, 2)])
def test_int8_act_gemm_matches_float64(M, N, K, groups, bits):
    g = torch.Generator().manual_seed(M + N + K + bits)
    x = torch.randn(M, K, generator=g)
    a, s = act_quant(x.to(DEVICE), 0.9, bits)
    _, w, ws, _ = _weights(N, K, groups, g)
    out = int8_act_gemm(a, s, w, ws, out_dtype=torch.float32)
    ref = int8_act_gemm_reference(a.cpu(), s.cpu(), w.cpu(), ws.cpu())
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M,N,K,groups", [(1, 70, 576, 1), (3, 192, 1536, 12), (16, 100, 1536, 1)])
def test_decode_split_k(M, N, K, groups):
    """M ≤ 16 on a grid of a few tiles splits K (atomic float32 partials), to half precision out."""
    assert gemm_plan(M, N, K, K // groups, DEVICE).split > 1
    g = torch.Generator().manual_seed(7 * M + N)
    a, s = act_quant(torch.randn(M, K, generator=g).to(DEVICE), 0.9)
    _, w, ws, _ = _weights(N, K, groups, g)
    ref = int8_act_gemm_reference(a.cpu(), s.cpu(), w.cpu(), ws.cpu())
    out = int8_act_gemm(a, s, w, ws, out_dtype=torch.float32)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)
    half = int8_act_gemm(a, s, w, ws, out_dtype=torch.float16)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.cpu().double(), ref, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("N,K", [(4096, 4096), (14336, 4096), (4096, 14336), (6144, 4096)])
def test_decode_plans_fill_the_gpu(N, K):
    """Llama-3-8B shapes at M ≤ 16: at least two programs per SM of an H100/H200 (132 SMs)."""
    plan = gemm_plan(16, N, K, K, "cpu")
    assert plan.BLOCK_K == 128
    assert -(-N // plan.BLOCK_N) * plan.split >= 2 * 132


def test_int8_act_gemm_refuses_unpacked_weights():
    g = torch.Generator().manual_seed(0)
    packed, _, ws, _ = _weights(64, 256, 1, g)
    a, s = act_quant(torch.randn(2, 256).to(DEVICE), 0.9)
    with pytest.raises(ValueError, match="repack_weights_for_int8_loop"):
        int8_act_gemm(a, s, packed, ws)


@pytest.mark.parametrize("M,N,K,groups", [(1, 100, 576, 1), (7, 192, 1536, 12), (37, 70, 576, 1)])
def test_w4a16_gemm_matches_float64(M, N, K, groups):
    g = torch.Generator().manual_seed(M * 3 + N + K)
    x = torch.randn(M, K, generator=g)
    _, w, ws, _ = _weights(N, K, groups, g)
    out = w4a16_gemm(x.to(DEVICE), w, ws)
    ref = w4a16_gemm_reference(x, w.cpu(), ws.cpu())
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act,hadamard,groups", [(ActivationArgs(bits=4, clip_ratio=0.9), 1536, 1), (None, None, 1),
                                                 (ActivationArgs(bits=4, clip_ratio=1.0), None, 12),
                                                 (ActivationArgs(bits=8, clip_ratio=0.9), 1536, 1),
                                                 (ActivationArgs(bits=8, clip_ratio=1.0), None, 12)])
def test_triton_linear_equals_the_serving_reference(act, hadamard, groups):
    """The CUDA serving path (Triton kernels on repacked weights) = the CPU path (PyTorch reference on
    dequantized weights) = the calibration's simulated linear, W4A4 and W4A8."""
    from rotq.kernels.linear import dequantize_packed, prepare_triton_weights, quantized_linear, quantized_linear_triton

    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 7, 1536, generator=g)
    packed, _, ws, _ = _weights(96, 1536, groups, g)
    bias = torch.randn(96, generator=g).to(DEVICE)
    ref = quantized_linear(x, dequantize_packed(packed.cpu(), ws.cpu(), None, 4, True), bias.cpu(), act, hadamard)
    out = quantized_linear_triton(x.to(DEVICE), prepare_triton_weights(packed, ws), bias, act, hadamard)
    assert out.shape == ref.shape
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)


def test_triton_linear_input_slice():
    """Tensor parallelism: codes and scales of the full row, this rank's columns of the int8 codes."""
    from rotq.kernels.linear import dequantize_packed, prepare_triton_weights, quantized_linear, quantized_linear_triton

    g = torch.Generator().manual_seed(5)
    act = ActivationArgs(bits=4, clip_ratio=0.9)
    x = torch.randn(5, 1536, generator=g)
    cols = slice(768, 1536)
    packed, _, ws, _ = _weights(64, 768, 1, g)
    ref = quantized_linear(x, dequantize_packed(packed.cpu(), ws.cpu(), None, 4, True), None, act, 1536, cols)
    out = quantized_linear_triton(x.to(DEVICE), prepare_triton_weights(packed, ws), None, act, 1536, cols)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)


def test_triton_supports_w4a8():
    from rotq.kernels.linear import triton_supported

    assert triton_supported(WeightArgs(bits=4), ActivationArgs(bits=8))[0]
    assert triton_supported(WeightArgs(bits=4, group_size=128), ActivationArgs(bits=4))[0]
    ok, reason = triton_supported(WeightArgs(bits=4), ActivationArgs(bits=6))
    assert not ok and "4/8-bit symmetric" in reason
    assert not triton_supported(WeightArgs(bits=4), ActivationArgs(bits=8, symmetric=False))[0]
