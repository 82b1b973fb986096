"""The int4 paged KV cache in vLLM: rotq's attention backend for ``--kv-cache-dtype
int4_per_token_head``.

vLLM names the cache dtype and allocates the pages; this backend decides their layout
(``rotq.kernels.kv4``: K and V codes, float32 scales and 4-bit zero points, 73 bytes per token
and head at head_dim 64 against 256 in bfloat16), quantizes K (after RoPE and the R3 Hadamard) and V into them with the
checkpoint's KV quantizer, and attends over them. Decode, prefill, chunked prefill and prefix
caching all read the same pages: a query token attends to its sequence's cached tokens up to
its own position, so a prefix written by an earlier request is reused as it is.

The scheme comes from the layer's quantization config (a rotq checkpoint: its kv_cache
quantizer and R3 flag); any other model gets an asymmetric int4 cache without clipping or R3.
On CUDA the kernels are ``rotq.kernels.kv4``'s Triton kernels (decode requests: the split-K
decode kernel; prefill requests: one dequantizing gather of their pages, then SDPA) and R3 is the
Triton Hadamard; elsewhere their PyTorch references (dequantize each request's pages, then SDPA;
R3 in float64). The per-layer path reads no device tensor on the host: host-side lengths come
from vLLM's host metadata once per step, so a decode step can be graph-captured.

How it is plugged in: vLLM's CPU platform always picks the backend registered as CPU_ATTN, so
the plugin overrides CPU_ATTN with :class:`RotqCPUAttentionBackend`, which hands every other
cache dtype to vLLM's own CPU attention unchanged (set ROTQ_KV4_BACKEND=0 to skip the
override). On CUDA it registers :class:`RotqKV4Backend` as the CUSTOM backend
(``--attention-backend CUSTOM``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVQuantMode

from rotq.kernels import kv4
from rotq.kernels.hadamard import hadamard
from rotq.quant.hadamard import apply_hadamard
from rotq.quant.scheme import KVCacheArgs
from rotq.serving.kv_cache_dtype import KV4_DTYPE
from rotq.serving.prefix_attention import has_prefix, kv16_forward, kv16_store, layer_prefix

DEFAULT_KV = KVCacheArgs(bits=4, symmetric=False, clip_ratio=1.0)


def is_kv4(spec_or_dtype) -> bool:
    if isinstance(spec_or_dtype, str):
        return spec_or_dtype == KV4_DTYPE
    return spec_or_dtype.kv_quant_mode == KVQuantMode.INT4_PER_TOKEN_HEAD


def kv4_spec(spec: AttentionSpec) -> AttentionSpec:
    """The page of an int4 layer: :func:`rotq.kernels.kv4.row_bytes` per token and head."""
    if spec.state_content_bytes is not None or not is_kv4(spec):
        return spec
    if spec.head_size_v != spec.head_size:
        raise ValueError(f"rotq's int4 KV cache needs equal K and V head sizes, got {spec.head_size} "
                         f"and {spec.head_size_v}")
    return replace(spec, state_content_bytes=kv4.row_bytes(spec.head_size))


# ----------------------------------------------------------------------------- metadata

@dataclass
class KV4Metadata:
    num_actual_tokens: int
    num_decodes: int  # the leading requests with one query token each (vLLM orders decodes first)
    query_starts: list[int]  # [num_reqs + 1], host
    seq_lens_host: list[int]  # [num_reqs]: tokens in the cache after this step, host
    seq_lens: torch.Tensor  # the same on the device
    block_table: torch.Tensor  # [num_reqs, max_blocks]
    slot_mapping: torch.Tensor  # [num_actual_tokens]


def build_kv4_metadata(common: CommonAttentionMetadata) -> KV4Metadata:
    """Host-side lengths from vLLM's host copies (query_start_loc_cpu, seq_lens_cpu_upper_bound:
    exact for prefill rows; decode rows read only the device seq_lens); a caller without the
    host bound costs one device-to-host copy here, once per step, never per layer."""
    n = common.num_reqs
    starts = common.query_start_loc_cpu[: n + 1].tolist()
    host = common.seq_lens_cpu_upper_bound
    lens = (host if host is not None else common.seq_lens.cpu())[:n].tolist()
    decodes = next((r for r in range(n) if starts[r + 1] - starts[r] != 1), n)
    T = common.num_actual_tokens
    return KV4Metadata(T, decodes, starts, lens, common.seq_lens[:n], common.block_table_tensor[:n],
                       common.slot_mapping[:T])


class KV4MetadataBuilder(AttentionMetadataBuilder[KV4Metadata]):
    reorder_batch_threshold = 1  # decodes first: they run as one decode-kernel launch

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):  # abstract in the base class
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KV4Metadata:
        return build_kv4_metadata(common_attn_metadata)


# ----------------------------------------------------------------------------- the computation

def layer_kv_scheme(layer) -> tuple[KVCacheArgs, bool]:
    """(KV quantizer, R3 on Q and K) of an attention layer: its rotq checkpoint's, or the default."""
    scheme = getattr(getattr(layer, "quant_config", None), "scheme", None)
    if scheme is None:
        return DEFAULT_KV, False
    kv = scheme.kv_cache or DEFAULT_KV
    if kv.bits != 4:
        raise ValueError(f"this checkpoint's KV cache is {kv.bits}-bit; --kv-cache-dtype {KV4_DTYPE} "
                         "stores 4 bits. Serve it without --kv-cache-dtype (16-bit cache)")
    return kv, scheme.rotation.r3


