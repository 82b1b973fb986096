"""The full-precision attention prefix (quant/prefix.py): its K/V are exactly what the model
computes for those tokens in front of the text (at every rotation, with SpinQuant's functional
R2), the scheme, recipe and checkpoint carry it and refuse what cannot work, and on SmolLM2 the
automatic choice takes the massive activations out of the text."""

import dataclasses
import json

import pytest
import torch

from rotq.export.prefix_file import PREFIX_FILE, load_prefix
from rotq.quant.cli import main
from rotq.quant.errors import RotqError
from rotq.quant.models import load_model
from rotq.quant.online import install_online_ops
from rotq.quant.pipeline import prepare_model, rotated_prefix
from rotq.quant.prefix import attach_prefix, compute_prefix_kv, parse_prefix
from rotq.quant.prefix_kv import PrefixKV, prefix_mask
from rotq.quant.recipe import Recipe
from rotq.quant.reference_model import load_rotq
from rotq.quant.rotation import apply_rotations, fuse_norms
from rotq.quant.scheme import PrefixArgs, Scheme, SchemeError, preset
from rotq.quant.spinquant import loss_and_gradients

PREFIX = (5, 17, 3)


def _ids(n=2, length=29, seed=0):
    return torch.randint(3, 512, (n, length), generator=torch.Generator().manual_seed(seed))


def _logits_after_prefix(model, ids, prefix_ids):
    """The model's logits for ``ids`` when ``prefix_ids`` precede them in one sequence."""
    full = torch.cat([torch.tensor([prefix_ids]).expand(ids.shape[0], -1), ids], 1)
    with torch.no_grad():
        return model(full).logits[:, len(prefix_ids):]


@pytest.mark.parametrize("arch,nonpow2", [("llama", False), ("qwen2", True), ("qwen3", False), ("mistral", False),
                                          ("qwen3_moe", False)])
def test_prefix_kv_in_the_past_equals_the_tokens_in_front(tiny_model_dir, arch, nonpow2):
    """Text at positions 0.. over the prefix's K/V (positions -P..-1) is the model run on
    prefix + text: RoPE sees the same distances."""
    model, _ = load_model(str(tiny_model_dir(arch, nonpow2)))
    ids = _ids()
    ref = _logits_after_prefix(model, ids, PREFIX)
    prefix = compute_prefix_kv(model, PREFIX)
    assert len(prefix.keys) == model.config.num_hidden_layers
    attach_prefix(model, prefix)
    install_online_ops(model, Scheme(prefix=PrefixArgs(PREFIX)))  # the "rotq" attention reads the prefix
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # and during generation: a cache of the text after the prefix
        out = model(ids[:, :20], use_cache=True)
        step = model(ids[:, 20:21], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, ref[:, 20], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rotation", ["hadamard", "spinquant"])
def test_rotated_prefix_is_the_rotated_model_prefix(tiny_model_dir, rotation):
    """K after R3 and V in each layer's R2 basis: the rotated full-precision model with the
    prefix computes what the original computes with the tokens in front."""
    from rotq.quant.spinquant import learn_rotations, SpinQuantOptions

    path = str(tiny_model_dir("llama", True))
    model, _ = load_model(path)
    ids = _ids(seed=1)
    ref = _logits_after_prefix(model, ids, PREFIX)
    prefix = compute_prefix_kv(model, PREFIX)
    scheme = preset("w4a4kv4", rotation).replace(activations=None, kv_cache=None, prefix=PrefixArgs(PREFIX))
    rotations = None
    if rotation == "spinquant":  # any orthogonal R2: a few learned steps move it off the Hadamard
        learner, _ = load_model(path)
        rotations = learn_rotations(learner, preset("w4a4kv4", "spinquant"), _ids(4, 33, 2),
                                    SpinQuantOptions(steps=2, lr=0.5)).rotations
    prepare_model(model, scheme, rotations)
    attach_prefix(model, rotated_prefix(model.config, scheme, prefix, rotations))
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)


