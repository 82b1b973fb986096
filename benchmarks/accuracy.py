"""Accuracy table: perplexity of quantized variants of a model, with calibration cost.

Each row calls the Python API: `quantize` in a fresh process of its own (so its peak RSS is the
row's alone), with the row's `rotq quantize` flags read by the CLI's own parser, then `evaluate` on
WikiText-2 test and the wikisum test split.
Calibration text is wikisum train only. Prints a Markdown table and writes JSON.

    python benchmarks/accuracy.py --rows foundation --json benchmarks/results/foundation.json
    python benchmarks/accuracy.py --plot benchmarks/results/accuracy.png --plot-only
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import platform
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIKITEXT2 = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

COMPENSATORS = ("gptaq", "gptaq+foem", "gptaq+rescomp", "qep", "foem", "rescomp")

# (scheme, rotation, method[, extra `rotq quantize` flags]); None = the full-precision model
ROW_SETS = {
    "foundation": [
        None,
        ("w4a4kv4", "none", "rtn"), ("w4a4kv4", "none", "gptq"),
        ("w4a4kv4", "hadamard", "rtn"), ("w4a4kv4", "hadamard", "gptq"),
        ("w4a16", "none", "rtn"), ("w4a16", "none", "gptq"),
        ("w3a16", "none", "rtn"), ("w3a16", "none", "gptq"),
    ],
    # issue 5: the compensators beside the foundation's rtn/gptq rows
    "compensators-w4a4kv4-hadamard": [
        ("w4a4kv4", "hadamard", m) for m in COMPENSATORS],
    "compensators-w3a16": [("w3a16", "none", m) for m in ("gptq", *COMPENSATORS)],
    # issue 5: the activation-error levers on top of the best compensator
    "levers-w4a4kv4": [("w4a4kv4", "hadamard", "qep+gptq", ("--a-clip", "auto")),
                       ("w4a4kv4", "spinquant", "qep+gptq", ("--a-clip", "auto", "--rotation-steps", "20"))],
    # issue 7: learned refinement before {rtn, gptq, the best compensator}, with and without the
    # cross-layer term; the clip ratio of the foundation/compensator rows (0.9) for comparison,
    # and those rows rerun first with the same code (W4A4 moves ~2 % with float rounding alone)
    "refine-w4a4kv4-hadamard": [
        ("w4a4kv4", "hadamard", m, ("--a-clip", "0.9", "--refine", r)) for m in ("rtn", "gptq", "qep+gptq")
        for r in ("none", "lsi", "sde")] + [
        ("w4a4kv4", "hadamard", m, ("--a-clip", "0.9", "--refine", "sde", "--cross-layer", "1"))
        for m in ("gptq", "qep+gptq")],
    "refine-w3a16": [("w3a16", "none", m, ("--refine", r)) for m in ("rtn", "gptq", "gptaq")
                     for r in ("none", "lsi", "sde")]
    + [("w3a16", "none", "gptq", ("--refine", "sde", "--cross-layer", "1"))],
    # issue 5: both rotation columns of the W4A4KV4 ablation under one code and one machine, at
    # the fixed clip ratio of the first hadamard column (0.9), so the methods alone differ
    "compensators-w4a4kv4": [("w4a4kv4", rotation, m, ("--a-clip", "0.9"))
                             for m in ("rtn", "gptq", *COMPENSATORS) for rotation in ("hadamard", "spinquant")],
    # issue 5: does GPTAQ's gain at W3A16 hold at 4 bits, the weight-only scheme people deploy?
    "gptaq-w4a16": [("w4a16", "none", m) for m in ("gptq", "gptaq")],
    # ... and under the weight-only default's own rotation (hadamard), before the default changes
    "gptaq-w4a16-hadamard": [("w4a16", "hadamard", m) for m in ("gptq", "gptaq")],
    # issue 23: the W4A8 schemes served by the int8 main loop, beside the W4A4KV4 row of
    # levers-w4a4kv4 with the same recipe (Hadamard, fitted clip, QEP + GPTQ)
    "w4a8": [(scheme, "hadamard", "qep+gptq", ("--a-clip", "auto")) for scheme in ("w4a8kv4", "w4a8")],
    # issue 5: the default W4A4KV4 pipeline (spinquant, clip fitted, qep+gptq) over calibration
    # draws: the seed picks the calibration windows and the randomised Hadamards
    "seeds-default": [("w4a4kv4", "spinquant", "qep+gptq", ("--a-clip", "auto", "--seed", str(seed)))
                      for seed in range(4)],
    # issue 24: the full-precision prefix of sink tokens, alone on Hadamard + GPTQ (fixed clip) and
    # in the default pipeline, over two calibration seeds
    "prefix-w4a4kv4": [("w4a4kv4", "hadamard", "gptq", ("--a-clip", "0.9", "--prefix", prefix, "--seed", str(seed)))
                       for seed in range(2) for prefix in ("none", "auto")]
    + [("w4a4kv4", "spinquant", "qep+gptq", ("--a-clip", "auto", "--prefix", prefix, "--seed", str(seed)))
       for seed in range(2) for prefix in ("auto", "none")],
    # issue 24: the weight clip search's range (shrinks p in [1 - s, 1]) for the weight-only default
    # (Hadamard + GPTAQ, at 4 and 3 bits), the same schemes unrotated (plain GPTQ) and the W4A4KV4
    # default; decided on --train-ppl
    "w-clip-range": [(scheme, "hadamard", "gptaq", ("--w-clip-max-shrink", s))
                     for scheme in ("w4a16", "w3a16") for s in ("0.8", "0.2")]
    + [(scheme, "none", "gptq", ("--w-clip-max-shrink", s)) for scheme in ("w4a16", "w3a16") for s in ("0.8", "0.2")]
    + [("w4a4kv4", "spinquant", "qep+gptq", ("--a-clip", "auto", "--prefix", "auto", "--w-clip-max-shrink", s))
       for s in ("0.8", "0.2")],
    # issue 24: a further lever after the prefix: SpinQuant learning 3x longer than the default's 20 steps
    "spinquant-steps": [("w4a4kv4", "spinquant", "qep+gptq",
                         ("--a-clip", "auto", "--prefix", "auto", "--rotation-steps", "60"))],
}


def _quantize(model: str, out: str, flags: tuple[str, ...], report: str) -> None:
    """`rotq quantize MODEL -o OUT FLAGS` through the API (flags parsed as the CLI parses them)."""
    from rotq.quant.api import quantize
    from rotq.quant.cli import build_parser, recipe_from_args

    args = build_parser().parse_args(["quantize", model, "-o", out, *flags])
    quantize(model, out, recipe_from_args(args), report=report)


_CALIBRATIONS: set = set()  # calibration processes now running (one per row in flight)


def _quantize_in_own_process(*args) -> None:
    proc = multiprocessing.get_context("spawn").Process(target=_quantize, args=args)
    proc.start()
    _CALIBRATIONS.add(proc)
    proc.join()
    _CALIBRATIONS.discard(proc)
    if proc.exitcode != 0:
        raise RuntimeError(f"calibration failed (exit code {proc.exitcode}; its traceback is above)")


def _stop(signum, frame) -> None:
    """SIGTERM stops the calibrations too: left running, orphaned, they would slow every later job."""
    for proc in list(_CALIBRATIONS):
        proc.terminate()
    sys.exit(128 + signum)


def _ppl(model: str, data: str, windows: int, seqlen: int, tmp: Path, device: str) -> float:
    from rotq.quant.evaluation import evaluate

    return evaluate(model, data, windows=windows, seqlen=seqlen, device=device).ppl


def run_row(row, a: argparse.Namespace, tmp: Path) -> dict:
    model, result = a.model, {"scheme": "fp32", "rotation": "-", "method": "-"}
    if row is not None:
        scheme, rotation, method, *extra = row
        extra = tuple(extra[0]) if extra else ()
        model, report = str(tmp / "q"), tmp / "report.json"
        reuse = ("--rotation-file", str(a.rotation_file)) if a.rotation_file and rotation == "spinquant" else ()
        t0 = time.perf_counter()
        _quantize_in_own_process(a.model, model, ("--scheme", scheme, "--rotation", rotation, "--method", method,
                                                  "--calib", "wikisum", "--nsamples", str(a.nsamples), "--seqlen",
                                                  str(a.seqlen), "--seed", str(a.seed), "--device", a.device,
                                                  *extra, *reuse), str(report))
        rep = json.loads(report.read_text())
        result = {"scheme": scheme, "rotation": rotation, "method": _label(method, extra),
                  "calib_seconds": rep["seconds"], "quantize_wall_seconds": time.perf_counter() - t0,
                  "peak_rss_mb": rep["peak_rss_mb"]}
        if reuse:  # the row's label stays: the same seed and clip learn the same rotations
            result["rotation_file"] = reuse[1]
        if rep.get("act_clip_search"):
            result["act_clip_search"] = rep["act_clip_search"]
        if rep.get("provenance", {}).get("prefix"):
            result["prefix"] = rep["provenance"]["prefix"]
        if rep.get("refine"):
            result["refine_seconds"] = sum(r["seconds"] for r in rep["refine"])
        result["layer_output_rel_err"] = layer_errors(rep["linears"])
    result["wikitext2"] = _ppl(model, str(a.wikitext2), a.windows, 2048, tmp, a.device)
    result["wikisum"] = _ppl(model, "wikisum", a.wikisum_windows, 2048, tmp, a.device)
    if a.train_ppl:  # the calibration text itself: a gap to the test columns is overfitting
        result["wikisum_train"] = _ppl(model, "wikisum:train", a.wikisum_windows, 2048, tmp, a.device)
    if row is not None:
        shutil.rmtree(model)
    return result


def layer_errors(linears: list[dict]) -> list[float]:
    """Mean relative output error tr(dW H dWᵀ) / tr(W H Wᵀ) of each decoder layer's linears."""
    per_layer: dict[int, list[float]] = {}
    for lin in linears:
        if lin.get("output_rel_err") is not None:
            per_layer.setdefault(int(lin["name"].split(".")[2]), []).append(lin["output_rel_err"])
    return [sum(v) / len(v) for _, v in sorted(per_layer.items())]


