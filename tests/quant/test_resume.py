"""Resumable calibration (quant/resume.py) through the CLI on tiny 2-layer models: a run killed
with SIGKILL, then resumed with --resume, writes the same files, byte for byte, as an
uninterrupted run; a resume with other options is refused; a kill while the state is being
written leaves the previous state, which a resume uses.

The calibration report is compared without its wall-clock fields (seconds, peak RSS), which
differ between any two runs; every other file is compared byte for byte."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from rotq.quant import pipeline
from rotq.quant.cli import main
from rotq.quant.resume import MANIFEST

TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
        "A rotation of the hidden state leaves the output of the network unchanged. ") * 40 + "\n"
LINEARS_PER_LAYER = 7

# Runs `rotq quantize` in a child process that stops at the n-th call of one function: "solve"
# (pipeline._solve_linear: stops mid-layer) or "save" (resume.write_safetensors: stops mid-write, after
# half of the file's bytes reached the .tmp file). It then touches READY and waits for the
# parent's SIGKILL.
CHILD = r"""
import os, sys, time
from pathlib import Path
from safetensors.torch import save
from rotq.quant import pipeline, resume
from rotq.quant.cli import main

where, n, ready, argv = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]
calls = 0

def stop():
    ready.touch()
    time.sleep(600)

def solve(*args, _solve=pipeline._solve_linear):
    global calls
    calls += 1
    if calls == n:
        stop()
    return _solve(*args)

