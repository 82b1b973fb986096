"""GPTAQ ("GPTQv2"): GPTQ with an asymmetric target, fitting ``W X ≈ Q X̃``.

Li et al., "GPTAQ: Efficient Finetuning-Free Quantization for Asymmetric Calibration", ICML 2025
(https://arxiv.org/abs/2504.02692); math in docs/algorithms.md#gptaq, implemented from the
equations only (the reference code carries no licence).

X̃ are a linear's inputs in the partially quantized model, X those along the full-precision
trajectory, H = 2/N Σ x̃ x̃ᵀ and D = 2/N Σ (x − x̃) x̃ᵀ, both [K, K]. The linear term −W D of the
asymmetric objective is spread over GPTQ's column loop: when column i is done, its share
w_i D[i, F] is projected onto the remaining columns F with (H_d[F, F])⁻¹. By Identity B all
these projections are rows of one strictly upper matrix P = α · triu₁(D Uᵀ) · U.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rotq.quant.gptq import Correction, GPTQOptions, SolveContext, SolveResult, gptq_solve
from rotq.quant.scheme import WeightArgs

MODES = ("org", "allw")


@dataclass(frozen=True)
class GPTAQOptions:
    # Scale of the asymmetric term; 0.25 in the official code (not in the paper), 0 is GPTQ.
    alpha: float = 0.25
    # 'org': the published loop, whose block-level term sees quantized weights while the
    # in-block term sees latent ones, so results depend slightly on the block size.
    # 'allw': latent weights in both, clamped to the grid at block level (ResComp's fix).
    mode: str = "org"

    def __post_init__(self):
        check_mode(self.mode)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def asymmetric_term(D: torch.Tensor, U: torch.Tensor, alpha: float) -> torch.Tensor:
    """P = alpha * triu1(D U^T) U [K, K], strictly upper: row i is alpha D[i, F] (H_d[F, F])^-1
    for F = {i+1 .. K-1} (Identity B), so one GEMM pair replaces K sub-Hessian inverses."""
    return alpha * torch.triu(D @ U.T, diagonal=1) @ U


class GPTAQCorrection(Correction):
    """Adds w ⊗ P[c, ·] at every step (w: the latent column before rounding) and W1 · P[block, ·]
    at block end. ``D`` None or ``alpha`` 0 adds nothing (plain GPTQ)."""

    def __init__(self, D: torch.Tensor | None, alpha: float, mode: str = "org"):
        self.D, self.alpha = D, alpha
        self.latent = check_mode(mode) == "allw"

    def prepare(self, ctx: SolveContext) -> None:
        super().prepare(ctx)
        use = self.D is not None and self.alpha != 0
        self.P = asymmetric_term(ctx.statistic(self.D), ctx.U, self.alpha) if use else None

    def step(self, W1, w, i1, j):
        if self.P is None:
            return None
        s = j + 1 if self.latent else j
        return w.unsqueeze(1) * self.P[i1 + j, i1 + s:i1 + W1.shape[1]].unsqueeze(0)

    def block(self, W, W1, i1, i2):
        return None if self.P is None else W1 @ self.P[i1:i2, i2:]


def gptaq_solve(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor | None, args: WeightArgs,
                opts: GPTAQOptions = GPTAQOptions(), gptq: GPTQOptions = GPTQOptions()) -> SolveResult:
    """Quantize W [N, K] for the asymmetric target W X ≈ Q X̃, given H and D [K, K] (D None:
    X = X̃, which is GPTQ)."""
    return gptq_solve(W, H, args, gptq, GPTAQCorrection(D, opts.alpha, opts.mode))


def add_terms(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """Sum of two optional update terms (None: no term)."""
    if a is None:
        return b
    return a if b is None else a + b