def plot(json_files: list[Path], png: Path) -> None:
    """Perplexity of every row in ``json_files`` (one bar pair per row, grouped by scheme) and
    the per-layer output error of the rows that recorded it, as one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, seen, curves = [], set(), []
    for f in json_files:
        for r in json.loads(Path(f).read_text()).get("rows", []):
            key = (r.get("scheme"), r.get("rotation"), r.get("method"))
            if r.get("layer_output_rel_err"):
                curves.append(r)
            if {"rotation", "wikitext2", "wikisum"} <= r.keys() and key not in seen:
                seen.add(key)
                rows.append(r)
    if not rows:
        raise SystemExit(f"no accuracy rows in {', '.join(map(str, json_files))}")
    rows.sort(key=lambda r: (r["scheme"], r["rotation"], r["wikitext2"]))
    fig, axes = plt.subplots(1, 2 if curves else 1, figsize=(16 if curves else 11, 6), squeeze=False)
    ax = axes[0, 0]
    labels = [f"{r['scheme']} {r['rotation']} {r['method']}" for r in rows]
    y = range(len(rows))
    ax.barh([i - 0.2 for i in y], [r["wikitext2"] for r in rows], height=0.4, label="WikiText-2 (40 × 2048)")
    ax.barh([i + 0.2 for i in y], [r["wikisum"] for r in rows], height=0.4, label="wikisum test (16 × 2048)")
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("perplexity (log scale)")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    ax.set_title("smollm2-135m: perplexity per scheme, rotation and method")
    if curves:
        ax = axes[0, 1]
        for r in curves:
            ax.plot(r["layer_output_rel_err"], marker=".",
                    label=f"{r['scheme']} {r.get('rotation', '')} {r['method']}")
        ax.set_yscale("log")
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("mean tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) of its linears")
        ax.set_title("per-layer reconstruction error during calibration")
        ax.legend(fontsize=7)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _machine(device: str) -> str:
    """The host, and the GPU's name when the rows compute on one."""
    host = f"{platform.node()} {platform.machine()}"
    if device.startswith("cuda"):
        import torch
        return f"{host}, {torch.cuda.get_device_name(torch.device(device))}"
    return host


