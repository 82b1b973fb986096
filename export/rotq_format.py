"""The "rotq" checkpoint format: what `rotq quantize` writes and the vLLM plugin serves.

OUT/ is a Hugging Face checkpoint of the rotated model in which every quantized linear
``P`` is stored as integers instead of ``P.weight``:

* ``P.weight_packed``  int32 [N, K / f]: codes packed along K (``rotq.kernels.packing``:
  int4 codes as uint4b8, 8 per int32; 5..8-bit codes as 8-bit containers, 4 per int32);
* ``P.weight_scale``   float32 [N, K / G] (G = K per output channel: [N, 1]);
* ``P.weight_zero_point`` int32 [N, K / G], only for asymmetric weights (unsigned codes);
* ``P.bias`` unchanged.

``config.json["quantization_config"]`` is the scheme of ``rotq.quant.scheme`` (the one
versioned schema) with ``quant_method: "rotq"``; vLLM picks the plugin from it. Everything else
(embeddings, norms, lm_head, tokenizer, generation config) is a plain checkpoint. Tensors are
sharded (``model-0000i-of-0000n.safetensors`` + index) above ``max_shard_size``. This module
writes the format and reads its metadata and tensors (:func:`read_scheme`, :func:`read_tensors`);
the PyTorch reference model of a checkpoint is ``rotq.quant.reference_model.load_rotq``, which
checks every tensor's presence, dtype and shape and names the first one that is wrong.

With learned rotations (kind "spinquant") OUT/spinquant/rotations.safetensors also holds the
folded R1/R2 (``rotq.export.rotations_file.save_rotations``), for reuse with ``--rotation-file``; it
is not needed to run the model, and sits in a subdirectory because vLLM loads every
``*.safetensors`` at the top of an unsharded checkpoint as model weights.

With a full-precision attention prefix (scheme ``prefix``, format version 2) OUT/prefix/
prefix_kv.safetensors holds its K and V per layer (``rotq.export.prefix_file``); it is needed to
run the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from rotq.export.checkpoint import packed_tensors, write_checkpoint
from rotq.export.prefix_file import PREFIX_FILE, save_prefix
from rotq.export.rotations_file import ROTATIONS_FILE, RotationMatrices, save_rotations
from rotq.quant.errors import RotqError
from rotq.quant.quantizer import QuantizedWeight
from rotq.quant.scheme import Scheme, SchemeError

QUANT_METHOD = "rotq"
REPORT = "calibration_report.json"


def quantization_config(scheme: Scheme) -> dict:
    return {"quant_method": QUANT_METHOD, **scheme.to_dict()}


def save_rotq(model, weights: dict[str, QuantizedWeight], tokenizer, scheme: Scheme, out: Path,
              report: dict | None = None, max_shard_size: str = "5GB",
              rotations: RotationMatrices | None = None, files: dict[str, str] | None = None,
              prefix=None) -> None:
    """Write the rotq checkpoint of a calibrated model atomically (see the module docstring);
    ``files``: further text files by name (the model card); ``prefix``: the full-precision
    prefix's K/V (quant/prefix.PrefixKV, required when the scheme has one)."""
    if (prefix is None) != (scheme.prefix is None):
        raise ValueError("a scheme with a prefix needs its K/V (prefix=...), and only such a scheme")
    if prefix is not None:
        tokenizer = tokenizer_without_bos(tokenizer, prefix.token_ids)
    state = packed_tensors(model, weights, scheme)
    with write_checkpoint(model, state, tokenizer, quantization_config(scheme), out, max_shard_size, files) as tmp:
        if report is not None:
            (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        if rotations is not None:
            (tmp / ROTATIONS_FILE).parent.mkdir()
            save_rotations(rotations, tmp / ROTATIONS_FILE)
        if prefix is not None:
            (tmp / PREFIX_FILE).parent.mkdir()
            save_prefix(prefix, tmp / PREFIX_FILE)


def tokenizer_without_bos(tokenizer, prefix_ids):
    """A copy of ``tokenizer`` that adds no BOS when the prefix holds it already: the prefix is in
    every sequence's past, so a server's tokenizer must not add a second BOS after it."""
    import copy

    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None or bos not in prefix_ids or not getattr(tokenizer, "add_bos_token", False):
        return tokenizer
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_bos_token = False
    if tokenizer("a").input_ids[:1] == [bos]:
        raise RotqError(f"the prefix holds BOS ({bos}) and this tokenizer cannot be told not to add it; choose a "
                        "--prefix without BOS")
    return tokenizer


def is_rotq_checkpoint(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config")
    except json.JSONDecodeError:
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def read_scheme(path: str | Path) -> Scheme:
    """The scheme in OUT/config.json; a SchemeError names the bad field."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict):
        raise SchemeError(f"{path}/config.json has no quantization_config mapping")
    return Scheme.from_dict(qc)


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in ``path`` (sharded or not) by name, as stored."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for f in files:
        if not (path / f).is_file():
            raise RotqError(f"checkpoint file {path / f} is missing")
        with safe_open(path / f, framework="pt") as st:
            for k in st.keys():
                tensors[k] = st.get_tensor(k)
    return tensors
