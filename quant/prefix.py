"""A full-precision attention prefix (PrefixQuant, Chen et al. 2024; IntactKV, Liu et al. 2024):
the few "sink" tokens that carry massive activations are taken out of the 4-bit path.

Llama-family models turn the first token of a sequence (and a few delimiter tokens) into
attention sinks whose hidden states reach |x| in the thousands, hundreds of times the other
tokens'. Per-token 4-bit quantization handles them badly, and one such value crossing a 4-bit
boundary moves everything after it. With a prefix of those tokens in the past of every
sequence, the sink role goes to the prefix; its K (after RoPE, and R3 when the scheme rotates
it) and V are computed once by the full-precision model and kept in full precision, so no
prefix token passes a quantized linear or the KV quantizer.

Positions: the prefix sits at positions -P..-1 and the text starts at 0. RoPE scores depend
only on position differences, so this is the same model as prefix at 0..P-1 and text at
P.., while the text keeps the positions it has without a prefix (a server needs no offset).

The prefix is chosen from calibration statistics (:func:`choose_prefix`): a token is an outlier
at a layer where its largest |x| at the input of down_proj or of the attention projections
exceeds ``OUTLIER_RATIO`` (64, PrefixQuant's) times the median over tokens; the prefix length is
the worst layer's mean count per sequence, its first token the candidate that best takes over
the sink role (measured), the others the most frequent outlier token ids.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from rotq.quant.arch import decoder_layers, is_moe_layer
from rotq.quant.errors import RotqError
from rotq.quant.prefix_kv import KEY_BUFFER, VALUE_BUFFER, PrefixKV

logger = logging.getLogger(__name__)

OUTLIER_RATIO = 64.0  # a token is an outlier where max|x| > this x the median token's max|x|
STAT_SEQUENCES, STAT_TOKENS = 8, 512  # the statistics' share of the calibration data
FIRST_CANDIDATES = 4  # frequent outlier ids tried as the first prefix token, beside BOS and EOS
MAX_PREFIX = 16  # longest automatic prefix
# The attention input and the down_proj input; a mixture of experts' down_projs each see only
# their tokens, so there the sparse block's output (their weighted sum) stands in for them.
_SITES = ("self_attn.q_proj", "mlp.down_proj")
_MOE_SITES = ("self_attn.q_proj", "mlp")


@dataclass
class PrefixChoice:
    """Why the prefix is what it is: what the calibration report records."""

    token_ids: tuple[int, ...]
    tokens: list[str]
    outliers_per_sequence: float  # at the worst (layer, site), before the prefix
    worst_layer: int
    worst_site: str
    sequences: int
    outlier_ids: dict[int, int] = field(default_factory=dict)  # the most frequent, with counts
    first_candidates: dict[str, list] = field(default_factory=dict)  # id: [outliers left, largest ratio]

    @property
    def outliers_left(self) -> float | None:
        """Outliers per sequence with the chosen prefix in place, when the choice measured it
        (a one-token prefix is one of the scored candidates); None otherwise."""
        if len(self.token_ids) != 1:
            return None
        return self.first_candidates[str(self.token_ids[0])][0] / self.sequences

    def to_dict(self) -> dict:
        return {"token_ids": list(self.token_ids), "tokens": self.tokens, "threshold": OUTLIER_RATIO,
                "outliers_per_sequence": round(self.outliers_per_sequence, 3), "worst_layer": self.worst_layer,
                "worst_site": self.worst_site, "sequences": self.sequences,
                "outlier_ids": {str(k): v for k, v in self.outlier_ids.items()},
                "first_token_candidates": self.first_candidates}


def parse_prefix(value: str) -> str | tuple[int, ...]:
    """``auto``, ``none`` or comma-separated token ids ("0,198") as a tuple."""
    if value in ("auto", "none"):
        return value
    try:
        ids = tuple(int(t) for t in value.split(","))
    except ValueError:
        ids = ()
    if not ids or any(i < 0 for i in ids):
        raise RotqError(f"--prefix must be auto, none or comma-separated token ids such as 0,198; got {value!r}")
    if len(ids) > 256:
        raise RotqError(f"--prefix has {len(ids)} tokens; a prefix is a few sink tokens (at most 256)")
    return ids


class _Layers:
    """Decoder layers in order, with their linears read from disk first when the model is
    offloaded (``source``: offload.LayerSource) and released after."""

    def __init__(self, model: nn.Module, source=None):
        self.model, self.source = model, source

    def run(self, h: torch.Tensor, positions: torch.Tensor, visit) -> torch.Tensor:
        """h [n, L, d] through every layer at ``positions`` [L]; ``visit(i, layer, h, forward)``
        returns the layer's output."""
        position_ids = positions.unsqueeze(0)
        forward = dict(position_ids=position_ids, attention_mask=None, use_cache=False,
                       position_embeddings=self.model.model.rotary_emb(h, position_ids))
        for i, layer in enumerate(decoder_layers(self.model)):
            if self.source is not None:
                self.source.load(i, layer, self.model.config)
            try:
                h = visit(i, layer, h, forward)
            finally:
                if self.source is not None:
                    self.source.release(layer)
        return h


