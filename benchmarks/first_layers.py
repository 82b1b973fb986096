"""Cheap checks on the first decoder layers of a model, scored on calibration text only.

A full accuracy row costs 30-60 min on a 2-core CPU. This benchmark keeps the first
``--layers`` decoder layers of the model (saved as a model of its own), quantizes them once per
row of a set with the real CLI (`rotq quantize` in a subprocess), and scores each against the
same truncated model in full precision: mean KL divergence of the next-token distribution and
top-1 agreement on wikisum **train** text, so no test text is looked at while a choice is made.

    python benchmarks/first_layers.py --set refine-cross-layer --json benchmarks/results/first-layers-refine-cross-layer.json
    python benchmarks/first_layers.py --set foem --json benchmarks/results/first-layers-foem.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

W3A16 = ("--scheme", "w3a16", "--rotation", "none")
W4A4KV4 = ("--scheme", "w4a4kv4", "--rotation", "hadamard", "--a-clip", "0.9")

# Each row is the `rotq quantize` flags that differ from the set's calibration (wikisum train,
# --nsamples/--seqlen/--seed of this script).
ROW_SETS = {
    # issue 7: does the cross-layer term rescue refinement, behind RTN and behind GPTQ?
    "refine-cross-layer": [(*W3A16, "--method", m, "--refine", r, *x) for m in ("rtn", "gptq")
                           for r, x in (("none", ()), ("lsi", ()), ("lsi", ("--cross-layer", "1")))],
    # issue 5: why FOEM does not beat GPTQ at W4A4KV4: its beta, and the paper's own variant (6a)
    "foem": [(*W4A4KV4, "--method", "gptq"),
             (*W4A4KV4, "--method", "foem"),
             (*W4A4KV4, "--method", "foem", "--foem-beta", "0.05"),
             (*W4A4KV4, "--method", "foem", "--foem-variant", "6a"),
             (*W4A4KV4, "--method", "gptaq"),
             (*W4A4KV4, "--method", "gptaq+foem"),
             (*W4A4KV4, "--method", "gptaq+foem", "--foem-variant", "6a")],
}


def truncate(spec: str, layers: int, out: Path) -> Path:
    """Save the first ``layers`` decoder layers of ``spec`` (with its embeddings, final norm,
    head and tokenizer) as a model of its own."""
    from rotq.quant.models import load_model

    model, tokenizer = load_model(spec)
    total = len(model.model.layers)
    if not 1 <= layers <= total:
        sys.exit(f"--layers must be between 1 and {total} for {spec}, got {layers}")
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:layers]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _rotq(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "rotq.quant.cli", *args], check=True, stdout=subprocess.DEVNULL)


def run_row(row: tuple[str, ...], fp: Path, a: argparse.Namespace, tmp: Path) -> dict:
    out, report, scores = tmp / "q", tmp / "report.json", tmp / "eval.json"
    _rotq("quantize", str(fp), "-o", str(out), *row, "--calib", "wikisum", "--nsamples", str(a.nsamples),
          "--seqlen", str(a.seqlen), "--seed", str(a.seed), "--report", str(report), *shlex.split(a.quantize_flags))
    _rotq("eval", str(out), "--ppl", "wikisum:train", "--windows", str(a.windows), "--seqlen", str(a.eval_seqlen),
          "--kl-vs", str(fp), "--json", str(scores))
    rep, ev = json.loads(report.read_text()), json.loads(scores.read_text())
    subprocess.run(["rm", "-rf", str(out)], check=True)
    refined = rep.get("refine") or []
    return {"row": " ".join(row), "kl_vs_fp": ev["kl_vs_reference"], "top1_agreement": ev["top1_agreement"],
            "kl_tokens": ev["kl_tokens"], "calib_seconds": rep["seconds"],
            "refine_seconds_per_layer": [r["seconds"] for r in refined],
            "refine_loss": [(r["loss_start"], r["loss_end"]) for r in refined]}


def markdown(results: list[dict]) -> str:
    lines = ["| rotq quantize flags | mean KL vs FP (nats) | top-1 agreement | calibration s | refine s / layer |",
             "|---|---|---|---|---|"]
    for r in results:
        per_layer = r["refine_seconds_per_layer"]
        secs = f"{sum(per_layer) / len(per_layer):.0f}" if per_layer else "-"
        lines.append(f"| `{r['row']}` | {r['kl_vs_fp']:.4f} | {100 * r['top1_agreement']:.2f} % | "
                     f"{r['calib_seconds']:.0f} | {secs} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", choices=sorted(ROW_SETS), required=True, help="the rows to run")
    p.add_argument("--only", metavar="REGEX", help="only the rows whose flags match")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", type=int, default=4, help="decoder layers kept from the model")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quantize-flags", default="", help="more `rotq quantize` flags for every row, e.g. "
                   "'--refine-steps 20'")
    p.add_argument("--windows", type=int, default=8, help="wikisum train windows scored")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--json", type=Path, required=True, help="where the rows go")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --json, run the rest")
    a = p.parse_args()
    try:
        only = re.compile(a.only) if a.only else None
    except re.error as e:
        sys.exit(f"--only {a.only!r} is not a regular expression: {e}")
    results = json.loads(a.json.read_text())["rows"] if a.resume and a.json.is_file() else []
    done = {r["row"] for r in results}
    todo = [row for row in ROW_SETS[a.set]
            if " ".join(row) not in done and (only is None or only.search(" ".join(row)))]
    if not todo:
        print(f"nothing to run: every row of {a.set}{' matching --only' if only else ''} is in {a.json}")
    with tempfile.TemporaryDirectory() as tmp:
        fp = truncate(a.model, a.layers, Path(tmp) / "fp") if todo else None
        for row in todo:
            t0 = time.perf_counter()
            print(f"{' '.join(row)} ...", flush=True)
            with tempfile.TemporaryDirectory(dir=tmp) as row_tmp:
                result = run_row(row, fp, a, Path(row_tmp))
            result["wall_seconds"] = time.perf_counter() - t0
            results.append(result)
            meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {platform.machine()}",
                    "args": {k: str(v) for k, v in vars(a).items()}}
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps({"meta": meta, "rows": results}, indent=2) + "\n")
            print(markdown([result]).splitlines()[-1], flush=True)
    print(markdown(results))


if __name__ == "__main__":
    main()
