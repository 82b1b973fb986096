"""The full-precision attention prefix as data (quant/prefix.py chooses and computes it): its
token ids and per-layer K/V, their change of basis under the scheme's rotations, the shape checks
a loader runs, and the attention mask over [prefix; keys]. A primitive: calibration, export and
the vLLM plugin all read it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rotq.quant.arch import attention_shape
from rotq.quant.errors import RotqError
from rotq.quant.hadamard import apply_hadamard

KEY_BUFFER, VALUE_BUFFER = "rotq_prefix_key", "rotq_prefix_value"  # on each layer's self_attn


@dataclass
class PrefixKV:
    """The prefix's token ids and, per decoder layer, its K and V [H_kv, P, D] (float32)."""

    token_ids: tuple[int, ...]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.token_ids)

    def rotated(self, r3: bool, R2: list[torch.Tensor] | None) -> PrefixKV:
        """K and V as the rotated model computes them: K after R3 (when the scheme applies it),
        V in each layer's R2 basis (V R2 per head; R1 cancels in both)."""
        keys = [apply_hadamard(k.double()).float() if r3 else k for k in self.keys]
        values = self.values if R2 is None else [(v.double() @ R.double().to(v.device)).float()
                                                  for v, R in zip(self.values, R2)]
        return PrefixKV(self.token_ids, keys, values)


def check_prefix_shapes(prefix: PrefixKV, config, where: str) -> None:
    """Each layer's K and V must be [num_kv_heads, P, head_dim] for this model."""
    shape = attention_shape(config)
    P = len(prefix.token_ids)
    expected = (shape.num_kv_heads, P, shape.head_dim)
    if len(prefix.keys) != config.num_hidden_layers or len(prefix.values) != config.num_hidden_layers:
        raise RotqError(f"{where}: the prefix has K/V for {len(prefix.keys)} layers; the model has "
                        f"{config.num_hidden_layers}")
    for i, (k, v) in enumerate(zip(prefix.keys, prefix.values)):
        for name, t in (("key", k), ("value", v)):
            if tuple(t.shape) != expected:
                raise RotqError(f"{where}: layers.{i}.{name} has shape {list(t.shape)}, expected {list(expected)} "
                                f"(KV heads, {P} prefix tokens, head dim)")
            if not torch.isfinite(t).all():
                raise RotqError(f"{where}: layers.{i}.{name} holds NaN or Inf; the file is corrupt")


def prefix_mask(attention_mask: torch.Tensor | None, q_len: int, kv_len: int, P: int,
                device: torch.device) -> torch.Tensor:
    """The boolean mask [.., q_len, P + kv_len] (True: attend) of queries over [prefix; keys]:
    every query sees the whole prefix; over the keys, ``attention_mask`` as given, or causal
    aligned bottom-right (the queries are the last q_len of the kv_len keys) when it is None."""
    if attention_mask is None:
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)
        return torch.cat([torch.ones(q_len, P, dtype=torch.bool, device=device), causal], -1)[None, None]
    if attention_mask.dtype == torch.bool:
        pad = torch.ones(*attention_mask.shape[:-1], P, dtype=torch.bool, device=attention_mask.device)
    else:  # additive float mask
        pad = torch.zeros(*attention_mask.shape[:-1], P, dtype=attention_mask.dtype, device=attention_mask.device)
    return torch.cat([pad, attention_mask], -1)
