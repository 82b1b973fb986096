"""Perplexity against Hugging Face's own loss and a float64 reference."""

import math

import pytest
import torch

from rotq.quant import perplexity as ppl_module
from rotq.quant.models import load_model
from rotq.quant.perplexity import perplexity


@pytest.mark.parametrize("rows", [1024, 7])  # one block per batch, and blocks that split windows
def test_perplexity_equals_float64_cross_entropy_and_hf_loss(tiny_model_dir, monkeypatch, rows):
    monkeypatch.setattr(ppl_module, "_LOGIT_ROWS", rows)
    model, _ = load_model(str(tiny_model_dir("qwen2", nonpow2=True)))
    windows = torch.randint(0, 512, (5, 23), generator=torch.Generator().manual_seed(1))
    got = perplexity(model, windows, batch_size=2, progress=False)
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1].double()
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 windows[:, 1:].reshape(-1)).item()
        hf = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    assert got.tokens == 5 * 22 and got.windows == 5 and got.seqlen == 23
    assert got.nll == pytest.approx(want, rel=1e-5)
    assert got.nll == pytest.approx(sum(hf) / len(hf), rel=1e-5)  # equal windows: mean of means
    assert got.ppl == pytest.approx(math.exp(want), rel=1e-5)
