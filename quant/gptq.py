"""GPTQ: column-by-column optimal-brain-surgeon rounding with lazy block updates.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023 (https://arxiv.org/abs/2210.17323); math in notes/algorithms.md §4.
Minimises ||W X - Q X||_F^2 given H = 2/N sum x x^T. Pure function of (W, H): the pipeline
collects H, this module only solves. Dynamic groups are fitted on the current (updated) weights
of the block, not on stale ones as in the reference code (algorithms.md §4, quirk).
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


def gptq_solve(W: torch.Tensor, H: torch.Tensor, args: WeightArgs,
               opts: GPTQOptions = GPTQOptions()) -> SolveResult:
    """Quantize W [N, K] against the Hessian H [K, K] (both float32 or float64)."""
    N, K = W.shape
    G = check_group_size(K, args)
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
            e = (w - q) / U1[j, j]
            losses += (w - q) ** 2 / U1[j, j] ** 2 / 2
            W1[:, j:] -= e.unsqueeze(1) * U1[j, j:].unsqueeze(0)
            E[:, j] = e
        W[:, i2:] -= E @ U[i1:i2, i2:]

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return SolveResult(Q, _integer_form(Q, grids, G), float(losses.sum()))


def _integer_form(Q: torch.Tensor, grids: list[Grid], G: int) -> QuantizedWeight:
    """Codes and grids of the (on-grid) dequantized Q."""
    codes = torch.cat([grid.quantize(Q[:, g * G:(g + 1) * G]) for g, grid in enumerate(grids)], dim=1)
    scale = torch.cat([grid.scale for grid in grids], dim=1)
    zp = None if grids[0].zero_point is None else torch.cat([g.zero_point for g in grids], dim=1)
    return QuantizedWeight(codes, scale, zp, G)
