"""Accuracy table: perplexity of quantized variants of a model, with calibration cost.

Each row runs the real CLI in a subprocess (`rotq quantize`, then `rotq eval` on WikiText-2
test and the wikisum test split), so its wall time and peak RSS are those of a user's run.
Calibration text is wikisum train only. Prints a Markdown table and writes JSON.

    python benchmarks/accuracy.py --rows foundation --json benchmarks/results/foundation.json
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
    "compensators-w3a16": [("w3a16", "none", m) for m in COMPENSATORS],
    # issue 5: the activation-error levers on top of the best compensator
    "levers-w4a4kv4": [("w4a4kv4", "hadamard", "qep+gptq", ("--a-clip", "auto")),
                       ("w4a4kv4", "spinquant", "qep+gptq", ("--a-clip", "auto", "--rotation-steps", "20"))],
}


def _rotq(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "rotq.quant.cli", *args], check=True,
                   stdout=subprocess.DEVNULL)


def _ppl(model: str, data: str, windows: int, seqlen: int, tmp: Path) -> float:
    out = tmp / "ppl.json"
    _rotq("eval", model, "--ppl", data, "--windows", str(windows), "--seqlen", str(seqlen),
          "--json", str(out))
    return json.loads(out.read_text())["ppl"]


def run_row(row, a: argparse.Namespace, tmp: Path) -> dict:
    model, result = a.model, {"scheme": "fp32", "rotation": "-", "method": "-"}
    if row is not None:
        scheme, rotation, method, *extra = row
        extra = tuple(extra[0]) if extra else ()
        model, report = str(tmp / "q"), tmp / "report.json"
        t0 = time.perf_counter()
        _rotq("quantize", a.model, "-o", model, "--scheme", scheme, "--rotation", rotation,
              "--method", method, "--calib", "wikisum", "--nsamples", str(a.nsamples),
              "--seqlen", str(a.seqlen), "--seed", str(a.seed), "--report", str(report), *extra)
        rep = json.loads(report.read_text())
        result = {"scheme": scheme, "rotation": rotation, "method": _label(method, extra),
                  "calib_seconds": rep["seconds"], "quantize_wall_seconds": time.perf_counter() - t0,
                  "peak_rss_mb": rep["peak_rss_mb"]}
        if rep.get("act_clip_search"):
            result["act_clip_search"] = rep["act_clip_search"]
    result["wikitext2"] = _ppl(model, str(a.wikitext2), a.windows, 2048, tmp)
    result["wikisum"] = _ppl(model, "wikisum", a.wikisum_windows, 2048, tmp)
    if row is not None:
        subprocess.run(["rm", "-rf", model], check=True)
    return result


def _label(method: str, extra: tuple[str, ...]) -> str:
    return " ".join((method, *extra))


def _key(row) -> tuple[str, str, str]:
    if row is None:
        return ("fp32", "-", "-")
    scheme, rotation, method, *extra = row
    return (scheme, rotation, _label(method, tuple(extra[0]) if extra else ()))


def markdown(rows: list[dict]) -> str:
    lines = ["| scheme | rotation | method | WikiText-2 | wikisum | calibration s | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cal = f"{r['calib_seconds']:.0f}" if "calib_seconds" in r else "-"
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        lines.append(f"| {r['scheme']} | {r['rotation']} | {r['method']} | {r['wikitext2']:.2f} | "
                     f"{r['wikisum']:.2f} | {cal} | {rss} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--rows", choices=sorted(ROW_SETS), default="foundation")
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows", type=int, default=40, help="WikiText-2 windows of 2048")
    p.add_argument("--wikisum-windows", type=int, default=16, help="wikisum test windows of 2048")
    p.add_argument("--wikitext2", type=Path, default=WIKITEXT2)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--resume", action="store_true", help="keep the rows already in --json, run the rest")
    a = p.parse_args()
    if not a.wikitext2.is_file():
        sys.exit(f"WikiText-2 test file not found at {a.wikitext2}; pass --wikitext2 PATH")
    rows = json.loads(a.json.read_text())["rows"] if a.resume and a.json.is_file() else []
    done = {(r["scheme"], r["rotation"], r["method"]) for r in rows}
    for row in ROW_SETS[a.rows]:
        if _key(row) in done:
            continue
        with tempfile.TemporaryDirectory(dir=REPO / "runs" if (REPO / "runs").is_dir() else None) as tmp:
            rows.append(run_row(row, a, Path(tmp)))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
        meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {platform.machine()}",
                "args": {k: str(v) for k, v in vars(a).items()}}
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
