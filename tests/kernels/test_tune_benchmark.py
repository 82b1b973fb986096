"""benchmarks/tune.py runs end to end (``--smoke``: tiny shapes, CPU, Triton interpreter): every
candidate it times passed the check against the default plan's output, so each kind of tuning
yields its default and its candidates."""

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
                    "tuning (benchmarks/gpu_run.sh with STEPS naming tune)")
def test_tune_benchmark_smoke(tmp_path):
    out = tmp_path / "tune.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tune.py"), "--smoke", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "failed" not in run.stdout and "off by" not in run.stdout, run.stdout[-3000:]
    rows = json.loads(out.read_text())["rows"]
    for kind in ("gemm-decode", "gemm-prefill", "kv4-decode"):
        mine = [r for r in rows if r["tune"] == kind]
        assert [r["candidate"] for r in mine][0] == "default" and len(mine) == 3, mine
        assert all(r["ms"] > 0 and math.isfinite(r["vs_default"]) for r in mine)
