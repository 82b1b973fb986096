"""Safetensors files written tensor by tensor from the tensors' own memory.

safetensors' ``save_file`` first copies every tensor into a Python bytes object, so saving the
calibration activations (the hidden states of every calibration token) briefly doubled their
memory at each layer. This writes the same format (an 8-byte header length, the JSON header
padded to 8 bytes, then the raw little-endian data in header order) straight from each tensor's
storage; files are read back with safetensors' own ``safe_open``.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import torch

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (CPU) as a safetensors file at ``path`` without copying their data."""
    if sys.byteorder != "little":
        raise RuntimeError("safetensors data is little-endian; this writer runs on little-endian machines only")
    flat, header, offset = [], {}, 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} cannot be stored in safetensors by this writer")
        t = t.detach().contiguous()
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        flat.append(t.reshape(-1).view(torch.uint8))
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for data in flat:
            if data.numel():
                f.write(data.numpy().data)
