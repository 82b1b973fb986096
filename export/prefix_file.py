"""The prefix file of a rotq checkpoint: the full-precision attention prefix's K and V
(quant/prefix.py), which the PyTorch reference and the vLLM plugin both attend over.

On disk: ``OUT/prefix/prefix_kv.safetensors`` (a subdirectory: vLLM loads every
``*.safetensors`` at the top of an unsharded checkpoint as model weights), float32 tensors
``layers.{i}.key`` and ``layers.{i}.value`` [num_kv_heads, P, head_dim] per decoder layer, K after
RoPE at positions -P..-1 and R3, V in the layer's R2 basis: exactly what attention reads. The
token ids are in the scheme (``quantization_config.prefix.token_ids``) and repeated in the
file's metadata (key ``rotq_prefix``), so that a file from another calibration is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rotq.quant.errors import RotqError
from rotq.quant.prefix_kv import PrefixKV, check_prefix_shapes
from rotq.quant.scheme import Scheme

PREFIX_FILE = "prefix/prefix_kv.safetensors"


def save_prefix(prefix: PrefixKV, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for i, (k, v) in enumerate(zip(prefix.keys, prefix.values)):
        tensors[f"layers.{i}.key"] = k.detach().to("cpu", torch.float32).contiguous()
        tensors[f"layers.{i}.value"] = v.detach().to("cpu", torch.float32).contiguous()
    # one metadata key: safetensors writes several in an order that changes from run to run
    save_file(tensors, str(path), metadata={"rotq_prefix": json.dumps({"token_ids": list(prefix.token_ids)})})


def load_prefix(checkpoint: str | Path, scheme: Scheme, config) -> PrefixKV | None:
    """The prefix of the checkpoint whose scheme and HF config these are (None when the scheme has
    none); RotqError names what is missing or does not fit."""
    from safetensors import SafetensorError, safe_open

    if scheme.prefix is None:
        return None
    path = Path(checkpoint) / PREFIX_FILE
    if not path.is_file():
        raise RotqError(f"{path} is missing: this checkpoint's scheme has a full-precision prefix "
                        f"{list(scheme.prefix.token_ids)}, whose K/V that file holds; copy the whole checkpoint")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise RotqError(f"cannot read {path}: {e}") from None
    ids = json.loads(meta.get("rotq_prefix", "{}")).get("token_ids")
    if ids != list(scheme.prefix.token_ids):
        raise RotqError(f"{path} is the prefix {ids}, but config.json names {list(scheme.prefix.token_ids)}: the "
                        "file comes from another calibration")
    layers = config.num_hidden_layers
    for i in range(layers):
        for name in ("key", "value"):
            if f"layers.{i}.{name}" not in tensors:
                raise RotqError(f"{path} has no layers.{i}.{name}; this model has {layers} decoder layers")
    prefix = PrefixKV(tuple(ids), [tensors[f"layers.{i}.key"] for i in range(layers)],
                      [tensors[f"layers.{i}.value"] for i in range(layers)])
    check_prefix_shapes(prefix, config, str(path))
    return prefix
