"""QEP (quantization error propagation): correct W for the input discrepancy, then quantize.

Arai & Ichikawa, "Quantization Error Propagation: Revisiting Layer-Wise Post-Training
Quantization", NeurIPS 2025 (https://arxiv.org/abs/2504.09629); math in docs/algorithms.md#qep.

With H = 2/N Σ x̃ x̃ᵀ and D = 2/N Σ (x − x̃) x̃ᵀ (x along the full-precision trajectory, x̃ in
the partially quantized model), the ridge problem min ||W X − W* X̃||² + λ ||W* − W||² has the
closed form W* = W + W D (H + λI)⁻¹. QEP moves W a fraction α of the way there and lets any
layer-wise quantizer (GPTQ, RTN, GPTAQ, ...) handle rounding. α < 1 and the strong default ridge
(λ = 1.0 · mean diag H) keep 128 calibration samples from being overfitted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The reference code leaves the MLP's down projection uncorrected (architecture-specific);
# in a mixture of experts, every expert's.
DEFAULT_SKIP = ("down_proj",)


@dataclass(frozen=True)
class QEPOptions:
    alpha: float = 0.5  # fraction of the correction applied ("perccorr")
    # ridge lambda = percdampqep * mean(diag H); 1.0 in the paper's code, 0.01 in later ports
    percdampqep: float = 1.0
    skip: tuple[str, ...] = DEFAULT_SKIP  # suffixes of linear names left uncorrected


def qep_skips(name: str | None, opts: QEPOptions) -> bool:
    """Whether the linear called ``name`` (e.g. 'model.layers.3.mlp.down_proj') is excluded."""
    return name is not None and any(name == s or name.endswith("." + s) for s in opts.skip)


def qep_correct(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor,
                opts: QEPOptions = QEPOptions()) -> torch.Tensor:
    """W* = W + alpha W D (H + lambda I)^-1, W [N, K], H and D [K, K]; same dtype as W.
    Dead inputs (diag H = 0) get H_jj = 1 and a zero column of D, so their column is unchanged."""
    if opts.alpha == 0:
        return W.clone()
    H, D = H.to(W).clone(), D.to(W).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    D[:, dead] = 0
    lam = opts.percdampqep * torch.mean(torch.diag(H))
    L, info = torch.linalg.cholesky_ex(H + lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device))
    if info != 0:
        raise ValueError(f"QEP: H + {opts.percdampqep} mean(diag H) I is not positive definite; "
                        "raise percdampqep (the calibration inputs do not span every channel)")
    # (W D)(H + lambda I)^-1 = (solve((H + lambda I), (W D)^T))^T, H symmetric
    return W + opts.alpha * torch.cholesky_solve((W @ D).T, L).T