def _r3(x: torch.Tensor, triton: bool) -> torch.Tensor:
    """R3 over each head: the Triton Hadamard kernel on the Triton path, float64 PyTorch elsewhere."""
    return hadamard(x, x.shape[-1]) if triton else apply_hadamard(x)


def kv4_store(layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
              slot_mapping: torch.Tensor, triton: bool | None = None) -> None:
    """Quantize the new tokens' K (after R3) and V into the pages at ``slot_mapping`` (with the
    Triton kernels when ``triton``, by default on CUDA); padded tokens (slot −1) are skipped by
    the store itself."""
    args, r3 = layer_kv_scheme(layer)
    triton = kv_cache.is_cuda if triton is None else triton
    T = slot_mapping.shape[0]
    key, value = key[:T], value[:T]
    if r3:
        key = _r3(key, triton)
    if triton:
        kv4.kv_quant_store(key.contiguous(), value.contiguous(), kv_cache, slot_mapping, args.clip_ratio,
                           args.symmetric)
    else:
        kv4.kv_store_reference(key, value, kv_cache, slot_mapping.long(), args.clip_ratio, args.symmetric)


def kv4_forward(layer, query: torch.Tensor, kv_cache: torch.Tensor, meta: KV4Metadata, scale: float,
                output: torch.Tensor, triton: bool | None = None) -> torch.Tensor:
    """Causal attention of the step's query tokens over the pages (their own K/V already
    stored). With ``triton`` (by default on CUDA): the decode kernel for the leading decode
    requests, the gather + SDPA prefill for the rest; else every request through the PyTorch
    gather and the same SDPA."""
    _, r3 = layer_kv_scheme(layer)
    triton = kv_cache.is_cuda if triton is None else triton
    T = meta.num_actual_tokens
    q = query[:T]
    if r3:
        q = _r3(q, triton)
    out = output[:T].view(T, q.shape[1], q.shape[2])
    D = q.shape[-1]
    prefix = layer_prefix(layer, kv_cache.shape[1], q.dtype, q.device, r3_applied=True)
    if not triton:
        K, V = kv4.kv4_gather_reference(kv_cache, D, meta.block_table, meta.seq_lens_host, q.dtype)
        kv4.causal_attention(q, K, V, meta.query_starts, meta.seq_lens_host, scale, out, prefix=prefix)
        return output
    nd, starts = meta.num_decodes, meta.query_starts
    if nd:
        kv4.kv4_decode(q[:nd], kv_cache, meta.block_table[:nd], meta.seq_lens[:nd], scale, out=out[:nd],
                       prefix=prefix)
    if nd < len(meta.seq_lens_host):
        q0 = starts[nd]
        kv4.kv4_prefill(q[q0:], kv_cache, meta.block_table[nd:], meta.seq_lens[nd:], [s - q0 for s in starts[nd:]],
                        meta.seq_lens_host[nd:], scale, out=out[q0:], prefix=prefix)
    return output


# ----------------------------------------------------------------------------- CPU: override CPU_ATTN

def _prefixed(vllm_config) -> bool:
    return getattr(getattr(vllm_config, "quant_config", None), "prefix", None) is not None


class RotqCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's CPU builder, or the int4 cache's metadata for an int4 layer group and for a
    checkpoint with a full-precision prefix (whose 16-bit pages rotq reads itself)."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        self.rotq_pages = is_kv4(kv_cache_spec) or _prefixed(vllm_config)
        if self.rotq_pages:
            AttentionMetadataBuilder.__init__(self, kv_cache_spec, layer_names, vllm_config, device)
        else:
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        if self.rotq_pages:
            return build_kv4_metadata(common_attn_metadata)
        return super().build(common_prefix_len, common_attn_metadata, fast_build)


class RotqCPUAttentionImpl(CPUAttentionBackendImpl):
    """vLLM's CPU attention, or the int4 paged cache when the layer's cache dtype is int4, or a
    16-bit cache read by rotq when the checkpoint has a full-precision prefix (prefix_attention.py)."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        kv4_cache = is_kv4(self.kv_cache_dtype)
        if not kv4_cache and not has_prefix(layer):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        _check_kv4_call(self, output_scale, output_block_scale)
        if attn_metadata is None:  # warm-up
            return output
        if not kv4_cache:
            return kv16_forward(layer, query, kv_cache, attn_metadata, self.scale, self.num_kv_heads, output)
        return kv4_forward(layer, query, kv_cache, attn_metadata, self.scale, output)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        if is_kv4(self.kv_cache_dtype):
            kv4_store(layer, key, value, kv_cache, slot_mapping)
        elif has_prefix(layer):
            kv16_store(key, value, kv_cache, slot_mapping)
        else:
            super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)


def _check_kv4_call(impl, output_scale, output_block_scale) -> None:
    if output_scale is not None or output_block_scale is not None:
        raise NotImplementedError("rotq's int4 KV cache does not fuse output quantization")
    if impl.attn_type != AttentionType.DECODER or impl.sliding_window not in (None, -1) \
            or impl.alibi_slopes is not None or impl.logits_soft_cap or impl.sinks is not None:
        raise NotImplementedError("rotq's attention (int4 KV cache, full-precision prefix) serves causal decoder "
                                  "attention without sliding windows, ALiBi, soft-capping or sinks")


class RotqCPUAttentionBackend(CPUAttentionBackend):
    supported_kv_cache_dtypes = [*CPUAttentionBackend.supported_kv_cache_dtypes, KV4_DTYPE]

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        return kv4_spec(super().customize_spec(spec))

    @staticmethod
    def get_impl_cls():
        return RotqCPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return RotqCPUAttentionMetadataBuilder


# ----------------------------------------------------------------------------- CUDA: the CUSTOM backend

class RotqKV4Impl(AttentionImpl[KV4Metadata]):
    def __init__(self, num_heads, head_size, scale, num_kv_heads=None, alibi_slopes=None, sliding_window=None,
                 kv_cache_dtype="auto", logits_soft_cap=None, attn_type=AttentionType.DECODER,
                 kv_sharing_target_layer_name=None, sinks=None):
        if not is_kv4(kv_cache_dtype):
            raise ValueError(f"the rotq attention backend stores an int4 cache; pass --kv-cache-dtype {KV4_DTYPE}")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype, self.attn_type = kv_cache_dtype, attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.alibi_slopes, self.sliding_window, self.sinks = alibi_slopes, sliding_window, sinks
        self.logits_soft_cap = logits_soft_cap

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        _check_kv4_call(self, output_scale, output_block_scale)
        if attn_metadata is None:
            return output
        return kv4_forward(layer, query, kv_cache, attn_metadata, self.scale, output)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        kv4_store(layer, key, value, kv_cache, slot_mapping)


class RotqKV4Backend(AttentionBackend):
    forward_includes_kv_cache_update = False
    supported_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes = [KV4_DTYPE]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        return kv4_spec(spec)

    @staticmethod
    def get_impl_cls():
        return RotqKV4Impl

    @staticmethod
    def get_builder_cls():
        return KV4MetadataBuilder


def register_backends() -> None:
    """CPU: override CPU_ATTN (unless ROTQ_KV4_BACKEND=0); everywhere: register CUSTOM."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu() and os.environ.get("ROTQ_KV4_BACKEND", "1") != "0":
        register_backend(AttentionBackendEnum.CPU_ATTN, f"{__name__}.RotqCPUAttentionBackend")
    register_backend(AttentionBackendEnum.CUSTOM, f"{__name__}.RotqKV4Backend")
