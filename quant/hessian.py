"""Input statistics of a linear, collected layer by layer (notes/algorithms.md §1, §3).

H = 2/N_seq Σ x̃ x̃ᵀ from the inputs x̃ of the partially quantized model and, for methods that
fit the full-precision trajectory (GPTAQ, QEP, ResComp), D = 2/N_seq Σ (x − x̃) x̃ᵀ with x the
same linear's input in the full-precision model, token for token. Sums run over all tokens,
the normalisation over sequences (as every GPTQ-family reference does); accumulated in float64.
Under torchrun each rank sums its own samples and the sums are all-reduced (distributed.py).
"""

from __future__ import annotations

import torch
from torch import nn

from rotq.quant.distributed import SINGLE, Ranks


class StopForward(Exception):
    """Raised by a capture hook once it has its input, to skip the rest of the layer."""


class InputCapture:
    """Forward pre-hook that keeps a linear's (already transformed) input and stops the layer."""

    def __init__(self):
        self.x: torch.Tensor | None = None

    def __call__(self, module, inputs):
        self.x = inputs[0]
        raise StopForward


def _input_of(layer: nn.Module, linear: str, batch: torch.Tensor, forward: dict) -> torch.Tensor:
    capture = InputCapture()
    handle = layer.get_submodule(linear).register_forward_pre_hook(capture)
    try:
        layer(batch, **forward)
    except StopForward:
        pass
    finally:
        handle.remove()
    if capture.x is None:
        raise RuntimeError(f"{linear} was not reached by the layer's forward")
    return capture.x.reshape(-1, capture.x.shape[-1]).float()


@torch.no_grad()
def group_statistics(layer: nn.Module, linear: str, inps: torch.Tensor, forward: dict,
                     batch_size: int, fp_layer: nn.Module | None = None,
                     fp_inps: torch.Tensor | None = None,
                     ranks: Ranks = SINGLE) -> tuple[torch.Tensor, torch.Tensor | None]:
    """H (and D when ``fp_layer`` is given) of the input of ``linear`` in ``layer`` over the
    calibration inputs ``inps`` [N, L, d] (and their full-precision twins ``fp_inps``): this
    rank's shard of them, summed over ``ranks``."""
    K = layer.get_submodule(linear).in_features
    H = torch.zeros(K, K, dtype=torch.float64)
    D = None if fp_layer is None else torch.zeros(K, K, dtype=torch.float64)
    for start in range(0, inps.shape[0], batch_size):
        xq = _input_of(layer, linear, inps[start:start + batch_size], forward)
        H += (xq.T @ xq).to("cpu", torch.float64)
        if D is not None:
            x = _input_of(fp_layer, linear, fp_inps[start:start + batch_size], forward)
            D += ((x - xq).T @ xq).to("cpu", torch.float64)
    ranks.sum_(H)
    if D is not None:
        ranks.sum_(D)
    scale = 2.0 / ranks.sum(inps.shape[0])[0]
    return H * scale, None if D is None else D * scale
