"""ResComp: GPTQ with a compensation-aware residual on top of GPTAQ's asymmetric term.

Li et al., "Rethinking Residual Errors in Compensation-based LLM Quantization", ICLR 2026
(https://arxiv.org/abs/2604.07955); math in docs/algorithms.md#rescomp,
implemented from the equations only (the reference code carries no licence).

Each step's target is ``W_org X ≈ [Q_{≤i}, W_F] X̃``: besides the input discrepancy (GPTAQ's
P term, D = 2/N Σ (x − x̃) x̃ᵀ) the residual holds the compensation the loop has already pushed
into the latent weights, (W_org − w). Its first-order share uses X X̃ᵀ = D + H with H
*undamped*: R = α2 · triu₁((D + H) Uᵀ) · U. With D = 0 (Identity C) R = −α2 (diag(U)⁻¹ U − I),
and the step becomes FOEM 6b's modified error with β = α2 (foem.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rotq.quant.gptaq import GPTAQCorrection, add_terms, check_mode
from rotq.quant.gptq import GPTQOptions, SolveContext, SolveResult, gptq_solve
from rotq.quant.scheme import WeightArgs


@dataclass(frozen=True)
class ResCompOptions:
    alpha: float = 0.25  # GPTAQ's asymmetric term
    alpha2: float = 0.25  # the compensation-aware term
    # 'allw' (paper's choice at >= 3 bits) keeps latent weights, clamped to the grid at block
    # level; 'org' (its choice at 2 bits, "more stable") follows GPTAQ's published loop.
    mode: str = "allw"

    def __post_init__(self):
        check_mode(self.mode)


def compensation_term(D: torch.Tensor | None, H: torch.Tensor, U: torch.Tensor,
                      alpha2: float) -> torch.Tensor:
    """R = alpha2 * triu1((D + H) U^T) U [K, K] with H undamped: row i projects column i's
    share of X X̃ᵀ onto the remaining columns (Identity B with D + H in place of D)."""
    XXt = H if D is None else D + H
    return alpha2 * torch.triu(XXt @ U.T, diagonal=1) @ U


class ResCompCorrection(GPTAQCorrection):
    """GPTAQ's terms plus (W_org[:, c] − w) ⊗ R[c, ·] per step and (W_org − W1) · R at block
    end; W_org is the weights at solve start (permuted like W)."""

    def __init__(self, D: torch.Tensor | None, alpha: float, alpha2: float, mode: str = "allw"):
        super().__init__(D, alpha, mode)
        self.alpha2 = alpha2

    def prepare(self, ctx: SolveContext) -> None:
        super().prepare(ctx)
        D = None if self.D is None else ctx.statistic(self.D)
        self.R = compensation_term(D, ctx.H, ctx.U, self.alpha2) if self.alpha2 != 0 else None

    def step(self, W1, w, i1, j):
        base = super().step(W1, w, i1, j)
        if self.R is None:
            return base
        c, s = i1 + j, i1 + (j + 1 if self.latent else j)
        term = (self.ctx.W0[:, c] - w).unsqueeze(1) * self.R[c, s:i1 + W1.shape[1]].unsqueeze(0)
        return add_terms(base, term)

    def block(self, W, W1, i1, i2):
        base = super().block(W, W1, i1, i2)
        if self.R is None:
            return base
        return add_terms(base, (self.ctx.W0[:, i1:i2] - W1) @ self.R[i1:i2, i2:])


def rescomp_solve(W: torch.Tensor, H: torch.Tensor, D: torch.Tensor | None, args: WeightArgs,
                  opts: ResCompOptions = ResCompOptions(),
                  gptq: GPTQOptions = GPTQOptions()) -> SolveResult:
    """Quantize W [N, K] for W X ≈ Q X̃ with ResComp's two terms, given H and D [K, K]
    (D None: X = X̃, only the compensation-aware term remains)."""
    return gptq_solve(W, H, args, gptq, ResCompCorrection(D, opts.alpha, opts.alpha2, opts.mode))
