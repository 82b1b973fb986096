"""Triton int4 kernels against their float64 / float32 references on fresh random inputs,
awkward shapes included (M = 1, 7, 37; K = 576, 1536; N not a multiple of the block).
On CPU they run under TRITON_INTERPRET=1 (set before triton is imported: see conftest)."""

import pytest
import torch

from rotq.kernels.int4_gemm import (
    act_quant,
    act_quant_reference,
    w4a4_gemm,
    w4a4_gemm_reference,
    w4a16_gemm,
    w4a16_gemm_reference,
)
from rotq.kernels.packing import pack_int4, pack_int32, unpack_int4
from rotq.quant.quantizer import fake_quantize_activation
from rotq.quant.scheme import ActivationArgs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weights(N, K, groups, g):
    codes = torch.randint(-8, 8, (N, K), generator=g)
    scale = torch.rand(N, groups, generator=g) * 0.02 + 1e-3
    return pack_int32(codes, 4, signed=True).to(DEVICE), scale.to(DEVICE)


@pytest.mark.parametrize("M,K", [(1, 576), (7, 1536), (37, 64), (5, 6)])
def test_act_quant_matches_reference_and_calibration(M, K):
    g = torch.Generator().manual_seed(M * K)
    x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 4
    x[0, :3] = 0.0
    if M > 1:
        x[1] = 0.0  # an all-zero token gets scale 1 and codes 0
    q, s = act_quant(x.to(DEVICE), 0.9)
    codes, scale = act_quant_reference(x, 0.9)
    torch.testing.assert_close(s.cpu(), scale, rtol=0, atol=0)
    assert torch.equal(q.cpu(), pack_int4(codes, signed=True))
    # and it is exactly the calibration's simulated quantizer
    fake = fake_quantize_activation(x, ActivationArgs(bits=4, clip_ratio=0.9))
    torch.testing.assert_close(unpack_int4(q.cpu(), signed=True).float() * s.cpu()[:, None], fake, rtol=0, atol=0)


@pytest.mark.parametrize("M,N,K,groups", [(1, 100, 576, 1), (7, 192, 1536, 1), (37, 70, 576, 9),
                                          (16, 64, 256, 2)])
def test_w4a4_gemm_matches_float64(M, N, K, groups):
    g = torch.Generator().manual_seed(M + N + K)
    x = torch.randn(M, K, generator=g)
    a, s = act_quant(x.to(DEVICE), 0.9)
    w, ws = _weights(N, K, groups, g)
    out = w4a4_gemm(a, s, w, ws, out_dtype=torch.float32)
    ref = w4a4_gemm_reference(a.cpu(), s.cpu(), w.cpu(), ws.cpu())
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("M,N,K,groups", [(1, 100, 576, 1), (7, 192, 1536, 12), (37, 70, 576, 1)])
def test_w4a16_gemm_matches_float64(M, N, K, groups):
    g = torch.Generator().manual_seed(M * 3 + N + K)
    x = torch.randn(M, K, generator=g)
    w, ws = _weights(N, K, groups, g)
    out = w4a16_gemm(x.to(DEVICE), w, ws)
    ref = w4a16_gemm_reference(x, w.cpu(), ws.cpu())
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("act,hadamard", [(ActivationArgs(bits=4, clip_ratio=0.9), 1536), (None, None),
                                          (ActivationArgs(bits=4, clip_ratio=1.0), None)])
def test_triton_linear_equals_the_serving_reference(act, hadamard):
    """The CUDA serving path (Triton kernels on packed weights) = the CPU path (PyTorch reference on
    dequantized weights) = the calibration's simulated linear."""
    from rotq.kernels.linear import dequantize_packed, quantized_linear, quantized_linear_triton

    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 7, 1536, generator=g)
    w, ws = _weights(96, 1536, 1, g)
    bias = torch.randn(96, generator=g).to(DEVICE)
    ref = quantized_linear(x, dequantize_packed(w.cpu(), ws.cpu(), None, 4, True), bias.cpu(), act, hadamard)
    out = quantized_linear_triton(x.to(DEVICE), w, ws, bias, act, hadamard)
    assert out.shape == ref.shape
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)
