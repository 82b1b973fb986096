"""KV-cache capacity and accuracy in vLLM: rotq's int4 paged cache against 16-bit caches and
vLLM's built-in ``int4_per_token_head``, with the same cache memory.

Each configuration starts its own vLLM engine in a subprocess (so vLLM's log, with its
"KV cache size: N tokens" line, is captured), then measures perplexity through vLLM's prompt
logprobs on wikisum test windows. Prints a table and writes JSON.

    python benchmarks/kv_cache.py --fp smollm2-135m --w4a4kv4 runs/sm_w4a4kv4_gptq \\
        --json benchmarks/results/kv_cache_cpu.json

``--w4a4kv4`` is the output of ``rotq quantize smollm2-135m -o DIR --scheme w4a4kv4``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

KV_LINE = re.compile(r"KV cache size: ([\d,]+) tokens")
ERROR_LINE = re.compile(r"Worker proc \S+ died unexpectedly|\w+Error: .*")

# name -> (which model, vLLM dtype, kv_cache_dtype, extra environment)
CONFIGS = {
    "fp, bf16 cache": ("fp", "bfloat16", "auto", {}),
    "fp, fp32 cache": ("fp", "float32", "auto", {}),
    "rotq w4a4kv4, fp32 cache (KV not quantized)": ("q", "float32", "auto", {}),
    "rotq w4a4kv4, rotq int4 cache": ("q", "float32", "int4_per_token_head", {}),
    "rotq w4a4kv4, vLLM built-in int4_per_token_head": ("q", "float32", "int4_per_token_head",
                                                       {"ROTQ_KV4_BACKEND": "0"}),
}


def run_one(a: argparse.Namespace) -> None:
    """Child: one engine, its perplexity as JSON on the last stdout line."""
    from transformers import AutoTokenizer

    from rotq.quant.data import eval_windows, load_text, tokenize_text
    from rotq.quant.models import resolve_model_dir
    from rotq.serving.engine import EngineOptions, close_engine, make_engine, vllm_perplexity

    model = str(resolve_model_dir(a.model))
    ids = tokenize_text(AutoTokenizer.from_pretrained(model), load_text("wikisum", "test"))
    windows = eval_windows(ids, a.windows, a.seqlen)
    t0 = time.perf_counter()
    llm = make_engine(model, EngineOptions(dtype=a.dtype, kv_cache_dtype=a.kv_cache_dtype,
                                           max_model_len=a.seqlen + 1, kv_cache_memory_bytes=a.kv_bytes))
    cache = llm.llm_engine.vllm_config.cache_config
    result = vllm_perplexity(llm, windows)
    close_engine(llm)
    print(json.dumps({"ppl": result.ppl, "blocks": cache.num_gpu_blocks, "block_size": cache.block_size,
                      "seconds": time.perf_counter() - t0}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fp", default="smollm2-135m", help="the full-precision model")
    p.add_argument("--w4a4kv4", required=False, help="a rotq W4A4KV4 checkpoint of the same model")
    p.add_argument("--kv-bytes", type=int, default=256 << 20, help="KV cache memory per engine")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--json", type=Path)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--kv-cache-dtype", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        return run_one(a)
    if a.json is None or a.w4a4kv4 is None:
        sys.exit("pass --w4a4kv4 DIR and --json FILE")
    rows = []
    for name, (which, dtype, kv_dtype, env) in CONFIGS.items():
        model = a.fp if which == "fp" else a.w4a4kv4
        cmd = [sys.executable, __file__, "--one", "--model", model, "--dtype", dtype, "--kv-cache-dtype", kv_dtype,
               "--kv-bytes", str(a.kv_bytes), "--windows", str(a.windows), "--seqlen", str(a.seqlen)]
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "VLLM_LOGGING_LEVEL": "INFO", **env})
        log = proc.stdout + proc.stderr
        found = KV_LINE.search(log)
        row = {"config": name, "model": model, "dtype": dtype, "kv_cache_dtype": kv_dtype, **env,
               "vllm_kv_line": found.group(0) if found else None,
               "tokens": int(found.group(1).replace(",", "")) if found else None}
        if proc.returncode == 0:
            row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        else:
            failure = ERROR_LINE.search(log)
            row["error"] = failure.group(0)[:200] if failure else f"exit status {proc.returncode}"
        rows.append(row)
        print(f"{name}: {row.get('vllm_kv_line')}, ppl {row.get('ppl', 'n/a')}", flush=True)
    base = next(r["tokens"] for r in rows if r["config"] == "fp, bf16 cache")
    lines = ["| configuration | vLLM's KV cache line | tokens vs bf16 | wikisum ppl |", "|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['tokens'] / base:.2f}x" if r["tokens"] and base else "-"
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else r.get("error", "-")
        lines.append(f"| {r['config']} | {r['vllm_kv_line']} | {ratio} | {ppl} |")
    print("\n".join(lines))
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {platform.machine()}",
            "kv_bytes": a.kv_bytes, "windows": a.windows, "seqlen": a.seqlen}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
