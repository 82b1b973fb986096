"""benchmarks/first_layers.py: the truncated model is the original's first layers, and a run on a
tiny model writes one scored row per `rotq quantize` flag set, resumable."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("first_layers", ROOT / "benchmarks" / "first_layers.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_truncated_model_keeps_the_first_layers(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tiny_model_dir("qwen3")
    full = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    cut = AutoModelForCausalLM.from_pretrained(bench.truncate(str(src), 1, tmp_path / "cut"), dtype=torch.float32)
    assert cut.config.num_hidden_layers == 1 and len(cut.model.layers) == 1
    kept = dict(cut.named_parameters())
    for name, param in full.named_parameters():
        if ".layers.1." in name:
            assert name not in kept
        else:
            assert torch.equal(kept[name], param), name
    with pytest.raises(SystemExit, match="--layers must be between 1 and 2"):
        bench.truncate(str(src), 3, tmp_path / "too-many")


def test_rows_and_their_scores(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "rows.json"
    argv = ["first_layers.py", "--set", "refine-cross-layer", "--only", "--method rtn", "--model",
            str(tiny_model_dir("llama")), "--layers", "2", "--quantize-flags", "--refine-steps 3", "--nsamples", "2",
            "--seqlen", "32", "--windows", "2", "--eval-seqlen", "32", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    rows = json.loads(out.read_text())["rows"]
    assert [r["row"].split("--method ")[1] for r in rows] == [
        "rtn --refine none", "rtn --refine lsi", "rtn --refine lsi --cross-layer 1"]
    for r in rows:
        assert r["kl_vs_fp"] > 0 and 0 <= r["top1_agreement"] <= 1 and r["kl_tokens"] > 0
    assert rows[0]["refine_seconds_per_layer"] == [] and len(rows[2]["refine_seconds_per_layer"]) == 2
    assert rows[1]["kl_vs_fp"] != rows[0]["kl_vs_fp"]  # refinement changed the deployed weights
    monkeypatch.setattr(sys, "argv", argv + ["--resume"])
    monkeypatch.setattr(bench, "run_row", lambda *args: pytest.fail("--resume reran a finished row"))
    bench.main()
