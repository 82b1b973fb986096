"""Learned weight refinement (CQE+-style, quant/refine.py) on tiny random models and in float64."""

import dataclasses

import pytest
import torch

from rotq.quant.arch import decoder_layers, layer_linears
from rotq.quant.errors import RotqError
from rotq.quant.models import load_model
from rotq.quant.online import install_layer_ops, install_online_ops
from rotq.quant.pipeline import CalibrationConfig, _embed, _full_precision_copy, calibrate, prepare_model
from rotq.quant.refine import (
    RefinementObjective, RefineOptions, SingularRefinement, refine_layer, relative_error,
)
from rotq.quant.scheme import preset


def _calib(n=4, seqlen=24, seed=0):
    return torch.randint(0, 512, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape,kind", [((24, 40), "lsi"), ((40, 24), "sde"), ((37, 37), "sde"), ((5, 3), "sde")])
def test_merged_weight_is_u_sigma_plus_e_vt_in_float64(shape, kind):
    g = torch.Generator().manual_seed(shape[0])
    W = torch.randn(*shape, generator=g, dtype=torch.float64)
    ref = SingularRefinement(W, kind, band=2)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.1)
    E = ref.E()
    r = min(shape)
    assert E.shape == (r, r)
    band = 0 if kind == "lsi" else 2
    off_band = torch.ones(r, r, dtype=torch.bool).triu(band + 1) | torch.ones(r, r, dtype=torch.bool).tril(-band - 1)
    assert not E[off_band].any() and E.diagonal().ne(0).all()
    want = ref.U @ (torch.diag(ref.sigma) + E) @ ref.V.T
    torch.testing.assert_close(W + ref.delta(), want, rtol=0, atol=1e-12)


def _layer_setup(path, scheme_name="w4a4kv4"):
    model, _ = load_model(path)
    scheme = preset(scheme_name, "hadamard")
    prepare_model(model, scheme)
    ids = _calib()
    with torch.no_grad():  # as in calibrate()
        inps = _embed(model, ids, 2, torch.device("cpu"))
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        forward = dict(position_ids=pos, position_embeddings=model.model.rotary_emb(inps[:1], pos),
                       attention_mask=None, use_cache=False)
    return model, scheme, inps, forward


def _out(block, x, forward):
    out = block(x, **forward)
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture
def tiny_llama(tiny_model_dir):
    return str(tiny_model_dir("llama", nonpow2=True))


def test_zero_steps_leave_the_weights_unchanged_bit_for_bit(tiny_llama):
    model, scheme, inps, forward = _layer_setup(tiny_llama)
    layer = decoder_layers(model)[0]
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    rep = refine_layer(0, layer, _full_precision_copy(layer, scheme), [], inps, None, forward, scheme, scheme,
                       RefineOptions(kind="sde", steps=0), batch_size=2)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    assert rep.loss_start == rep.loss_end > 0


def test_refined_block_with_e_at_zero_equals_the_original(tiny_llama):
    """W(0) = W: the objective's layer with E frozen at zero computes what the plain layer computes
    with its weights on the same (straight-through) grid."""
    model, scheme, inps, forward = _layer_setup(tiny_llama)
    layer = decoder_layers(model)[0]
    refs = {n: SingularRefinement(lin.weight.data, "sde") for n, lin in layer_linears(layer).items()}
    install_layer_ops(layer, scheme, ste=True)
    y = torch.zeros_like(inps)
    obj = RefinementObjective(layer, refs, None, [], [y], forward, 1.0)  # weights unquantized
    with torch.no_grad():
        got = obj(inps[:2], slice(0, 2))
        want = relative_error(_out(layer, inps[:2], forward), y[:2])
    assert torch.equal(got, want)


@pytest.mark.parametrize("scheme_name", ["w4a4kv4", "w3a16"])
def test_objective_at_e_zero_is_the_error_of_the_weights_rtn_gives(tiny_llama, scheme_name):
    """Training rounds W(E) on the grid the final RTN fits (clip search included), so at E = 0
    the objective is the block error of exactly the weights `--method rtn` would write."""
    from rotq.quant.quantizer import quantize_weight_rtn

    model, scheme, inps, forward = _layer_setup(tiny_llama, scheme_name)
    assert scheme.weights.clip_search  # otherwise a min-max grid would pass too
    layer = decoder_layers(model)[1]
    fp = _full_precision_copy(layer, scheme)
    with torch.no_grad():
        y = torch.cat([_out(fp, b, forward) for b in inps.split(2)])
    refs = {n: SingularRefinement(lin.weight.data, "sde") for n, lin in layer_linears(layer).items()}
    install_layer_ops(layer, scheme, ste=True)
    obj = RefinementObjective(layer, refs, scheme.weights, [], [y], forward, 1.0)
    with torch.no_grad():
        got = obj(inps[:2], slice(0, 2))
        for lin in layer_linears(layer).values():
            lin.weight.copy_(quantize_weight_rtn(lin.weight, scheme.weights).dequantize())
        want = relative_error(_out(layer, inps[:2], forward), y[:2])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_training_keeps_the_grid_of_the_starting_weights(tiny_llama):
    model, scheme, inps, forward = _layer_setup(tiny_llama)
    layer = decoder_layers(model)[1]
    refs = {n: SingularRefinement(lin.weight.data, "lsi") for n, lin in layer_linears(layer).items()}
    obj = RefinementObjective(layer, refs, scheme.weights, [], [inps], forward, 1.0)
    scales = {n: g.scale.clone() for n, g in obj.grids.items()}
    with torch.no_grad():
        for r in refs.values():
            r.diag.fill_(0.5)  # every singular value 50 % larger: a min-max grid would grow with them
    obj(inps[:1], slice(0, 1)).backward()
    assert all(torch.equal(obj.grids[n].scale, scales[n]) for n in scales)
    assert all(r.diag.grad is not None and r.diag.grad.abs().sum() > 0 for r in refs.values())


