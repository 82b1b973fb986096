"""Computational invariance: fuse RMSNorm weights into the following linears and fold the
offline rotations R1 (residual stream) and R2 (per head, V -> O), plus the weight side of the
online R4 (before down_proj). QuaRot, Ashkboos et al., NeurIPS 2024 (https://arxiv.org/abs/2404.00456);
notes/algorithms.md §9. Row-vector convention: y = x W^T, so an input rotated by M needs
W <- W M and an output rotated by M needs W <- M^T W, b <- b M. All math runs in float64.
R1 and R2 are random Hadamards (kind "hadamard") or given orthogonal matrices (kind "spinquant",
learned by spinquant.py from those same Hadamards).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rotq.quant.arch import attention_shape, decoder_layers
from rotq.quant.errors import RotqError
from rotq.quant.hadamard import hadamard_matrix, random_hadamard_matrix
from rotq.quant.scheme import RotationArgs

ROTATIONS_FILE = "spinquant/rotations.safetensors"  # in a rotq checkpoint: R1 and R2.{layer}, float64
ORTHOGONALITY_TOL = 1e-6  # max |R^T R - I| accepted from a rotation file


@dataclass
class RotationMatrices:
    """The offline rotations: R1 [d, d] on the residual stream and one R2 [D, D] per decoder
    layer (shared by its heads), orthogonal, float64."""

    R1: torch.Tensor
    R2: list[torch.Tensor]


def orthogonality_error(R: torch.Tensor) -> float:
    """max |R^T R - I| in float64."""
    R = R.double()
    return float((R.T @ R - torch.eye(R.shape[1], dtype=torch.float64, device=R.device)).abs().max())


def hadamard_rotations(config, seed: int) -> RotationMatrices:
    """The random Hadamards of ``--rotation hadamard``: R1 from ``seed``, layer i's R2 from seed + 1 + i."""
    head_dim = attention_shape(config).head_dim
    return RotationMatrices(random_hadamard_matrix(config.hidden_size, seed),
                            [random_hadamard_matrix(head_dim, seed + 1 + i)
                             for i in range(config.num_hidden_layers)])


def _set(param: nn.Parameter, value: torch.Tensor) -> None:
    """param <- value, in place when the shape allows: a weight still backed by the checkpoint's
    memory-mapped file then turns into private memory page by page, instead of keeping the
    file's pages resident beside a new copy (a model's size in peak RSS)."""
    if param.shape == value.shape:
        param.data.copy_(value)
    else:
        param.data = value.to(param.dtype)


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
    attn, mlp = layer.self_attn, layer.mlp
    _fuse(layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj))
    _fuse(layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))


def _fuse(norm: nn.Module, linears) -> None:
    gamma = norm.weight.double()
    for lin in linears:
        _set(lin.weight, lin.weight.double() * gamma)
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
        R1 = matrices.R1.double()
        emb = model.model.embed_tokens.weight
        _set(emb, emb.double() @ R1)
        _set(model.lm_head.weight, model.lm_head.weight.double() @ R1)
    if layers:
        for i, layer in enumerate(decoder_layers(model)):
            rotate_layer(layer, i, model.config, rot, matrices)


@torch.no_grad()
def rotate_layer(layer: nn.Module, i: int, config, rot: RotationArgs, matrices: RotationMatrices | None) -> None:
    """Fold R1, layer i's R2 and R4's weight side into decoder layer i (norms already fused)."""
    attn, mlp = layer.self_attn, layer.mlp
    if rot.r1:
        R1 = matrices.R1.double()
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _set(lin.weight, lin.weight.double() @ R1)
        for lin in (attn.o_proj, mlp.down_proj):
            _rotate_output(lin, R1)
    if rot.r2:
        shape = attention_shape(config)
        R2 = matrices.R2[i].double()
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


def save_rotations(rotations: RotationMatrices, path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write R1 and R2.{i} (float64) to a safetensors file; ``metadata``: provenance strings."""
    from safetensors.torch import save_file

    tensors = {"R1": rotations.R1} | {f"R2.{i}": R2 for i, R2 in enumerate(rotations.R2)}
    tensors = {k: v.detach().to("cpu", torch.float64).contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "rotq-rotations", **(metadata or {})})


def load_rotations(path: Path, config) -> RotationMatrices:
    """Read a file of :func:`save_rotations` for the model of ``config``; RotqError names what
    does not fit (missing file, shapes or layer count of another model, a non-orthogonal matrix)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise RotqError(f"cannot read rotation file {path}: {e}") from None
    d, D = config.hidden_size, attention_shape(config).head_dim
    layers = config.num_hidden_layers
    expected = ["R1"] + [f"R2.{i}" for i in range(layers)]
    missing, extra = [k for k in expected if k not in tensors], sorted(set(tensors) - set(expected))
    if missing or extra:
        held = sum(k.startswith("R2.") for k in tensors)
        raise RotqError(
            f"rotation file {path} holds {sorted(tensors)[:4]}{'...' if len(tensors) > 4 else ''} "
            f"(R2 for {held} layers); this model needs R1 and R2.0..R2.{layers - 1} ({layers} decoder "
            f"layers): it was learned for another model, or is incomplete")
    for name, n, what in [("R1", d, "hidden_size"), *((k, D, "head_dim") for k in expected[1:])]:
        R = tensors[name]
        if tuple(R.shape) != (n, n):
            raise RotqError(f"{name} in rotation file {path} has shape {list(R.shape)}; this model needs "
                            f"[{n}, {n}] ({what} {n}): it was learned for another model")
        err = orthogonality_error(R)
        if not err <= ORTHOGONALITY_TOL:
            raise RotqError(f"{name} in rotation file {path} is not orthogonal (max |R^T R - I| = "
                            f"{err:.3g} > {ORTHOGONALITY_TOL:g}); the file is damaged or not a rotation")
    return RotationMatrices(tensors["R1"].double(), [tensors[k].double() for k in expected[1:]])