def _layer_output(layer, h, forward):
    out = layer(h, **forward)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def compute_prefix_kv(model: nn.Module, token_ids: tuple[int, ...], source=None) -> PrefixKV:
    """Run the prefix through the full-precision model (as loaded: no rotation, no quantizer)
    at positions -P..-1 and keep each layer's K (after RoPE) and V."""
    from rotq.quant.online import capture_attention_inputs

    vocab = model.config.vocab_size
    if any(t >= vocab for t in token_ids):
        raise RotqError(f"--prefix token id {max(token_ids)} is outside this model's vocabulary (size {vocab})")
    ids = torch.tensor([token_ids])
    P = len(token_ids)
    keys, values = [], []

    def visit(i, layer, h, forward):
        with capture_attention_inputs(model, layer.self_attn) as captured:
            out = _layer_output(layer, h, forward)
        k, v = captured[0]
        keys.append(k[0].float().clone())
        values.append(v[0].float().clone())
        return out

    _Layers(model, source).run(model.model.embed_tokens(ids).float(), torch.arange(-P, 0), visit)
    return PrefixKV(tuple(token_ids), keys, values)


@torch.no_grad()
def _token_maxima(model, ids: torch.Tensor, prefix: PrefixKV | None, source) -> dict[tuple[int, str], torch.Tensor]:
    """max |x| per token [n, L] at each (layer, site) of the full-precision model on ``ids``,
    with ``prefix`` (its K/V as computed by :func:`compute_prefix_kv`) in the past when given."""
    from rotq.quant.online import ATTN_IMPLEMENTATION

    maxima = {}
    n, L = ids.shape

    def visit(i, layer, h, forward):
        hooks = []
        for site in _MOE_SITES if is_moe_layer(layer) else _SITES:
            def record(x, site=site):
                maxima[(i, site)] = x.detach().abs().amax(-1).reshape(n, L).float()
            module = layer.get_submodule(site)
            if site == "mlp":
                hooks.append(module.register_forward_hook(lambda m, inputs, out, record=record: record(out)))
            else:
                hooks.append(module.register_forward_pre_hook(lambda m, inputs, record=record: record(inputs[0])))
        try:
            if prefix is not None:
                attach_prefix_to_layer(layer, prefix.keys[i], prefix.values[i])
            return _layer_output(layer, h, forward)
        finally:
            for hk in hooks:
                hk.remove()
            if prefix is not None:
                detach_prefix_from_layer(layer)

    previous = model.config._attn_implementation
    if prefix is not None:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    try:
        _Layers(model, source).run(model.model.embed_tokens(ids).float(), torch.arange(L), visit)
    finally:
        model.set_attn_implementation(previous)
    return maxima


def _outliers(maxima: dict) -> dict[tuple[int, str], torch.Tensor]:
    """Boolean [n, L] outlier masks per (layer, site)."""
    return {key: m > OUTLIER_RATIO * m.flatten().median() for key, m in maxima.items()}


