"""What the PyTorch reference of a rotq checkpoint computes, for comparing vLLM against it."""

import torch


def reference_greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """n greedy tokens after each prompt (transformers' generate, KV cache on)."""
    out = []
    for p in prompts:
        ids = model.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        out.append(ids[0, len(p):].tolist())
    return out


def reference_logprobs(model, windows: torch.Tensor) -> torch.Tensor:
    """log p(token_t | tokens_<t) for t = 1..L-1 of each window [n, L], in float64."""
    with torch.no_grad():
        lp = torch.log_softmax(model(windows).logits.double(), -1)
    return lp[:, :-1].gather(-1, windows[:, 1:, None])[..., 0]
