"""Mixtures of experts (Qwen3-MoE, Mixtral): unfolded experts, true-routing statistics, experts
no token reaches, checkpoint names and the reference model."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from rotq.quant.arch import (checkpoint_name, decoder_layers, expert_groups, is_moe_layer, layer_linears,
                             router_names)
from rotq.quant.cli import main
from rotq.quant.models import load_model
from rotq.quant.online import install_online_ops
from rotq.quant.pipeline import CalibrationConfig, calibrate
from rotq.quant.quantizer import fake_quantize_activation, quantize_weight_rtn
from rotq.quant.reference_model import load_rotq
from rotq.quant.scheme import preset
from rotq.quant.staged import StagedLayer

MOE = ["qwen3_moe", "mixtral"]


def _ids(n=6, seqlen=33, seed=0):
    return torch.randint(3, 512, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", MOE)
@pytest.mark.parametrize("nonpow2", [False, True])
def test_unfolded_experts_compute_what_transformers_computes(tiny_model_dir, arch, nonpow2):
    path = tiny_model_dir(arch, nonpow2)
    fused = AutoModelForCausalLM.from_pretrained(path).eval()
    model, _ = load_model(str(path))
    moe = [layer for layer in decoder_layers(model) if is_moe_layer(layer)]
    assert moe and len(layer_linears(moe[0])) == 4 + 3 * 8
    ids = _ids(2, 29, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fused(ids).logits, rtol=0, atol=1e-5)


def test_checkpoint_names_follow_each_family():
    from types import SimpleNamespace

    mixtral, qwen = (SimpleNamespace(architectures=[a]) for a in ("MixtralForCausalLM", "Qwen3MoeForCausalLM"))
    assert checkpoint_name(mixtral, "model.layers.3.mlp.experts.7.up_proj.weight") == \
        "model.layers.3.block_sparse_moe.experts.7.w3.weight"
    assert checkpoint_name(mixtral, "model.layers.3.mlp.gate") == "model.layers.3.block_sparse_moe.gate"
    assert checkpoint_name(mixtral, "model.layers.3.self_attn.q_proj.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert checkpoint_name(qwen, "model.layers.0.mlp.experts.1.down_proj") == "model.layers.0.mlp.experts.1.down_proj"
    assert checkpoint_name(SimpleNamespace(architectures=["LlamaForCausalLM"]), "model.layers.0.mlp.gate_proj") == \
        "model.layers.0.mlp.gate_proj"


@pytest.mark.parametrize("arch", MOE)
def test_each_expert_sees_the_quantized_inputs_of_the_tokens_routed_to_it(tiny_model_dir, arch):
    """Expert e's gate/up statistics are A4(x) for exactly the tokens whose router top-k holds e
    (every token with ``all_tokens``); the token counts add up to tokens x top-k."""
    model, _ = load_model(str(tiny_model_dir(arch)))
    scheme = preset("w4a4", "none")
    install_online_ops(model, scheme)
    layer = decoder_layers(model)[0]
    inps = model.model.embed_tokens(_ids(4, 17)).detach()
    position_ids = torch.arange(17).unsqueeze(0)
    forward = dict(position_ids=position_ids, position_embeddings=model.model.rotary_emb(inps, position_ids),
                   attention_mask=None, use_cache=False)
    with torch.no_grad():
        attn_out = layer.self_attn(layer.input_layernorm(inps), **forward)[0]
        x = layer.post_attention_layernorm(inps + attn_out).reshape(-1, inps.shape[-1])
        top_k = layer.mlp.gate(x)[2]
        for all_tokens in (False, True):
            staged = StagedLayer(layer, inps.clone(), forward, batch_size=3, mlp_rows=64, all_tokens=all_tokens)
            for g in range(2):
                list(staged.group_inputs(g))
            counts = []
            for e in range(8):
                got = torch.cat(list(staged.group_inputs(2 + 2 * e)) or [x[:0]])
                rows = x if all_tokens else x[(top_k == e).any(-1)]
                torch.testing.assert_close(got, fake_quantize_activation(rows, scheme.activations), rtol=0, atol=1e-5)
                counts.append(staged.statistics_tokens(2 + 2 * e))
                list(staged.group_inputs(3 + 2 * e))
            assert counts == ([len(x)] * 8 if all_tokens else [int((top_k == e).sum()) for e in range(8)])
            assert sum(len(t) for t in staged.routed) == top_k.numel()


def _starve_expert(model, e: int) -> None:
    """Make expert e unreachable in every MoE layer: the routers route as before with e's logit at -inf."""
    for layer in decoder_layers(model):
        if is_moe_layer(layer):
            gate = layer.mlp.gate

            def forward(h, gate=gate):
                logits = torch.nn.functional.linear(h.reshape(-1, gate.weight.shape[1]), gate.weight)
                probs = logits.float().index_fill(1, torch.tensor([e]), -torch.inf).softmax(-1)
                top, index = probs.topk(gate.top_k, dim=-1)
                return logits, (top / top.sum(-1, keepdim=True)).to(logits.dtype), index
            gate.forward = forward


