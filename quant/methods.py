"""The weight solvers the pipeline can call, by name. A new compensator (GPTAQ, FOEM, ...) is a
small module plus one entry here."""

from __future__ import annotations

import torch

from rotq.quant.errors import RotqError
from rotq.quant.gptq import GPTQOptions, SolveResult, gptq_solve
from rotq.quant.quantizer import quantize_weight_rtn
from rotq.quant.scheme import WeightArgs

METHODS = ("rtn", "gptq")
NEEDS_DATA = {"rtn": False, "gptq": True}


def check_method(name: str) -> str:
    if name not in METHODS:
        raise RotqError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return name


def solve(method: str, W: torch.Tensor, H: torch.Tensor | None, args: WeightArgs,
          gptq: GPTQOptions) -> SolveResult:
    """Quantize one linear's weight W [N, K] (float32/64) with the named method."""
    if method == "rtn":
        qw = quantize_weight_rtn(W, args)
        return SolveResult(qw.dequantize(), qw, float("nan"))
    if method == "gptq":
        return gptq_solve(W, H, args, gptq)
    raise RotqError(f"unknown method {method!r}")
