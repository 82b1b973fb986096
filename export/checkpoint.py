"""Writing a calibrated model as a Hugging Face checkpoint whose quantized linears are packed
integer codes and scales: the part the rotq and compressed-tensors formats share."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from rotq.export.atomic import atomic_directory
from rotq.kernels.packing import pack_factor, pack_int32
from rotq.quant.arch import decoder_layers, layer_linears
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


def packed_state(model, weights: dict[str, QuantizedWeight], scheme: Scheme, extra=None) -> dict:
    """The model's state dict with every quantized linear's weight replaced by its packed
    tensors (plus ``extra(name, qw)``'s tensors per linear), on CPU, tied lm_head dropped."""
    state = dict(model.state_dict())
    names = quantized_linear_names(model)
    missing = [n for n in names if n not in weights]
    if missing:
        raise RotqError(f"no quantized weights for {missing[0]} (and {len(missing) - 1} more)")
    for name in names:
        del state[f"{name}.weight"]
        state.update(linear_tensors(name, weights[name], scheme.weights.bits, scheme.weights.symmetric))
        if extra is not None:
            state.update(extra(name, weights[name]))
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


@contextlib.contextmanager
def write_checkpoint(model, state: dict, tokenizer, quant_config: dict, out: Path, max_shard_size: str):
    """Atomically write config (with ``quant_config``), sharded safetensors and tokenizer into
    ``out``; yields the temporary directory for further files."""
    with atomic_directory(out) as tmp:
        model.config.quantization_config = quant_config
        try:
            model.save_pretrained(tmp, state_dict=state, max_shard_size=max_shard_size)
        finally:
            del model.config.quantization_config
        tokenizer.save_pretrained(tmp)
        yield tmp