def _label(method: str, extra: tuple[str, ...]) -> str:
    return " ".join((method, *extra))


def _key(row) -> tuple[str, str, str]:
    if row is None:
        return ("fp32", "-", "-")
    scheme, rotation, method, *extra = row
    return (scheme, rotation, _label(method, tuple(extra[0]) if extra else ()))


def _result_key(result: dict) -> tuple[str, str, str]:
    """The row a result came from, as ``_key`` names it."""
    return (result["scheme"], result["rotation"], result["method"])


def markdown(rows: list[dict]) -> str:
    train = any("wikisum_train" in r for r in rows)
    lines = ["| scheme | rotation | method | WikiText-2 | wikisum | " + ("wikisum train | " if train else "")
             + "calibration s | peak RSS MB |", "|---|---|---|---|---|---|---|" + ("---|" if train else "")]
    for r in rows:
        cal = f"{r['calib_seconds']:.0f}" if "calib_seconds" in r else "-"
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        tr = (f"{r['wikisum_train']:.2f} | " if "wikisum_train" in r else "- | ") if train else ""
        lines.append(f"| {r['scheme']} | {r['rotation']} | {r['method']} | {r['wikitext2']:.2f} | "
                     f"{r['wikisum']:.2f} | {tr}{cal} | {rss} |")
    return "\n".join(lines)