@pytest.mark.parametrize("arch", MOE)
def test_an_expert_no_token_reaches_is_rounded_and_reported(tiny_model_dir, arch):
    model, _ = load_model(str(tiny_model_dir(arch)))
    _starve_expert(model, 5)
    scheme = preset("w4a16", "none")
    first = next(i for i, layer in enumerate(decoder_layers(model)) if is_moe_layer(layer))
    layer = decoder_layers(model)[first]
    W = {name: layer.get_submodule(name).weight.detach().clone() for group in expert_groups(5) for name in group}
    report = calibrate(model, scheme, _ids(), CalibrationConfig(method="gptq", batch_size=3)).report
    experts = [r for r in report.experts if r.layer == first][0]
    assert experts.tokens[5] == 0 and experts.rounded_without_data == [5]
    assert sum(experts.tokens) == 6 * 33 * model.config.num_experts_per_tok
    for name, w in W.items():  # RTN, not GPTQ on an empty Hessian
        rtn = quantize_weight_rtn(w, scheme.weights).dequantize()
        torch.testing.assert_close(layer.get_submodule(name).weight, rtn, rtol=0, atol=0)
    by_name = {r.name: r for r in report.linears}
    assert by_name[f"model.layers.{first}.mlp.experts.5.gate_proj"].output_rel_err is None
    assert by_name[f"model.layers.{first}.mlp.experts.4.gate_proj"].output_rel_err is not None

    model, _ = load_model(str(tiny_model_dir(arch)))  # every token in every expert's statistics
    _starve_expert(model, 5)
    report = calibrate(model, scheme, _ids(), CalibrationConfig(method="gptq", batch_size=3,
                                                                moe_all_tokens=True)).report
    experts = [r for r in report.experts if r.layer == first][0]
    assert experts.tokens[5] == 0 and experts.rounded_without_data == []  # true routing still


@pytest.mark.parametrize("arch,args", [
    ("mixtral", ["--scheme", "w4a4kv4", "--rotation", "hadamard", "--method", "qep+gptq", "--a-clip", "0.9"]),
    ("qwen3_moe", ["--scheme", "w4a16", "--rotation", "hadamard", "--method", "gptaq", "--moe-all-tokens"]),
])
def test_checkpoint_uses_the_family_names_and_loads_back(tiny_model_dir, tmp_path, arch, args):
    text = tmp_path / "calib.txt"
    text.write_text("The river flows through the valley, past the old mill and into the sea. " * 80)
    out = tmp_path / "out"
    assert main(["quantize", str(tiny_model_dir(arch)), "-o", str(out), "--calib", str(text), "--nsamples", "6",
                 "--seqlen", "48", *args]) == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    block, up = ("block_sparse_moe", "w3") if arch == "mixtral" else ("mlp", "up_proj")
    assert f"model.layers.0.{block}.experts.7.{up}.weight_packed" in keys
    assert f"model.layers.0.{block}.gate.weight" in keys  # the router: 16-bit
    assert not any(".mlp.experts." in k for k in keys) or block == "mlp"
    config = json.loads((out / "config.json").read_text())
    assert f"model.layers.0.{block}.gate" in config["quantization_config"]["ignore"]
    report = json.loads((out / "calibration_report.json").read_text())
    assert report["experts"][0]["layer"] == 0 and len(report["experts"][0]["tokens"]) == 8

    # the reference model of the checkpoint computes what calibration left in memory
    model, _ = load_model(str(tiny_model_dir(arch)))
    assert router_names(model)[0] == f"model.layers.0.{block}.gate"
    ref, _, scheme = load_rotq(out)
    assert scheme.ignore[1:] == tuple(router_names(model))
    ids = _ids(2, 25, seed=4)
    with torch.no_grad():
        logits = ref(ids).logits
    assert torch.isfinite(logits).all()
    result = main(["eval", str(out), "--ppl", str(text), "--windows", "2", "--seqlen", "32"])
    assert result == 0


def test_compressed_tensors_refuses_what_its_moe_methods_cannot_serve(tiny_model_dir, tmp_path, capsys):
    common = [str(tiny_model_dir("mixtral")), "-o", str(tmp_path / "out"), "--format", "compressed-tensors",
              "--method", "rtn", "--nsamples", "2", "--seqlen", "32"]
    assert main(["quantize", *common, "--scheme", "w4a16", "--rotation", "hadamard"]) != 0
    assert "mixture of experts covers weight-only schemes without the online R4" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