def test_spinquant_objective_with_prefix_is_the_folded_model_loss(tiny_model_dir):
    """Learning applies each step's R2 to the prefix's V functionally: its loss is the folded
    quantized model's with the rotated prefix attached."""
    path = str(tiny_model_dir("qwen2", True))
    spin = preset("w4a4kv4", "spinquant").replace(prefix=PrefixArgs(PREFIX))
    model, _ = load_model(path)
    prefix = compute_prefix_kv(model, PREFIX)
    g = torch.Generator().manual_seed(4)
    orth = lambda n: torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]  # noqa: E731
    from rotq.export.rotations_file import RotationMatrices

    rotations = RotationMatrices(orth(model.config.hidden_size),
                                 [orth(model.config.head_dim) for _ in range(model.config.num_hidden_layers)])
    ids = _ids(seed=5)
    loss, _ = loss_and_gradients(model, spin, rotations, ids, prefix=prefix)
    loss_without, _ = loss_and_gradients(load_model(path)[0], spin.replace(prefix=None), rotations, ids)
    folded, _ = load_model(path)
    fuse_norms(folded)
    apply_rotations(folded, spin.rotation, rotations)
    attach_prefix(folded, rotated_prefix(folded.config, spin, prefix, rotations))
    install_online_ops(folded, spin)
    with torch.no_grad():
        logits = folded(ids).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert loss == pytest.approx(float(ref), rel=1e-4)
    assert abs(loss - loss_without) > 1e-4  # the prefix takes part


def test_prefix_mask_sees_the_whole_prefix_and_is_causal_after():
    m = prefix_mask(None, 3, 5, 2, torch.device("cpu"))[0, 0]
    assert m.shape == (3, 7) and m[:, :2].all()
    assert torch.equal(m[:, 2:], torch.ones(3, 5, dtype=torch.bool).tril(2))
    given = torch.zeros(1, 1, 3, 5)
    assert torch.equal(prefix_mask(given, 3, 5, 2, torch.device("cpu")), torch.zeros(1, 1, 3, 7))


def test_scheme_and_recipe_carry_the_prefix():
    s = preset("w4a4kv4", "hadamard").replace(prefix=PrefixArgs((216, 260)))
    d = s.to_dict()
    assert d["prefix"] == {"token_ids": [216, 260]} and d["format_version"] == 2
    assert Scheme.from_dict(d) == s
    v1 = preset("w4a4kv4", "hadamard").to_dict() | {"format_version": 1}
    assert Scheme.from_dict(v1).prefix is None  # version-1 files read as before
    with pytest.raises(SchemeError, match="prefix needs format_version 2"):
        Scheme.from_dict(d | {"format_version": 1})
    with pytest.raises(SchemeError, match="token_ids must be a non-empty list"):
        Scheme.from_dict(d | {"prefix": {"token_ids": []}})
    assert Recipe().resolved().prefix == "auto"
    assert Recipe(scheme="w4a16").resolved().prefix == "none"
    assert Recipe(scheme="w4a4", format="compressed-tensors").resolved().prefix == "none"
    assert Recipe(prefix="5,17").resolved().prefix_tokens == (5, 17)
    with pytest.raises(RotqError, match="cannot store a full-precision prefix"):
        Recipe(scheme="w4a4", format="compressed-tensors", prefix="auto").resolved()
    for bad in ("x", "1,-2", "", "1,,2"):
        with pytest.raises(RotqError, match="--prefix must be auto, none or comma-separated token ids"):
            parse_prefix(bad)


