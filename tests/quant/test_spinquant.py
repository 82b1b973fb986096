"""SpinQuant rotation learning: Cayley steps stay on the orthogonal group, 0 steps is the
Hadamard rotation, the learning objective is the folded model's loss, learning lowers it, and
the learned rotation is saved, reused and checked."""

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from rotq.export.rotations_file import (
    ROTATIONS_FILE, RotationMatrices, load_rotations, orthogonality_error, save_rotations,
)
from rotq.quant.cli import main
from rotq.quant.errors import RotqError
from rotq.quant.models import load_model
from rotq.quant.online import install_online_ops
from rotq.quant.pipeline import CalibrationConfig, calibrate
from rotq.quant.quantizer import fake_quantize_activation, fake_quantize_kv
from rotq.quant.rotation import apply_rotations, fuse_norms, hadamard_rotations
from rotq.quant.scheme import ActivationArgs, KVCacheArgs, Scheme, preset
from rotq.quant.spinquant import SpinQuantOptions, cayley_step, learn_rotations, loss_and_gradients

SPIN = preset("w4a4kv4", "spinquant")


def _ids(n=2, length=33, seed=0, vocab=512):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _orthogonal(n, g):
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]


def _random_rotations(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    return RotationMatrices(_orthogonal(config.hidden_size, g),
                            [_orthogonal(config.head_dim, g) for _ in range(config.num_hidden_layers)])


def _learn(model, steps, **kw):
    return learn_rotations(model, SPIN, _ids(), SpinQuantOptions(steps=steps, **kw))


def _rtn(model, scheme, rotations=None):
    calibrate(model, scheme, None, CalibrationConfig(method="rtn"), rotations=rotations)
    return model.state_dict()


def test_straight_through_quantizers_keep_values_and_pass_gradients():
    g = torch.Generator().manual_seed(0)
    x, w = (3 * torch.randn(2, 4, 7, 64, generator=g)).unbind()
    x.requires_grad_()
    for fq, args in ((fake_quantize_activation, ActivationArgs()), (fake_quantize_kv, KVCacheArgs())):
        assert torch.equal(fq(x, args, ste=True), fq(x.detach(), args))
        (g_ste,) = torch.autograd.grad((fq(x, args, ste=True) * w).sum(), x)
        (g,) = torch.autograd.grad((fq(x, args) * w).sum(), x)
        # round() passes nothing: only each row's min/max (through the scale) gets a gradient
        assert (g_ste != 0).float().mean() > 0.8 and (g != 0).float().mean() < 0.1


def test_cayley_steps_stay_orthogonal_and_descend():
    g = torch.Generator().manual_seed(0)
    R, C = _orthogonal(48, g), torch.randn(48, 48, generator=g, dtype=torch.float64)
    f = lambda M: float((C * M).sum())  # noqa: E731  (linear loss, Euclidean gradient C)
    A = None
    for _ in range(20):
        R_next, A = cayley_step(R, C, 1.5, A, momentum=0.5)
        assert orthogonality_error(R_next) < 1e-12
        R = R_next
    R_small, _ = cayley_step(R, C, 1e-3)
    assert f(R_small) < f(R)
    R_big, _ = cayley_step(R, 1e6 * C, 1.5)  # the step bound: at most 2 atan(1/2) per plane
    assert torch.linalg.matrix_norm(R_big - R, 2) <= 2 * math.sin(math.atan(0.5)) + 1e-9


@pytest.mark.parametrize("arch,nonpow2", [("llama", False), ("qwen2", True), ("mixtral", False)])
def test_learned_rotation_is_orthogonal_and_keeps_the_fp_logits(tiny_model_dir, arch, nonpow2):
    model, _ = load_model(str(tiny_model_dir(arch, nonpow2)))
    ids = _ids(seed=1)
    with torch.no_grad():
        ref = model(ids).logits
    result = _learn(model, steps=3, samples_per_step=2)
    learned = result.rotations
    init = hadamard_rotations(model.config, SPIN.rotation.seed)
    assert len(result.losses) == 3 and not torch.allclose(learned.R1, init.R1, atol=1e-4)
    for R in [learned.R1, *learned.R2]:
        assert R.dtype == torch.float64 and orthogonality_error(R) < 1e-6
    apply_rotations(model, SPIN.rotation, learned)  # learn_rotations left the norms fused
    install_online_ops(model, Scheme(rotation=SPIN.rotation))  # R3/R4 online, no quantizers
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_zero_steps_is_the_hadamard_rotation_bit_for_bit(tiny_model_dir):
    path = str(tiny_model_dir("qwen3"))
    hadamard = _rtn(load_model(path)[0], preset("w4a4kv4", "hadamard"))
    model, _ = load_model(path)
    learned = _learn(model, steps=0).rotations
    spin = _rtn(model, SPIN, learned)
    assert hadamard.keys() == spin.keys()
    assert all(torch.equal(hadamard[k], spin[k]) for k in hadamard)


@pytest.mark.parametrize("arch,nonpow2", [("llama", False), ("qwen2", True), ("qwen3", False),
                                          ("qwen3_moe", True), ("mixtral", False)])
def test_objective_is_the_folded_quantized_model_loss(tiny_model_dir, arch, nonpow2):
    """The functional rotation of learning and the float64 fold of rotation.py are one function."""
    path = str(tiny_model_dir(arch, nonpow2))
    model, _ = load_model(path)
    rotations, ids = _random_rotations(model.config), _ids(seed=2)
    loss, grads = loss_and_gradients(model, SPIN, rotations, ids)
    assert len(grads) == 1 + model.config.num_hidden_layers
    folded, _ = load_model(path)
    fuse_norms(folded)
    apply_rotations(folded, SPIN.rotation, rotations)
    install_online_ops(folded, SPIN)
    with torch.no_grad():
        logits = folded(ids).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert loss == pytest.approx(float(ref), rel=1e-4)


def test_gradients_flow_only_through_the_quantizers(tiny_model_dir):
    """Without quantizers the loss is rotation invariant: its Riemannian gradient A = G R^T - R G^T
    vanishes although G does not. With the A4/KV4 quantizers (straight-through) it does not."""
    model, _ = load_model(str(tiny_model_dir("llama")))
    rotations, ids = hadamard_rotations(model.config, 0), _ids(seed=3)
    for scheme, quantized in ((SPIN.replace(activations=None, kv_cache=None), False), (SPIN, True)):
        _, grads = loss_and_gradients(model, scheme, rotations, ids)
        for R, G in zip([rotations.R1, *rotations.R2], grads):
            A = G @ R.T - R @ G.T
            assert G.norm() > 0.1
            assert (A.norm() > 1e-2 * G.norm()) if quantized else (A.norm() < 1e-5 * G.norm())


def test_learning_lowers_the_w16a4kv4_loss(tiny_model_dir):
    """A random model's predictions are near uniform, so quantization barely changes its loss.
    Sharpen lm_head and train on the model's own samples: then A4/KV4 costs a clear gap to FP."""
    model, _ = load_model(str(tiny_model_dir("qwen3")))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        ids = torch.randint(0, 512, (2, 1), generator=g)
        for _ in range(63):
            probs = model(ids).logits[:, -1].softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
    fp_scheme = SPIN.replace(activations=None, kv_cache=None)
    fp_loss, _ = loss_and_gradients(model, fp_scheme, hadamard_rotations(model.config, 0), ids)
    result = learn_rotations(model, SPIN, ids, SpinQuantOptions(steps=6, samples_per_step=2))
    init_loss = result.losses[0]
    final_loss, _ = loss_and_gradients(model, SPIN, result.rotations, ids)
    assert init_loss - fp_loss > 0.1  # the gap learning should close
    assert final_loss - fp_loss < 0.5 * (init_loss - fp_loss)


def test_saved_rotations_are_reused_exactly(tiny_model_dir, tmp_path):
    path = str(tiny_model_dir("mistral"))
    model, _ = load_model(path)
    learned = _learn(model, steps=2).rotations
    save_rotations(learned, tmp_path / "rot.safetensors", {"model": "tiny"})
    loaded = load_rotations(tmp_path / "rot.safetensors", model.config)
    assert torch.equal(loaded.R1, learned.R1) and all(map(torch.equal, loaded.R2, learned.R2))
    first = _rtn(model, SPIN, learned)
    again = _rtn(load_model(path)[0], SPIN, loaded)
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_rotation_file_for_another_model_or_damaged_fails_clearly(tiny_model_dir, tmp_path):
    config = load_model(str(tiny_model_dir("llama")))[0].config
    other = load_model(str(tiny_model_dir("llama", nonpow2=True)))[0].config
    good = tmp_path / "rot.safetensors"
    save_rotations(hadamard_rotations(config, 0), good)
    with pytest.raises(RotqError, match=r"R1 in rotation file .* has shape \[256, 256\]; this model "
                                        r"needs \[144, 144\] \(hidden_size 144\)"):
        load_rotations(good, other)
    tensors = load_file(good)
    bad = {"nonorth": tensors | {"R2.1": 1.01 * tensors["R2.1"]},
           "missing": {k: v for k, v in tensors.items() if k != "R2.1"},
           "head": tensors | {"R2.0": torch.eye(32, dtype=torch.float64)}}
    for name, t in bad.items():
        save_file(t, tmp_path / f"{name}.safetensors")
    with pytest.raises(RotqError, match=r"R2.1 in rotation file .* is not orthogonal \(max \|R\^T R - I\| = 0.0201"):
        load_rotations(tmp_path / "nonorth.safetensors", config)
    with pytest.raises(RotqError, match=r"needs R1 and R2.0..R2.1 \(2 decoder layers\)"):
        load_rotations(tmp_path / "missing.safetensors", config)
    with pytest.raises(RotqError, match=r"R2.0 .* needs \[64, 64\] \(head_dim 64\)"):
        load_rotations(tmp_path / "head.safetensors", config)
    (tmp_path / "junk.safetensors").write_text("not a safetensors file")
    with pytest.raises(RotqError, match="cannot read rotation file"):
        load_rotations(tmp_path / "junk.safetensors", config)


def test_scheme_records_spinquant_and_fold_needs_the_matrices(tiny_model_dir):
    assert Scheme.from_dict(SPIN.to_dict()) == SPIN
    assert SPIN.rotation.kind == "spinquant" and SPIN.rotation.r3 and SPIN.rotation.r4
    assert not preset("w4a16", "spinquant").rotation.r3
    model, _ = load_model(str(tiny_model_dir("llama")))
    with pytest.raises(ValueError, match="pass them as `matrices`"):
        apply_rotations(model, SPIN.rotation)


def test_cli_learns_saves_and_reuses_the_rotation(tiny_model_dir, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Paris is the capital of France.\n" * 40)
    model = str(tiny_model_dir("qwen2"))
    common = ["--calib", str(text), "--nsamples", "2", "--seqlen", "32", "--method", "rtn",
              "--rotation", "spinquant"]
    out = tmp_path / "out"
    assert main(["quantize", model, "-o", str(out), *common, "--rotation-steps", "2"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["rotation"]["kind"] == "spinquant"
    provenance = json.loads((out / "calibration_report.json").read_text())["provenance"]
    assert provenance["rotations"]["source"] == "learned" and provenance["rotations"]["steps"] == 2
    # vLLM loads every top-level *.safetensors of an unsharded checkpoint as weights
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    assert main(["eval", str(out), "--ppl", str(text), "--windows", "1", "--seqlen", "32"]) == 0
    reuse = tmp_path / "reuse"
    assert main(["quantize", model, "-o", str(reuse), *common,
                 "--rotation-file", str(out / ROTATIONS_FILE)]) == 0
    first, again = load_file(out / "model.safetensors"), load_file(reuse / "model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert torch.equal(load_file(out / ROTATIONS_FILE)["R1"], load_file(reuse / ROTATIONS_FILE)["R1"])
    capsys.readouterr()
    assert main(["quantize", model, "-o", str(tmp_path / "x"), "--rotation", "hadamard", "--rotation-steps", "2"]) == 2
    assert "--rotation-steps: for --rotation spinquant only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_recipe_keys_and_zero_steps_through_the_cli(tiny_model_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("A rotation of the hidden state leaves the output of the network unchanged.\n" * 40)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("rotation: spinquant\nrotation_steps: 0\nmethod: rtn\n")
    model = str(tiny_model_dir("llama"))
    common = ["--calib", str(text), "--nsamples", "2", "--seqlen", "32"]
    assert main(["quantize", model, "-o", str(tmp_path / "spin"), *common, "--recipe", str(recipe)]) == 0
    assert main(["quantize", model, "-o", str(tmp_path / "had"), *common, "--rotation", "hadamard",
                 "--method", "rtn"]) == 0
    spin, had = (load_file(tmp_path / d / "model.safetensors") for d in ("spin", "had"))
    assert all(torch.equal(spin[k], had[k]) for k in had)


def test_options_are_checked():
    with pytest.raises(RotqError, match="steps >= 0"):
        SpinQuantOptions(steps=-1)
    with pytest.raises(RotqError, match="lr > 0"):
        dataclasses.replace(SpinQuantOptions(), lr=0.0)