def main() -> None:
    signal.signal(signal.SIGTERM, _stop)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", choices=sorted(ROW_SETS), default="foundation")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", type=int, default=40, help="WikiText-2 windows of 2048")
    p.add_argument("--wikisum-windows", type=int, default=16, help="wikisum test windows of 2048")
    p.add_argument("--wikitext2", type=Path, default=WIKITEXT2)
    p.add_argument("--train-ppl", action="store_true",
                   help="also the perplexity of the calibration text (wikisum train, as many windows as wikisum test)")
    p.add_argument("--device", default="cpu", help="where calibration and evaluation compute (e.g. cuda)")
    p.add_argument("--jobs", type=int, default=1,
                   help="rows run at once (each its own processes; their times then share the machine)")
    p.add_argument("--json", type=Path, help="where the rows go (required unless --plot-only)")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --json, run the rest")
    p.add_argument("--only", metavar="REGEX",
                   help="run only the rows whose method label matches (e.g. 'gptq --a-clip 0.9 --refine lsi')")
    p.add_argument("--rotation", metavar="NAME",
                   help="run only the rows under this rotation (e.g. spinquant: one column of a row set)")
    p.add_argument("--rotation-file", type=Path, metavar="FILE",
                   help="spinquant rows reuse these learned R1/R2 (OUT/spinquant/rotations.safetensors of a "
                        "run with the same --seed and clip) instead of learning them again")
    p.add_argument("--plot", type=Path, metavar="PNG",
                   help="draw perplexity and per-layer error from every JSON in benchmarks/results")
    p.add_argument("--plot-only", action="store_true", help="only redraw --plot from the JSON files")
    a = p.parse_args()
    results = sorted((REPO / "benchmarks" / "results").glob("*.json"))
    if a.plot_only:
        if a.plot is None:
            sys.exit("--plot-only needs --plot PNG")
        plot(results, a.plot)
        return
    if a.json is None:
        sys.exit("--json is required (or --plot PNG --plot-only)")
    if not a.wikitext2.is_file():
        sys.exit(f"WikiText-2 test file not found at {a.wikitext2}; pass --wikitext2 PATH")
    if a.rotation_file is not None and not a.rotation_file.is_file():
        sys.exit(f"--rotation-file {a.rotation_file} does not exist; pass OUT/spinquant/rotations.safetensors "
                 f"of an earlier `rotq quantize --rotation spinquant` run")
    if a.jobs < 1:
        sys.exit(f"--jobs must be at least 1, got {a.jobs}")
    try:
        only = re.compile(a.only) if a.only else None
    except re.error as e:
        sys.exit(f"--only {a.only!r} is not a regular expression: {e}")
    rows = json.loads(a.json.read_text())["rows"] if a.resume and a.json.is_file() else []
    done = {_result_key(r) for r in rows}
    rotations = {_key(row)[1] for row in ROW_SETS[a.rows]}
    if a.rotation is not None and a.rotation not in rotations:
        sys.exit(f"--rotation {a.rotation!r}: row set {a.rows} has rows under {', '.join(sorted(rotations))}")
    todo = [row for row in ROW_SETS[a.rows] if _key(row) not in done
            and (only is None or only.search(_key(row)[2])) and a.rotation in (None, _key(row)[1])]
    if not todo:
        print(f"nothing to run: every row of {a.rows}{' matching the filters' if only or a.rotation else ''} "
              f"is in {a.json}")
    order = {_key(row): i for i, row in enumerate(ROW_SETS[a.rows])}
    lock = threading.Lock()

    def run(row) -> None:
        with tempfile.TemporaryDirectory(dir=REPO / "runs" if (REPO / "runs").is_dir() else None) as tmp:
            result = run_row(row, a, Path(tmp))
        with lock:  # each finished row is on disk at once: an interrupted run keeps it (--resume)
            print(markdown([result]).splitlines()[-1], flush=True)
            rows.append(result)
            rows.sort(key=lambda r: order.get(_result_key(r), len(order)))
            meta = {"date": time.strftime("%Y-%m-%d"), "machine": _machine(a.device),
                    "args": {k: str(v) for k, v in vars(a).items()}}
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")

    with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:
        for future in [pool.submit(run, row) for row in todo]:
            future.result()
    print(markdown(rows))
    if a.plot is not None:
        plot(sorted(set(results) | {a.json}), a.plot)


if __name__ == "__main__":
    main()