def choose_prefix(model: nn.Module, calib_ids: torch.Tensor, tokenizer, source=None,
                  sequences: int = STAT_SEQUENCES, tokens: int = STAT_TOKENS) -> PrefixChoice:
    """The prefix from outlier statistics of the full-precision model on the first ``sequences``
    calibration sequences (their first ``tokens`` tokens; see the module docstring).

    The length is the worst (layer, site)'s mean outlier count per sequence. The first prefix
    token takes over the sink role of a sequence's first token; which id does that best is
    model-specific (SmolLM2's BOS does not, its "<|endoftext|>" and " " do), so the candidates
    (BOS, EOS and the most frequent outlier ids) are each tried as a one-token prefix and the
    one leaving the fewest outliers in the text (then the smallest largest ratio) is taken; where
    outliers remain, the other tokens are the most frequent outlier ids after the first position."""
    ids = calib_ids[:sequences, :tokens]
    n = ids.shape[0]
    masks = _outliers(_token_maxima(model, ids, None, source))
    (worst_layer, worst_site), worst = max(masks.items(), key=lambda kv: (int(kv[1].sum()), -kv[0][0]))
    per_sequence = float(worst.sum()) / n
    length = min(MAX_PREFIX, round(per_sequence))
    counts: Counter[int] = Counter()
    for mask in masks.values():  # ids of outliers after the first position, at any layer and site
        counts.update(ids[:, 1:][mask[:, 1:]].tolist())
    common = dict(counts.most_common(8))
    if length == 0:
        logger.info("no outlier tokens in the calibration statistics: no prefix")
        return PrefixChoice((), [], per_sequence, worst_layer, worst_site, n, common)
    candidates = [t for t in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None),
                              *list(common)[:FIRST_CANDIDATES]) if t is not None]
    scores = {}
    for t in dict.fromkeys(candidates):
        scores[t] = _remaining_outliers(model, ids, compute_prefix_kv(model, (t,), source), source)
        logger.info("prefix candidate %r: %d outliers left, largest ratio %.1f", tokenizer.decode([t]), *scores[t])
    first = min(scores, key=lambda t: scores[t])
    if scores[first][0] == 0:  # the first token alone leaves no outlier: nothing for more tokens to do
        length = 1
    token_ids = (first, *[t for t in counts if t != first][:length - 1])
    return PrefixChoice(token_ids, [tokenizer.decode([t]) for t in token_ids], per_sequence, worst_layer, worst_site,
                        n, common, first_candidates={str(t): list(v) for t, v in scores.items()})


def _remaining_outliers(model, ids, prefix: PrefixKV, source) -> tuple[int, float]:
    """(outliers at the worst (layer, site), largest max|x| / median ratio) of the text with ``prefix``."""
    maxima = _token_maxima(model, ids, prefix, source)
    count = max(int(m.sum()) for m in _outliers(maxima).values())
    return count, round(max(float(m.max() / m.flatten().median()) for m in maxima.values()), 1)


def outliers_with_prefix(model: nn.Module, calib_ids: torch.Tensor, prefix: PrefixKV, source=None,
                         sequences: int = STAT_SEQUENCES, tokens: int = STAT_TOKENS) -> float:
    """Outlier tokens per sequence at the worst (layer, site) with ``prefix`` in the past: how many
    sinks the prefix leaves in the text (ideally none)."""
    ids = calib_ids[:sequences, :tokens]
    return _remaining_outliers(model, ids, prefix, source)[0] / ids.shape[0]


# ----------------------------------------------------------------------------- in the model

def attach_prefix_to_layer(layer: nn.Module, key: torch.Tensor, value: torch.Tensor) -> None:
    """Give a decoder layer's attention the prefix K and V [H_kv, P, D] (the "rotq" attention
    function reads them). Non-persistent buffers: they move with the layer and stay out of its
    state dict (the checkpoint stores them in their own file)."""
    attn = layer.self_attn
    ref = next(attn.parameters(), None)
    for name, t in ((KEY_BUFFER, key), (VALUE_BUFFER, value)):
        device = t.device if ref is None or ref.device.type == "meta" else ref.device
        attn.register_buffer(name, t.detach().to(device).unsqueeze(0), persistent=False)


def detach_prefix_from_layer(layer: nn.Module) -> None:
    for name in (KEY_BUFFER, VALUE_BUFFER):
        layer.self_attn._buffers.pop(name, None)


def attach_prefix(model: nn.Module, prefix: PrefixKV | None) -> None:
    """Every decoder layer attends over ``prefix`` (already in the model's basis, see
    :meth:`PrefixKV.rotated`); None removes it."""
    layers = decoder_layers(model)
    if prefix is not None and len(prefix.keys) != len(layers):
        raise RotqError(f"the prefix has K/V for {len(prefix.keys)} layers, the model has {len(layers)}")
    for i, layer in enumerate(layers):
        if prefix is None:
            detach_prefix_from_layer(layer)
        else:
            attach_prefix_to_layer(layer, prefix.keys[i], prefix.values[i])


