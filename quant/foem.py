"""FOEM: GPTQ with a first-order term for the drift of the latent weights from W0.

Zheng et al., "First-Order Error Matters: Accurate Compensation for Quantized Large Language
Models", AAAI 2026 (https://arxiv.org/abs/2507.11017); math in docs/algorithms.md#foem,
implemented from the equations only (the reference code carries no licence).

After many compensations the latent W has moved away from W0 (the weights at solve start), so
the gradient H (W − W0) is no longer zero. Two published implementations, incompatible in their
β, are both offered:

* ``'6b'`` (GPTQModel's): OBS step with that gradient, approximated without a Hessian as
  H⁻¹g ≈ β (w − w0). The error becomes e' = ((w − q) − β (w − w0)) / U_cc and the next column
  of the block is pulled toward W0. β is dimensionless (default 0.2).
* ``'6a'`` (the paper repository's): a preconditioned step −β (W_F − W0_F) (H_F)⁻¹ at every
  column, with the block's part of the trailing inverse in-block and the exact trailing inverse
  U_Fᵀ U_F at block end (Identity A). β scales with H⁻¹, i.e. with H's 2/N normalisation
  (default 1e-4, the W4A4KV4 script's value).

Either can carry GPTAQ's asymmetric term (method "gptaq+foem"); that needs D. By Fact D the
first-order term is nonzero only through damping, rounding or an asymmetric target, so FOEM
acts as a tunable pull toward W0: ablate it against percdamp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rotq.quant.gptaq import GPTAQCorrection, add_terms
from rotq.quant.gptq import GPTQOptions, SolveContext, SolveResult, gptq_solve
from rotq.quant.scheme import WeightArgs

DEFAULT_BETA = {"6b": 0.2, "6a": 1e-4}
# GPTAQ's alpha when combined with it: GPTQModel's "default best" (6b) and the W4A4KV4 script (6a).
DEFAULT_ALPHA = {"6b": 0.25, "6a": 0.30}


@dataclass(frozen=True)
class FOEMOptions:
    variant: str = "6b"
    beta: float | None = None  # None: DEFAULT_BETA[variant]
    # GPTAQ's term, used only with D ("gptaq+foem"); None: DEFAULT_ALPHA[variant] there.
    alpha: float | None = None

    def __post_init__(self):
        if self.variant not in DEFAULT_BETA:
            raise ValueError(f"FOEM variant must be one of {', '.join(DEFAULT_BETA)}, "
                             f"got {self.variant!r}")

    def resolved_beta(self) -> float:
        return DEFAULT_BETA[self.variant] if self.beta is None else self.beta

    def resolved_alpha(self, with_d: bool) -> float:
        """The GPTAQ alpha to use; without D it must be unset (or 0)."""
        if not with_d:
            if self.alpha:
                raise ValueError(f"FOEM alpha={self.alpha} is GPTAQ's term and needs D from the "
                                 "full-precision trajectory; pass D (method 'gptaq+foem') "
                                 "or unset alpha")
            return 0.0
        return DEFAULT_ALPHA[self.variant] if self.alpha is None else self.alpha


class FOEMCorrection(GPTAQCorrection):
    """FOEM's terms (variant '6a' or '6b') on top of GPTAQ's ('org' loop; D None: none)."""

    def __init__(self, variant: str, beta: float, D: torch.Tensor | None = None, alpha: float = 0.0):
        super().__init__(D, alpha, "org")
        self.variant, self.beta = variant, beta

    def prepare(self, ctx: SolveContext) -> None:
        super().prepare(ctx)
        self.W0, self.U = ctx.W0, ctx.U

    def residual(self, w, q, c):
        if self.variant == "6b" and self.beta != 0:
            return (w - q) - self.beta * (w - self.W0[:, c])
        return w - q

    def step(self, W1, w, i1, j):
        base = super().step(W1, w, i1, j)
        if self.variant != "6a" or self.beta == 0:
            return base
        c, i2 = i1 + j, i1 + W1.shape[1]
        return add_terms(base, -self.beta * self._precondition(W1[:, j:] - self.W0[:, c:i2], c, i2))

    def after_step(self, W1, i1, j):
        if self.variant == "6b" and self.beta != 0 and j + 1 < W1.shape[1]:
            W1[:, j + 1] -= self.beta * (W1[:, j + 1] - self.W0[:, i1 + j + 1])

    def block(self, W, W1, i1, i2):
        base = super().block(W, W1, i1, i2)
        if self.variant != "6a" or self.beta == 0:
            return base
        K = W.shape[1]
        return add_terms(base, -self.beta * self._precondition(W[:, i2:] - self.W0[:, i2:], i2, K))

    def _precondition(self, dW: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """dW [N, b-a] times U[a:b, a:b]^T U[a:b, a:b]: the [a, b) block of (H_d[F, F])^-1 for
        F = {a .. K-1} (Identity A), exact when b = K; two triangular products."""
        Ub = self.U[a:b, a:b]
        return (dW @ Ub.T) @ Ub


def foem_solve(W: torch.Tensor, H: torch.Tensor, args: WeightArgs,
               opts: FOEMOptions = FOEMOptions(), gptq: GPTQOptions = GPTQOptions(),
               D: torch.Tensor | None = None) -> SolveResult:
    """Quantize W [N, K] against H [K, K] with FOEM; with D [K, K] it also carries GPTAQ's
    asymmetric term (alpha from ``opts``)."""
    alpha = opts.resolved_alpha(D is not None)
    return gptq_solve(W, H, args, gptq, FOEMCorrection(opts.variant, opts.resolved_beta(), D, alpha))
