"""Input statistics of a linear, collected layer by layer (docs/algorithms.md#hessian-statistics).

H = 2/N_seq Σ x̃ x̃ᵀ from the inputs x̃ of the partially quantized model and, for methods that
fit the full-precision trajectory (GPTAQ, QEP, ResComp), D = 2/N_seq Σ (x − x̃) x̃ᵀ with x the
same linear's input in the full-precision model, token for token. Sums run over all tokens,
the normalisation over sequences (as every GPTQ-family reference does); each batch's product
in float32, accumulated in float64. Under torchrun each rank sums its own samples and the sums
are all-reduced (distributed.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from rotq.quant.distributed import SINGLE, Ranks

_GRAM_BLOCKS = 4


def gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx [K, K] for x [T, K], exactly symmetric: only the blocks on and above the diagonal are
    multiplied (a quarter to a third less work than the full product for large K), and the upper
    triangle is mirrored, since a BLAS need not sum (i, j) and (j, i) in the same order (MKL on
    AVX2 does not for small K)."""
    K = x.shape[1]
    if K < 256:
        out = x.T @ x
    else:
        out = x.new_empty(K, K)
        step = -(-K // _GRAM_BLOCKS)
        for i in range(0, K, step):
            block = x[:, i:i + step].T @ x[:, i:]
            out[i:i + step, i:] = block
            out[i + step:, i:i + step] = block[:, step:].T
    return out.triu() + out.triu(1).T


@torch.no_grad()
def group_statistics(inputs: Iterable[torch.Tensor], n_sequences: int,
                     fp_inputs: Iterable[torch.Tensor] | None = None,
                     ranks: Ranks = SINGLE, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """H (and D when ``fp_inputs`` is given) from one linear group's transformed inputs x̃,
    batch by batch [tokens, K] (staged.StagedLayer.group_inputs), and the full-precision
    model's inputs x to the same linears for the same tokens; ``n_sequences``: this rank's
    number of calibration sequences. Summed over ``ranks``. ``size``: K, for inputs that may be
    empty on this rank (a MoE expert no token reached): its sums are then zero."""
    fp_iter = iter(fp_inputs) if fp_inputs is not None else None
    H = D = None
    if size is not None:
        H = torch.zeros(size, size, dtype=torch.float64)
        D = None if fp_iter is None else torch.zeros(size, size, dtype=torch.float64)
    for xq in inputs:
        xq = xq.float()
        if H is None:
            K = xq.shape[1]
            H = torch.zeros(K, K, dtype=torch.float64)
            D = None if fp_iter is None else torch.zeros(K, K, dtype=torch.float64)
        H += gram(xq).to("cpu", torch.float64)
        if D is not None:
            x = next(fp_iter).float()
            D += ((x - xq).T @ xq).to("cpu", torch.float64)
    if H is None:
        raise ValueError("no calibration inputs for this rank")
    ranks.sum_(H)
    if D is not None:
        ranks.sum_(D)
    scale = 2.0 / ranks.sum(n_sequences)[0]
    return H * scale, None if D is None else D * scale
