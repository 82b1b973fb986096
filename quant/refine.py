"""CQE+-style learned weight refinement: a gradient-trained stage before the compensators
(docs/algorithms.md#refinement). CQE+ (arXiv 2407.15508) publishes only its abstract; this is rotq's
formulation of it, written down here and in the README.

Parameterisation. Each linear's weight W [N, K] is written from its thin SVD W = U diag(σ) Vᵀ
(r = min(N, K)) as

    W(E) = W + U E Vᵀ = U (diag(σ) + E) Vᵀ,    E learnable, zero at the start,

with E_ij = θ_ij · sqrt(σ_i σ_j): the learned θ are relative (θ_ii = 0.01 moves σ_i by 1 %), so one
learning rate suits every layer and linear.

* ``lsi`` (learnable singular-value increments): E diagonal, r parameters.
* ``sde`` (singular-value diagonal expansion): E banded, the diagonal and the ``band`` nearest
  off-diagonals on each side, r (2 band + 1) parameters. A band rather than a low-rank term: it
  mixes only neighbouring singular directions (of similar σ), so the update keeps the SVD's
  ordering as its structure; a low-rank term U A Bᵀ Vᵀ would be plain LoRA on W and forget it.

Written as W + U E Vᵀ, E = 0 gives W back bit for bit; after training W ← W(E) (merged: nothing
changes at inference) and the chosen compensator (RTN, GPTQ, GPTAQ, ...) quantizes it.

Objective. On the layer's calibration inputs x̃ (the partially quantized model's, as the
compensators see them), the layer F_E, with every W(E) fake-quantized on the grid RTN fits
to W at the start (the scheme's clip search included; held fixed while E trains) and the
scheme's activation and KV quantizers, all rounding straight through, should reproduce the
full-precision layer's output y (computed on the full-precision inputs when the method keeps
that trajectory, else on x̃):

    L = e(F_E(x̃), y) + γ / K' Σ_{k=1..K'} e(G_k(F_E(x̃)), G_k(y)),    e(a, b) = ||a − b||² / ||b||²,

where G_k pushes through the next k decoder layers in full precision (cross-layer learning,
``cross_layer`` K; K' = K but fewer at the last layers; γ = ``cross_weight``). K = 0 is the
plain block loss. AdamW on θ with a cosine learning rate, one calibration sequence per step in
an order drawn from ``seed`` and the layer's index (so a resumed run repeats it exactly on the
CPU; CUDA's attention backward is not deterministic).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from rotq.quant.arch import layer_linears
from rotq.quant.errors import RotqError
from rotq.quant.online import ATTN_IMPLEMENTATION, install_layer_ops
from rotq.quant.quantizer import Grid, check_group_size, fit_weight_grid
from rotq.quant.scheme import Scheme, WeightArgs

REFINE_KINDS = ("none", "lsi", "sde")


@dataclass(frozen=True)
class RefineOptions:
    kind: str = "none"  # none | lsi | sde
    steps: int = 100  # AdamW steps per decoder layer
    lr: float = 5e-3  # initial learning rate of the relative θ (cosine decay to 0)
    cross_layer: int = 0  # K: also match the output K layers ahead
    cross_weight: float = 1.0  # γ: weight of the cross-layer term
    band: int = 2  # sde: off-diagonals on each side of the diagonal
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.kind not in REFINE_KINDS:
            raise RotqError(f"unknown --refine {self.kind!r}; choose one of {', '.join(REFINE_KINDS)}")
        if self.steps < 0 or self.lr <= 0 or self.cross_layer < 0 or self.cross_weight < 0 or self.band < 1:
            raise RotqError(f"refinement needs steps >= 0, lr > 0, cross-layer >= 0, cross-layer weight >= 0 "
                            f"and band >= 1; got {self.steps}, {self.lr}, {self.cross_layer}, "
                            f"{self.cross_weight}, {self.band}")

    @property
    def enabled(self) -> bool:
        return self.kind != "none"


def check_refine(opts: RefineOptions, distributed: bool) -> None:
    """Refuse training across processes. (The cross-layer term's need for the next layers in memory,
    which rules out --offload, is a recipe check.)"""
    if opts.enabled and distributed:
        raise RotqError("--refine trains in one process only; run without torchrun")


class SingularRefinement(nn.Module):
    """The learnable E of one weight, in the coordinates of its SVD (module docstring)."""

    def __init__(self, W: torch.Tensor, kind: str, band: int = 2):
        super().__init__()
        U, sigma, Vh = torch.linalg.svd(W.detach().double(), full_matrices=False)
        self.register_buffer("U", U.to(W.dtype))
        self.register_buffer("V", Vh.T.to(W.dtype))
        self.register_buffer("sigma", sigma.to(W.dtype))
        r = sigma.numel()
        self.band = band if kind == "sde" else 0
        self.diag = nn.Parameter(torch.zeros(r, dtype=W.dtype))
        # upper[k - 1, i] = θ_(i, i+k), lower[k - 1, i] = θ_(i+k, i), for i < r - k
        self.upper = nn.Parameter(torch.zeros(self.band, r, dtype=W.dtype))
        self.lower = nn.Parameter(torch.zeros(self.band, r, dtype=W.dtype))

    def E(self) -> torch.Tensor:
        """E [r, r] (dense; for tests and the merge check)."""
        r = self.sigma.numel()
        E = torch.diag(self.diag * self.sigma)
        for k in range(1, min(self.band, r - 1) + 1):
            geo = (self.sigma[:r - k] * self.sigma[k:]).sqrt()
            E = E + torch.diag(self.upper[k - 1, :r - k] * geo, k) + torch.diag(self.lower[k - 1, :r - k] * geo, -k)
        return E

    def delta(self) -> torch.Tensor:
        """U E Vᵀ [N, K], without forming E: (U E)[:, j] = Σ_i U[:, i] E_ij over the band."""
        U, s, r = self.U, self.sigma, self.sigma.numel()
        UE = U * (self.diag * s)
        for k in range(1, min(self.band, r - 1) + 1):
            geo = (s[:r - k] * s[k:]).sqrt()
            # E_(j-k, j) = upper[k-1, j-k]: column j >= k gains U[:, j-k] times it
            UE = UE + nn.functional.pad(U[:, :r - k] * (self.upper[k - 1, :r - k] * geo), (k, 0))
            # E_(j+k, j) = lower[k-1, j]: column j < r-k gains U[:, j+k] times it
            UE = UE + nn.functional.pad(U[:, k:] * (self.lower[k - 1, :r - k] * geo), (0, k))
        return UE @ self.V.T


@dataclass
class RefineReport:
    layer: int
    loss_start: float  # the objective at E = 0: RTN of the weights, the scheme's other quantizers
    loss_end: float  # the objective after the last step, on all calibration sequences
    seconds: float


def fixed_weight_grid(W: torch.Tensor, args: WeightArgs | None) -> Grid | None:
    """The grid RTN would fit on W now (the scheme's clip search included), detached, rounding
    straight through; None for 16-bit weights. Training keeps W(E) on this one grid: a grid
    refitted to W(E) at every step lets E buy its gains by moving the grid, which the final
    quantizer then refits differently (at W3A16, training through a min-max grid refitted each
    step took RTN's WikiText-2 perplexity from 2,201 to 34,292; benchmarks/RESULTS.md)."""
    if args is None or args.bits >= 16:
        return None
    G = check_group_size(W.shape[1], args)
    grid = fit_weight_grid(W.detach().reshape(-1, G), args)
    return Grid(grid.scale.detach(), None if grid.zero_point is None else grid.zero_point.detach(), grid.bits,
                ste=True)


def fake_quantize_on_grid(W: torch.Tensor, grid: Grid | None) -> torch.Tensor:
    """W rounded (straight through) and clamped on ``grid``'s rows; W itself when None."""
    if grid is None:
        return W
    return grid.fake_quantize(W.reshape(grid.scale.shape[0], -1)).reshape(W.shape)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).square().sum() / b.square().sum().clamp_min(1e-30)


class RefinementObjective:
    """L(θ) on calibration sequences (module docstring): ``layer`` computes the scheme's online
    ops with straight-through rounding; ``ahead`` are the next layers in full precision;
    ``targets[k]`` [N, L, d] is y pushed through k of them."""

    def __init__(self, layer: nn.Module, refinements: dict[str, SingularRefinement], weights: WeightArgs | None,
                 ahead: list[nn.Module], targets: list[torch.Tensor], forward: dict, cross_weight: float):
        self.layer, self.refinements = layer, refinements
        self.ahead, self.targets, self.forward, self.cross_weight = ahead, targets, forward, cross_weight
        self.fixed = {name: p.detach() for name, p in layer.named_parameters()}
        self.base = {name: layer.get_submodule(name).weight.detach() for name in refinements}
        self.grids = {name: fixed_weight_grid(W, weights) for name, W in self.base.items()}

    def __call__(self, x: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
        params = dict(self.fixed)
        for name, ref in self.refinements.items():
            params[f"{name}.weight"] = fake_quantize_on_grid(self.base[name] + ref.delta(), self.grids[name])
        h = _hidden(functional_call(self.layer, params, (x,), self.forward))
        loss = relative_error(h, self.targets[0][rows])
        if self.ahead:
            cross = 0.0
            for k, block in enumerate(self.ahead, 1):
                h = _hidden(block(h, **self.forward))
                cross = cross + relative_error(h, self.targets[k][rows])
            loss = loss + self.cross_weight * cross / len(self.ahead)
        return loss


def refine_layer(i: int, layer: nn.Module, fp_layer: nn.Module, ahead: list[nn.Module], inps: torch.Tensor,
                 fp_inps: torch.Tensor | None, forward: dict, scheme: Scheme, installed: Scheme,
                 opts: RefineOptions, batch_size: int, show_progress: bool = True) -> RefineReport:
    """Learn E for every linear of decoder layer ``i`` and merge W ← W(E) into ``layer``.
    ``fp_layer`` and ``ahead`` compute in full precision (no quantizers); ``inps`` [N, L, d] are
    the layer's calibration inputs, ``fp_inps`` the full-precision trajectory's (or None);
    ``installed``: the online ops to leave on ``layer`` afterwards."""
    t0 = time.perf_counter()
    inps = inps.detach()
    targets = [_outputs(fp_layer, fp_inps if fp_inps is not None else inps, forward, batch_size)]
    for block in ahead:
        targets.append(_outputs(block, targets[-1], forward, batch_size))
    linears = layer_linears(layer)
    refinements = {name: SingularRefinement(lin.weight.data.float(), opts.kind, opts.band).to(inps.device)
                   for name, lin in linears.items()}
    params = [p for ref in refinements.values() for p in ref.parameters()]
    for block in ahead:
        block.requires_grad_(False)
    objective = RefinementObjective(layer, refinements, scheme.weights, ahead, targets, forward, opts.cross_weight)
    install_layer_ops(layer, scheme, ste=True)
    # the KV quantizer and R3 live in rotq's attention function, which a model calibrated
    # without quantizers (--no-calib-act-quant) may have switched off
    config, attention = layer.self_attn.config, layer.self_attn.config._attn_implementation
    if scheme.kv_cache is not None or scheme.rotation.r3:
        config._attn_implementation = ATTN_IMPLEMENTATION
    try:
        with torch.enable_grad():
            loss_start = _full_loss(objective, inps, batch_size)
            if opts.steps:
                _train(objective, params, inps, opts, i, show_progress)
            loss_end = _full_loss(objective, inps, batch_size)
    finally:
        install_layer_ops(layer, installed)
        config._attn_implementation = attention
    with torch.no_grad():
        for name, lin in linears.items():
            if opts.steps:
                lin.weight.data.copy_(lin.weight.data.double() + refinements[name].delta().double())
    return RefineReport(i, loss_start, loss_end, time.perf_counter() - t0)


def _train(objective: RefinementObjective, params, inps: torch.Tensor, opts: RefineOptions, i: int,
           show_progress: bool) -> None:
    n = inps.shape[0]
    generator = torch.Generator().manual_seed(opts.seed * 1_000_003 + i)
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(-(-opts.steps // n))])
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    bar = tqdm(range(opts.steps), desc=f"Refining layer {i} ({opts.kind})", unit="step", leave=False,
               disable=not show_progress)
    for t in bar:
        for group in optimizer.param_groups:
            group["lr"] = opts.lr * 0.5 * (1 + math.cos(math.pi * t / opts.steps))
        s = int(order[t])
        loss = objective(inps[s:s + 1], slice(s, s + 1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.4g}")


def _full_loss(objective: RefinementObjective, inps: torch.Tensor, batch_size: int) -> float:
    """The objective over all calibration sequences (the mean of the per-batch values)."""
    with torch.no_grad():
        losses = [float(objective(inps[s:s + batch_size], slice(s, s + batch_size)))
                  for s in range(0, inps.shape[0], batch_size)]
    return sum(losses) / len(losses)


@torch.no_grad()
def _outputs(block: nn.Module, inps: torch.Tensor, forward: dict, batch_size: int) -> torch.Tensor:
    return torch.cat([_hidden(block(b, **forward)) for b in inps.split(batch_size)])


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out