def write_safetensors(filename, tensors, metadata=None, _write=resume.write_safetensors):
    global calls
    calls += 1
    if calls == n:
        data = save(tensors, metadata=metadata)
        Path(filename).write_bytes(data[: len(data) // 2])
        stop()
    return _write(filename, tensors, metadata)

if where == "solve":
    pipeline._solve_linear = solve
else:
    resume.write_safetensors = write_safetensors
main(argv)
raise SystemExit("the run finished before it was killed")
"""


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def _args(model, out, text, *extra):
    return ["quantize", str(model), "-o", str(out), "--calib", str(text), "--nsamples", "4",
            "--seqlen", "32", *extra]


def _kill_run(tmp_path, where: str, n: int, argv: list[str]) -> None:
    """Run the CLI in a child, SIGKILL it at the n-th call of ``where`` (see CHILD)."""
    ready = tmp_path / "ready"
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, where, str(n), str(ready), *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert ready.exists() and proc.returncode == -signal.SIGKILL, err[-2000:]


def _files(out) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _without_clock(value):
    if isinstance(value, dict):
        return {k: _without_clock(v) for k, v in value.items() if k not in ("seconds", "peak_rss_mb")}
    if isinstance(value, list):
        return [_without_clock(v) for v in value]
    return value


def assert_same_output(a, b, linears: int = 2 * LINEARS_PER_LAYER) -> None:
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        if name == "calibration_report.json":
            ra, rb = (_without_clock(json.loads(f[name])) for f in (fa, fb))
            assert ra == rb
            assert len(ra["linears"]) == linears
        else:
            assert fa[name] == fb[name], f"{name} differs"


def _count_solves(monkeypatch) -> list:
    calls = []
    solve = pipeline._solve_linear
    monkeypatch.setattr(pipeline, "_solve_linear", lambda name, *a: calls.append(name) or solve(name, *a))
    return calls


def _refuse(monkeypatch, module, name):
    def refuse(*args, **kwargs):
        raise AssertionError(f"{name} ran again on resume")
    monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("extra", [[], ["--method", "gptaq"], ["--scheme", "w4a16", "--method", "rtn"]],
                         ids=["w4a4kv4-default", "gptaq", "w4a16-rtn"])
def test_sigkill_mid_layer_then_resume_is_bitwise_identical(tiny_model_dir, text_file, tmp_path, capsys,
                                                              monkeypatch, extra):
    """Default w4a4kv4 (qep+gptq with the fitted activation clip; both trajectories), gptaq
    (the full-precision trajectory) and data-free rtn; killed in layer 1 at its third linear."""
    model = tiny_model_dir("qwen3")
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert main(_args(model, reference, text_file, *extra)) == 0
    assert not (tmp_path / "reference.partial").exists()

    _kill_run(tmp_path, "solve", LINEARS_PER_LAYER + 3, _args(model, out, text_file, *extra))
    state = tmp_path / "out.partial"
    assert json.loads((state / MANIFEST).read_text())["layers_done"] == 1
    assert not out.exists()

    _refuse(monkeypatch, pipeline, "search_activation_clip")
    solved = _count_solves(monkeypatch)
    capsys.readouterr()
    assert main(_args(model, out, text_file, *extra, "--resume")) == 0
    err = capsys.readouterr().err
    assert f"resuming from {state}: 1 of 2 layers done" in err
    assert "1/2 [" in err  # the progress bar starts at the completed layer
    assert solved == [n for n in solved if n.startswith("model.layers.1.")] and len(solved) == LINEARS_PER_LAYER
    assert not state.exists()
    assert_same_output(reference, out)


def test_mixture_of_experts_killed_among_its_experts_resumes_bitwise_identical(tiny_model_dir, text_file, tmp_path):
    """Mixtral, both layers sparse (4 attention + 8 x 3 expert linears each): killed in layer 1's
    third expert; layer 0's experts and the routing report come back from the state."""
    model, per_layer = tiny_model_dir("mixtral"), 4 + 8 * 3
    extra = ["--rotation", "hadamard", "--method", "qep+gptq", "--a-clip", "0.9"]
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert main(_args(model, reference, text_file, *extra)) == 0
    _kill_run(tmp_path, "solve", per_layer + 4 + 2 * 3, _args(model, out, text_file, *extra))
    assert json.loads((tmp_path / "out.partial" / MANIFEST).read_text())["layers_done"] == 1
    assert main(_args(model, out, text_file, *extra, "--resume")) == 0
    assert_same_output(reference, out, linears=2 * per_layer)
    assert len(json.loads((out / "calibration_report.json").read_text())["experts"]) == 2


def test_offloaded_run_killed_mid_layer_resumes_bitwise_identical(tiny_model_dir, text_file, tmp_path,
                                                                   monkeypatch):
    """--offload with --resume: the state keeps each finished layer's integer weights and its
    other tensors (not the float linears, which stay in the checkpoint); a run killed in layer 1
    resumes with a fresh scratch folder and writes what an uninterrupted run writes (which is
    what an in-memory run writes: test_offload.py)."""
    model = tiny_model_dir("llama", nonpow2=True)
    extra = ["--scheme", "w4a4kv4", "--rotation", "hadamard", "--a-clip", "0.9", "--method", "gptaq"]
    offload = ["--offload", str(tmp_path / "scratch")]
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert main(_args(model, reference, text_file, *extra, *offload)) == 0

    _kill_run(tmp_path, "solve", LINEARS_PER_LAYER + 3, _args(model, out, text_file, *extra, *offload))
    state = tmp_path / "out.partial"
    assert json.loads((state / MANIFEST).read_text())["layers_done"] == 1
    from safetensors import safe_open
    with safe_open(state / "layer-00000.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("qweight.model.layers.0.mlp.down_proj.codes").dtype == torch.int8
    assert not any(k.startswith("state.") and k.endswith("_proj.weight") for k in keys)  # no float linears

    solved = _count_solves(monkeypatch)
    assert main(_args(model, out, text_file, *extra, *offload, "--resume")) == 0
    assert len(solved) == LINEARS_PER_LAYER and not state.exists()
    assert_same_output(reference, out)


def test_spinquant_rotations_are_not_learned_again(tiny_model_dir, text_file, tmp_path, monkeypatch):
    """Learned R1/R2 are saved before the layer loop; the resumed run folds the saved ones."""
    from rotq.quant import spinquant

    model = tiny_model_dir("llama")
    extra = ["--rotation", "spinquant", "--rotation-steps", "2", "--method", "gptq"]
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert main(_args(model, reference, text_file, *extra)) == 0
    _kill_run(tmp_path, "solve", LINEARS_PER_LAYER + 1, _args(model, out, text_file, *extra))
    _refuse(monkeypatch, spinquant, "learn_rotations")
    assert main(_args(model, out, text_file, *extra, "--resume")) == 0
    assert "spinquant/rotations.safetensors" in _files(out)
    assert_same_output(reference, out)


def test_sigkill_while_writing_the_state_keeps_the_previous_one(tiny_model_dir, text_file, tmp_path):
    """Killed halfway through writing layer 1's activations (layer 1's own file is complete
    but not yet committed): the resume recomputes layer 1 from layer 0's state. A torn
    manifest.json.tmp, as a kill during the manifest's write leaves, is ignored as well. The
    full-precision trajectory lives in a memory-mapped file (--trajectory-dir) here."""
    model = tiny_model_dir("llama")
    extra = ["--method", "gptaq", "--trajectory-dir", str(tmp_path / "trajectory")]
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert main(_args(model, reference, text_file, *extra)) == 0
    # write_safetensors calls: layer-00000, activations-00000, layer-00001, activations-00001
    _kill_run(tmp_path, "save", 4, _args(model, out, text_file, *extra))
    state = tmp_path / "out.partial"
    torn = state / "activations-00001.safetensors.tmp"
    assert torn.is_file() and (state / "layer-00001.safetensors").is_file()
    assert json.loads((state / MANIFEST).read_text())["layers_done"] == 1
    (state / f"{MANIFEST}.tmp").write_text('{"format": "rotq-calibration-state", "layers_')
    assert main(_args(model, out, text_file, *extra, "--resume")) == 0
    assert not state.exists()
    assert_same_output(reference, out)


class _Crash(Exception):
    pass


def _crash_in_layer_1(tiny_model_dir, text_file, out, monkeypatch):
    """A run that dies in layer 1 (in process: the state is all that matters here)."""
    calls = _count_solves(monkeypatch)
    solve = pipeline._solve_linear

    def crash(name, *args):
        if len(calls) > LINEARS_PER_LAYER:
            raise _Crash
        return solve(name, *args)

    monkeypatch.setattr(pipeline, "_solve_linear", crash)
    with pytest.raises(_Crash):
        main(_args(tiny_model_dir("llama"), out, text_file))
    monkeypatch.undo()


def _bad(argv, capsys, *match):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for m in match:
        assert m in err, err


def test_resume_refuses_a_different_run(tiny_model_dir, text_file, tmp_path, capsys, monkeypatch):
    model, out = tiny_model_dir("llama"), tmp_path / "out"
    state = tmp_path / "out.partial"
    _crash_in_layer_1(tiny_model_dir, text_file, out, monkeypatch)
    before = _files(state)
    _bad(_args(model, out, text_file, "--resume", "--nsamples", "6"), capsys,
         f"the calibration state in {state} belongs to a different run", "--nsamples: 4 in the state, 6 now")
    _bad(_args(model, out, text_file, "--resume", "--method", "gptaq"), capsys,
         '--method: "qep+gptq" in the state, "gptaq" now')
    other_text = tmp_path / "other.txt"
    other_text.write_text(TEXT.replace("fox", "cat"))
    _bad(_args(model, out, other_text, "--resume"), capsys, "--calib:", "calibration tokens: sha256")
    _bad(_args(model, out, text_file), capsys, f"{state} holds the calibration state of an interrupted run; "
         "pass --resume")
    assert _files(state) == before  # a refusal leaves the state as it was

    config, st = model / "config.json", (model / "config.json").stat()
    os.utime(config, ns=(1, 1))  # the model changed on disk
    try:
        _bad(_args(model, out, text_file, "--resume"), capsys, "model file config.json:")
    finally:
        os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns))

    layer0 = state / "layer-00000.safetensors"  # damaged after it was committed
    layer0.write_bytes(layer0.read_bytes()[:100])
    _bad(_args(model, out, text_file, "--resume"), capsys, f"{layer0} cannot be read", f"remove {state}")


def test_resume_without_a_state_starts_fresh(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(tiny_model_dir("llama"), out, text_file, "--resume", "--state-dir",
                      str(tmp_path / "state"))) == 0
    assert "no calibration state in" in capsys.readouterr().err
    assert out.is_dir() and not (tmp_path / "state").exists()
    not_a_state = tmp_path / "mine"
    not_a_state.mkdir()
    (not_a_state / "notes.txt").write_text("keep me")
    _bad(_args(tiny_model_dir("llama"), tmp_path / "o2", text_file, "--state-dir", str(not_a_state)), capsys,
         "is not a rotq calibration state")
    assert (not_a_state / "notes.txt").read_text() == "keep me"
    _bad(_args(tiny_model_dir("llama"), tmp_path / "o2", text_file, "--state-dir", str(text_file / "state")),
         capsys, "cannot create the state directory")
