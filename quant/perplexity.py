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

    @classmethod
    def from_nll(cls, nll: float, tokens: int, windows: int, seqlen: int) -> PerplexityResult:
        """The result of a mean NLL (ppl = exp(nll)); ``from_nll(*vllm_perplexity(...))`` for
        ``rotq.serving.engine.vllm_perplexity``'s measurement."""
        return cls(math.exp(nll), nll, tokens, windows, seqlen)

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "tokens": self.tokens,
                "windows": self.windows, "seqlen": self.seqlen}


_LOGIT_ROWS = 1024  # tokens whose logits exist at once: 1024 x 49k vocabulary = 200 MB in float32


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1,
               progress: bool = True) -> PerplexityResult:
    """Perplexity of ``model`` (a Hugging Face causal LM: ``model.model`` then ``lm_head``) on
    ``windows`` [n, L] of token ids. The logits are made and scored a block of tokens at a
    time: a batch's whole logits would hold batch x L x vocabulary floats (0.8 GB for 4 x 1024
    tokens of SmolLM2) several times over."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    batches = windows.split(batch_size)
    for batch in tqdm(batches, desc="Perplexity", unit="batch", disable=not progress):
        batch = batch.to(device)
        hidden = model.model(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        targets = batch[:, 1:].reshape(-1)
        for start in range(0, targets.numel(), _LOGIT_ROWS):
            logits = model.lm_head(hidden[start:start + _LOGIT_ROWS]).float()
            total += float(F.cross_entropy(logits, targets[start:start + _LOGIT_ROWS], reduction="sum"))
        count += targets.numel()
    nll = total / count
    return PerplexityResult.from_nll(nll, count, windows.shape[0], windows.shape[1])
