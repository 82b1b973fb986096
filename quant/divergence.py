"""How far a quantized model's next-token distribution is from the full-precision model's, token
by token: mean KL(P_fp ‖ P_q) and top-1 agreement on the same windows (`rotq eval --kl-vs`).
Perplexity averages errors that cancel; these do not, so they show a damaged model earlier."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@dataclass
class DivergenceResult:
    kl: float  # mean over predicted tokens of KL(P_ref || P_model), nats
    top1_agreement: float  # fraction of positions where both models' most likely token agree
    tokens: int

    def to_dict(self) -> dict:
        return {"kl_vs_reference": self.kl, "top1_agreement": self.top1_agreement, "kl_tokens": self.tokens}


def token_divergence(logits: torch.Tensor, ref_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position [..., V] -> (KL(softmax(ref) ‖ softmax(logits)), argmax agreement), in float64."""
    logp, ref_logp = F.log_softmax(logits.double(), -1), F.log_softmax(ref_logits.double(), -1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    return kl, logits.argmax(-1) == ref_logits.argmax(-1)


@torch.no_grad()
def divergence(model: nn.Module, reference: nn.Module, windows: torch.Tensor, batch_size: int = 1,
               progress: bool = True) -> DivergenceResult:
    """Over the positions that predict a next token (all but the last of each window), as perplexity."""
    kl_sum, agree, count = 0.0, 0, 0
    for batch in tqdm(windows.split(batch_size), desc="KL vs reference", unit="batch", disable=not progress):
        batch = batch.to(next(model.parameters()).device)
        kl, same = token_divergence(model(input_ids=batch, use_cache=False).logits[:, :-1],
                                    reference(input_ids=batch.to(next(reference.parameters()).device),
                                              use_cache=False).logits[:, :-1].to(batch.device))
        kl_sum, agree, count = kl_sum + float(kl.sum()), agree + int(same.sum()), count + kl.numel()
    return DivergenceResult(kl_sum / count, agree / count, count)
