"""Where the parts of a Llama-family decoder live (Llama, Qwen2, Qwen3, Mistral, SmolLM2).

All supported architectures share Hugging Face's module names, so one explicit map serves
them; Qwen3's per-head q/k norms sit after the projections and need no special handling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Linears that share an input are solved together from one Hessian ("true sequential" order).
LINEAR_GROUPS: tuple[tuple[str, ...], ...] = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
LINEAR_NAMES: tuple[str, ...] = tuple(name for group in LINEAR_GROUPS for name in group)


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def attention_shape(config) -> AttentionShape:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return AttentionShape(config.num_attention_heads, config.num_key_value_heads, head_dim)


def layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The seven quantized linears of a decoder layer, by their name inside the layer."""
    return {name: layer.get_submodule(name) for name in LINEAR_NAMES}


def release_linears(layer: nn.Module) -> None:
    """Return the layer's linear weights to the meta device, freeing their memory (their
    integer form, or the checkpoint on disk, is what is used from then on)."""
    for lin in layer_linears(layer).values():
        lin.weight = nn.Parameter(torch.empty_like(lin.weight, device="meta"), requires_grad=False)
