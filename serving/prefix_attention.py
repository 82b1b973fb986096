"""The full-precision attention prefix in vLLM (quant/prefix.py): every query of every request
attends over the checkpoint's prefix K/V before its own cached tokens.

The prefix is not in vLLM's pages: it is a constant of the model, read once from
``OUT/prefix/prefix_kv.safetensors`` by the quantization config (``RotqConfig``), and each
attention layer takes its rows: its layer index, its tensor-parallel share of the KV heads. The
text keeps positions 0, 1, ... (the prefix sits at -P..-1, see quant/prefix.py), so vLLM's
positions, lengths, chunked prefill and prefix caching are untouched.

With the int4 cache the prefix K is used as stored (after R3, like the cached keys). A 16-bit
cache holds K without R3 (R3 cancels in Q·Kᵀ, so the plugin skips it there): the prefix K is
rotated back once. vLLM's own CPU attention cannot take extra keys, so a prefixed layer with a
16-bit cache stores and reads its pages here, in PyTorch (the same [blocks, heads, 2 x block,
head_dim] view vLLM's CPU backend allocates: K rows, then V rows), and attends with the int4
path's causal attention.
"""

from __future__ import annotations

import re

import torch

from rotq.kernels import kv4
from rotq.quant.hadamard import apply_hadamard

_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


def has_prefix(layer) -> bool:
    return getattr(getattr(layer, "quant_config", None), "prefix", None) is not None


def _tp() -> tuple[int, int]:
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


def layer_prefix(layer, num_kv_heads: int, dtype: torch.dtype, device: torch.device,
                 r3_applied: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """This rank's prefix K and V [num_kv_heads, P, D] of an attention layer, in ``dtype`` on
    ``device`` (cached on the layer), K in the basis of the cached keys (``r3_applied``: after
    R3); None for a layer without a prefix."""
    config = getattr(layer, "quant_config", None)
    prefix = getattr(config, "prefix", None)
    if prefix is None:
        return None
    key = (dtype, device, r3_applied)
    cached = getattr(layer, "_rotq_prefix", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    match = _LAYER_INDEX.search(layer.layer_name)
    if match is None:
        raise ValueError(f"rotq: cannot tell the decoder layer of attention layer {layer.layer_name!r} for its prefix")
    i = int(match.group(1))
    K, V = prefix.keys[i].double(), prefix.values[i].double()
    if config.scheme.rotation.r3 and not r3_applied:  # K R3 -> K: R3 is orthogonal
        R3 = apply_hadamard(torch.eye(K.shape[-1], dtype=torch.float64))
        K = K @ R3.T
    total = K.shape[0]
    rank, world = _tp()
    if total >= world:
        heads = slice(rank * num_kv_heads, (rank + 1) * num_kv_heads)
    else:  # fewer KV heads than ranks: each is replicated on world / total ranks
        first = rank * total // world
        heads = slice(first, first + 1)
    rows = (K[heads].to(device, dtype).contiguous(), V[heads].to(device, dtype).contiguous())
    if rows[0].shape[0] != num_kv_heads:
        raise ValueError(f"rotq: the prefix of {layer.layer_name} has {total} KV heads; this rank serves "
                         f"{num_kv_heads} of them")
    layer._rotq_prefix = (key, rows)
    return rows


# ----------------------------------------------------------------------------- a 16-bit cache

def _pages(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V pages [blocks, heads, block_size, D] of vLLM's CPU cache allocation."""
    blocks, heads, block_size, _ = kv_cache.shape
    view = kv_cache.view(blocks, heads, 2 * block_size, -1)
    return view[:, :, :block_size], view[:, :, block_size:]


def kv16_store(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write the new tokens' K and V [T, H, D] at ``slot_mapping`` (−1: padding, skipped)."""
    T = slot_mapping.shape[0]
    slots = slot_mapping.long()
    keep = slots >= 0
    K, V = _pages(kv_cache)
    block_size = K.shape[2]
    blocks, offsets = slots[keep] // block_size, slots[keep] % block_size
    K[blocks, :, offsets] = key[:T][keep].to(K.dtype)
    V[blocks, :, offsets] = value[:T][keep].to(V.dtype)


def kv16_gather(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: list[int],
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [H, Σ seq_lens, D] of each request's first seq_lens[r] tokens, in ``dtype``."""
    K, V = _pages(kv_cache)
    block_size = K.shape[2]
    ks, vs = [], []
    for r, length in enumerate(seq_lens):
        blocks = block_table[r, : -(-length // block_size)].long()
        ks.append(K[blocks].permute(1, 0, 2, 3).reshape(K.shape[1], -1, K.shape[3])[:, :length])
        vs.append(V[blocks].permute(1, 0, 2, 3).reshape(V.shape[1], -1, V.shape[3])[:, :length])
    return torch.cat(ks, 1).to(dtype), torch.cat(vs, 1).to(dtype)


def kv16_forward(layer, query: torch.Tensor, kv_cache: torch.Tensor, meta, scale: float, num_kv_heads: int,
                 output: torch.Tensor) -> torch.Tensor:
    """Causal attention of the step's queries over [prefix; their 16-bit pages]."""
    T = meta.num_actual_tokens
    q = query[:T]
    out = output[:T].view(T, q.shape[1], q.shape[2])
    prefix = layer_prefix(layer, num_kv_heads, q.dtype, q.device, r3_applied=False)
    K, V = kv16_gather(kv_cache, meta.block_table, meta.seq_lens_host, q.dtype)
    kv4.causal_attention(q, K, V, meta.query_starts, meta.seq_lens_host, scale, out, prefix=prefix)
    return output
