"""The CPU int8 path (activation codes x weight codes through torch._int_mm) against the float64
product of the same codes and against the serving reference, on fresh random inputs with awkward
shapes (M = 1, 3, 37; K = 576, 1536; N = 70, 1535), asymmetric weights, 8-bit activations, the
online Hadamard and a tensor-parallel input slice; and the path choice with its reasons."""

import pytest
import torch

from rotq.kernels.cpu_int8 import int8_supported, int8_weight_codes, quantized_linear_int8
from rotq.kernels.linear import choose_linear_path, dequantize_packed, quantized_linear, triton_supported
from rotq.kernels.packing import pack_int32
from rotq.quant.hadamard import apply_hadamard
from rotq.quant.quantizer import activation_grid
from rotq.quant.scheme import ActivationArgs, WeightArgs


def _packed(N, K, bits, symmetric, g):
    if symmetric:
        codes = torch.randint(-2 ** (bits - 1), 2 ** (bits - 1), (N, K), generator=g)
        zp = None
    else:
        codes = torch.randint(0, 2**bits, (N, K), generator=g)
        zp = torch.randint(0, 2**bits, (N, 1), generator=g, dtype=torch.int32)
    scale = torch.rand(N, 1, generator=g) * 0.02 + 1e-3
    return pack_int32(codes, bits, signed=symmetric), scale, zp


CASES = [  # M, K, N, weight bits, symmetric, act bits, hadamard, input slice
    (1, 576, 70, 4, True, 4, None, None),
    (3, 1536, 1535, 4, True, 8, 1536, None),
    (37, 576, 96, 4, False, 4, None, None),
    (16, 1536, 64, 8, True, 8, None, slice(768, 1536)),
    (5, 576, 33, 3, False, 4, 576, slice(0, 288)),
]


@pytest.mark.parametrize("M,K,N,bits,symmetric,act_bits,hadamard,input_slice", CASES)
def test_int8_linear_equals_float64_of_the_same_codes(M, K, N, bits, symmetric, act_bits, hadamard, input_slice):
    g = torch.Generator().manual_seed(M * 7 + K + N + bits)
    act = ActivationArgs(bits=act_bits, clip_ratio=0.9)
    x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 3
    packed, scale, zp = _packed(N, K if input_slice is None else input_slice.stop - input_slice.start, bits,
                                symmetric, g)
    bias = torch.randn(N, generator=g)
    codes, row_scale = int8_weight_codes(packed, scale, zp, bits, symmetric)
    out = quantized_linear_int8(x, codes, row_scale, bias, act, hadamard, input_slice)

    rows = apply_hadamard(x, hadamard, exact=False) if hadamard else x
    grid = activation_grid(rows, act)
    a = grid.quantize(rows)
    if input_slice is not None:
        a = a[:, input_slice]
    ref = (a.double() @ codes.double().t()) * grid.scale.double() * row_scale.double() + bias.double()
    assert out.dtype == torch.float32 and out.shape == (M, N)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    # and the serving reference (float32 fake quantization, dequantized weights) agrees
    dq = dequantize_packed(packed, scale, zp, bits, symmetric)
    torch.testing.assert_close(out, quantized_linear(x, dq, bias, act, hadamard, input_slice), rtol=1e-4, atol=1e-4)


def test_int8_linear_keeps_leading_dims_and_dtype():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 576, generator=g).bfloat16()
    packed, scale, _ = _packed(40, 576, 4, True, g)
    codes, row_scale = int8_weight_codes(packed, scale, None, 4, True)
    act = ActivationArgs()
    out = quantized_linear_int8(x, codes, row_scale, None, act, None)
    assert out.shape == (2, 5, 40) and out.dtype == torch.bfloat16
    flat = quantized_linear_int8(x.reshape(10, 576), codes, row_scale, None, act, None)
    assert torch.equal(out.reshape(10, 40), flat)


def test_weight_codes_are_centred_and_int8():
    g = torch.Generator().manual_seed(5)
    packed, scale, zp = _packed(8, 64, 4, False, g)
    codes, row_scale = int8_weight_codes(packed, scale, zp, 4, False)
    assert codes.dtype == torch.int8 and row_scale.shape == (8,)
    torch.testing.assert_close(codes.float() * scale, dequantize_packed(packed, scale, zp, 4, False), rtol=0, atol=0)


@pytest.mark.parametrize("weights,act,reason", [
    (WeightArgs(), None, "16-bit activations"),
    (WeightArgs(), ActivationArgs(symmetric=False), "asymmetric"),
    (WeightArgs(bits=8, symmetric=False), ActivationArgs(), "do not fit int8"),
    (WeightArgs(group_size=128), ActivationArgs(), "groups of 128"),
])
def test_int8_path_says_why_it_does_not_apply(weights, act, reason):
    ok, why = int8_supported(weights, act)
    assert not ok and reason in why
    path = choose_linear_path("cpu", weights, act)
    assert path.name == "dequant" and reason in path.reason


def test_path_choice_by_device():
    w4a4 = (WeightArgs(), ActivationArgs())
    assert choose_linear_path("cpu", *w4a4).name == "int8"
    assert choose_linear_path("cpu", WeightArgs(), ActivationArgs(bits=8)).name == "int8"
    assert choose_linear_path("cuda", *w4a4).name == "triton"
    assert choose_linear_path("cuda", WeightArgs(), None).name == "triton"
    cuda_w3 = choose_linear_path("cuda", WeightArgs(bits=3), ActivationArgs())
    assert cuda_w3.name == "dequant" and "3-bit" in cuda_w3.reason
    assert not triton_supported(WeightArgs(bits=3), None)[0]


@pytest.mark.parametrize("bits,clip", [(4, 0.9), (8, 1.0), (4, 0.75)])
def test_activation_codes_are_the_reference_quantizer(bits, clip):
    from rotq.kernels.cpu_int8 import activation_codes

    g = torch.Generator().manual_seed(bits * 100 + int(clip * 100))
    rows = torch.randn(37, 1536, generator=g) * torch.rand(37, 1, generator=g) * 5
    rows[3] = 0.0
    rows[4] = rows[4].abs()  # one-signed tokens
    rows[5] = -rows[5].abs()
    rows[6, :] = 0.0
    rows[6, 7] = 2.5  # ties: x / scale lands on .5 boundaries for this token
    act = ActivationArgs(bits=bits, clip_ratio=clip)
    codes, scale = activation_codes(rows, act)
    grid = activation_grid(rows, act)
    assert codes.dtype == torch.int8
    assert torch.equal(scale, grid.scale)
    assert torch.equal(codes.float(), grid.quantize(rows))
