"""Model resolution, architecture checks and loading (tiny random models; SmolLM2 only when slow)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import replace

import pytest
import torch

from rotq.quant import models
from rotq.quant.errors import RotqError
from rotq.quant.models import SUPPORTED_ARCHITECTURES, check_architecture, load_model, resolve_model_dir


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "qwen3_moe", "mixtral"])
@pytest.mark.parametrize("nonpow2", [False, True])
def test_tiny_models_load_and_run(tiny_model_dir, arch, nonpow2):
    model, tokenizer = load_model(str(tiny_model_dir(arch, nonpow2)))
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert next(model.parameters()).dtype == torch.float32
    ids = tokenizer("The quick brown fox", return_tensors="pt", add_special_tokens=False).input_ids
    assert ids.max() < model.config.vocab_size
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


def test_load_model_dtype(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir("llama")), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_unsupported_architecture_is_rejected_before_loading(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)  # config only: no weights to load
    with pytest.raises(RotqError) as info:
        load_model(str(tmp_path))
    message = str(info.value)
    assert "GPT2LMHeadModel" in message or "gpt2" in message
    assert all(arch in message for arch in SUPPORTED_ARCHITECTURES)


def test_architecture_from_model_type_when_architectures_missing(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    assert check_architecture(tmp_path)["model_type"] == "qwen3"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt"}))
    with pytest.raises(RotqError, match="opt"):
        check_architecture(tmp_path)


def test_missing_path(tmp_path):
    with pytest.raises(RotqError, match="no such directory.*smollm2-135m"):
        resolve_model_dir(str(tmp_path / "nope"))


def test_hub_id_that_cannot_be_downloaded(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(RotqError, match="could not be downloaded.*smollm2-135m"):
        resolve_model_dir("someone/some-model")


def test_directory_without_config(tmp_path):
    with pytest.raises(RotqError, match="config.json"):
        load_model(str(tmp_path))


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ROTQ_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path


@pytest.fixture
def fake_builtin(monkeypatch, tmp_path):
    """A builtin whose 'GGUF' is a few bytes in a wheel already in the cache, and a stub converter."""
    monkeypatch.setenv("ROTQ_CACHE", str(tmp_path / "cache"))
    payload = b"not really a gguf"
    builtin = replace(models.BUILTIN_MODELS["smollm2-135m"], distribution="fake-pkg", package="fake_pkg_rotq_test",
                      gguf_name="m.gguf", gguf_sha256=hashlib.sha256(payload).hexdigest())
    monkeypatch.setitem(models.BUILTIN_MODELS, "fake", builtin)
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / f"fake_pkg-{builtin.version}-py3-none-any.whl", "w") as zf:
        zf.writestr("fake_pkg_rotq_test/m.gguf", payload)

    def convert(gguf_path, out):
        assert gguf_path.read_bytes() == payload
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    return tmp_path / "cache"


def test_prepare_builtin_extracts_converts_and_caches(fake_builtin, monkeypatch):
    target = models.prepare_builtin("fake")
    assert target == fake_builtin / "models" / "fake" and (target / "config.json").is_file()
    assert (fake_builtin / "gguf" / "m.gguf").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == ["fake"]  # no temporary left behind
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: pytest.fail("converted twice"))
    assert models.prepare_builtin("fake") == target


def test_prepare_builtin_crash_leaves_nothing(fake_builtin, monkeypatch):
    def crash(gguf_path, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(RuntimeError):
        models.prepare_builtin("fake")
    assert list((fake_builtin / "models").iterdir()) == []


def test_prepare_builtin_keeps_a_concurrent_writers_copy(fake_builtin, monkeypatch):
    target = fake_builtin / "models" / "fake"

    def race(gguf_path, out):
        target.mkdir()
        (target / "config.json").write_text('{"winner": "other"}')
        (out / "config.json").write_text('{"winner": "us"}')

    monkeypatch.setattr(models, "_convert_gguf", race)
    assert models.prepare_builtin("fake") == target
    assert json.loads((target / "config.json").read_text()) == {"winner": "other"}
    assert sorted(p.name for p in target.parent.iterdir()) == ["fake"]


def test_extracted_gguf_with_wrong_hash_is_refused(fake_builtin, monkeypatch):
    monkeypatch.setitem(models.BUILTIN_MODELS, "fake", replace(models.BUILTIN_MODELS["fake"], gguf_sha256="0" * 64))
    with pytest.raises(RotqError, match="sha256"):
        models.prepare_builtin("fake")
    assert not (fake_builtin / "gguf" / "m.gguf").exists()


def test_unknown_builtin():
    with pytest.raises(RotqError, match="smollm2-135m"):
        models.prepare_builtin("gpt-5")


@pytest.mark.slow
def test_smollm2_builtin():
    model, tokenizer = load_model("smollm2-135m")
    assert tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"] == [504, 2365, 6354, 16438]
    assert model.config.hidden_size == 576
    assert model.config.num_hidden_layers == 30
    ids = tokenizer("The capital of France is", return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        next_id = model(ids).logits[0, -1].argmax().item()
    assert tokenizer.decode([next_id]) == " Paris"
