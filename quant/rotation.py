"""Computational invariance: fuse RMSNorm weights into the following linears and fold the
offline rotations R1 (residual stream) and R2 (per head, V -> O), plus the weight side of the
online R4 (before down_proj). QuaRot, Ashkboos et al., NeurIPS 2024 (https://arxiv.org/abs/2404.00456);
notes/algorithms.md §9. Row-vector convention: y = x W^T, so an input rotated by M needs
W <- W M and an output rotated by M needs W <- M^T W, b <- b M. All math runs in float64.
"""

from __future__ import annotations

import torch
from torch import nn

from rotq.quant.arch import attention_shape, decoder_layers
from rotq.quant.hadamard import hadamard_matrix, random_hadamard_matrix
from rotq.quant.scheme import RotationArgs


def _set(param: nn.Parameter, value: torch.Tensor) -> None:
    param.data = value.to(param.dtype)


@torch.no_grad()
def fuse_norms(model: nn.Module) -> None:
    """Fold every RMSNorm weight into the linears it feeds and set it to one; unties lm_head
    from the embeddings first, because the final norm's weight only goes into lm_head."""
    if model.lm_head.weight is model.model.embed_tokens.weight:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        _fuse(layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj))
        _fuse(layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))
    _fuse(model.model.norm, (model.lm_head,))


def _fuse(norm: nn.Module, linears) -> None:
    gamma = norm.weight.double()
    for lin in linears:
        _set(lin.weight, lin.weight.double() * gamma)
    norm.weight.data.fill_(1.0)


@torch.no_grad()
def apply_rotations(model: nn.Module, rot: RotationArgs) -> None:
    """Fold R1, R2 and the weight side of R4 into a norm-fused model (see :func:`fuse_norms`)."""
    shape = attention_shape(model.config)
    if rot.r1:
        R1 = random_hadamard_matrix(model.config.hidden_size, rot.seed)
        emb = model.model.embed_tokens.weight
        _set(emb, emb.double() @ R1)
        _set(model.lm_head.weight, model.lm_head.weight.double() @ R1)
    for i, layer in enumerate(decoder_layers(model)):
        attn, mlp = layer.self_attn, layer.mlp
        if rot.r1:
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                _set(lin.weight, lin.weight.double() @ R1)
            for lin in (attn.o_proj, mlp.down_proj):
                _rotate_output(lin, R1)
        if rot.r2:
            R2 = random_hadamard_matrix(shape.head_dim, rot.seed + 1 + i)
            _rotate_output(attn.v_proj, torch.block_diag(*[R2] * shape.num_kv_heads))
            o = attn.o_proj.weight
            _set(o, o.double() @ torch.block_diag(*[R2] * shape.num_heads))
        if rot.r4:
            n = mlp.down_proj.in_features
            _set(mlp.down_proj.weight, mlp.down_proj.weight.double() @ (hadamard_matrix(n) / n**0.5))


def _rotate_output(lin: nn.Linear, M: torch.Tensor) -> None:
    _set(lin.weight, M.T @ lin.weight.double())
    if lin.bias is not None:
        _set(lin.bias, lin.bias.double() @ M)
