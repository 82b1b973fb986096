"""The Python API: quantize() and evaluate() do what the CLI does, byte for byte."""

import hashlib
import json

import pytest

from rotq.quant import Recipe, evaluate, quantize
from rotq.quant.cli import main
from rotq.quant.errors import RotqError

TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France. "
        "A rotation of the hidden state leaves the output of the network unchanged.\n") * 40
OPTIONS = {"scheme": "w4a4kv4", "rotation": "hadamard", "method": "gptq", "a_clip": 0.9, "nsamples": 4,
           "seqlen": 32, "w_bits": 3}


def _digest(out):
    """Every file's sha256, the calibration report without its wall-clock fields."""
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "calibration_report.json":
            report = json.loads(data)
            for key in ("seconds", "peak_rss_mb"):
                report.pop(key)
            for linear in report["linears"]:
                linear.pop("seconds")
            data = json.dumps(report, sort_keys=True).encode()
        files[str(path.relative_to(out))] = hashlib.sha256(data).hexdigest()
    return files


def test_api_flags_and_recipe_file_write_the_same_bytes(tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    options = OPTIONS | {"calib": str(text)}

    api = quantize(str(model), tmp_path / "api", **options)
    assert api == tmp_path / "api"
    flags = [a for k, v in options.items() for a in ("--" + k.replace("_", "-"), str(v))]
    assert main(["quantize", str(model), "-o", str(tmp_path / "cli"), *flags]) == 0
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in options.items()))
    assert main(["quantize", str(model), "-o", str(tmp_path / "yaml"), "--recipe", str(recipe)]) == 0
    quantize(str(model), tmp_path / "object", Recipe(**options))

    digests = [_digest(tmp_path / name) for name in ("api", "cli", "yaml", "object")]
    assert "model.safetensors" in digests[0] and "README.md" in digests[0]
    assert all(d == digests[0] for d in digests[1:])


def test_evaluate_matches_the_cli_json(tiny_model_dir, tmp_path):
    model = tiny_model_dir("llama")
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    result = evaluate(str(model), str(text), windows=2, seqlen=32)
    assert result.tokens == 2 * 31 and not result.quantized and result.engine == "torch"
    out = tmp_path / "ppl.json"
    assert main(["eval", str(model), "--ppl", str(text), "--windows", "2", "--seqlen", "32", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["ppl"] == pytest.approx(result.ppl, rel=1e-9)


def test_api_refuses_bad_input_before_any_work(tmp_path):
    with pytest.raises(RotqError, match="unknown key"):
        quantize("smollm2-135m", tmp_path / "out", {"nsample": 3})
    with pytest.raises(RotqError, match="unknown scheme"):
        quantize("smollm2-135m", tmp_path / "out", scheme="w5a5")
    with pytest.raises(RotqError, match="unknown engine"):
        evaluate("smollm2-135m", engine="onnx")
    assert not (tmp_path / "out").exists()


def test_eval_records_its_result_in_the_model_card(tiny_model_dir, tmp_path):
    import yaml

    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    out = quantize(str(tiny_model_dir("llama")), tmp_path / "out", scheme="w4a16", rotation="none", method="rtn",
                   calib=str(text), nsamples=2, seqlen=32)
    card = (out / "README.md").read_text()
    assert yaml.safe_load(card.split("---")[1])["base_model_relation"] == "quantized"
    assert main(["eval", str(out), "--ppl", str(text), "--windows", "2", "--seqlen", "32", "--model-card"]) == 0
    ppl = evaluate(str(out), str(text), windows=2, seqlen=32).ppl
    meta = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    [result] = meta["model-index"][0]["results"]
    assert result["metrics"][0]["value"] == pytest.approx(ppl, rel=1e-3)


def test_a_model_without_hadamard_sizes_fails_before_work():
    from types import SimpleNamespace

    from rotq.quant.api import check_rotation_sizes
    from rotq.quant.scheme import preset

    llama2_7b = SimpleNamespace(hidden_size=4096, num_attention_heads=32, head_dim=128, intermediate_size=11008)
    with pytest.raises(RotqError, match="intermediate size \\(R4\\) 11008.*--rotation none"):
        check_rotation_sizes(llama2_7b, preset("w4a4kv4", "hadamard"))
    check_rotation_sizes(llama2_7b, preset("w4a4kv4", "none"))  # nothing to build
    smollm2 = SimpleNamespace(hidden_size=576, num_attention_heads=9, head_dim=64, intermediate_size=1536)
    check_rotation_sizes(smollm2, preset("w4a4kv4", "spinquant"))
