"""The activation clip ratio fitted on calibration data (--a-clip auto)."""

import json

import pytest
import torch

from rotq.quant.act_clip import ClipSearchOptions, search_activation_clip, with_activation_clip
from rotq.quant.errors import RotqError
from rotq.quant.models import load_model
from rotq.quant.perplexity import perplexity
from rotq.quant.pipeline import CalibrationConfig, calibrate, prepare_model
from rotq.quant.scheme import preset


def _ids(n, seqlen, seed):
    return torch.randint(0, 512, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_search_measures_each_ratio_and_keeps_the_best(tiny_model_dir):
    """Each reported loss equals the loss of a model built directly with that ratio; the
    chosen ratio is the argmin and stays installed; the weights are not touched."""
    path = str(tiny_model_dir("llama", nonpow2=True))
    scheme = preset("w4a4kv4", "hadamard")
    calib = _ids(5, 37, seed=0)
    options = ClipSearchOptions(grid=(0.55, 0.8, 1.0), sequences=3, batch_size=2)
    model, _ = load_model(path)
    prepare_model(model, scheme)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit = search_activation_clip(model, scheme, calib, options)
    assert fit.sequences == 3 and set(fit.nll) == {0.55, 0.8, 1.0}
    assert fit.clip_ratio == min(fit.nll, key=fit.nll.get)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    chosen = perplexity(model, calib[:3], 2, progress=False).nll
    assert chosen == pytest.approx(fit.nll[fit.clip_ratio], rel=1e-6)
    for clip in options.grid:
        ref, _ = load_model(path)
        prepare_model(ref, with_activation_clip(scheme, clip))
        assert perplexity(ref, calib[:3], 2, progress=False).nll == pytest.approx(fit.nll[clip], rel=1e-6)
    assert len(set(fit.nll.values())) == 3  # the ratio does change the quantized model


def test_calibrate_carries_the_fitted_ratio_into_the_scheme(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir("qwen2")))
    scheme = preset("w4a4kv4", "hadamard")
    cfg = CalibrationConfig(method="gptq", batch_size=4,
                            act_clip_search=ClipSearchOptions(grid=(0.6, 0.95), sequences=2))
    result = calibrate(model, scheme, _ids(4, 33, seed=1), cfg)
    fitted = result.report.act_clip_search
    assert fitted["clip_ratio"] in (0.6, 0.95) and set(fitted["nll"]) == {"0.6", "0.95"}
    assert result.scheme.activations.clip_ratio == fitted["clip_ratio"]
    assert result.scheme.replace(activations=scheme.activations) == scheme  # nothing else changed


def test_search_refuses_what_it_cannot_fit(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir("llama")))
    with pytest.raises(RotqError, match="16-bit activations"):
        search_activation_clip(model, preset("w4a16"), _ids(2, 17, 0))
    with pytest.raises(RotqError, match="needs calibration text"):
        search_activation_clip(model, preset("w4a4"), None)
    with pytest.raises(RotqError, match=r"in \(0, 1\]"):
        search_activation_clip(model, preset("w4a4"), _ids(2, 17, 0), ClipSearchOptions(grid=(0.9, 1.2)))


def test_cli_auto_clip_lands_in_the_checkpoint(tiny_model_dir, tmp_path):
    from rotq.quant.cli import main

    text = tmp_path / "t.txt"
    text.write_text("A rotation of the hidden state leaves the output unchanged. " * 200)
    out = tmp_path / "out"
    assert main(["quantize", str(tiny_model_dir("llama")), "-o", str(out), "--calib", str(text),
                 "--nsamples", "4", "--seqlen", "32", "--method", "rtn", "--a-clip", "auto"]) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    report = json.loads((out / "calibration_report.json").read_text())
    assert qc["activations"]["clip_ratio"] == report["act_clip_search"]["clip_ratio"]
    assert qc["activations"]["clip_ratio"] in ClipSearchOptions().grid
