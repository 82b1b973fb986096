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
On CUDA the kernels are ``rotq.kernels.kv4``'s Triton kernels; elsewhere their PyTorch
references (dequantize the pages of a sequence, then SDPA).

How it is plugged in: vLLM's CPU platform always picks the backend registered as CPU_ATTN, so
the plugin overrides CPU_ATTN with :class:`RotqCPUAttentionBackend`, which hands every other
cache dtype to vLLM's own CPU attention unchanged (set ROTQ_KV4_BACKEND=0 to skip the
override). On CUDA it registers :class:`RotqKV4Backend` as the CUSTOM backend
(``--attention-backend CUSTOM``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
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
from rotq.quant.hadamard import apply_hadamard
from rotq.quant.scheme import KVCacheArgs
from rotq.serving.kv_cache_dtype import KV4_DTYPE

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
    query_start_loc_cpu: torch.Tensor  # [num_reqs + 1]
    seq_lens_cpu: torch.Tensor  # [num_reqs]: tokens in the cache after this step
    block_table: torch.Tensor  # [num_reqs, max_blocks]
    slot_mapping: torch.Tensor  # [num_actual_tokens]
    seq_idx: torch.Tensor  # [num_actual_tokens]: the request of each query token
    positions: torch.Tensor  # [num_actual_tokens]: its position in the sequence
    _runs: dict = field(default_factory=dict)  # query group size -> kv4.query_blocks on the device

    def query_blocks(self, group: int, device) -> torch.Tensor | None:
        """The step's runs of prefill tokens for the Triton kernel (built once per step, shared
        by the layers); None for a decode-only step."""
        if group not in self._runs:
            runs = kv4.query_blocks(self.query_start_loc_cpu, group)
            self._runs[group] = None if runs is None else runs.to(device)
        return self._runs[group]


def build_kv4_metadata(common: CommonAttentionMetadata) -> KV4Metadata:
    n = common.num_reqs
    qsl_cpu = common.query_start_loc_cpu[: n + 1].long()
    seq_cpu = common.seq_lens[:n].cpu().long()
    qlens = qsl_cpu[1:] - qsl_cpu[:-1]
    seq_idx = torch.repeat_interleave(torch.arange(n), qlens)
    # query i of request r sits at position seq_len - query_len + i
    positions = torch.arange(int(qsl_cpu[-1])) - qsl_cpu[:-1][seq_idx] + (seq_cpu - qlens)[seq_idx]
    device = common.seq_lens.device
    T = common.num_actual_tokens
    return KV4Metadata(T, qsl_cpu, seq_cpu, common.block_table_tensor[:n], common.slot_mapping[:T],
                       seq_idx.to(device), positions.to(device))


class KV4MetadataBuilder(AttentionMetadataBuilder[KV4Metadata]):
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


def kv4_store(layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
              slot_mapping: torch.Tensor, triton: bool | None = None) -> None:
    """Quantize the new tokens' K (after R3) and V into the pages at ``slot_mapping`` (with the
    Triton kernel when ``triton``, by default on CUDA)."""
    args, r3 = layer_kv_scheme(layer)
    T = slot_mapping.shape[0]
    key, value = key[:T], value[:T]
    if r3:
        key = apply_hadamard(key)
    valid = slot_mapping >= 0  # padded tokens carry slot -1
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    if kv_cache.is_cuda if triton is None else triton:
        kv4.kv_quant_store(key.contiguous(), value.contiguous(), kv_cache, slot_mapping, args.clip_ratio,
                           args.symmetric)
    else:
        kv4.kv_store_reference(key, value, kv_cache, slot_mapping.long(), args.clip_ratio, args.symmetric)


def kv4_forward(layer, query: torch.Tensor, kv_cache: torch.Tensor, meta: KV4Metadata, scale: float,
                output: torch.Tensor, triton: bool | None = None) -> torch.Tensor:
    """Causal attention of the step's query tokens over the pages (their own K/V already
    stored); the Triton kernel when ``triton`` (by default on CUDA), else per request: gather
    and dequantize its pages, then SDPA."""
    _, r3 = layer_kv_scheme(layer)
    T = meta.num_actual_tokens
    q = query[:T]
    if r3:
        q = apply_hadamard(q)
    out = output[:T].view(T, q.shape[1], q.shape[2])
    if kv_cache.is_cuda if triton is None else triton:
        kv4.kv4_attention(q.contiguous(), kv_cache, meta.block_table, meta.seq_idx, meta.positions, scale, out=out,
                          q_blocks=meta.query_blocks(q.shape[1] // kv_cache.shape[1], q.device))
        return output
    D = q.shape[-1]
    for r in range(meta.seq_lens_cpu.shape[0]):
        start, end = int(meta.query_start_loc_cpu[r]), int(meta.query_start_loc_cpu[r + 1])
        length = int(meta.seq_lens_cpu[r])
        if end == start:
            continue
        K, V = kv4.gather_sequence(kv_cache, D, meta.block_table[r], length)  # [L, H_kv, D]
        qr = q[start:end].transpose(0, 1)  # [H_q, q_len, D]
        first = length - (end - start)  # position of the first query token
        allowed = torch.arange(length)[None, :] <= (first + torch.arange(end - start))[:, None]
        o = F.scaled_dot_product_attention(qr, K.transpose(0, 1).to(q.dtype), V.transpose(0, 1).to(q.dtype),
                                           attn_mask=allowed, scale=scale, enable_gqa=True)
        out[start:end] = o.transpose(0, 1)
    return output


# ----------------------------------------------------------------------------- CPU: override CPU_ATTN

class RotqCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    """vLLM's CPU builder, or the int4 cache's metadata for an int4 layer group."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        self.kv4 = is_kv4(kv_cache_spec)
        if self.kv4:
            AttentionMetadataBuilder.__init__(self, kv_cache_spec, layer_names, vllm_config, device)
        else:
            super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        if self.kv4:
            return build_kv4_metadata(common_attn_metadata)
        return super().build(common_prefix_len, common_attn_metadata, fast_build)


class RotqCPUAttentionImpl(CPUAttentionBackendImpl):
    """vLLM's CPU attention, or the int4 paged cache when the layer's cache dtype is int4."""

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if not is_kv4(self.kv_cache_dtype):
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale,
                                   output_block_scale)
        _check_kv4_call(self, output_scale, output_block_scale)
        if attn_metadata is None:  # warm-up
            return output
        return kv4_forward(layer, query, kv_cache, attn_metadata, self.scale, output)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        if not is_kv4(self.kv_cache_dtype):
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        kv4_store(layer, key, value, kv_cache, slot_mapping)


def _check_kv4_call(impl, output_scale, output_block_scale) -> None:
    if output_scale is not None or output_block_scale is not None:
        raise NotImplementedError("rotq's int4 KV cache does not fuse output quantization")
    if impl.attn_type != AttentionType.DECODER or impl.sliding_window not in (None, -1) \
            or impl.alibi_slopes is not None or impl.logits_soft_cap or impl.sinks is not None:
        raise NotImplementedError("rotq's int4 KV cache serves causal decoder attention without sliding "
                                  "windows, ALiBi, soft-capping or sinks; serve this model without "
                                  f"--kv-cache-dtype {KV4_DTYPE}")


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