@pytest.fixture(scope="module")
def prefixed_checkpoint(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    text = root / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Paris is the capital of France. " * 40)
    out = root / "w4a4kv4"
    assert main(["quantize", str(tiny_model_dir("llama")), "-o", str(out), "--scheme", "w4a4kv4",
                 "--rotation", "hadamard", "--method", "gptq", "--calib", str(text), "--nsamples", "8",
                 "--seqlen", "64", "--prefix", ",".join(map(str, PREFIX))]) == 0
    return out


def test_checkpoint_stores_the_prefix_and_the_reference_attends_over_it(prefixed_checkpoint, tiny_model_dir):
    model, _, scheme = load_rotq(prefixed_checkpoint)
    assert scheme.prefix == PrefixArgs(PREFIX)
    report = json.loads((prefixed_checkpoint / "calibration_report.json").read_text())
    assert report["provenance"]["prefix"]["token_ids"] == list(PREFIX)
    ids = _ids(1, 17, 6)
    with torch.no_grad():
        with_prefix = model(ids).logits
        attach_prefix(model, None)
        without = model(ids).logits
    assert (with_prefix - without).abs().max() > 1e-3
    config = model.config
    prefix = load_prefix(prefixed_checkpoint, scheme, config)
    assert prefix.keys[0].shape == (config.num_key_value_heads, len(PREFIX), config.head_dim)


def test_damaged_or_missing_prefix_file_is_named(prefixed_checkpoint, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(prefixed_checkpoint, bad)
    (bad / PREFIX_FILE).unlink()
    with pytest.raises(RotqError, match="prefix_kv.safetensors is missing"):
        load_rotq(bad)
    shutil.rmtree(bad)
    shutil.copytree(prefixed_checkpoint, bad)
    tensors = load_file(bad / PREFIX_FILE)
    tensors["layers.1.value"] = tensors["layers.1.value"][:, :2].contiguous()
    save_file(tensors, bad / PREFIX_FILE, metadata={"rotq_prefix": json.dumps({"token_ids": list(PREFIX)})})
    with pytest.raises(RotqError, match=r"layers.1.value has shape \[2, 2, 64\], expected \[2, 3, 64\]"):
        load_rotq(bad)
    save_file(tensors, bad / PREFIX_FILE, metadata={"rotq_prefix": '{"token_ids": [1, 2]}'})
    with pytest.raises(RotqError, match="comes from another calibration"):
        load_rotq(bad)


def test_bad_prefix_options_fail_before_calibration(tiny_model_dir, tmp_path, capsys):
    model = str(tiny_model_dir("llama"))
    assert main(["quantize", model, "-o", str(tmp_path / "a"), "--method", "rtn", "--rotation", "hadamard",
                 "--seqlen", "64", "--nsamples", "8", "--prefix", "5,99999"]) != 0
    assert "outside this model's vocabulary" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert main(["quantize", model, "-o", str(tmp_path / "b"), "--scheme", "w4a4", "--format",
                 "compressed-tensors", "--prefix", "auto"]) != 0
    assert "cannot store a full-precision prefix" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_auto_prefix_takes_the_massive_activations_out_of_the_text():
    """SmolLM2's first token reaches |x| near 3000 (ratio > 1000 to the median token, which a
    poor first prefix token such as its BOS leaves in place); the automatic prefix brings the
    text's largest ratio under 100 and leaves at most one outlier (> 64x) in four sequences."""
    from rotq.quant.data import calibration_batches, load_text, tokenize_text
    from rotq.quant.prefix import choose_prefix, outliers_with_prefix

    model, tokenizer = load_model("smollm2-135m")
    ids = calibration_batches(tokenize_text(tokenizer, load_text("wikisum", "train")), 64, 1024, 0)  # the default's
    choice = choose_prefix(model, ids, tokenizer)
    assert choice.outliers_per_sequence >= 1 and choice.token_ids
    ratios = {int(t): v[1] for t, v in choice.first_candidates.items()}
    assert max(ratios.values()) > 1000 and ratios[choice.token_ids[0]] < 100
    prefix = compute_prefix_kv(model, choice.token_ids)
    assert outliers_with_prefix(model, ids, prefix) <= 0.25


def test_prefix_kv_dataclass_rotation_identity():
    """rotated() without R3 or R2 is the identity; with R3 it is the float64 Hadamard of K."""
    from rotq.quant.hadamard import apply_hadamard

    k, v = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    p = PrefixKV((1, 2, 3), [k], [v])
    same = p.rotated(False, None)
    assert torch.equal(same.keys[0], k) and torch.equal(same.values[0], v)
    torch.testing.assert_close(p.rotated(True, None).keys[0], apply_hadamard(k.double()).float())
    R = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))[0]
    torch.testing.assert_close(p.rotated(False, [R]).values[0], (v.double() @ R).float())
    assert dataclasses.is_dataclass(p)
