"""The rotations file: learned R1/R2 as safetensors, written into a rotq checkpoint
(``ROTATIONS_FILE``, kind "spinquant"), into a calibration state directory, and read back by
``--rotation-file``.

On disk: one safetensors file with float64 tensors ``R1`` [d, d] and ``R2.{i}`` [D, D] per
decoder layer i, metadata ``format: rotq-rotations`` plus provenance strings. This module is the
file's only reader and writer; the math that folds the matrices into a model is
``rotq.quant.rotation``'s (which re-exports these names).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rotq.quant.arch import attention_shape
from rotq.quant.errors import RotqError

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
