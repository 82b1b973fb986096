"""GPTQ/QuaRot-style token perplexity: exp(mean NLL) over non-overlapping windows of L tokens
(no BOS), i.e. over windows x (L - 1) predicted tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token
    tokens: int  # predicted tokens
    windows: int
    seqlen: int

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens,
                "windows": self.windows, "seqlen": self.seqlen}


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1,
               progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` on ``windows`` [n, L] of token ids."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    batches = windows.split(batch_size)
    for batch in tqdm(batches, desc="Perplexity", unit="batch", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                       batch[:, 1:].reshape(-1), reduction="sum"))
        count += batch[:, 1:].numel()
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, windows.shape[0], windows.shape[1])
