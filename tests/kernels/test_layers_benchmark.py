"""benchmarks/layers.py runs end to end (``--smoke``: tiny shapes, CPU, Triton interpreter) and
its rotq stacks compute the bf16 stack's function up to 4-bit rounding."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the script on CPU machines; a GPU runs the real "
                    "benchmark (benchmarks/gpu_run.sh), and older Tritons' interpreters cannot run the smoke shapes")
def test_layers_benchmark_smoke(tmp_path):
    out = tmp_path / "layers.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "layers.py"), "--smoke", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["scenario"], r["config"]) for r in rows} == {
        (s, c) for s in ("prefill 37", "decode batch 1 ctx 40", "decode batch 3 ctx 40")
        for c in ("bf16", "rotq W4A4", "rotq W4A4KV4")}
    assert all(r["ms"] > 0 and math.isfinite(r["tokens_per_s"]) for r in rows)
    errs = [r["rel_err_vs_bf16"] for r in rows if r.get("rel_err_vs_bf16") is not None]
    assert len(errs) == 2 and all(0 < e < 0.8 for e in errs), errs  # unrelated outputs give ≈ 1.4
