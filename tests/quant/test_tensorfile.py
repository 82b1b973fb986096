"""The streaming safetensors writer against safetensors' own reader and writer."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rotq.quant.tensorfile import write_safetensors


def _tensors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 3, generator=g)
    return {
        "f32": torch.randn(3, 577, generator=g),
        "f64": torch.randn(2, 3, generator=g, dtype=torch.float64),
        "bf16": torch.randn(9, generator=g).to(torch.bfloat16),
        "f16": torch.randn(1, 1, 11, generator=g).to(torch.float16),
        "i64": torch.randint(-2**40, 2**40, (4,), generator=g),
        "i8": torch.randint(-8, 8, (6, 5), generator=g, dtype=torch.int8),
        "u8": torch.randint(0, 16, (3,), generator=g, dtype=torch.uint8),
        "bool": torch.rand(5, generator=g) > 0.5,
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "strided": x.transpose(0, 2),  # not contiguous
    }


def test_round_trip_through_safetensors_reader(tmp_path):
    tensors = _tensors()
    write_safetensors(tmp_path / "a.safetensors", tensors, {"k": "v", "n": "1"})
    back = load_file(tmp_path / "a.safetensors")
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name], t), name
    with safe_open(tmp_path / "a.safetensors", framework="pt") as f:
        assert f.metadata() == {"k": "v", "n": "1"}


def test_same_tensors_as_save_file(tmp_path):
    tensors = {k: v.contiguous() for k, v in _tensors().items()}
    write_safetensors(tmp_path / "ours.safetensors", tensors)
    save_file(tensors, tmp_path / "theirs.safetensors")
    ours, theirs = load_file(tmp_path / "ours.safetensors"), load_file(tmp_path / "theirs.safetensors")
    assert all(torch.equal(ours[k], theirs[k]) for k in tensors)
    # same size: the same data and a header of the same kind, padded to 8 bytes
    size = lambda p: p.stat().st_size  # noqa: E731
    assert abs(size(tmp_path / "ours.safetensors") - size(tmp_path / "theirs.safetensors")) < 512


def test_unsupported_dtype_is_refused(tmp_path):
    with pytest.raises(TypeError, match="complex64"):
        write_safetensors(tmp_path / "c.safetensors", {"c": torch.zeros(2, dtype=torch.complex64)})
