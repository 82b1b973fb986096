"""The staged layer pass against whole-layer forwards, and the symmetric Gram product."""

import pytest
import torch

from rotq.quant.arch import LINEAR_GROUPS, decoder_layers, layer_linears
from rotq.quant.hessian import gram
from rotq.quant.models import load_model
from rotq.quant.pipeline import prepare_model
from rotq.quant.scheme import preset
from rotq.quant.staged import StagedLayer


def _whole_layer_input(layer, linear, h, forward):
    """What ``linear`` sees when the whole layer runs on h (recorded by a pre-hook after the
    online ops' hooks; the layer runs to the end)."""
    seen = []
    handle = layer.get_submodule(linear).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        layer(h, **forward)
    finally:
        handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1])


@pytest.mark.parametrize("arch,scheme", [("llama", "w4a4kv4"), ("qwen3", "w4a4kv4"), ("qwen2", "w4a16")])
@pytest.mark.parametrize("batch_size,mlp_rows", [(2, 2048), (5, 2048), (2, 7)])
def test_stages_equal_whole_layer_forwards_as_groups_are_quantized(tiny_model_dir, arch, scheme, batch_size,
                                                                     mlp_rows):
    """Each group's inputs equal those of the whole layer with the groups before it changed,
    and the output equals the whole layer's: on 5 sequences of 19 tokens (odd batch split; the
    MLP whole, or 7 tokens at a time across sequence boundaries)."""
    model, _ = load_model(str(tiny_model_dir(arch, nonpow2=arch == "llama")))
    prepare_model(model, preset(scheme, "hadamard"))
    layer = decoder_layers(model)[1]
    g = torch.Generator().manual_seed(3)
    h = torch.randn(5, 19, model.config.hidden_size, generator=g)
    pos = torch.arange(19).unsqueeze(0)
    forward = dict(position_ids=pos, position_embeddings=model.model.rotary_emb(h, pos),
                   attention_mask=None, use_cache=False)
    with torch.no_grad():
        staged = StagedLayer(layer, h.clone(), forward, batch_size, mlp_rows=mlp_rows)
        for gi, group in enumerate(LINEAR_GROUPS):
            got = torch.cat(list(staged.group_inputs(gi)))
            want = torch.cat([_whole_layer_input(layer, group[0], h[s:s + batch_size], forward)
                              for s in range(0, 5, batch_size)])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            for name in group:  # "quantize" the group: later stages must see the new weights
                w = layer_linears(layer)[name].weight
                w.add_(0.05 * torch.randn(w.shape, generator=g))
        staged.propagate()
        outs = [layer(h[s:s + batch_size], **forward) for s in range(0, 5, batch_size)]
        want = torch.cat([o[0] if isinstance(o, tuple) else o for o in outs])
    torch.testing.assert_close(staged.inps, want, rtol=1e-5, atol=1e-5)


def test_stages_must_run_in_order(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir("llama")))
    layer = decoder_layers(model)[0]
    h = torch.randn(2, 7, model.config.hidden_size)
    pos = torch.arange(7).unsqueeze(0)
    forward = dict(position_ids=pos, position_embeddings=model.model.rotary_emb(h, pos),
                   attention_mask=None, use_cache=False)
    staged = StagedLayer(layer, h, forward, 2)
    with pytest.raises(RuntimeError, match="group 1 asked for before group 0"):
        staged.group_inputs(1)
    list(staged.group_inputs(0))
    with pytest.raises(RuntimeError, match="after 1 of its linear groups"):
        staged.propagate()


@pytest.mark.parametrize("T,K", [(37, 7), (19, 255), (101, 576), (33, 1536), (8, 1031)])
def test_gram_matches_float64_and_is_symmetric(T, K):
    x = torch.randn(T, K, generator=torch.Generator().manual_seed(K))
    H = gram(x)
    assert torch.equal(H, H.T)
    torch.testing.assert_close(H.double(), x.double().T @ x.double(), rtol=1e-5, atol=1e-4)
