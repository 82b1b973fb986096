"""GPTQ: column-by-column optimal-brain-surgeon rounding with lazy block updates.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023 (https://arxiv.org/abs/2210.17323); math in docs/algorithms.md#gptq.
Minimises ||W X - Q X||_F^2 given H = 2/N sum x x^T. Pure function of (W, H): the pipeline
collects H, this module only solves. Dynamic groups are fitted on the current (updated) weights
of the block, not on stale ones as in the reference code (docs/algorithms.md#gptq).

The GPTQ-family methods (GPTAQ, FOEM, ResComp: gptaq.py, foem.py, rescomp.py) are the same loop
plus extra update terms. They plug in as a ``Correction`` whose hooks add those terms; without
one the loop is plain GPTQ, operation for operation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from rotq.quant.quantizer import Grid, QuantizedWeight, check_group_size, fit_weight_grid
from rotq.quant.scheme import WeightArgs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQOptions:
    percdamp: float = 0.01  # damping = percdamp * mean(diag H)
    block_size: int = 128
    act_order: bool = True  # columns in order of decreasing diag(H)
    static_groups: bool | None = None  # None: on exactly when act_order is used with groups


@dataclass
class SolveResult:
    """Dequantized weights Q [N, K] (original column order), their integer form, and the
    solver's own loss estimate sum (w - q)^2 / U_cc^2 / 2."""

    Q: torch.Tensor
    quantized: QuantizedWeight
    loss: float


def damped_inverse_factor(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + lambda I)^-1, so that Hd^-1 = U^T U. Damping grows
    tenfold (with a warning) while H + lambda I is not positive definite."""
    mean_diag = torch.mean(torch.diag(H))
    damp = percdamp
    for _ in range(6):
        Hd = H + damp * mean_diag * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        logger.warning("H + %.3g mean(diag H) I is not positive definite; damping more", damp)
        damp *= 10
    raise ValueError("the Hessian is not positive definite even with 1e4x damping; "
                     "the calibration inputs are degenerate (NaN, Inf or all zero?)")


def prepare_hessian(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of W and H with dead input channels (diag H = 0) handled: H_jj = 1, W[:, j] = 0."""
    W, H = W.clone(), H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


@dataclass
class SolveContext:
    """What a correction sees, all in the solve's column order (permuted under act_order, dead
    inputs handled): W0 [N, K] the weights at solve start, H [K, K] undamped, U [K, K] with
    Hd^-1 = U^T U; ``perm`` and ``dead`` [K] refer to the original order."""

    W0: torch.Tensor
    H: torch.Tensor
    U: torch.Tensor
    perm: torch.Tensor | None
    dead: torch.Tensor

    def statistic(self, D: torch.Tensor) -> torch.Tensor:
        """Another [K, K] statistic (e.g. D) handled like H: dead columns zeroed, rows and
        columns permuted."""
        D = D.to(device=self.H.device, dtype=self.H.dtype).clone()
        D[:, self.dead] = 0
        return D if self.perm is None else D[self.perm][:, self.perm]


class Correction:
    """Extra update terms of a GPTQ-family method (docs/algorithms.md, GPTAQ to ResComp). Hooks see the solve's
    column order; the current column is local j of the block starting at i1 (global i1 + j).
    The base class adds nothing; subclasses override what they need."""

    # 'allw' mode: a step leaves its own column latent (updates only later ones) and block
    # terms see the block's latent W1 clamped to each column's grid range; 'org' (False) lets
    # the step overwrite its column with q, as GPTQ does.
    latent: bool = False

    def prepare(self, ctx: SolveContext) -> None:
        """Called once, after damping and permutation, before the first column."""
        self.ctx = ctx

    def residual(self, w: torch.Tensor, q: torch.Tensor, c: int) -> torch.Tensor:
        """Numerator of the step's error e = residual / U[c, c] (GPTQ: w - q)."""
        return w - q

    def step(self, W1: torch.Tensor, w: torch.Tensor, i1: int, j: int) -> torch.Tensor | None:
        """Term added to W1[:, s:] (s = j + 1 when latent, else j), computed from the
        pre-update W1 and the latent column w."""
        return None

    def after_step(self, W1: torch.Tensor, i1: int, j: int) -> None:
        """In-place change of W1 after the step's update."""

    def block(self, W: torch.Tensor, W1: torch.Tensor, i1: int, i2: int) -> torch.Tensor | None:
        """Term added to W[:, i2:] at block end, computed from the pre-update W; W1 is the
        finished block (clamped when latent)."""
        return None


