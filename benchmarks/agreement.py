"""Do vLLM (with the rotq plugin) and the PyTorch reference (`rotq eval`) compute the same model?

For each checkpoint: perplexity on the same wikisum test windows through both engines (relative
difference), and greedy continuations of the first tokens of other wikisum test windows (how
many prompts agree token for token, and the mean number of tokens matched before the paths
part). Checkpoints not given are made with RTN on the Hadamard rotation (the numerics, not the
compensator, are what is compared), with and without the full-precision prefix:

    python benchmarks/agreement.py --json benchmarks/results/agreement.json

W4A4 checkpoints are served with a 16-bit cache, W4A4KV4 with rotq's int4 cache, as `rotq
serve` does.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIGS = {name: (scheme, prefix) for scheme in ("w4a4", "w4a4kv4") for prefix in ("none", "auto")
           for name in [f"{scheme}-prefix-{prefix}"]}


def _make(model: str, out: Path, scheme: str, prefix: str, seed: int) -> None:
    from rotq.quant.api import quantize

    quantize(model, out, scheme=scheme, rotation="hadamard", method="rtn", a_clip=0.9, prefix=prefix,
             nsamples=8, seqlen=512, seed=seed)


def _compare(checkpoint: Path, windows: int, seqlen: int, prompts: int, prompt_len: int, new_tokens: int) -> dict:
    from rotq.quant.data import eval_windows, load_text, tokenize_text
    from rotq.quant.perplexity import perplexity
    from rotq.quant.reference_model import load_rotq
    from rotq.serving.engine import EngineOptions, close_engine, greedy_tokens, make_engine, vllm_perplexity

    model, tokenizer, scheme = load_rotq(checkpoint)
    ids = tokenize_text(tokenizer, load_text("wikisum", "test"))
    ppl_windows = eval_windows(ids, windows, seqlen)
    starts = eval_windows(ids, windows + prompts, seqlen)[windows:, :prompt_len].tolist()
    torch_ppl = perplexity(model, ppl_windows).ppl
    reference = []
    with torch.no_grad():
        for p in starts:
            out = model.generate(torch.tensor([p]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False)
            reference.append(out[0, len(p):].tolist())
    llm = make_engine(str(checkpoint), EngineOptions(max_model_len=seqlen + 1))
    try:
        served = vllm_perplexity(llm, ppl_windows)
        got = greedy_tokens(llm, starts, new_tokens)
    finally:
        close_engine(llm)
    vllm_ppl = float(torch.tensor(served.nll).exp())
    matched = [next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), len(r)) for g, r in zip(got, reference)]
    return {"scheme": scheme.label, "prefix": None if scheme.prefix is None else list(scheme.prefix.token_ids),
            "torch_ppl": torch_ppl, "vllm_ppl": vllm_ppl, "ppl_rel_diff": vllm_ppl / torch_ppl - 1,
            "prompts_equal": sum(m == new_tokens for m in matched), "prompts": len(starts),
            "mean_tokens_matched": sum(matched) / len(matched), "new_tokens": new_tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    p.add_argument("--checkpoints", nargs="*", default=[], metavar="NAME=DIR",
                   help="use these checkpoints instead of making them (e.g. w4a4kv4-prefix-auto=runs/x)")
    p.add_argument("--windows", type=int, default=8, help="wikisum test windows for perplexity")
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--prompts", type=int, default=16, help="greedy prompts (the starts of later windows)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, required=True)
    a = p.parse_args()
    given = dict(c.split("=", 1) for c in a.checkpoints)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.configs:
            checkpoint = Path(given[name]) if name in given else Path(tmp) / name
            if name not in given:
                _make(a.model, checkpoint, *CONFIGS[name], a.seed)
            t0 = time.perf_counter()
            row = {"config": name, **_compare(checkpoint, a.windows, a.seqlen, a.prompts, a.prompt_len,
                                              a.new_tokens), "seconds": round(time.perf_counter() - t0, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {platform.processor()}",
            "args": {k: str(v) for k, v in vars(a).items()}, "command": " ".join(sys.argv)}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print("| config | prefix | torch ppl | vLLM ppl | diff | greedy prompts equal | tokens matched |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['prefix']} | {r['torch_ppl']:.3f} | {r['vllm_ppl']:.3f} | "
              f"{100 * r['ppl_rel_diff']:+.2f} % | {r['prompts_equal']}/{r['prompts']} | "
              f"{r['mean_tokens_matched']:.1f}/{r['new_tokens']} |")


if __name__ == "__main__":
    main()
