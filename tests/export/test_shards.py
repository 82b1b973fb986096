"""The streaming safetensors writer of export/checkpoint.py against safetensors' own reader."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from rotq.export.checkpoint import _write_shards, shard_bytes


def _tensors(g):
    return [
        ("a.bf16", torch.randn(33, 7, generator=g).to(torch.bfloat16)),
        ("b.f32", torch.randn(576, 3, generator=g)),
        ("c.i32", torch.randint(-2**31, 2**31 - 1, (5, 11), generator=g, dtype=torch.int32)),
        ("d.u8", torch.randint(0, 256, (13,), generator=g, dtype=torch.uint8)),
        ("e.i8", torch.randint(-128, 128, (3, 1, 5), generator=g, dtype=torch.int8)),
        ("f.scalar", torch.tensor(3.25, dtype=torch.float64)),
        ("g.empty", torch.zeros(0, 4)),
        ("h.i64", torch.arange(9, dtype=torch.int64).reshape(3, 3)),
        ("i.view", torch.randn(8, 8, generator=g).T),  # not contiguous
        ("j.f16", torch.randn(1536, generator=g).half()),
        ("k.bool", torch.rand(17, generator=g) > 0.5),
    ]


@pytest.mark.parametrize("limit", ["1MB", "4KB", "1KB"])
def test_shards_read_back_exactly_with_safetensors(tmp_path, limit):
    tensors = _tensors(torch.Generator().manual_seed(0))
    _write_shards(iter(tensors), tmp_path, shard_bytes(limit))
    index = tmp_path / "model.safetensors.index.json"
    if limit == "1MB":
        assert not index.exists()
        files = {name: "model.safetensors" for name, _ in tensors}
    else:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = weight_map
        assert len(set(weight_map.values())) > 1 and sorted(weight_map) == sorted(n for n, _ in tensors)
        for part in set(weight_map.values()):  # no shard over the limit unless one tensor alone is
            with safe_open(tmp_path / part, "pt") as f:
                sizes = [f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()]
            assert sum(sizes) <= shard_bytes(limit) or len(sizes) == 1
    loaded = {}
    for part in set(files.values()):
        loaded.update(load_file(tmp_path / part))
        with safe_open(tmp_path / part, "pt") as f:
            assert f.metadata() == {"format": "pt"}
    for name, t in tensors:
        assert loaded[name].dtype == t.dtype and loaded[name].shape == t.shape
        assert torch.equal(loaded[name], t), name
    assert not list(tmp_path.glob("*.data")) and not list(tmp_path.glob("part-*"))


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("200KB", 200_000), ("1GiB", 2**30), (" 3 mib", 3 << 20)])
def test_shard_sizes(text, expected):
    assert shard_bytes(text) == expected


def test_bad_shard_size():
    with pytest.raises(ValueError, match="KB, MB, GB"):
        shard_bytes("lots")


def test_full_disk_while_writing_a_shard_leaves_no_output(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """ENOSPC from the shard writer: `rotq quantize` prints one line, exits 2, leaves no output."""
    import errno

    import rotq.export.checkpoint
    from rotq.quant.cli import main

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rotq.export.checkpoint._Shard, "close", full)
    out = tmp_path / "out"
    code = main(["quantize", str(tiny_model_dir("llama")), "-o", str(out), "--method", "rtn", "--scheme", "w4a16",
                 "--seqlen", "32"])
    assert code == 2
    assert "No space left on device: free space on that filesystem" in capsys.readouterr().err
    # no OUT and no temporary directory; the resume state stays, so `--resume` only re-exports
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["out.partial"]