def gptq_solve(W: torch.Tensor, H: torch.Tensor, args: WeightArgs,
               opts: GPTQOptions = GPTQOptions(), correction: Correction | None = None) -> SolveResult:
    """Quantize W [N, K] against the Hessian H [K, K] (both float32 or float64). A
    ``correction`` adds a GPTQ-family method's terms; None is plain GPTQ."""
    N, K = W.shape
    G = check_group_size(K, args)
    dead = torch.diag(H) == 0
    W, H = prepare_hessian(W, H)
    static = opts.static_groups if opts.static_groups is not None else (opts.act_order and G < K)
    if opts.act_order and G < K and not static:
        raise ValueError("act_order with dynamic groups needs a g_idx at inference, which rotq does "
                         "not export; enable static_groups or turn act_order off")
    grids: list[Grid | None] = [None] * (K // G)
    if G == K or static:
        for g in range(K // G):
            grids[g] = fit_weight_grid(W[:, g * G:(g + 1) * G], args)

    perm = torch.argsort(torch.diag(H), descending=True) if opts.act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U = damped_inverse_factor(H, opts.percdamp)
    order = perm.tolist() if perm is not None else range(K)
    original = list(order)
    if correction is not None:
        correction.prepare(SolveContext(W.clone(), H, U, perm, dead))

    Q = torch.zeros_like(W)
    losses = torch.zeros(N, dtype=W.dtype, device=W.device)
    for i1 in range(0, K, opts.block_size):
        i2 = min(i1 + opts.block_size, K)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E = torch.zeros_like(W1)
        for j in range(i2 - i1):
            g = original[i1 + j] // G
            if grids[g] is None:  # dynamic group: fit on the current weights of the group
                grids[g] = fit_weight_grid(torch.cat([W1[:, j:], W[:, i2:]], dim=1)[:, :G], args)
            w = W1[:, j]
            q = grids[g].fake_quantize(w.unsqueeze(1)).squeeze(1)
            Q[:, i1 + j] = q
            if correction is None:  # the lean path: e = (w - q) / U_jj; W1[:, j:] -= e U[j, j:]
                e = torch.sub(w, q).div_(U1[j, j])
                W1[:, j:].addr_(e, U1[j, j:], alpha=-1)
            else:
                losses += (w - q) ** 2 / U1[j, j] ** 2 / 2
                e = _corrected_step(correction, W1, w, q, U1, i1, j)
            E[:, j] = e
        if correction is None:
            losses += E.square().sum(dim=1) / 2  # (w - q)^2 / U_jj^2 / 2 summed over the block
            W[:, i2:] -= E @ U[i1:i2, i2:]
        else:
            W1 = _clamp_to_grids(W1, grids, original[i1:i2], G) if correction.latent else W1
            extra = correction.block(W, W1, i1, i2)  # before the update: FOEM 6a reads the old W
            W[:, i2:] -= E @ U[i1:i2, i2:]
            if extra is not None:
                W[:, i2:] += extra

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return SolveResult(Q, _integer_form(Q, grids, G), float(losses.sum()))


def _corrected_step(corr: Correction, W1, w, q, U1, i1: int, j: int) -> torch.Tensor:
    """One column step with a correction's terms; returns the step's error e."""
    e = corr.residual(w, q, i1 + j) / U1[j, j]
    s = j + 1 if corr.latent else j
    extra = corr.step(W1, w, i1, j)  # before the update: w and W1 are still latent
    W1[:, s:] -= e.unsqueeze(1) * U1[j, s:].unsqueeze(0)
    if extra is not None:
        W1[:, s:] += extra
    corr.after_step(W1, i1, j)
    return e


def _clamp_to_grids(W1: torch.Tensor, grids: list[Grid], columns: list[int], G: int) -> torch.Tensor:
    """W1 [N, B] with column j clamped to the range of the grid of original column columns[j]."""
    return torch.cat([grids[c // G].clamp(W1[:, j:j + 1]) for j, c in enumerate(columns)], dim=1)


def _integer_form(Q: torch.Tensor, grids: list[Grid], G: int) -> QuantizedWeight:
    """Codes and grids of the (on-grid) dequantized Q."""
    codes = torch.cat([grid.quantize(Q[:, g * G:(g + 1) * G]) for g, grid in enumerate(grids)], dim=1)
    scale = torch.cat([grid.scale for grid in grids], dim=1)
    zp = None if grids[0].zero_point is None else torch.cat([g.zero_point for g in grids], dim=1)
    return QuantizedWeight(codes, scale, zp, G)
