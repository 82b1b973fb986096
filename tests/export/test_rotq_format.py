"""The rotq checkpoint: what is written reloads into the same model, and a damaged or
mismatched checkpoint fails at load with a message that names the tensor or field."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from rotq.export.checkpoint import quantized_linear_names
from rotq.export.rotq_format import save_rotq
from rotq.quant.errors import RotqError
from rotq.quant.models import load_model
from rotq.quant.pipeline import CalibrationConfig, calibrate
from rotq.quant.reference_model import load_rotq
from rotq.quant.scheme import WeightArgs, preset


def _calibrated(tiny_model_dir, arch, scheme, nonpow2=False, method="gptq"):
    model, tok = load_model(str(tiny_model_dir(arch, nonpow2)))
    ids = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(5))
    return calibrate(model, scheme, ids, CalibrationConfig(method=method, batch_size=2)), tok


def _logits(model, seed=9):
    ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch,nonpow2,scheme", [
    ("llama", False, preset("w4a4kv4", "hadamard")),
    ("qwen2", True, preset("w4a4kv4", "hadamard")),
    ("qwen3", False, preset("w4a16").replace(weights=WeightArgs(bits=3, symmetric=False, group_size=32))),
    ("mistral", True, preset("w8a8", "hadamard")),
    ("llama", False, preset("w4a4")),  # no rotation: lm_head stays tied to the embeddings
])
def test_reload_computes_the_calibrated_model(tiny_model_dir, tmp_path, arch, nonpow2, scheme):
    result, tok = _calibrated(tiny_model_dir, arch, scheme, nonpow2)
    out = tmp_path / "ckpt"
    save_rotq(result.model, result.weights, tok, scheme, out)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    tensors = load_file(out / "model.safetensors")
    name = quantized_linear_names(result.model)[0]
    assert f"{name}.weight" not in tensors and tensors[f"{name}.weight_packed"].dtype == torch.int32
    model, _, loaded_scheme = load_rotq(out)
    assert loaded_scheme == scheme
    for n, lin in dict(result.model.named_modules()).items():
        if n in result.weights:
            torch.testing.assert_close(dict(model.named_modules())[n].weight, lin.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(model), _logits(result.model), rtol=1e-4, atol=1e-4)


def test_sharded_checkpoint_reloads(tiny_model_dir, tmp_path):
    scheme = preset("w4a16", "hadamard")
    result, tok = _calibrated(tiny_model_dir, "qwen2", scheme, method="rtn")
    out = tmp_path / "ckpt"
    save_rotq(result.model, result.weights, tok, scheme, out, max_shard_size="200KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    model, _, _ = load_rotq(out)
    torch.testing.assert_close(_logits(model), _logits(result.model), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def saved(tiny_model_dir, tmp_path_factory):
    scheme = preset("w4a4kv4", "hadamard")
    result, tok = _calibrated(tiny_model_dir, "llama", scheme, method="rtn")
    out = tmp_path_factory.mktemp("saved") / "ckpt"
    save_rotq(result.model, result.weights, tok, scheme, out)
    return out


def _damaged(saved, tmp_path, edit_tensors=None, edit_config=None, name="damaged"):
    out = tmp_path / name
    shutil.copytree(saved, out)
    if edit_tensors:
        tensors = load_file(out / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, out / "model.safetensors")
    if edit_config:
        cfg = json.loads((out / "config.json").read_text())
        edit_config(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
    return out


def test_missing_tensor_is_named(saved, tmp_path):
    name = "model.layers.1.mlp.down_proj.weight_scale"
    out = _damaged(saved, tmp_path, edit_tensors=lambda t: t.pop(name))
    with pytest.raises(RotqError, match=name):
        load_rotq(out)


def test_wrong_shape_is_named(saved, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight_packed"
    out = _damaged(saved, tmp_path, edit_tensors=lambda t: t.update({name: t[name][:, :-1].contiguous()}))
    with pytest.raises(RotqError, match=rf"{name} has shape \(128, 31\)"):
        load_rotq(out)


def test_unknown_schema_version_and_field_are_named(saved, tmp_path):
    out = _damaged(saved, tmp_path, edit_config=lambda c: c["quantization_config"].update(format_version=99))
    with pytest.raises(RotqError, match="format_version is 99"):
        load_rotq(out)
    out2 = _damaged(saved, tmp_path, name="two",
                    edit_config=lambda c: c["quantization_config"]["weights"].update(bits_per_weight=4))
    with pytest.raises(RotqError, match="bits_per_weight"):
        load_rotq(out2)


def test_mismatched_model_config_is_named(saved, tmp_path):
    out = _damaged(saved, tmp_path, edit_config=lambda c: c.update(intermediate_size=1024))
    with pytest.raises(RotqError, match=r"model.layers.0.mlp.gate_proj.weight_packed has shape"):
        load_rotq(out)


def test_a_failed_write_leaves_nothing(tiny_model_dir, tmp_path):
    scheme = preset("w4a16")
    result, tok = _calibrated(tiny_model_dir, "llama", scheme, method="rtn")

    def broken(*a, **k):
        raise OSError(28, "No space left on device")

    tok.save_pretrained = broken
    with pytest.raises(RotqError, match="nothing was written"):
        save_rotq(result.model, result.weights, tok, scheme, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []
