"""Does the cross-layer term help learned refinement? A cheap check on the first layers of a model.

The full accuracy rows of refinement cost 30-60 min each on a 2-core CPU. This benchmark keeps
the first ``--layers`` decoder layers of the model (saved as a model of their own), quantizes
them with each ``--methods`` entry under {no refinement, --refine KIND, --refine KIND
--cross-layer K}, and scores each against the same truncated model in full precision: mean KL
divergence of the next-token distribution and top-1 agreement on wikisum **train** text, so
that no test text is looked at. Each row runs the real CLI in a subprocess.

    python benchmarks/refine_cross_layer.py --json benchmarks/results/refine-cross-layer-4layers.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


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


def rows(methods: list[str], refine: str, cross_layers: list[int]) -> list[tuple[str, str, int]]:
    """(method, refinement, cross-layer K) of every row, each method's unrefined row first."""
    return [(m, r, k) for m in methods for r, k in [("none", 0), (refine, 0), *((refine, k) for k in cross_layers)]]


def label(row: tuple[str, str, int]) -> str:
    method, refine, k = row
    return f"{method} --refine {refine}" + (f" --cross-layer {k}" if k else "")


def _rotq(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "rotq.quant.cli", *args], check=True, stdout=subprocess.DEVNULL)


def run_row(row: tuple[str, str, int], fp: Path, a: argparse.Namespace, tmp: Path) -> dict:
    method, refine, k = row
    out, report, scores = tmp / "q", tmp / "report.json", tmp / "eval.json"
    extra = ["--refine", refine] + (["--cross-layer", str(k)] if k else [])
    if refine != "none" and a.refine_steps is not None:
        extra += ["--refine-steps", str(a.refine_steps)]
    _rotq("quantize", str(fp), "-o", str(out), "--scheme", a.scheme, "--rotation", a.rotation,
          "--method", method, "--calib", "wikisum", "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
          "--seed", str(a.seed), "--report", str(report), *extra)
    _rotq("eval", str(out), "--ppl", "wikisum:train", "--windows", str(a.windows), "--seqlen", str(a.eval_seqlen),
          "--kl-vs", str(fp), "--json", str(scores))
    rep, ev = json.loads(report.read_text()), json.loads(scores.read_text())
    subprocess.run(["rm", "-rf", str(out)], check=True)
    refined = rep.get("refine") or []
    return {"row": label(row), "method": method, "refine": refine, "cross_layer": k,
            "kl_vs_fp": ev["kl_vs_reference"], "top1_agreement": ev["top1_agreement"], "kl_tokens": ev["kl_tokens"],
            "calib_seconds": rep["seconds"], "refine_seconds_per_layer": [r["seconds"] for r in refined],
            "refine_loss": [(r["loss_start"], r["loss_end"]) for r in refined]}


def markdown(results: list[dict]) -> str:
    lines = ["| method | refinement | mean KL vs FP (nats) | top-1 agreement | refine s / layer |",
             "|---|---|---|---|---|"]
    for r in results:
        per_layer = r["refine_seconds_per_layer"]
        secs = f"{sum(per_layer) / len(per_layer):.0f}" if per_layer else "-"
        refine = r["refine"] + (f", cross-layer {r['cross_layer']}" if r["cross_layer"] else "")
        lines.append(f"| {r['method']} | {refine} | {r['kl_vs_fp']:.4f} | {100 * r['top1_agreement']:.2f} % | {secs} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", type=int, default=4, help="decoder layers kept from the model")
    p.add_argument("--scheme", default="w3a16")
    p.add_argument("--rotation", default="none")
    p.add_argument("--methods", default="rtn,gptq", help="comma-separated --method values")
    p.add_argument("--refine", choices=("lsi", "sde"), default="lsi")
    p.add_argument("--cross-layer", default="1", help="comma-separated K values of the cross-layer rows")
    p.add_argument("--refine-steps", type=int, help="steps per layer (default: rotq quantize's)")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", type=int, default=8, help="wikisum train windows scored")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--json", type=Path, required=True, help="where the rows go")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --json, run the rest")
    a = p.parse_args()
    try:
        cross = [int(k) for k in a.cross_layer.split(",") if k]
    except ValueError:
        sys.exit(f"--cross-layer takes comma-separated integers, got {a.cross_layer!r}")
    if any(k < 1 or k >= a.layers for k in cross):
        sys.exit(f"--cross-layer values must be between 1 and --layers - 1 ({a.layers - 1}), got {a.cross_layer}")
    results = json.loads(a.json.read_text())["rows"] if a.resume and a.json.is_file() else []
    done = {r["row"] for r in results}
    todo = [row for row in rows(a.methods.split(","), a.refine, cross) if label(row) not in done]
    if not todo:
        print(f"nothing to run: every row is in {a.json}")
    with tempfile.TemporaryDirectory() as tmp:
        fp = truncate(a.model, a.layers, Path(tmp) / "fp") if todo else None
        for row in todo:
            t0 = time.perf_counter()
            print(f"{label(row)} ...", flush=True)
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
