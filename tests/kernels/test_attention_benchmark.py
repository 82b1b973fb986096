"""benchmarks/attention.py runs end to end (``--smoke``: tiny shapes, CPU, Triton interpreter),
including its check that the paged bf16 baseline computes attention."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the script on CPU machines; a GPU runs the real "
                    "benchmark (benchmarks/gpu_run.sh)")
def test_attention_benchmark_smoke(tmp_path):
    out = tmp_path / "attention.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attention.py"), "--smoke", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(r["phase"], r["kernel"]) for r in rows} == {
        ("decode", "kv4_decode (int4 paged)"), ("decode", "bf16 paged (same design)"),
        ("decode", "bf16 SDPA, contiguous K/V"), ("prefill", "kv4_prefill (gather + SDPA)"),
        ("prefill", "kv4_gather alone"), ("prefill", "bf16 SDPA, contiguous K/V")}
    assert len(rows) == 2 * 3 + 2 * 3 and all(r["ms"] > 0 for r in rows)
