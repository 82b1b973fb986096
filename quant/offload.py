"""Decoder layers streamed from disk (``rotq quantize --offload DIR``): memory flat in depth.

The model is built with its decoder-layer linear weights on the meta device; everything else
(embeddings, norms, biases, lm_head) is read at once. Calibration materializes one layer's
linears from the checkpoint's safetensors (memory-mapped: only that layer's tensors are read),
fuses the norms and folds the rotations into them (rotation.py's per-layer functions: the same
arithmetic as the in-memory path, so the result is bit for bit the same), calibrates the layer,
writes its integer weights to DIR and returns the linears to meta. Export reads DIR back one
layer at a time. Peak memory: the non-layer tensors, one layer, the calibration activations.
Learning rotations and fitting the activation clip run the whole model many times, so they
need it in memory (``--rotation-file`` and a fixed ``--a-clip`` work with offload).
"""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from rotq.quant.arch import checkpoint_name, decoder_layers, layer_linears, release_linears, unfold_experts
from rotq.quant.errors import RotqError
from rotq.quant.quantizer import QuantizedWeight, compact_codes


def _layer_linear_names(model: nn.Module) -> set[str]:
    return {f"model.layers.{i}.{name}.weight" for i, layer in enumerate(decoder_layers(model))
            for name in layer_linears(layer)}


class LayerSource:
    """The decoder-layer linear weights of a checkpoint, read one layer at a time."""

    def __init__(self, model_dir: Path, dtype: torch.dtype):
        self.model_dir, self.dtype = Path(model_dir), dtype
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: self.model_dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            single = self.model_dir / "model.safetensors"
            with safe_open(single, "pt") as f:
                self.files = {k: single for k in f.keys()}

    def read(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise RotqError(f"{name} is missing from the weights in {str(self.model_dir)!r}; the checkpoint "
                            "is incomplete: copy or download it again")
        with safe_open(self.files[name], "pt") as f:
            t = f.get_tensor(name).to(self.dtype)
        if not torch.isfinite(t).all():
            raise RotqError(f"{str(self.model_dir)!r} has NaN or Inf weights: {name} "
                            f"({int((~torch.isfinite(t)).sum())}); the checkpoint is corrupt")
        return t

    def load(self, i: int, layer: nn.Module, config) -> None:
        """Materialize layer i's linear weights (as read from disk: fuse and rotate afterwards)."""
        for name, lin in layer_linears(layer).items():
            key = checkpoint_name(config, f"model.layers.{i}.{name}.weight")
            lin.weight = nn.Parameter(self.read(key), requires_grad=False)

    @staticmethod
    def release(layer: nn.Module) -> None:
        """Return the layer's linear weights to the meta device, freeing their memory."""
        release_linears(layer)


def load_model_offloaded(model_dir: Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, LayerSource), after models.py's cheap checks: every tensor but the
    decoder-layer linear weights loaded; those stay on the meta device until
    :meth:`LayerSource.load`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rotq.quant.models import check_architecture, check_shapes

    check_architecture(model_dir)
    check_shapes(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    unfold_experts(model)
    source = LayerSource(model_dir, dtype)
    lazy = _layer_linear_names(model)
    tied = getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in source.files
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        if name in lazy or (tied and name == "lm_head.weight"):
            continue
        module, _, attr = name.rpartition(".")
        value = source.read(checkpoint_name(config, name))
        setattr(model.get_submodule(module), attr, nn.Parameter(value, requires_grad=False))
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    rotary = model.model.rotary_emb  # its buffers are computed, not stored: build it on the CPU
    model.model.rotary_emb = type(rotary)(config=model.config)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_dir), source


class OffloadedWeights(MutableMapping):
    """Quantized weights by linear name, kept in a directory: :meth:`spill` moves the ones in
    memory into one file (a layer's), and reading loads one file at a time."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RotqError(f"cannot use {self.directory} for --offload: {e.strerror}") from None
        self._pending: dict[str, QuantizedWeight] = {}
        self._where: dict[str, Path] = {}
        self._cached: tuple[Path | None, dict[str, QuantizedWeight]] = (None, {})

    def spill(self, tag: str) -> None:
        """Write the weights held in memory to ``tag``.safetensors and forget them."""
        if not self._pending:
            return
        path = self.directory / f"{tag}.safetensors"
        tensors, meta = {}, {}
        for name, qw in self._pending.items():
            tensors[f"{name}.codes"] = compact_codes(qw.codes)
            tensors[f"{name}.scale"] = qw.scale.contiguous()
            if qw.zero_point is not None:
                tensors[f"{name}.zero_point"] = qw.zero_point.contiguous()
            meta[name] = json.dumps([qw.group_size, str(qw.codes.dtype).removeprefix("torch.")])
        try:
            save_file(tensors, path, metadata=meta)
        except OSError as e:
            raise RotqError(f"cannot write {path} (--offload): {e.strerror}; free space or choose "
                            "another --offload directory") from None
        self._where.update({name: path for name in self._pending})
        self._pending = {}

    def _load(self, path: Path) -> dict[str, QuantizedWeight]:
        if self._cached[0] != path:
            with safe_open(path, "pt") as f:
                meta, keys = f.metadata(), set(f.keys())
                self._cached = (path, {})
                for name, entry in meta.items():
                    group, dtype = json.loads(entry)
                    self._cached[1][name] = QuantizedWeight(
                        f.get_tensor(f"{name}.codes").to(getattr(torch, dtype)), f.get_tensor(f"{name}.scale"),
                        f.get_tensor(f"{name}.zero_point") if f"{name}.zero_point" in keys else None, group)
        return self._cached[1]

    def __getitem__(self, name: str) -> QuantizedWeight:
        if name in self._pending:
            return self._pending[name]
        if name not in self._where:
            raise KeyError(name)
        return self._load(self._where[name])[name]

    def __contains__(self, name) -> bool:
        return name in self._pending or name in self._where

    def __setitem__(self, name: str, qw: QuantizedWeight) -> None:
        self._pending[name] = qw

    def __delitem__(self, name: str) -> None:
        if self._pending.pop(name, None) is None:
            del self._where[name]

    def __iter__(self):
        yield from self._where
        yield from self._pending

    def __len__(self) -> int:
        return len(self._where) + len(self._pending)


@dataclass
class Offload:
    """What calibrate() needs to stream layers: where they come from and where they go."""

    source: LayerSource
    weights: OffloadedWeights
