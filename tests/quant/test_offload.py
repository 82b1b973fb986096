"""--offload (quant/offload.py): decoder layers streamed from the checkpoint one at a time and the
quantized layers kept on disk; the output is byte-identical to calibrating in memory."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from rotq.quant import offload as offload_module
from rotq.quant.arch import decoder_layers, layer_linears
from rotq.quant.cli import main
from rotq.quant.offload import OffloadedWeights
from rotq.quant.quantizer import QuantizedWeight

TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
        "A rotation of the hidden state leaves the output of the network unchanged. ") * 60 + "\n"


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def _files(out) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _comparable_report(raw: bytes) -> dict:
    report = json.loads(raw)
    report["provenance"]["options"].pop("offload")
    report["provenance"].get("prefix", {}).pop("seconds", None)
    for r in report["linears"] + report["refine"]:
        r.pop("seconds")
    return {k: v for k, v in report.items() if k not in ("seconds", "peak_rss_mb")}


def _sharded_copy(model_dir, dest):
    """The tiny model saved in several safetensors shards with an index."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(model_dir).save_pretrained(dest, max_shard_size="300KB")
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(dest)
    assert (dest / "model.safetensors.index.json").is_file()
    return dest


@pytest.mark.parametrize("arch,nonpow2,sharded,extra", [
    ("llama", False, False, ["--method", "qep+gptaq", "--rotation", "hadamard", "--a-clip", "0.8",
                             "--prefix", "5,17,3"]),  # the prefix computed on streamed layers
    ("qwen3", True, True, ["--scheme", "w4a16", "--method", "gptq"]),  # q_norm/k_norm, odd sizes, shards
    ("qwen2", False, False, ["--scheme", "w4a16", "--method", "rtn", "--rotation", "none",
                             "--format", "compressed-tensors"]),
    ("llama", True, False, ["--method", "gptq", "--rotation", "hadamard", "--a-clip", "0.9", "--refine", "sde",
                            "--refine-steps", "3"]),  # refinement on streamed layers
    # experts read by Mixtral's checkpoint names (block_sparse_moe.experts.{e}.w1/w2/w3), the router too
    ("mixtral", True, True, ["--method", "qep+gptq", "--rotation", "hadamard", "--a-clip", "0.9"]),
    ("qwen3_moe", False, False, ["--scheme", "w4a16", "--method", "gptaq", "--rotation", "hadamard"]),
])
def test_offload_writes_the_in_memory_checkpoint(tiny_model_dir, text_file, tmp_path, monkeypatch,
                                                 arch, nonpow2, sharded, extra):
    model = tiny_model_dir(arch, nonpow2=nonpow2)
    if sharded:
        model = _sharded_copy(model, tmp_path / "sharded")
    resident, loaded = [], []  # real (not meta) decoder-layer linears whenever a layer is read
    load, loader = offload_module.LayerSource.load, offload_module.load_model_offloaded

    def remembering_loader(*args, **kwargs):
        out = loader(*args, **kwargs)
        loaded.append(out[0])
        return out

    def counting_load(self, i, layer, config):
        load(self, i, layer, config)
        resident.append(sum(lin.weight.device.type != "meta" for m in decoder_layers(loaded[-1])
                            for lin in layer_linears(m).values()))

    monkeypatch.setattr(offload_module.LayerSource, "load", counting_load)
    monkeypatch.setattr(offload_module, "load_model_offloaded", remembering_loader)
    common = [str(model), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32", *extra]
    scratch = tmp_path / "scratch"
    assert main(["quantize", *common, "-o", str(tmp_path / "memory")]) == 0
    assert main(["quantize", *common, "-o", str(tmp_path / "offload"), "--offload", str(scratch)]) == 0
    a, b = _files(tmp_path / "memory"), _files(tmp_path / "offload")
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith("calibration_report.json"):
            assert _comparable_report(a[name]) == _comparable_report(b[name])
        else:
            assert a[name] == b[name], f"{name} differs with --offload"
    layers = decoder_layers(loaded[0])
    # one layer in memory at a time, however often the layers stream (the prefix's statistics,
    # its K/V and its outlier count each stream them once before calibration)
    per_layer = [len(layer_linears(layer)) for layer in layers]  # a MoE's dense layers have fewer
    assert resident == per_layer * (len(resident) // len(layers)) and len(resident) % len(layers) == 0
    assert scratch.is_dir() and not any(scratch.iterdir())  # the run's scratch folder is gone


def test_offloaded_weights_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    store = OffloadedWeights(tmp_path / "w")
    made = {}
    for layer in range(3):
        for name in ("q", "down"):
            key = f"model.layers.{layer}.{name}"
            zero = None if name == "q" else torch.randint(0, 15, (5, 2), generator=g).float()
            codes = torch.randint(-8, 8, (5, 12), generator=g) if name == "q" else torch.randint(0, 256, (5, 12))
            made[key] = QuantizedWeight(codes.float(), torch.rand(5, 2, generator=g), zero, 6)  # as solvers give
            store[key] = made[key]
        store.spill(f"layer-{layer:05d}")
    assert len(store) == 6 and list(store) == list(made) and "model.layers.1.q" in store
    for key, qw in reversed(made.items()):
        got = store[key]
        assert got.codes.dtype == qw.codes.dtype
        assert torch.equal(got.codes, qw.codes) and torch.equal(got.scale, qw.scale)
        assert (got.zero_point is None) == (qw.zero_point is None) and got.group_size == 6
        if qw.zero_point is not None:
            assert torch.equal(got.zero_point, qw.zero_point)
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [f"layer-{i:05d}.safetensors" for i in range(3)]
    with safe_open(tmp_path / "w" / "layer-00000.safetensors", "pt") as f:  # one byte per code on disk
        assert f.get_tensor("model.layers.0.q.codes").dtype == torch.int8
        assert f.get_tensor("model.layers.0.down.codes").dtype == torch.uint8


def test_saving_the_state_reads_no_offloaded_layer(tiny_model_dir, text_file, tmp_path, monkeypatch):
    """Saving the resume state after each layer must not read the layers already on disk (that
    grew with the square of the depth); only export reads them back."""
    from rotq.quant import pipeline

    saving, reads = [], []
    load, save = OffloadedWeights._load, pipeline._Checkpoint.save

    def counting_load(self, path):
        if saving:
            reads.append(path.name)
        return load(self, path)

    def marked_save(self, *args, **kwargs):
        saving.append(True)
        try:
            return save(self, *args, **kwargs)
        finally:
            saving.pop()

    monkeypatch.setattr(OffloadedWeights, "_load", counting_load)
    monkeypatch.setattr(pipeline._Checkpoint, "save", marked_save)
    assert main(["quantize", str(tiny_model_dir("llama")), "-o", str(tmp_path / "out"), "--calib", str(text_file),
                 "--nsamples", "4", "--seqlen", "32", "--scheme", "w4a16", "--method", "gptq",
                 "--offload", str(tmp_path / "scratch")]) == 0
    assert reads == []


@pytest.mark.parametrize("extra,message", [
    (["--rotation", "hadamard"], "--offload cannot fit --a-clip auto"),
    (["--a-clip", "0.9"], "--offload cannot learn SpinQuant rotations"),
])
def test_offload_refuses_what_needs_the_whole_model(tiny_model_dir, text_file, tmp_path, capsys, extra, message):
    argv = ["quantize", str(tiny_model_dir("llama")), "-o", str(tmp_path / "out"), "--calib", str(text_file),
            "--nsamples", "4", "--seqlen", "32", "--offload", str(tmp_path / "scratch"), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_failed_offload_run_leaves_no_scratch(tiny_model_dir, text_file, tmp_path, monkeypatch):
    def boom(self, tag):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(OffloadedWeights, "spill", boom)
    scratch = tmp_path / "scratch"
    with pytest.raises(RuntimeError, match="disk gone"):
        main(["quantize", str(tiny_model_dir("llama")), "-o", str(tmp_path / "out"), "--calib", str(text_file),
              "--nsamples", "4", "--seqlen", "32", "--scheme", "w4a16", "--offload", str(scratch)])
    assert not any(scratch.iterdir()) and not (tmp_path / "out").exists()
    shutil.rmtree(scratch)


CHILD = r"""
import sys, time
from pathlib import Path
from rotq.quant import offload
from rotq.quant.cli import main

ready = Path(sys.argv[1])
spill = offload.OffloadedWeights.spill

def spill_then_wait(self, tag):
    spill(self, tag)
    ready.touch()
    time.sleep(600)

offload.OffloadedWeights.spill = spill_then_wait
main(sys.argv[2:])
"""


def test_sigterm_mid_run_removes_the_scratch(tiny_model_dir, text_file, tmp_path):
    """kill (SIGTERM) after a layer was offloaded: exit 143, no scratch, no output."""
    import signal
    import subprocess
    import sys
    import time

    ready, scratch, out = tmp_path / "ready", tmp_path / "scratch", tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(ready), "quantize", str(tiny_model_dir("llama")),
                             "-o", str(out), "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32",
                             "--scheme", "w4a16", "--offload", str(scratch)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), proc.stderr.read()[-2000:]
    assert any(scratch.rglob("layer-00000.safetensors"))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert not any(scratch.iterdir()) and not out.exists()
