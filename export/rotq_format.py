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
sharded (``model-0000i-of-0000n.safetensors`` + index) above ``max_shard_size``. Loading
checks every tensor's presence, dtype and shape and names the first one that is wrong.

With learned rotations (kind "spinquant") OUT/spinquant/rotations.safetensors also holds the
folded R1/R2 (``rotq.quant.rotation.save_rotations``), for reuse with ``--rotation-file``; it
is not needed to run the model, and sits in a subdirectory because vLLM loads every
``*.safetensors`` at the top of an unsharded checkpoint as model weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from rotq.export.checkpoint import packed_tensors, quantized_linear_names, write_checkpoint
from rotq.kernels.linear import dequantize_packed
from rotq.kernels.packing import pack_factor
from rotq.quant.errors import RotqError
from rotq.quant.quantizer import QuantizedWeight
from rotq.quant.rotation import ROTATIONS_FILE, RotationMatrices, save_rotations
from rotq.quant.scheme import Scheme, SchemeError

QUANT_METHOD = "rotq"
REPORT = "calibration_report.json"


def quantization_config(scheme: Scheme) -> dict:
    return {"quant_method": QUANT_METHOD, **scheme.to_dict()}


def dequantize_linear(prefix: str, tensors: dict[str, torch.Tensor], scheme: Scheme,
                      out_features: int, in_features: int) -> torch.Tensor:
    """float32 weight [N, K] of one quantized linear, after checking its tensors' shapes."""
    w = scheme.weights
    G = w.group_size or in_features
    if in_features % G:
        raise RotqError(f"{prefix}: group size {G} does not divide the input size {in_features}")
    expected = {"weight_packed": ((out_features, in_features // pack_factor(w.bits)), torch.int32),
                "weight_scale": ((out_features, in_features // G), None)}
    if not w.symmetric:
        expected["weight_zero_point"] = ((out_features, in_features // G), torch.int32)
    for suffix, (shape, dtype) in expected.items():
        name = f"{prefix}.{suffix}"
        if name not in tensors:
            raise RotqError(f"checkpoint tensor {name} is missing (the scheme quantizes {prefix})")
        t = tensors[name]
        if tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype):
            raise RotqError(f"checkpoint tensor {name} has shape {tuple(t.shape)} {t.dtype}, expected "
                            f"{shape}{'' if dtype is None else f' {dtype}'} for a {out_features} x "
                            f"{in_features} linear with this scheme")
    return dequantize_packed(tensors[f"{prefix}.weight_packed"], tensors[f"{prefix}.weight_scale"],
                             None if w.symmetric else tensors[f"{prefix}.weight_zero_point"], w.bits,
                             w.symmetric)


def save_rotq(model, weights: dict[str, QuantizedWeight], tokenizer, scheme: Scheme, out: Path,
              report: dict | None = None, max_shard_size: str = "5GB",
              rotations: RotationMatrices | None = None) -> None:
    """Write the rotq checkpoint of a calibrated model atomically (see the module docstring)."""
    state = packed_tensors(model, weights, scheme)
    with write_checkpoint(model, state, tokenizer, quantization_config(scheme), out, max_shard_size) as tmp:
        if report is not None:
            (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        if rotations is not None:
            (tmp / ROTATIONS_FILE).parent.mkdir()
            save_rotations(rotations, tmp / ROTATIONS_FILE)


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


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
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


def load_rotq(path: str | Path):
    """(model, tokenizer, scheme): the PyTorch reference of a rotq checkpoint, with dequantized
    float32 weights and the scheme's online ops installed (what `rotq eval` measures)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from rotq.quant.models import check_architecture
    from rotq.quant.online import install_online_ops

    path = Path(path)
    scheme = read_scheme(path)
    check_architecture(path)
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    tensors = _read_tensors(path)
    modules = dict(model.named_modules())
    for name in quantized_linear_names(model):
        lin = modules[name]
        tensors[f"{name}.weight"] = dequantize_linear(name, tensors, scheme, lin.out_features, lin.in_features)
        for suffix in ("weight_packed", "weight_scale", "weight_zero_point"):
            tensors.pop(f"{name}.{suffix}", None)
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    expected = dict(model.state_dict())
    for name, t in tensors.items():
        if name not in expected:
            raise RotqError(f"checkpoint tensor {name} does not belong to a {config.architectures[0]} "
                            "with this config")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise RotqError(f"checkpoint tensor {name} has shape {tuple(t.shape)}, expected "
                            f"{tuple(expected[name].shape)}")
    absent = [n for n in expected if n not in tensors and not (config.tie_word_embeddings and n == "lm_head.weight")]
    if absent:
        raise RotqError(f"checkpoint tensor {absent[0]} is missing from {path}")
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    install_online_ops(model, scheme)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, scheme
