"""The packed layouts: int32 round trips and byte identity with compressed-tensors; the kernels'
two-codes-per-byte int4 layout and its agreement with the int32 words' nibble order."""

import pytest
import torch

from rotq.kernels.packing import pack_int4, pack_int32, unpack_int4, unpack_int32


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


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(1, 2), (7, 576), (3, 5, 64), (0, 8)])
def test_int4_round_trip(signed, shape):
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = torch.randint(lo, hi, shape)
    packed = pack_int4(codes, signed)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] // 2)
    out = unpack_int4(packed, signed)
    assert out.dtype == (torch.int8 if signed else torch.uint8)
    assert torch.equal(out.long(), codes)


def test_int4_layout():
    # element 2j in the low nibble, 2j + 1 in the high one; signed codes as q + 8 (uint4b8)
    assert pack_int4(torch.tensor([[3, 12, 0, 15]]), signed=False).tolist() == [[0xC3, 0xF0]]
    assert pack_int4(torch.tensor([[-8, 7, 0, -1]]), signed=True).tolist() == [[0xF0, 0x78]]


@pytest.mark.parametrize("signed", [True, False])
def test_int4_bytes_are_the_int32_words_bytes(signed):
    """The kernels' activation / KV bytes and the weights' int32 words order nibbles alike: the
    little-endian bytes of pack_int32(codes, 4) are pack_int4(codes)."""
    codes = torch.randint(-8, 8, (5, 64)) if signed else torch.randint(0, 16, (5, 64))
    words = pack_int32(codes, 4, signed)
    as_bytes = words.numpy().astype("<i4").view("u1").reshape(5, 32)
    assert torch.equal(torch.from_numpy(as_bytes.copy()), pack_int4(codes, signed))


def test_int4_needs_an_even_width():
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 5, dtype=torch.int8), True)
