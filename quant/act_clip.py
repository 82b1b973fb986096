"""The activation clip ratio, fitted on calibration data (``--a-clip auto``).

The per-token activation quantizer maps clip · max|x| to the top code (QuaRot's 0.9 was chosen
for Llama-2). On smollm2-135m with Hadamard rotation the best ratio on calibration text is
lower (benchmarks/RESULTS.md), and it differs by model, so rotq measures it instead of fixing
it: with the weights still in full precision and the scheme's online ops installed (rotations,
activation and KV quantizers), it evaluates the mean next-token loss of the first calibration
sequences for each ratio on a grid and keeps the best. One ratio for the whole model: fitting a
ratio per linear input to its local output error was measured too; it clips harder than the
end-to-end loss wants and was no better.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from rotq.quant.distributed import SINGLE, Ranks
from rotq.quant.errors import RotqError
from rotq.quant.online import install_online_ops
from rotq.quant.perplexity import perplexity
from rotq.quant.scheme import Scheme


@dataclass(frozen=True)
class ClipSearchOptions:
    grid: tuple[float, ...] = (0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)
    sequences: int = 16  # the first calibration sequences the loss is measured on
    batch_size: int = 4


@dataclass
class ClipSearchResult:
    clip_ratio: float
    nll: dict[float, float]  # mean next-token NLL on the calibration sequences, per ratio
    sequences: int
    seconds: float

    def to_dict(self) -> dict:
        return {"clip_ratio": self.clip_ratio, "sequences": self.sequences,
                "seconds": round(self.seconds, 1), "nll": {str(c): v for c, v in self.nll.items()}}


@torch.no_grad()
def search_activation_clip(model: nn.Module, scheme: Scheme, calib_ids: torch.Tensor,
                           options: ClipSearchOptions = ClipSearchOptions(),
                           ranks: Ranks = SINGLE) -> ClipSearchResult:
    """Pick the activation clip ratio of ``scheme`` from ``options.grid`` by the loss of
    ``model`` (rotations already folded, weights not yet quantized) on ``calib_ids``. Leaves the
    online ops of the chosen ratio installed; the weights are not touched. Under torchrun each
    rank scores its share of the sequences and the losses are summed."""
    if scheme.activations is None:
        raise RotqError("--a-clip auto fits the activation clip ratio, but this scheme keeps 16-bit "
                        "activations; drop --a-clip")
    if calib_ids is None or calib_ids.shape[0] == 0:
        raise RotqError("--a-clip auto needs calibration text (--calib)")
    bad = [c for c in options.grid if not 0 < c <= 1]
    if not options.grid or bad:
        raise RotqError(f"activation clip ratios must lie in (0, 1], got {list(options.grid)}")
    start = time.perf_counter()
    windows = calib_ids[: options.sequences]
    mine = windows[ranks.shard(windows.shape[0], options.batch_size)]
    nll = {}
    for clip in tqdm(options.grid, desc="Fitting activation clip", unit="ratio", disable=not ranks.is_main):
        install_online_ops(model, with_activation_clip(scheme, clip))
        nll[clip] = _mean_nll(model, mine, options.batch_size, ranks)
        if not math.isfinite(nll[clip]):
            raise RotqError(f"the calibration loss at activation clip {clip} is {nll[clip]}; "
                            "the model or the calibration text is broken")
    best = min(nll, key=nll.__getitem__)
    install_online_ops(model, with_activation_clip(scheme, best))
    return ClipSearchResult(best, nll, windows.shape[0], time.perf_counter() - start)


def _mean_nll(model, windows, batch_size, ranks: Ranks) -> float:
    """The mean next-token loss over every rank's ``windows``."""
    if not ranks.distributed:
        return perplexity(model, windows, batch_size, progress=False).nll
    total, count = 0.0, 0
    if windows.shape[0]:
        local = perplexity(model, windows, batch_size, progress=False)
        total, count = local.nll * local.tokens, local.tokens
    total, count = ranks.sum(total, count)
    return total / count


def with_activation_clip(scheme: Scheme, clip: float) -> Scheme:
    """``scheme`` with its activation clip ratio set to ``clip``."""
    return scheme.replace(activations=dataclasses.replace(scheme.activations, clip_ratio=clip))
