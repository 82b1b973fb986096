"""The Triton Hadamard (alone and fused with int4 / int8 quantization) against the PyTorch
transform of calibration, on R3 and R4 sizes (64, 128, 1536 = 12·128, 576 = 36·16,
14336 = 28·512)."""

import pytest
import torch

from rotq.kernels.hadamard import hadamard, hadamard_act_quant
from rotq.kernels.int4_gemm import act_quant, act_quant_reference
from rotq.quant.hadamard import apply_hadamard

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("M,n,width", [(1, 64, 64), (7, 128, 512), (5, 1536, 1536), (3, 576, 576),
                                       (2, 14336, 14336)])
def test_hadamard_matches_reference(M, n, width):
    g = torch.Generator().manual_seed(n + M)
    x = torch.randn(M, width, generator=g)
    out = hadamard(x.to(DEVICE), n).cpu()
    ref = apply_hadamard(x.double(), n)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M,n", [(1, 1536), (7, 64), (37, 576)])
def test_fused_hadamard_quant_equals_the_two_steps(M, n, bits):
    g = torch.Generator().manual_seed(3 * n + M + bits)
    x = (torch.randn(M, n, generator=g) * torch.rand(M, 1, generator=g) * 3).to(DEVICE)
    x[0] = 0.0  # an all-zero token: scale 1, codes 0
    q, s = hadamard_act_quant(x, 0.9, bits)
    y = hadamard(x)
    q2, s2 = act_quant(y, 0.9, bits)
    assert q.dtype == torch.int8 and q.shape == (M, n)
    assert torch.equal(s, s2)
    assert torch.equal(q, q2)
    codes, scale = act_quant_reference(y.cpu(), 0.9, bits)
    assert torch.equal(q.cpu(), codes) and torch.equal(s.cpu(), scale)


def test_sizes_without_a_kernel_are_refused():
    with pytest.raises(ValueError, match="no Hadamard matrix"):
        hadamard(torch.zeros(2, 18), 18)
