"""Second-moment statistics of a linear's input, collected by a forward pre-hook.

H = 2/N_seq * sum over all tokens of x x^T (running mean over calibration sequences, the
normalisation of every GPTQ-family reference; algorithms.md §1). Accumulated in float64.
"""

from __future__ import annotations

import torch


class StopForward(Exception):
    """Raised by a hook once it has what it needs, to skip the rest of the layer's forward."""


class HessianHook:
    """Forward pre-hook that adds x x^T of a linear's (already transformed) input to H."""

    def __init__(self, in_features: int, stop: bool = True):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.nsamples = 0
        self.stop = stop

    def __call__(self, module, inputs):
        x = inputs[0]
        self.nsamples += x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum += (x.T @ x).to(self.sum.device, torch.float64)
        if self.stop:
            raise StopForward

    @property
    def H(self) -> torch.Tensor:
        return self.sum * (2.0 / max(self.nsamples, 1))
