"""Sequential calibration on tiny random models."""

import pytest
import torch

from rotq.quant.arch import decoder_layers, layer_linears
from rotq.quant.models import load_model
from rotq.quant.pipeline import CalibrationConfig, calibrate
from rotq.quant.quantizer import quantize_weight_rtn
from rotq.quant.scheme import WeightArgs, preset


def _calib(n=6, seqlen=33, seed=0):
    return torch.randint(0, 512, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_w4a4kv4_weights_land_on_a_4bit_grid(tiny_model_dir, arch, method):
    model, _ = load_model(str(tiny_model_dir(arch, nonpow2=arch == "llama")))
    report = calibrate(model, preset("w4a4kv4", "hadamard"), _calib(),
                       CalibrationConfig(method=method, batch_size=4)).report
    assert len(report.linears) == 7 * len(decoder_layers(model))
    for layer in decoder_layers(model):
        for lin in layer_linears(layer).values():
            distinct = [len(torch.unique(row)) for row in lin.weight]
            assert max(distinct) <= 16
    errs = [r.output_rel_err for r in report.linears]
    assert all((e is None) == (method == "rtn") for e in errs)
    assert all(e is None or 0 <= e < 1 for e in errs)
    with torch.no_grad():
        assert torch.isfinite(model(_calib(2, 17, seed=1)).logits).all()


def test_layer0_hessian_and_gptq_gain(tiny_model_dir):
    """Layer 0's q_proj sees the RMS-normed embeddings: rebuild its H by hand, check the
    reported output error against it, and check GPTQ beats RTN on that same objective."""
    model, _ = load_model(str(tiny_model_dir("llama")))
    ids = _calib(8, 40)
    layer = decoder_layers(model)[0]
    with torch.no_grad():
        x = layer.input_layernorm(model.model.embed_tokens(ids)).reshape(-1, model.config.hidden_size)
    H = 2 * x.double().T @ x.double() / ids.shape[0]
    W = layer.self_attn.q_proj.weight.detach().double().clone()
    scheme = preset("w4a16")
    report = calibrate(model, scheme, ids, CalibrationConfig(method="gptq", batch_size=3)).report
    Q = layer.self_attn.q_proj.weight.detach().double()
    err = lambda Q: float(((W - Q) @ H * (W - Q)).sum() / (W @ H * W).sum())  # noqa: E731
    assert report.linears[0].name == "model.layers.0.self_attn.q_proj"
    assert report.linears[0].output_rel_err == pytest.approx(err(Q), rel=1e-4)
    rtn = quantize_weight_rtn(W.float(), scheme.weights).dequantize().double()
    assert err(Q) < 0.8 * err(rtn)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3_moe", "mixtral"])
def test_sixteen_bit_weights_leave_the_rotated_model_unchanged(tiny_model_dir, arch):
    """With 16-bit weights and no activation/KV quantizers, calibration is only rotation (a MoE's
    router rotated with the residual stream, R4 before every expert's down_proj)."""
    model, _ = load_model(str(tiny_model_dir(arch, nonpow2=True)))
    ids = _calib(2, 21, seed=3)
    with torch.no_grad():
        ref = model(ids).logits
    scheme = preset("w4a16", "hadamard").replace(weights=WeightArgs(bits=16, clip_search=False))
    calibrate(model, scheme, _calib(), CalibrationConfig(method="gptq", batch_size=4))
    with torch.no_grad():
        out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())


def test_activation_quantization_during_calibration_is_a_switch(tiny_model_dir):
    weights = []
    for on in (True, False):
        model, _ = load_model(str(tiny_model_dir("llama")))
        calibrate(model, preset("w4a4kv4", "hadamard"), _calib(),
                  CalibrationConfig(method="gptq", act_quant_calibration=on))
        weights.append(decoder_layers(model)[1].mlp.down_proj.weight.detach().clone())
        assert model.config._attn_implementation == "rotq"  # online ops back on either way
    assert not torch.equal(*weights)


def test_fp_trajectory_statistics_by_hand(tiny_model_dir):
    """Layer 0, first group: x̃ = A4(norm(emb)) in the quantized model, x = norm(emb) in the
    full-precision one; H and D from the pipeline's lockstep pass equal the hand-built ones."""
    from rotq.quant.hessian import group_statistics
    from rotq.quant.online import install_layer_ops
    from rotq.quant.quantizer import fake_quantize_activation
    from rotq.quant.staged import StagedLayer
    import copy

    model, _ = load_model(str(tiny_model_dir("llama")))
    scheme = preset("w4a4")
    layer = decoder_layers(model)[0]
    fp_layer = copy.deepcopy(layer)
    install_layer_ops(layer, scheme)  # the copy stays full precision
    ids = _calib(5, 19, seed=4)
    with torch.no_grad():
        inps = model.model.embed_tokens(ids)
        pos = torch.arange(19).unsqueeze(0)
        forward = dict(position_ids=pos, position_embeddings=model.model.rotary_emb(inps, pos),
                       attention_mask=None, use_cache=False)
        H, D = group_statistics(StagedLayer(layer, inps, forward, 2).group_inputs(0), 5,
                                StagedLayer(fp_layer, inps.clone(), forward, 2).group_inputs(0))
        x = layer.input_layernorm(inps).reshape(-1, inps.shape[-1]).double()
    xq = fake_quantize_activation(x.float(), scheme.activations).double()
    torch.testing.assert_close(H, 2 * xq.T @ xq / 5, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(D, 2 * (x - xq).T @ xq / 5, rtol=1e-4, atol=1e-5)
    assert D.abs().max() > 0


@pytest.mark.parametrize("method", ["gptaq", "qep+gptq", "gptaq+foem", "rescomp"])
def test_asymmetric_methods_run_end_to_end(tiny_model_dir, method):
    model, _ = load_model(str(tiny_model_dir("qwen2", nonpow2=True)))
    report = calibrate(model, preset("w4a4kv4", "hadamard"), _calib(),
                       CalibrationConfig(method=method, batch_size=4)).report
    assert report.method == method
    assert all(r.output_rel_err is not None and r.output_rel_err < 1 for r in report.linears)
    for layer in decoder_layers(model):
        for lin in layer_linears(layer).values():
            assert max(len(torch.unique(row)) for row in lin.weight) <= 16


def test_trajectory_on_disk_gives_the_same_weights(tiny_model_dir, tmp_path):
    """--trajectory-dir only moves the full-precision hidden states into a memory-mapped file."""
    weights = []
    for directory in (None, str(tmp_path / "traj")):
        model, _ = load_model(str(tiny_model_dir("llama")))
        result = calibrate(model, preset("w4a4kv4", "hadamard"), _calib(),
                           CalibrationConfig(method="gptaq", batch_size=4, trajectory_dir=directory))
        weights.append({k: v.codes for k, v in result.weights.items()})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert list((tmp_path / "traj").iterdir()) == []  # the file is unlinked at once
