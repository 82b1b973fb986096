"""Computational invariance: fuse RMSNorm weights into the following linears and fold the
offline rotations R1 (residual stream) and R2 (per head, V -> O), plus the weight side of the
online R4 (before down_proj; before every expert's down_proj in a mixture of experts, whose
16-bit router is rotated like gate/up). QuaRot, Ashkboos et al., NeurIPS 2024 (https://arxiv.org/abs/2404.00456);
docs/algorithms.md#rotations. Row-vector convention: y = x W^T, so an input rotated by M needs
W <- W M and an output rotated by M needs W <- M^T W, b <- b M. All math runs in float64.
R1 and R2 are random Hadamards (kind "hadamard") or given orthogonal matrices (kind "spinquant",
learned by spinquant.py from those same Hadamards).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rotq.export.rotations_file import RotationMatrices
from rotq.quant.arch import attention_shape, decoder_layers, mlp_input_linears, mlp_output_linears
from rotq.quant.hadamard import apply_hadamard, hadamard_matrix, random_hadamard_matrix
from rotq.quant.scheme import RotationArgs

_FOLD_BLOCK = 4096  # rows (or columns) of a weight folded at a time: small float64 temporaries


def hadamard_rotations(config, seed: int) -> RotationMatrices:
    """The random Hadamards of ``--rotation hadamard``: R1 from ``seed``, layer i's R2 from seed + 1 + i."""
    head_dim = attention_shape(config).head_dim
    return RotationMatrices(random_hadamard_matrix(config.hidden_size, seed),
                            [random_hadamard_matrix(head_dim, seed + 1 + i)
                             for i in range(config.num_hidden_layers)])


class _R1:
    """R1 as it is folded: by the fast Hadamard transform (O(d log d) per row instead of a dense
    d x d product) when it is a signed Hadamard, i.e. --rotation hadamard or SpinQuant before any
    step; densely otherwise. Float64 in, float64 out."""

    def __init__(self, R1: torch.Tensor):
        self.R1 = R1.detach().double()
        self.signs = _hadamard_signs(self.R1)

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """x R1 for rows x [r, d]."""
        if self.signs is not None:
            return apply_hadamard(x * self.signs.to(x.device))
        return x @ self.R1.to(x.device)

    def left_t(self, x: torch.Tensor) -> torch.Tensor:
        """R1^T x for columns x [d, c]."""
        if self.signs is not None:
            return apply_hadamard((self.signs.to(x.device)[:, None] * x).T).T
        return self.R1.to(x.device).T @ x


def _hadamard_signs(R: torch.Tensor) -> torch.Tensor | None:
    """s with R == diag(s) H / sqrt(n) bit for bit (as random_hadamard_matrix builds it), else None."""
    n = R.shape[0]
    try:
        H = hadamard_matrix(n).to(R.device)
    except ValueError:  # no Hadamard matrix of this size: R is not one
        return None
    s = torch.sign(R[:, 0] * H[:, 0])
    return s if torch.equal(R, s[:, None] * H / math.sqrt(n)) else None


def _fold_rows(param: nn.Parameter, f) -> None:
    """param <- f(param) in place, for an f that maps each row on its own (float64 blocks of rows).
    In place, so a weight still backed by the checkpoint's memory-mapped file turns into private
    memory page by page rather than keeping the file's pages resident beside a new copy."""
    W = param.data if param.dim() > 1 else param.data.unsqueeze(0)
    for start in range(0, W.shape[0], _FOLD_BLOCK):
        W[start:start + _FOLD_BLOCK] = f(W[start:start + _FOLD_BLOCK].double())


def _fold_columns(param: nn.Parameter, f) -> None:
    """param <- f(param) in place, for an f that maps each column on its own."""
    W = param.data
    for start in range(0, W.shape[1], _FOLD_BLOCK):
        W[:, start:start + _FOLD_BLOCK] = f(W[:, start:start + _FOLD_BLOCK].double())


@torch.no_grad()
def fuse_norms(model: nn.Module, layers: bool = True) -> None:
    """Fold every RMSNorm weight into the linears it feeds and set it to one; unties lm_head
    from the embeddings first, because the final norm's weight only goes into lm_head.
    Idempotent: on a fused model (norms one) it changes nothing. ``layers=False`` leaves the
    decoder layers to :func:`fuse_layer_norms` (layers streamed from disk, offload.py)."""
    if model.lm_head.weight is model.model.embed_tokens.weight:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if layers:
        for layer in decoder_layers(model):
            fuse_layer_norms(layer)
    _fuse(model.model.norm, (model.lm_head,))


@torch.no_grad()
def fuse_layer_norms(layer: nn.Module) -> None:
    attn = layer.self_attn
    _fuse(layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj))
    _fuse(layer.post_attention_layernorm, mlp_input_linears(layer))  # a MoE's router too


def _fuse(norm: nn.Module, linears) -> None:
    gamma = norm.weight.double()
    for lin in linears:
        _fold_rows(lin.weight, lambda w: w * gamma)
    norm.weight.data.fill_(1.0)


def rotation_matrices(config, rot: RotationArgs, matrices: RotationMatrices | None = None) -> RotationMatrices | None:
    """The R1/R2 to fold: ``matrices`` (required for kind "spinquant"), else the random Hadamards."""
    if matrices is None and (rot.r1 or rot.r2):
        if rot.kind == "spinquant":
            raise ValueError("rotation kind 'spinquant' folds learned R1/R2: pass them as `matrices` "
                             "(spinquant.learn_rotations or spinquant.load_rotations)")
        matrices = hadamard_rotations(config, rot.seed)
    return matrices


@torch.no_grad()
def apply_rotations(model: nn.Module, rot: RotationArgs, matrices: RotationMatrices | None = None,
                    layers: bool = True) -> None:
    """Fold R1, R2 and the weight side of R4 into a norm-fused model (see :func:`fuse_norms`).
    ``matrices`` gives R1/R2 (required for kind "spinquant"); by default the random Hadamards of
    ``rot.seed``. ``layers=False`` leaves the decoder layers to :func:`rotate_layer`."""
    matrices = rotation_matrices(model.config, rot, matrices)
    if rot.r1:
        R1 = _R1(matrices.R1)
        _fold_rows(model.model.embed_tokens.weight, R1.right)
        _fold_rows(model.lm_head.weight, R1.right)
    if layers:
        for i, layer in enumerate(decoder_layers(model)):
            rotate_layer(layer, i, model.config, rot, matrices)


@torch.no_grad()
def rotate_layer(layer: nn.Module, i: int, config, rot: RotationArgs, matrices: RotationMatrices | None) -> None:
    """Fold R1, layer i's R2 and R4's weight side into decoder layer i (norms already fused)."""
    attn = layer.self_attn
    if rot.r1:  # a MoE's router reads the rotated residual too: it gets W R1 like gate/up
        R1 = _R1(matrices.R1)
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, *mlp_input_linears(layer)):
            _fold_rows(lin.weight, R1.right)
        for lin in (attn.o_proj, *mlp_output_linears(layer)):
            _rotate_output(lin, R1.left_t, R1.right)
    if rot.r2:
        shape = attention_shape(config)
        R2 = matrices.R2[i].double()
        V = torch.block_diag(*[R2] * shape.num_kv_heads)
        _rotate_output(attn.v_proj, lambda x: V.T @ x, lambda x: x @ V)
        O = torch.block_diag(*[R2] * shape.num_heads)
        _fold_rows(attn.o_proj.weight, lambda x: x @ O)
    if rot.r4:  # W H4 / sqrt(n), by the same fast transform the online side uses (per expert)
        for lin in mlp_output_linears(layer):
            _fold_rows(lin.weight, apply_hadamard)


def _rotate_output(lin: nn.Linear, left_t, right) -> None:
    """An output rotated by M: W <- M^T W (``left_t``), b <- b M (``right``)."""
    _fold_columns(lin.weight, left_t)
    if lin.bias is not None:
        _fold_rows(lin.bias, right)
