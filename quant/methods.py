"""The weight solvers the pipeline can call, by name, and how they compose.

A method string joins methods with '+': "gptq", "rtn", "gptaq", "foem", "qep", "rescomp",
"gptaq+foem", "qep+gptq", "qep+gptaq", "gptaq+rescomp", ... (any order). It parses into a
``SolverPlan``: an optional QEP pre-correction of W, then one solver. The GPTQ-family terms
combine as docs/algorithms.md ("How methods compose") allows:

* gptaq+foem: FOEM with GPTAQ's asymmetric term (alpha from ``FOEMOptions.alpha``).
* gptaq+rescomp: ResComp, which already contains GPTAQ's term (alpha from ``ResCompOptions``).
* qep+X: W ← W + α W D (H + λI)⁻¹, then solver X (rtn, gptq, gptaq, foem, rescomp, ...); "qep"
  alone is qep+gptq. With an asymmetric X both stages aim at the same discrepancy D, so their
  corrections add up.

Inputs of every solve: W [N, K], H = 2/N Σ x̃ x̃ᵀ [K, K] and, for methods that fit the
full-precision trajectory (W X ≈ Q X̃), D = 2/N Σ (x − x̃) x̃ᵀ [K, K].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rotq.quant.errors import RotqError
from rotq.quant.foem import FOEMOptions, foem_solve
from rotq.quant.gptaq import GPTAQOptions, gptaq_solve
from rotq.quant.gptq import GPTQOptions, SolveResult, gptq_solve
from rotq.quant.qep import QEPOptions, qep_correct, qep_skips
from rotq.quant.quantizer import quantize_weight_rtn
from rotq.quant.rescomp import ResCompOptions, rescomp_solve
from rotq.quant.scheme import WeightArgs

METHODS = ("rtn", "gptq", "gptaq", "foem", "qep", "rescomp")
# Methods that fit W X ≈ Q X̃ need D, i.e. the layer's inputs along the full-precision trajectory.
NEEDS_FP_TRAJECTORY = {"rtn": False, "gptq": False, "gptaq": True, "foem": False, "qep": True,
                       "rescomp": True}


@dataclass(frozen=True)
class SolverPlan:
    """A parsed method: ``qep`` pre-correction or not, then ``solver``, one of 'rtn', 'gptq',
    'gptaq', 'foem', 'gptaq+foem', 'rescomp'. ``name`` is the canonical spelling."""

    qep: bool
    solver: str

    @property
    def name(self) -> str:
        return f"qep+{self.solver}" if self.qep else self.solver

    @property
    def needs_data(self) -> bool:
        return self.qep or self.solver != "rtn"

    @property
    def needs_fp_trajectory(self) -> bool:
        return any(NEEDS_FP_TRAJECTORY[m] for m in self.name.split("+"))


RTN = SolverPlan(False, "rtn")  # what a linear without calibration inputs falls back to


@dataclass(frozen=True)
class MethodOptions:
    """Hyperparameters of every method; a plan reads the ones of its parts."""

    gptq: GPTQOptions = field(default_factory=GPTQOptions)
    gptaq: GPTAQOptions = field(default_factory=GPTAQOptions)
    foem: FOEMOptions = field(default_factory=FOEMOptions)
    qep: QEPOptions = field(default_factory=QEPOptions)
    rescomp: ResCompOptions = field(default_factory=ResCompOptions)


def parse_method(method: str) -> SolverPlan:
    """Parse a method string; RotqError says which parts do not combine and why."""
    parts = method.split("+")
    for p in parts:
        if p not in METHODS:
            raise RotqError(f"unknown method {p!r} in {method!r}; choose one of {', '.join(METHODS)} "
                            "or combine them with '+' (e.g. qep+gptq, gptaq+foem)")
    for i, a in enumerate(parts):
        for b in parts[i + 1:]:
            _check_pair(a, b)
    solvers = [p for p in parts if p != "qep"]
    if len(solvers) > 1 and "rescomp" in solvers:
        solver = "rescomp"  # gptaq+rescomp: ResComp contains GPTAQ's term
    elif len(solvers) > 1:
        solver = "gptaq+foem"
    else:
        solver = solvers[0] if solvers else "gptq"
    return SolverPlan("qep" in parts, solver)


def _check_pair(a: str, b: str) -> None:
    a, b = sorted((a, b))
    why = None
    if a == b:
        why = (f"'{a}' appears twice; each correction is applied once (a second QEP step would "
               "correct an already corrected W against the same D)")
    elif "rtn" in (a, b) and "qep" not in (a, b):
        other = b if a == "rtn" else a
        why = (f"'rtn' rounds each weight on its own while '{other}' is a column-by-column "
               "solver: they are alternatives, choose one")
    elif "gptq" in (a, b) and "qep" not in (a, b):
        other = b if a == "gptq" else a
        why = f"'{other}' already is GPTQ plus its own update term; write '{other}'"
    elif (a, b) == ("foem", "rescomp"):
        why = ("both add the compensation-aware term (W0 - W): FOEM 6b's error term is ResComp's "
               "R term with beta <-> alpha2 (docs/algorithms.md, ResComp); use 'gptaq+foem' or 'rescomp'")
    if why is not None:
        raise RotqError(f"'{a}' and '{b}' cannot be combined: {why}")


def solve(method: str, W: torch.Tensor, H: torch.Tensor | None, args: WeightArgs,
          options: GPTQOptions | MethodOptions | None = None, D: torch.Tensor | None = None,
          name: str | None = None) -> SolveResult:
    """Quantize one linear's weight W [N, K] (float32/64) with the named method. ``options``
    may be plain GPTQOptions (for rtn/gptq callers); ``name`` (e.g. 'model.layers.0.mlp.down_proj')
    lets QEP skip excluded linears."""
    if not isinstance(options, MethodOptions):
        options = MethodOptions(gptq=options or GPTQOptions())
    return solve_plan(parse_method(method), W, H, D, args, options, name)


def solve_plan(plan: SolverPlan, W: torch.Tensor, H: torch.Tensor | None, D: torch.Tensor | None,
               args: WeightArgs, options: MethodOptions = MethodOptions(),
               name: str | None = None) -> SolveResult:
    """Run a parsed plan on W [N, K] with H and D [K, K] (D None only for methods that do not
    need the full-precision trajectory)."""
    if plan.needs_data and H is None:
        raise ValueError(f"method {plan.name!r} needs the Hessian H of the linear's inputs")
    if plan.needs_fp_trajectory and D is None:
        raise ValueError(f"method {plan.name!r} needs D = 2/N sum (x - x~) x~^T from the "
                         "full-precision trajectory; pass D or choose rtn, gptq or foem")
    if plan.solver in ("gptaq+foem", "rescomp") and options.gptaq != GPTAQOptions():
        raise ValueError(f"{plan.name!r} reads GPTAQ's alpha from its own options, not from "
                         "GPTAQOptions; set FOEMOptions.alpha or ResCompOptions.alpha instead")
    if plan.qep and not qep_skips(name, options.qep):
        W = qep_correct(W, H, D, options.qep)
    o = options
    if plan.solver == "rtn":
        qw = quantize_weight_rtn(W, args)
        return SolveResult(qw.dequantize(), qw, float("nan"))
    if plan.solver == "gptq":
        return gptq_solve(W, H, args, o.gptq)
    if plan.solver == "gptaq":
        return gptaq_solve(W, H, D, args, o.gptaq, o.gptq)
    if plan.solver == "foem":
        return foem_solve(W, H, args, o.foem, o.gptq)
    if plan.solver == "gptaq+foem":
        return foem_solve(W, H, args, o.foem, o.gptq, D=D)
    return rescomp_solve(W, H, D, args, o.rescomp, o.gptq)
