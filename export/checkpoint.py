"""Writing a calibrated model as a Hugging Face checkpoint whose quantized linears are packed
integer codes and scales: the part the rotq and compressed-tensors formats share."""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch

from rotq.export.atomic import atomic_directory
from rotq.kernels.packing import pack_factor, pack_int32
from rotq.quant.arch import checkpoint_name, decoder_layers, layer_linears
from rotq.quant.errors import RotqError
from rotq.quant.quantizer import QuantizedWeight
from rotq.quant.scheme import Scheme


def quantized_linear_names(model) -> list[str]:
    """Module names of the linears a scheme quantizes (every decoder-layer linear)."""
    return [f"model.layers.{i}.{name}" for i, layer in enumerate(decoder_layers(model))
            for name in layer_linears(layer)]


def linear_tensors(prefix: str, qw: QuantizedWeight, bits: int, symmetric: bool) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized linear (see the module docstring)."""
    if bits > 8:
        raise RotqError(f"{prefix}: {bits}-bit weights cannot be exported packed; the rotq format "
                        "stores 2..8-bit weights (use a 16-bit model for unquantized weights)")
    N, K = qw.codes.shape
    if K % pack_factor(bits):
        raise RotqError(f"{prefix}: input size {K} is not a multiple of {pack_factor(bits)}, "
                        f"so its {bits}-bit codes cannot be packed into int32")
    out = {f"{prefix}.weight_packed": pack_int32(qw.codes, bits, signed=symmetric),
           f"{prefix}.weight_scale": qw.scale.reshape(N, K // qw.group_size).float().contiguous()}
    if not symmetric:
        out[f"{prefix}.weight_zero_point"] = qw.zero_point.reshape(N, -1).round().to(torch.int32)
    return out


def packed_tensors(model, weights: Mapping[str, QuantizedWeight], scheme: Scheme,
                   extra=None) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's tensors, named as the architecture's checkpoints name them (arch.checkpoint_name),
    with every quantized linear's weight replaced by its packed tensors (plus ``extra(name, qw)``'s
    tensors per linear, ``name`` as stored), on CPU, tied lm_head dropped: first the
    unquantized ones, then the linears layer by layer, each packed only when reached (so a
    model whose weights live on disk, offload.py, is written one layer at a time)."""
    names = quantized_linear_names(model)
    missing = [n for n in names if n not in weights]
    if missing:
        raise RotqError(f"no quantized weights for {missing[0]} (and {len(missing) - 1} more)")
    quantized = {f"{name}.weight" for name in names}
    tied = getattr(model.config, "tie_word_embeddings", False)
    stored = functools.partial(checkpoint_name, model.config)  # a MoE family's names on disk
    for key, value in model.state_dict().items():
        if key not in quantized and not (tied and key == "lm_head.weight"):
            yield stored(key), value.detach().cpu().contiguous()
    for name in names:
        qw = weights[name]
        tensors = linear_tensors(stored(name), qw, scheme.weights.bits, scheme.weights.symmetric)
        if extra is not None:
            tensors.update(extra(stored(name), qw))
        yield from tensors.items()


_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def shard_bytes(size: str) -> int:
    """'5GB', '200KB', '1GiB' -> bytes (Hugging Face's spelling of shard sizes)."""
    text = size.strip().upper()
    for unit in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(unit) and text[: -len(unit)].strip().isdigit():
            return int(text[: -len(unit)]) * _UNITS[unit]
    raise ValueError(f"shard size {size!r}: write a number and KB, MB, GB, KiB, MiB or GiB")


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


class _Shard:
    """One safetensors file written a tensor at a time, so no shard is ever held in memory:
    the tensors' bytes go to a side file as they come, and close() writes the header (which
    must precede them) and then copies the bytes after it."""

    def __init__(self, path: Path):
        self.path, self.data_path = path, path.with_suffix(".data")
        self.data = open(self.data_path, "wb")
        self.entries: dict[str, dict] = {}
        self.size = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().cpu().contiguous()
        nbytes = t.numel() * t.element_size()
        self.entries[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self.size, self.size + nbytes]}
        if nbytes:
            self.data.write(t.reshape(-1).view(torch.uint8).numpy())
        self.size += nbytes

    def close(self) -> None:
        self.data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(self.path, "wb") as out, open(self.data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, 1 << 24)
        self.data_path.unlink()


def _write_shards(tensors: Iterable[tuple[str, torch.Tensor]], directory: Path, limit: int) -> None:
    """Write ``tensors`` as safetensors shards of at most ``limit`` bytes (a larger tensor gets
    its own), one tensor in memory at a time: model.safetensors, or
    model-0000i-of-0000n.safetensors and model.safetensors.index.json."""
    parts: list[_Shard] = []
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if not parts or (parts[-1].entries and parts[-1].size + nbytes > limit):
            if parts:
                parts[-1].close()
            parts.append(_Shard(directory / f"part-{len(parts)}.safetensors"))
        parts[-1].add(name, t)
    if not parts:
        raise RotqError("the model has no tensors to write")
    parts[-1].close()
    if len(parts) == 1:
        parts[0].path.rename(directory / "model.safetensors")
        return
    weight_map = {}
    for i, part in enumerate(parts, 1):
        final = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        part.path.rename(directory / final)
        weight_map.update(dict.fromkeys(part.entries, final))
    index = {"metadata": {"total_size": sum(p.size for p in parts)}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


@contextlib.contextmanager
def write_checkpoint(model, tensors: Iterable[tuple[str, torch.Tensor]], tokenizer, quant_config: dict,
                     out: Path, max_shard_size: str, files: Mapping[str, str] | None = None):
    """Atomically write config (with ``quant_config``), sharded safetensors, tokenizer and
    ``files`` (text by file name) into ``out``; yields the temporary directory for further files."""
    limit = shard_bytes(max_shard_size)
    with atomic_directory(out) as tmp:
        _write_shards(tensors, tmp, limit)
        config = model.config
        config.architectures = [type(model).__name__]
        config.quantization_config = quant_config
        try:
            config.save_pretrained(tmp)
        finally:
            del config.quantization_config
        if model.can_generate() and model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        yield tmp
