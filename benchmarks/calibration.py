"""Calibration cost: wall time and peak memory per method, how they grow with model width and
depth, and llm-compressor's GPTQ on the same model, data and machine.

Every run is the real CLI (`rotq quantize`) in its own process, so its time and peak RSS are a
user's. Three parts (``--parts``):

* ``methods``: smollm2-135m, each ``--methods`` entry at ``--scheme`` on ``--nsamples`` ×
  ``--seqlen`` wikisum-train tokens (the issue's setting: W4A16 per channel, 64 × 1024);
  perplexity on WikiText-2 (``--windows`` × 2048) for the GPTQ rows.
* ``scaling``: random-weight Llama models (smollm2's tokenizer) of growing width at fixed depth
  and growing depth at fixed width, GPTQ W4A16, time and peak RSS, drawn as a PNG.
* ``offload``: the same random models at ``--offload-width`` and ``--offload-depths``, GPTQ
  W4A16 on ``--offload-nsamples`` × 512 tokens, in memory and with ``--offload`` (decoder layers
  streamed from disk): peak RSS against depth for both, on the PNG's third panel.
* ``llm-compressor``: llm-compressor 0.14's ``oneshot`` with a per-channel symmetric W4A16
  ``GPTQModifier`` (lm_head ignored) on the same token windows, installed by this script into
  its own virtual environment (skipped, with the reason, where that fails); its output is
  evaluated with `rotq eval` like rotq's.

    python benchmarks/calibration.py --json benchmarks/results/calibration.json --plot benchmarks/results/calibration.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIKITEXT2 = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
LLMC_VENV = Path(os.environ.get("ROTQ_LLMC_VENV", Path(tempfile.gettempdir()) / "rotq-llmcompressor-venv"))
LLMC_SPEC = "llmcompressor==0.14.*"

LLMC_SCRIPT = r'''
import sys, time, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier

model_dir, windows_file, out = sys.argv[1:4]
torch.set_num_threads(int(sys.argv[4]))
ids = torch.load(windows_file)
data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
t0 = time.perf_counter()
per_channel = {"targets": ["Linear"],  # the preset "W4A16" is group 128: per channel, as rotq's w4a16
               "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "channel"}}
recipe = GPTQModifier(config_groups={"group_0": per_channel}, ignore=["lm_head"])
oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0])
print("LLMC_SECONDS", time.perf_counter() - t0, flush=True)
model.save_pretrained(out, save_compressed=False)
tokenizer.save_pretrained(out)
'''


def _child(cmd: list[str], env=None, log: Path | None = None) -> tuple[float, float, str]:
    """(wall s, peak RSS MB of that process tree's largest process, stdout) of one command."""
    t0 = time.perf_counter()
    with open(log or os.devnull, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed" + (f"; see {log}" if log else ""))
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, out


def quantize(model: str, out: Path, scheme: str, method: str, a, extra=()) -> dict:
    report = out.parent / f"{out.name}-report.json"
    wall, rss, _ = _child([sys.executable, "-m", "rotq.quant.cli", "quantize", model, "-o", str(out),
                           "--scheme", scheme, "--rotation", "none", "--method", method, "--calib", "wikisum",
                           "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--report", str(report),
                           *extra], log=out.parent / f"{out.name}.log")
    rep = json.loads(report.read_text())
    from accuracy import layer_errors  # benchmarks/accuracy.py, beside this file

    return {"wall_s": wall, "calib_s": rep["seconds"], "peak_rss_mb": rss,
            "layer_output_rel_err": layer_errors(rep["linears"])}


def wikitext2(model: str, a) -> float:
    out = Path(tempfile.mkdtemp()) / "ppl.json"
    _child([sys.executable, "-m", "rotq.quant.cli", "eval", model, "--ppl", str(a.wikitext2), "--windows",
            str(a.windows), "--seqlen", "2048", "--json", str(out)])
    return json.loads(out.read_text())["ppl"]


def methods_part(a, tmp: Path) -> list[dict]:
    rows = []
    for method in a.methods:
        out = tmp / f"m-{method}"
        row = {"part": "methods", "model": a.model, "scheme": a.scheme, "method": method,
               **quantize(a.model, out, a.scheme, method, a)}
        if a.windows:
            row["wikitext2"] = wikitext2(str(out), a)
        print(f"  {method}: {row['calib_s']:.0f} s calibration, {row['peak_rss_mb']:.0f} MB"
              + (f", WikiText-2 {row['wikitext2']:.2f}" if "wikitext2" in row else ""), flush=True)
        rows.append(row)
        subprocess.run(["rm", "-rf", str(out)], check=True)
    return rows


def synthetic_model(out: Path, hidden: int, layers: int) -> None:
    """A random Llama (head_dim 64, intermediate 8/3 · hidden rounded to 64) with smollm2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rotq.quant.models import resolve_model_dir

    tok = AutoTokenizer.from_pretrained(resolve_model_dir("smollm2-135m"))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=(hidden * 8 // 3 + 63) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)


def scaling_part(a, tmp: Path) -> list[dict]:
    shapes = [("width", w, a.base_depth) for w in a.widths] + [("depth", a.base_width, d) for d in a.depths]
    rows = []
    for axis, hidden, layers in shapes:
        model = tmp / f"syn-{hidden}x{layers}"
        if not model.exists():
            synthetic_model(model, hidden, layers)
        out = tmp / f"q-{hidden}x{layers}"
        row = {"part": "scaling", "axis": axis, "hidden": hidden, "layers": layers, "method": "gptq",
               **quantize(str(model), out, "w4a16", "gptq", a)}
        print(f"  {axis}: hidden {hidden} x {layers} layers: {row['calib_s']:.0f} s, {row['peak_rss_mb']:.0f} MB",
              flush=True)
        rows.append(row)
        subprocess.run(["rm", "-rf", str(out)], check=True)
    return rows


def llmcompressor_part(a, tmp: Path) -> list[dict]:
    """llm-compressor's GPTQ W4A16 on the same windows, or one row saying why it was skipped."""
    import torch

    from rotq.quant.data import calibration_batches, load_text, tokenize_text
    from rotq.quant.models import resolve_model_dir

    py = LLMC_VENV / "bin" / "python"
    if not py.exists() or subprocess.run([str(py), "-c", "import llmcompressor"], capture_output=True).returncode:
        print(f"  installing {LLMC_SPEC} into {LLMC_VENV} (once)", flush=True)
        steps = [[sys.executable, "-m", "venv", str(LLMC_VENV)],
                 [str(py), "-m", "pip", "install", "-q", "torch==2.13.0", LLMC_SPEC]]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode:
                reason = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["unknown error"]
                print(f"  llm-compressor skipped: {' '.join(step[:3])} failed: {reason[0]}", flush=True)
                return [{"part": "llm-compressor", "skipped": reason[0]}]
    model_dir = resolve_model_dir(a.model)
    from transformers import AutoTokenizer

    ids = tokenize_text(AutoTokenizer.from_pretrained(model_dir), load_text("wikisum", "train"))
    windows = tmp / "windows.pt"
    torch.save(calibration_batches(ids, a.nsamples, a.seqlen, 0), windows)
    script, out = tmp / "llmc_gptq.py", tmp / "llmc-out"
    script.write_text(LLMC_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    log = tmp / "llmc.log"
    try:
        wall, rss, stdout = _child([str(py), str(script), str(model_dir), str(windows), str(out),
                                    str(torch.get_num_threads())], env=env, log=log)
    except RuntimeError:
        last = [line for line in log.read_text().splitlines() if line.strip()][-1:] or ["no output"]
        print(f"  llm-compressor failed: {last[0]}", flush=True)
        return [{"part": "llm-compressor", "skipped": f"failed: {last[0][:300]}"}]
    seconds = float(next(line.split()[1] for line in stdout.splitlines() if line.startswith("LLMC_SECONDS")))
    row = {"part": "llm-compressor", "method": "llm-compressor 0.14 GPTQModifier W4A16", "wall_s": wall,
           "calib_s": seconds, "peak_rss_mb": rss}
    if a.windows:
        row["wikitext2"] = wikitext2(str(out), a)
    print(f"  llm-compressor: {seconds:.0f} s calibration ({wall:.0f} s wall), {rss:.0f} MB"
          + (f", WikiText-2 {row['wikitext2']:.2f}" if "wikitext2" in row else ""), flush=True)
    return [row]


def offload_part(a, tmp: Path) -> list[dict]:
    rows = []
    for layers in a.offload_depths:
        model = tmp / f"syn-{a.offload_width}x{layers}"
        if not model.exists():
            synthetic_model(model, a.offload_width, layers)
        for offload in (False, True):
            out = tmp / f"o-{a.offload_width}x{layers}-{offload}"
            extra = ["--offload", str(tmp / "offload")] if offload else []
            small = argparse.Namespace(nsamples=a.offload_nsamples, seqlen=512)
            row = {"part": "offload", "hidden": a.offload_width, "layers": layers, "method": "gptq",
                   "offload": offload, **quantize(str(model), out, "w4a16", "gptq", small, extra)}
            print(f"  hidden {a.offload_width} x {layers} layers, {'offload' if offload else 'in memory'}: "
                  f"{row['calib_s']:.0f} s, {row['peak_rss_mb']:.0f} MB", flush=True)
            rows.append(row)
            subprocess.run(["rm", "-rf", str(out)], check=True)
    return rows


def plot(rows: list[dict], png: Path) -> None:
    """One panel per part measured: time and peak RSS against width and against depth
    (``scaling``), peak RSS against depth in memory and with --offload (``offload``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_rows = [(axis, key) for axis, key in (("width", "hidden"), ("depth", "layers"))
                 if any(r.get("axis") == axis for r in rows)]
    offload = [r for r in rows if r.get("part") == "offload"]
    panels = len(axes_rows) + bool(offload)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    for ax, (axis, key) in zip(axes[0], axes_rows):
        pts = sorted((r[key], r["calib_s"], r["peak_rss_mb"]) for r in rows if r.get("axis") == axis)
        x = [p[0] for p in pts]
        ax.plot(x, [p[1] for p in pts], "o-", color="tab:blue", label="calibration s")
        ax.set_xlabel("hidden size" if axis == "width" else "decoder layers")
        ax.set_ylabel("seconds", color="tab:blue")
        twin = ax.twinx()
        twin.plot(x, [p[2] for p in pts], "s--", color="tab:red", label="peak RSS MB")
        twin.set_ylabel("peak RSS MB", color="tab:red")
        ax.set_ylim(bottom=0)
        twin.set_ylim(bottom=0)
        ax.set_title(f"GPTQ W4A16 vs model {axis}")
    if offload:
        ax = axes[0][-1]
        for mode, style, label in ((False, "o-", "in memory"), (True, "s--", "--offload")):
            pts = sorted((r["layers"], r["peak_rss_mb"]) for r in offload if r["offload"] == mode)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
        ax.set_title(f"GPTQ W4A16 peak RSS vs depth, hidden {offload[0]['hidden']}")
        ax.set_xlabel("decoder layers")
        ax.set_ylabel("peak RSS MB")
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="+", choices=("methods", "scaling", "offload", "llm-compressor"),
                   default=["methods", "scaling", "offload", "llm-compressor"])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--scheme", default="w4a16")
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--windows", type=int, default=40, help="WikiText-2 windows of 2048 (0: skip perplexity)")
    p.add_argument("--wikitext2", type=Path, default=WIKITEXT2)
    p.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--base-width", type=int, default=512)
    p.add_argument("--base-depth", type=int, default=4)
    p.add_argument("--offload-width", type=int, default=1024)
    p.add_argument("--offload-depths", type=int, nargs="+", default=[2, 8, 16])
    p.add_argument("--offload-nsamples", type=int, default=16, help="calibration sequences of 512 (offload part)")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--plot", type=Path, metavar="PNG")
    a = p.parse_args()
    if a.windows and not a.wikitext2.is_file():
        sys.exit(f"WikiText-2 test file not found at {a.wikitext2}; pass --wikitext2 PATH or --windows 0")
    import torch

    rows = []
    with tempfile.TemporaryDirectory(prefix="rotq-calib-bench-", dir=REPO / "runs" if (REPO / "runs").is_dir()
                                     else None) as tmp:
        for part, run in (("methods", methods_part), ("scaling", scaling_part), ("offload", offload_part),
                          ("llm-compressor", llmcompressor_part)):
            if part in a.parts:
                print(f"{part}:", flush=True)
                rows += run(a, Path(tmp))
    rotq_gptq = next((r for r in rows if r.get("part") == "methods" and r["method"] == "gptq"), None)
    llmc = next((r for r in rows if r.get("part") == "llm-compressor" and "calib_s" in r), None)
    print("| part | model / shape | method | calibration s | wall s | peak RSS MB | WikiText-2 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['part']} | - | skipped: {r['skipped']} | | | | |")
            continue
        shape = r.get("model") or (f"hidden {r['hidden']} x {r['layers']}" if "hidden" in r else a.model)
        shape += " (--offload)" if r.get("offload") else ""
        ppl = f"{r['wikitext2']:.2f}" if "wikitext2" in r else "-"
        print(f"| {r['part']} | {shape} | {r['method']} | {r['calib_s']:.0f} | {r['wall_s']:.0f} | "
              f"{r['peak_rss_mb']:.0f} | {ppl} |")
    if rotq_gptq and llmc:
        print(f"rotq GPTQ vs llm-compressor: {llmc['wall_s'] / rotq_gptq['wall_s']:.2f}x faster (wall), "
              f"{llmc['peak_rss_mb'] / rotq_gptq['peak_rss_mb']:.2f}x less peak memory")
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} {platform.machine()}",
            "threads": torch.get_num_threads(), "args": {k: str(v) for k, v in vars(a).items()}}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    if a.plot is not None and any(r.get("part") in ("scaling", "offload") for r in rows):
        plot(rows, a.plot)


if __name__ == "__main__":
    main()
