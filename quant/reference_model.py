"""The PyTorch reference model of a rotq checkpoint: the rotated model with every quantized
linear's weight dequantized to float32 and the scheme's online operations (activation and KV
quantizers, online Hadamards, the full-precision attention prefix) installed, i.e. what calibration simulated and what `rotq eval
--engine torch` measures. The checkpoint format itself (writing it, reading its scheme and
tensors) is ``rotq.export.rotq_format``'s.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rotq.export.checkpoint import quantized_linear_names
from rotq.export.prefix_file import load_prefix
from rotq.export.rotq_format import read_scheme, read_tensors
from rotq.kernels.linear import dequantize_packed
from rotq.kernels.packing import pack_factor
from rotq.quant.arch import checkpoint_name, unfold_experts
from rotq.quant.errors import RotqError
from rotq.quant.models import check_architecture
from rotq.quant.online import install_online_ops
from rotq.quant.prefix import attach_prefix
from rotq.quant.scheme import Scheme

__all__ = ["load_rotq", "dequantize_linear"]


def load_rotq(path: str | Path):
    """(model, tokenizer, scheme): the PyTorch reference of a rotq checkpoint, with dequantized
    float32 weights and the scheme's online ops installed (what `rotq eval` measures)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    scheme = read_scheme(path)
    check_architecture(path)
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    unfold_experts(model)
    tensors = _in_memory_names(config, model, read_tensors(path))
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
    attach_prefix(model, load_prefix(path, scheme, config))
    install_online_ops(model, scheme)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, scheme


def _in_memory_names(config, model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors renamed from its names (a MoE family's, arch.checkpoint_name) to
    the model's module names, which the rest of rotq uses."""
    modules = {checkpoint_name(config, name): name for name, _ in model.named_modules()}
    renamed = {}
    for key, t in tensors.items():
        module, _, suffix = key.rpartition(".")
        renamed[f"{modules[module]}.{suffix}" if module in modules else key] = t
    return renamed


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
