"""Tests for rotq.quant.hadamard: constructions are exact Hadamard, the fast transform
matches the dense product, and unsupported sizes fail with a helpful message."""

import math

import pytest
import torch

from rotq.quant.hadamard import (
    apply_hadamard,
    hadamard_matrix,
    is_hadamard_size,
    random_hadamard_matrix,
)

SIZES = [1, 2, 4, 12, 20, 28, 36, 40, 44, 60, 64, 108, 140, 576, 1536]
FAST_SIZES = [12, 20, 28, 36, 40, 64, 576, 1536, 2304]
BAD_SIZES = [9, 52, 172, 11008, 3]


@pytest.mark.parametrize("n", SIZES)
def test_orthogonality_exact(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert torch.equal(h.abs(), torch.ones(n, n, dtype=torch.float64))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_large_sizes_supported():
    for n in [4096, 14336, 128]:
        assert is_hadamard_size(n)
    h = hadamard_matrix(4096, dtype=torch.float32)
    assert h.dtype == torch.float32 and h.shape == (4096, 4096)


def test_cached_copy_is_independent():
    h = hadamard_matrix(12)
    h.zero_()
    assert hadamard_matrix(12).abs().sum() == 144


@pytest.mark.parametrize("n", FAST_SIZES)
@pytest.mark.parametrize("shape", [(7,), (2, 3)])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_fast_matches_dense(n, shape, dtype, atol):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(*shape, n, generator=g, dtype=torch.float64).to(dtype)
    dense = x @ (hadamard_matrix(n, dtype=dtype) / math.sqrt(n))
    out = apply_hadamard(x)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, dense, atol=atol, rtol=0)


@pytest.mark.parametrize("n", [12, 576, 1536, 2 ** 12])
def test_inexact_transform_is_within_float32_rounding(n):
    """``exact=False`` (the CPU serving path) computes in float32: within a few float32 ulps of the
    float64 transform, which stays the default."""
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n + 1))
    fast, exact = apply_hadamard(x, exact=False), apply_hadamard(x)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast, exact, rtol=0, atol=2e-6 * float(exact.abs().max()))


@pytest.mark.parametrize("n,width", [(16, 16), (128, 128), (576, 576), (1536, 1536), (64, 256), (2 ** 15, 2 ** 15)])
def test_a_row_does_not_depend_on_its_batch(n, width):
    """Serving transforms one decode token at a time, calibration whole prompts: a row's result
    must be the same bits either way (a float32 BLAS sums in a batch-dependent order)."""
    x = torch.randn(9, width, generator=torch.Generator().manual_seed(n))
    batch = apply_hadamard(x, n)
    assert batch.dtype == torch.float32
    assert torch.equal(torch.cat([apply_hadamard(x[i:i + 1], n) for i in range(9)]), batch)
    assert torch.equal(apply_hadamard(x[2:7], n), batch[2:7])


def test_block_diagonal():
    x = torch.randn(5, 576, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    block = torch.block_diag(*([hadamard_matrix(64) / 8] * 9))
    torch.testing.assert_close(apply_hadamard(x, 64), x @ block, atol=1e-10, rtol=0)


@pytest.mark.parametrize("n", [12, 28, 36, 64, 576])
def test_inverse_by_transpose(n):
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = hadamard_matrix(n) / math.sqrt(n)
    torch.testing.assert_close(apply_hadamard(x) @ h.T, x, atol=1e-10, rtol=0)


@pytest.mark.parametrize("n", [12, 20, 64, 576])
def test_random_hadamard(n):
    m = random_hadamard_matrix(n, seed=3)
    torch.testing.assert_close(m @ m.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(m, random_hadamard_matrix(n, seed=3))
    assert not torch.equal(m, random_hadamard_matrix(n, seed=4))
    assert random_hadamard_matrix(n, seed=3, dtype=torch.float32).dtype == torch.float32


@pytest.mark.parametrize("n", BAD_SIZES)
def test_unsupported_sizes(n):
    assert not is_hadamard_size(n)
    with pytest.raises(ValueError, match=str(n)) as err:
        hadamard_matrix(n)
    assert "2^m" in str(err.value)
    with pytest.raises(ValueError, match=str(n)):
        apply_hadamard(torch.zeros(2, n))


def test_apply_size_not_dividing_width():
    with pytest.raises(ValueError, match="64"):
        apply_hadamard(torch.zeros(2, 96), 64)


@pytest.mark.parametrize("n", SIZES + FAST_SIZES + [4096, 14336])
def test_is_hadamard_size_supported(n):
    assert is_hadamard_size(n)


@pytest.mark.parametrize("n", [0, -4, 6, 10, 18])
def test_is_hadamard_size_rejects(n):
    assert not is_hadamard_size(n)


def test_apply_hadamard_traces_under_torch_compile_once_prepared():
    """vLLM compiles the model: the Paley factor must be built before tracing, whose fake
    tensors cannot run the construction's exactness check (this failed `rotq serve` for W4A4)."""
    from rotq.quant import hadamard as hm

    hm._FACTORS.clear()
    x = torch.randn(3, 1536)
    traced = torch.compile(lambda t: hm.apply_hadamard(t, 1536), backend="eager", fullgraph=True)
    with pytest.raises(Exception):
        traced(x)  # the factor of 12 built inside the trace
    torch._dynamo.reset()
    hm._FACTORS.clear()
    hm.prepare_hadamard(1536)
    traced = torch.compile(lambda t: hm.apply_hadamard(t, 1536), backend="eager", fullgraph=True)
    torch.testing.assert_close(traced(x), hm.apply_hadamard(x, 1536), rtol=0, atol=0)