@pytest.mark.parametrize("kind", ["lsi", "sde"])
def test_training_lowers_the_loss_below_rtn(tiny_llama, kind):
    model, scheme, inps, forward = _layer_setup(tiny_llama)
    layer = decoder_layers(model)[1]
    fp = _full_precision_copy(layer, scheme)
    rep = refine_layer(1, layer, fp, [], inps, None, forward, scheme, scheme,
                       RefineOptions(kind=kind, steps=30, lr=2e-2), batch_size=2, show_progress=False)
    assert rep.loss_end < rep.loss_start  # loss_start: RTN weights with E = 0
    # the merged layer's own weights are no longer the originals, and the online ops are back to rounding
    assert not layer.self_attn.rotq_ste


def test_cross_layer_loss_with_k_zero_is_the_block_loss(tiny_llama):
    model, scheme, inps, forward = _layer_setup(tiny_llama)
    layers = decoder_layers(model)
    layer = layers[0]
    refs = {n: SingularRefinement(lin.weight.data, "lsi") for n, lin in layer_linears(layer).items()}
    with torch.no_grad():
        for r in refs.values():
            r.diag.normal_(0, 0.05)
    fp = _full_precision_copy(layer, scheme)
    with torch.no_grad():
        y = torch.cat([_out(fp, b, forward) for b in inps.split(2)])
    install_layer_ops(layer, scheme, ste=True)
    plain = RefinementObjective(layer, refs, scheme.weights, [], [y], forward, 1.0)
    ahead = [_full_precision_copy(layers[1], scheme)]
    with torch.no_grad():
        y1 = torch.cat([_out(ahead[0], b, forward) for b in y.split(2)])
    zero_weight = RefinementObjective(layer, refs, scheme.weights, ahead, [y, y1], forward, 0.0)
    crossed = RefinementObjective(layer, refs, scheme.weights, ahead, [y, y1], forward, 1.0)
    with torch.no_grad():
        a, b, c = plain(inps[:2], slice(0, 2)), zero_weight(inps[:2], slice(0, 2)), crossed(inps[:2], slice(0, 2))
    assert torch.equal(a, b) and c > a


def test_refinement_quantizes_kv_even_when_calibration_does_not(tiny_llama, monkeypatch):
    """--no-calib-act-quant leaves the model on plain SDPA; the objective still runs the scheme's
    KV quantizer (rotq's attention function), and the model's attention is put back."""
    from rotq.quant import online
    from rotq.quant.pipeline import _without_quantizers
    model, scheme, inps, forward = _layer_setup(tiny_llama, "w4a16kv4")
    scheme = scheme.replace(rotation=dataclasses.replace(scheme.rotation, r3=False))  # no R3: SDPA suffices
    plain = _without_quantizers(scheme)
    install_online_ops(model, plain)
    assert model.config._attn_implementation == "sdpa"
    calls = []
    quantize_kv = online.fake_quantize_kv
    monkeypatch.setattr(online, "fake_quantize_kv", lambda *a: calls.append(1) or quantize_kv(*a))
    layer = decoder_layers(model)[0]
    refine_layer(0, layer, _full_precision_copy(layer, scheme), [], inps, None, forward, scheme, plain,
                 RefineOptions(kind="lsi", steps=1), batch_size=2, show_progress=False)
    assert calls and model.config._attn_implementation == "sdpa" and layer.self_attn.rotq_kv is None


def test_calibrate_with_refinement_is_deterministic_and_lowers_block_losses(tiny_model_dir):
    path = str(tiny_model_dir("qwen2", nonpow2=True))
    cfg = CalibrationConfig(method="gptq", batch_size=2,
                            refine=RefineOptions(kind="sde", steps=8, lr=1e-2, cross_layer=1, seed=3))
    outs = []
    for _ in range(2):
        model, _ = load_model(path)
        report = calibrate(model, preset("w4a4kv4", "hadamard"), _calib(), cfg).report
        outs.append({k: v.clone() for k, v in model.state_dict().items()})
        assert [r.layer for r in report.refine] == list(range(len(decoder_layers(model))))
        assert all(r.loss_end < r.loss_start for r in report.refine)
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_refinement_refusals(tiny_model_dir):
    with pytest.raises(RotqError, match="unknown --refine 'svd'"):
        RefineOptions(kind="svd")
    with pytest.raises(RotqError, match="steps >= 0"):
        RefineOptions(kind="lsi", steps=-1)
    model, _ = load_model(str(tiny_model_dir("llama")))
    with pytest.raises(ValueError, match="needs calibration data"):
        calibrate(model, preset("w4a16"), None, CalibrationConfig(method="rtn", refine=RefineOptions(kind="lsi")))
