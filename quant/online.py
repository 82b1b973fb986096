"""The online part of a scheme, simulated in PyTorch: per-token activation quantizers (with the
R4 Hadamard before down_proj) on the inputs of the linears, and R3 plus the KV quantizer inside
attention, after RoPE.

Linear inputs are transformed by forward pre-hooks, so module names and state dicts stay
Hugging Face's. Attention goes through an attention function registered with transformers as
"rotq": it receives Q and K after RoPE (and the whole cache during generation, which it
quantizes per token, so the result equals quantizing at write time). With ``ste=True`` the
quantizers round straight through, for learning rotations through them (spinquant.py).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rotq.quant.arch import decoder_layers, layer_linears
from rotq.quant.hadamard import apply_hadamard
from rotq.quant.prefix_kv import KEY_BUFFER, VALUE_BUFFER, prefix_mask
from rotq.quant.quantizer import fake_quantize_activation, fake_quantize_kv
from rotq.quant.scheme import ActivationArgs, KVCacheArgs, Scheme

ATTN_IMPLEMENTATION = "rotq"


def rotq_attention(module, query, key, value, attention_mask, **kwargs):
    """SDPA with R3 on Q and K [B, heads, M, D] and fake-quantized K and V, over the
    full-precision prefix's K and V first when the layer has one (prefix.py)."""
    capture = getattr(module, "rotq_capture", None)
    if capture is not None:
        capture.append((key, value))
    if getattr(module, "rotq_r3", False):
        query, key = apply_hadamard(query), apply_hadamard(key)
    kv: KVCacheArgs | None = getattr(module, "rotq_kv", None)
    if kv is not None:
        ste = getattr(module, "rotq_ste", False)
        key, value = fake_quantize_kv(key, kv, ste), fake_quantize_kv(value, kv, ste)
    prefix_key = getattr(module, KEY_BUFFER, None)
    if prefix_key is not None:
        B, P = key.shape[0], prefix_key.shape[2]
        prefix_value = getattr(module, VALUE_BUFFER)
        attention_mask = prefix_mask(attention_mask, query.shape[2], key.shape[2], P, key.device)
        key = torch.cat([prefix_key.to(key.dtype).expand(B, -1, -1, -1), key], 2)
        value = torch.cat([prefix_value.to(value.dtype).expand(B, -1, -1, -1), value], 2)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@contextlib.contextmanager
def capture_attention_inputs(model: nn.Module, attention: nn.Module):
    """Collect the K and V [B, kv_heads, M, D] (after RoPE, before any online op) that
    ``attention`` (a layer's self_attn) receives while the block runs: a list of (K, V)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    attention.rotq_capture = []
    try:
        yield attention.rotq_capture
    finally:
        del attention.rotq_capture
        model.set_attn_implementation(previous)


AttentionInterface.register(ATTN_IMPLEMENTATION, rotq_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


class InputTransform:
    """Forward pre-hook of a linear: optional online Hadamard, then per-token fake quantization."""

    def __init__(self, act: ActivationArgs | None, hadamard_size: int | None = None, ste: bool = False):
        self.act, self.hadamard_size, self.ste = act, hadamard_size, ste

    def __call__(self, module: nn.Module, inputs: tuple):
        x = inputs[0]
        if self.hadamard_size:
            x = apply_hadamard(x, self.hadamard_size)
        if self.act is not None:
            x = fake_quantize_activation(x, self.act, self.ste)
        return (x, *inputs[1:])


def install_online_ops(model: nn.Module, scheme: Scheme, ste: bool = False) -> None:
    """Make ``model`` compute the scheme's online ops (idempotent: replaces earlier ones);
    ``ste``: straight-through rounding in the quantizers (same outputs, gradients pass)."""
    for layer in decoder_layers(model):
        install_layer_ops(layer, scheme, ste)
    online_attention = scheme.rotation.r3 or scheme.kv_cache is not None or scheme.prefix is not None
    model.set_attn_implementation(ATTN_IMPLEMENTATION if online_attention else "sdpa")


def remove_online_ops(model: nn.Module) -> None:
    for layer in decoder_layers(model):
        remove_layer_ops(layer)
    model.set_attn_implementation("sdpa")


def install_layer_ops(layer: nn.Module, scheme: Scheme, ste: bool = False) -> None:
    """One decoder layer's share of :func:`install_online_ops` (the attention attributes only
    take effect under the "rotq" attention implementation)."""
    remove_layer_ops(layer)
    for name, lin in layer_linears(layer).items():
        had = lin.in_features if name.endswith("down_proj") and scheme.rotation.r4 else None  # experts' too
        if scheme.activations is not None or had:
            lin.register_forward_pre_hook(InputTransform(scheme.activations, had, ste))
    layer.self_attn.rotq_r3, layer.self_attn.rotq_kv = scheme.rotation.r3, scheme.kv_cache
    layer.self_attn.rotq_ste = ste


def remove_layer_ops(layer: nn.Module) -> None:
    # Found by type rather than by handle, so that it also works on a deep copy of the layer
    # (a copied handle would still point at the original's hook table).
    for lin in layer_linears(layer).values():
        hooks = lin._forward_pre_hooks
        for key in [k for k, h in hooks.items() if isinstance(h, InputTransform)]:
            del hooks[key]
    layer.self_attn.rotq_r3, layer.self_attn.rotq_kv, layer.self_attn.rotq_ste = False, None, False
