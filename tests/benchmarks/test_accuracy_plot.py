"""benchmarks/accuracy.py's summary helpers (per-layer errors from a calibration report, the PNG
drawn from result files) and its row bookkeeping under --jobs and --resume."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("accuracy_benchmark", ROOT / "benchmarks" / "accuracy.py")
accuracy = importlib.util.module_from_spec(spec)
spec.loader.exec_module(accuracy)


def test_layer_errors_average_each_layers_linears():
    linears = [{"name": "model.layers.0.self_attn.q_proj", "output_rel_err": 0.1},
               {"name": "model.layers.0.mlp.down_proj", "output_rel_err": 0.3},
               {"name": "model.layers.1.self_attn.o_proj", "output_rel_err": None},
               {"name": "model.layers.1.mlp.up_proj", "output_rel_err": 0.5},
               {"name": "model.layers.10.mlp.up_proj", "output_rel_err": 0.7}]
    assert accuracy.layer_errors(linears) == pytest.approx([0.2, 0.5, 0.7])


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"scheme": "fp32", "rotation": "-", "method": "-", "wikitext2": 20.6, "wikisum": 13.4},
            {"scheme": "w4a4kv4", "rotation": "hadamard", "method": "gptq", "wikitext2": 45.6, "wikisum": 30.0,
             "layer_output_rel_err": [0.01, 0.02, 0.015]}]
    f = tmp_path / "rows.json"
    f.write_text(json.dumps({"rows": rows}))
    png = tmp_path / "plot.png"
    accuracy.plot([f], png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    with pytest.raises(SystemExit, match="no accuracy rows"):
        accuracy.plot([empty], png)


def test_parallel_rows_land_in_table_order_and_resume_runs_only_the_missing(tmp_path, monkeypatch):
    """Rows finish out of order under --jobs; each is on disk as soon as it finishes, the table
    keeps the row set's order, and --resume reruns only what is missing."""
    calls = []

    def fake_row(row, a, tmp):
        scheme, rotation, method, *_ = row
        calls.append((method, a.device))
        time.sleep(0.05 * (len(calls) % 3))
        return {"scheme": scheme, "rotation": rotation, "method": method, "wikitext2": 1.0, "wikisum": 2.0}

    monkeypatch.setattr(accuracy, "run_row", fake_row)
    out, text = tmp_path / "rows.json", tmp_path / "wiki.test.raw"
    text.write_text("x")
    argv = ["accuracy.py", "--rows", "compensators-w3a16", "--jobs", "3", "--device", "cpu", "--json", str(out),
            "--wikitext2", str(text)]
    monkeypatch.setattr(sys, "argv", argv)
    accuracy.main()
    methods = [m for _, _, m in accuracy.ROW_SETS["compensators-w3a16"]]
    assert sorted(calls) == sorted((m, "cpu") for m in methods)
    assert [r["method"] for r in json.loads(out.read_text())["rows"]] == methods

    kept = json.loads(out.read_text())
    kept["rows"] = [r for r in kept["rows"] if r["method"] != "qep"]
    out.write_text(json.dumps(kept))
    calls.clear()
    monkeypatch.setattr(sys, "argv", argv + ["--resume"])
    accuracy.main()
    assert calls == [("qep", "cpu")]
    assert [r["method"] for r in json.loads(out.read_text())["rows"]] == methods


def test_only_runs_the_rows_whose_label_matches(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_row(row, a, tmp):
        scheme, rotation, method, *_ = row
        calls.append(method)
        return {"scheme": scheme, "rotation": rotation, "method": method, "wikitext2": 1.0, "wikisum": 2.0}

    monkeypatch.setattr(accuracy, "run_row", fake_row)
    out, text = tmp_path / "rows.json", tmp_path / "wiki.test.raw"
    text.write_text("x")
    argv = ["accuracy.py", "--rows", "compensators-w3a16", "--json", str(out), "--wikitext2", str(text)]
    monkeypatch.setattr(sys, "argv", argv + ["--only", "foem$"])
    accuracy.main()
    assert calls == ["gptaq+foem", "foem"]
    monkeypatch.setattr(sys, "argv", argv + ["--only", "foem$", "--resume"])
    accuracy.main()
    assert calls == ["gptaq+foem", "foem"] and "nothing to run" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", argv + ["--only", "("])
    with pytest.raises(SystemExit, match="not a regular expression"):
        accuracy.main()


def test_rotation_runs_one_column_of_a_row_set(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_row(row, a, tmp):
        scheme, rotation, method, *_ = row
        calls.append((rotation, method))
        return {"scheme": scheme, "rotation": rotation, "method": method, "wikitext2": 1.0, "wikisum": 2.0}

    monkeypatch.setattr(accuracy, "run_row", fake_row)
    out, text = tmp_path / "rows.json", tmp_path / "wiki.test.raw"
    text.write_text("x")
    argv = ["accuracy.py", "--rows", "compensators-w4a4kv4", "--json", str(out), "--wikitext2", str(text)]
    monkeypatch.setattr(sys, "argv", argv + ["--rotation", "spinquant", "--only", "^qep"])
    accuracy.main()
    assert calls == [("spinquant", "qep")]
    monkeypatch.setattr(sys, "argv", argv + ["--rotation", "quarot"])
    with pytest.raises(SystemExit, match="has rows under hadamard, spinquant"):
        accuracy.main()


def test_rotation_file_is_passed_to_spinquant_rows_only(tmp_path, monkeypatch):
    """--rotation-file reaches `rotq quantize` for spinquant rows (not hadamard's) and the row
    records it; a missing file is a clear exit before anything runs."""
    quantized = []

    def fake_quantize(model, out, flags, report):
        quantized.append(flags)
        Path(report).write_text(json.dumps({"seconds": 1.0, "peak_rss_mb": 1.0, "linears": []}))
        Path(out).mkdir()

    monkeypatch.setattr(accuracy, "_quantize_in_own_process", fake_quantize)
    monkeypatch.setattr(accuracy, "_ppl", lambda *a: 3.0)
    out, text, rot = tmp_path / "rows.json", tmp_path / "wiki.test.raw", tmp_path / "rotations.safetensors"
    text.write_text("x")
    argv = ["accuracy.py", "--rows", "compensators-w4a4kv4", "--only", "^gptq", "--json", str(out),
            "--wikitext2", str(text), "--rotation-file", str(rot)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match="does not exist"):
        accuracy.main()
    assert not quantized
    rot.write_bytes(b"R")
    accuracy.main()
    by_rotation = {q[q.index("--rotation") + 1]: q for q in quantized}
    assert "--rotation-file" not in by_rotation["hadamard"]
    assert by_rotation["spinquant"][-2:] == ("--rotation-file", str(rot))
    rows = {r["rotation"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["spinquant"]["rotation_file"] == str(rot) and "rotation_file" not in rows["hadamard"]
