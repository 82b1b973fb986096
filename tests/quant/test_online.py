"""The online ops compute what the scheme says: compared against a direct re-implementation."""

import pytest
import torch
import torch.nn.functional as F

from rotq.quant.hadamard import apply_hadamard
from rotq.quant.models import load_model
from rotq.quant.online import install_online_ops
from rotq.quant.quantizer import fake_quantize_activation, fake_quantize_kv
from rotq.quant.scheme import preset


def _reference_layer(layer, x, cos, sin, scheme, shape):
    """One decoder layer written out by hand with the scheme's quantizers (Llama, no biases)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    act, kv = scheme.activations, scheme.kv_cache
    attn, mlp = layer.self_attn, layer.mlp
    B, M, _ = x.shape
    h = fake_quantize_activation(layer.input_layernorm(x), act)
    q = F.linear(h, attn.q_proj.weight).view(B, M, -1, shape[2]).transpose(1, 2)
    k = F.linear(h, attn.k_proj.weight).view(B, M, -1, shape[2]).transpose(1, 2)
    v = F.linear(h, attn.v_proj.weight).view(B, M, -1, shape[2]).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    q, k = apply_hadamard(q), apply_hadamard(k)
    k, v = fake_quantize_kv(k, kv), fake_quantize_kv(v, kv)
    groups = shape[0] // shape[1]
    o = F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), is_causal=True)
    o = o.transpose(1, 2).reshape(B, M, -1)
    x = x + F.linear(fake_quantize_activation(o, act), attn.o_proj.weight)
    h = fake_quantize_activation(layer.post_attention_layernorm(x), act)
    g = F.silu(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight)
    g = fake_quantize_activation(apply_hadamard(g), act)
    return x + F.linear(g, mlp.down_proj.weight)


@pytest.mark.parametrize("nonpow2", [False, True])
def test_w4a4kv4_layer_matches_hand_written_reference(tiny_model_dir, nonpow2):
    model, _ = load_model(str(tiny_model_dir("llama", nonpow2)))
    scheme = preset("w4a4kv4", "hadamard")
    install_online_ops(model, scheme)
    cfg = model.config
    shape = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    x = torch.randn(2, 29, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(29).unsqueeze(0)
    cos, sin = model.model.rotary_emb(x, pos)
    layer = model.model.layers[0]
    with torch.no_grad():
        out = layer(x, position_ids=pos, position_embeddings=(cos, sin), attention_mask=None)
        ref = _reference_layer(layer, x, cos, sin, scheme, shape)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_generation_with_cache_equals_full_forward(tiny_model_dir):
    """KV quantization is per token, so quantizing the whole cache at every step equals
    quantizing at write time: incremental decoding reproduces the full-sequence logits."""
    model, _ = load_model(str(tiny_model_dir("qwen3")))
    install_online_ops(model, preset("w4a4kv4", "hadamard"))
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits[0, -1]
        out = model(ids[:, :8], use_cache=True)
        cache = out.past_key_values
        for t in range(8, 12):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
    torch.testing.assert_close(out.logits[0, -1], full, rtol=1e-4, atol=1e-4)
