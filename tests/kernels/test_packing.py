"""The packed int32 layout: round trips, and byte identity with compressed-tensors."""

import pytest
import torch

from rotq.kernels.packing import pack_int32, unpack_int32


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(1, 8), (7, 576), (3, 5, 64)])
def test_round_trip(bits, signed, shape):
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1)) if signed else (0, 2**bits)
    codes = torch.randint(lo, hi, shape)
    assert torch.equal(unpack_int32(pack_int32(codes, bits, signed), bits, signed), codes.int())


@pytest.mark.parametrize("bits", [4, 8])
def test_identical_to_compressed_tensors(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    codes = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (37, 1536), dtype=torch.int8)
    assert torch.equal(pack_int32(codes, bits, signed=True), helpers.pack_to_int32(codes, bits))


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int32(torch.zeros(2, 12), 4, True)
    with pytest.raises(ValueError, match="range"):
        pack_int32(torch.full((1, 8), 8), 4, True)
    with pytest.raises(ValueError, match="2..8-bit"):
        pack_int32(torch.zeros(1, 8), 16, True)
