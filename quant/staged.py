"""A decoder layer run over the calibration inputs in the stages of true-sequential calibration,
each part computed once.

Calibration needs the (transformed) input of each group of linears (arch.linear_groups)
after the groups before it are quantized, then the layer's output. Running the whole layer up
to each group and again for the output computes the attention four times and the q/k/v
projections three times. Every Llama-family decoder layer computes

    mid = h + o_proj(attention(input_layernorm(h))),    out = mid + mlp(post_attention_layernorm(mid)),

so this keeps o_proj's input Ã (captured when o_proj's statistics are collected, after q/k/v
are quantized) and the residual ``mid`` (computed from Ã once o_proj is quantized), and starts
the MLP's groups and the output from ``mid``: the attention runs once per layer. The memory cost
is one extra copy of the calibration hidden states (Ã, then ``mid`` in its place).

The MLP is per token, so its two stages run on ``mlp_rows`` tokens at a time: its intermediates
(four [tokens, intermediate] tensors, 200 MB for 8 × 1024 tokens of SmolLM2) were the largest
transient of the calibration loop.

A mixture-of-experts layer has two stages per expert (gate/up, then down) after the attention's.
The block's input x = post_attention_layernorm(mid) is computed once, and the router's choice
for every token with it; expert e's stages then see only the tokens routed to it (true routing:
its Hessians describe the inputs it serves), one expert at a time, so the peak is one expert's
tokens and intermediates. With ``all_tokens`` the statistics take every token instead (each
expert's H then describes the whole distribution, which helps experts the calibration text
rarely reaches); the forward that produces the next layer's inputs always routes truly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from rotq.quant.arch import LINEAR_GROUPS, is_moe_layer, linear_groups


class StopForward(Exception):
    """Raised by a capture hook once it has its input, to skip the rest of the module."""


class _InputCapture:
    """Forward pre-hook that keeps a linear's input, after the pre-hooks registered before it
    (the online Hadamard and activation quantizer), and stops the module's forward."""

    def __init__(self):
        self.x: torch.Tensor | None = None

    def __call__(self, module, inputs):
        self.x = inputs[0]
        raise StopForward


def input_of(module: nn.Module, linear: str, *args, **kwargs) -> torch.Tensor:
    """The input [tokens, in_features] that ``module(*args, **kwargs)`` gives its submodule
    ``linear``, as the linear sees it (transformed); the rest of the forward is skipped."""
    capture = _InputCapture()
    handle = module.get_submodule(linear).register_forward_pre_hook(capture)
    try:
        module(*args, **kwargs)
    except StopForward:
        pass
    finally:
        handle.remove()
    if capture.x is None:
        raise RuntimeError(f"{linear} was not reached by the forward of {type(module).__name__}")
    return capture.x.reshape(-1, capture.x.shape[-1])


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


class StagedLayer:
    """``layer`` over ``inps`` [N, L, d] in batches of ``batch_size`` sequences. Call
    :meth:`group_inputs` for the groups in ``self.groups`` order, quantizing each group's
    linears before asking for the next, then :meth:`propagate` (which works without the
    stages too: then it runs the whole layer). ``allocate(shape)`` gives the buffer for the kept
    attention output (default: ``inps.new_empty``; e.g. a memory-mapped file instead). The MLP
    runs on ``mlp_rows`` tokens at a time (a multiple of 64 keeps MKL's float32 products bit for
    bit those of the whole batch)."""

    def __init__(self, layer: nn.Module, inps: torch.Tensor, forward: dict, batch_size: int,
                 allocate: Callable[[tuple[int, ...]], torch.Tensor] | None = None, mlp_rows: int = 2048,
                 routing: StagedLayer | None = None, all_tokens: bool = False):
        self.layer, self.inps, self.forward, self.batch_size = layer, inps, forward, batch_size
        self.mlp_rows = mlp_rows
        self.allocate = allocate or (lambda shape: inps.new_empty(shape))
        self.groups = linear_groups(layer)
        self.moe = is_moe_layer(layer)
        # MoE: the layer whose routing decides which tokens each expert sees (the full-precision
        # copy pairs its inputs with the calibrated layer's tokens), and whether statistics take all
        self.routing, self.all_tokens = routing or self, all_tokens
        self._next = 0  # the next group index
        self._attn: torch.Tensor | None = None  # Ã [N, L, d_attn], transformed o_proj input
        self._mid: torch.Tensor | None = None  # h + o_proj(Ã) [N, L, d]
        self._moe_x: torch.Tensor | None = None  # post_attention_layernorm(mid) [tokens, d], MoE only
        self.routed: list[torch.Tensor] | None = None  # token indices per expert, MoE only

    def _batches(self) -> Iterator[slice]:
        for start in range(0, self.inps.shape[0], self.batch_size):
            yield slice(start, start + self.batch_size)

    def group_inputs(self, group: int) -> Iterator[torch.Tensor]:
        """The transformed input [tokens, K] of linear_groups(layer)[group]'s linears, batch by batch
        (a MoE expert's: its tokens, ``mlp_rows`` at a time; none when it has none)."""
        if group != self._next:
            raise RuntimeError(f"linear group {group} asked for before group {self._next}")
        self._next += 1
        if self.moe and group >= 2:
            expert, part = divmod(group - 2, 2)
            return self._expert_down(expert) if part else self._expert_in(expert)
        return getattr(self, f"_stage_{group}")()

    def statistics_tokens(self, group: int) -> int | None:
        """How many tokens a MoE expert group's statistics see (after its inputs were asked for);
        None for the other groups, which see every token."""
        if not (self.moe and group >= 2):
            return None
        return self._moe_x.shape[0] if self.all_tokens else len(self.routing.routed[(group - 2) // 2])

    def _keep_mid(self) -> None:
        """``mid`` from Ã with o_proj quantized, batch by batch."""
        o_proj = self.layer.get_submodule(LINEAR_GROUPS[1][0])
        same_shape = self._attn.shape == self.inps.shape
        self._mid = self._attn if same_shape else self.allocate(tuple(self.inps.shape))
        for b in self._batches():
            self._mid[b].copy_(self.inps[b] + F.linear(self._attn[b], o_proj.weight, o_proj.bias))
        self._attn = None

    def _moe_input(self) -> torch.Tensor:
        """x = post_attention_layernorm(mid) [tokens, d], computed (and routed) on first use."""
        if self._moe_x is None:
            self._keep_mid()
            mid = self._mid.reshape(-1, self._mid.shape[-1])
            self._moe_x = torch.cat([self.layer.post_attention_layernorm(mid[r]) for r in self._row_slices(len(mid))])
            if self.routing is self:
                _, _, top_k = self.layer.mlp.gate(self._moe_x)
                self.routed = [torch.where(top_k == e)[0] for e in range(len(self.layer.mlp.experts))]
        return self._moe_x

    def _row_slices(self, n: int) -> Iterator[slice]:
        for start in range(0, n, self.mlp_rows):
            yield slice(start, start + self.mlp_rows)

    def _expert_rows(self, e: int) -> Iterator[torch.Tensor]:
        x = self._moe_input()
        if self.all_tokens:
            yield from (x[r] for r in self._row_slices(len(x)))
            return
        tokens = self.routing.routed[e]
        yield from (x[tokens[r]] for r in self._row_slices(len(tokens)))

    def _expert_in(self, e: int):  # expert e's gate/up: the block input of its tokens
        expert = self.layer.mlp.experts[e]
        for rows in self._expert_rows(e):
            yield input_of(expert, "gate_proj", rows)

    def _expert_down(self, e: int):  # expert e's down_proj: its inner activation, gate/up quantized
        expert = self.layer.mlp.experts[e]
        for rows in self._expert_rows(e):
            yield input_of(expert, "down_proj", rows)

    def _stage_0(self):  # q/k/v: input_layernorm(h)
        for b in self._batches():
            yield input_of(self.layer, LINEAR_GROUPS[0][0], self.inps[b], **self.forward)

    def _stage_1(self):  # o_proj: the attention, with q/k/v quantized; its output Ã is kept
        for b in self._batches():
            a = input_of(self.layer, LINEAR_GROUPS[1][0], self.inps[b], **self.forward)
            if self._attn is None:
                self._attn = self.allocate((*self.inps.shape[:2], a.shape[-1]))
            self._attn[b].view_as(a).copy_(a)
            yield a

    def _stage_2(self):  # gate/up: post_attention_layernorm(mid), mid from Ã with o_proj quantized
        self._keep_mid()
        for b in self._batches():
            yield input_of(self.layer.mlp, LINEAR_GROUPS[2][0].removeprefix("mlp."),
                           self.layer.post_attention_layernorm(self._mid[b]))

    def _mlp_chunks(self, mid: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
        """``mid`` [n, L, d] as [1, rows, d] pieces of at most ``mlp_rows`` tokens, with their rows."""
        flat = mid.reshape(-1, mid.shape[-1])
        for start in range(0, flat.shape[0], self.mlp_rows):
            rows = slice(start, start + self.mlp_rows)
            yield rows, flat[rows].unsqueeze(0)

    def _stage_3(self):  # down_proj: the MLP's inner activation, with gate/up quantized
        down_proj = LINEAR_GROUPS[3][0].removeprefix("mlp.")
        for b in self._batches():
            mid, x = self._mid[b], None
            for rows, piece in self._mlp_chunks(mid):
                a = input_of(self.layer.mlp, down_proj, self.layer.post_attention_layernorm(piece))
                if x is None:
                    x = a.new_empty(mid.shape[0] * mid.shape[1], a.shape[-1])
                x[rows] = a
            yield x

    @torch.no_grad()
    def propagate(self) -> None:
        """inps <- layer(inps), in place (each batch depends only on itself)."""
        if self._next not in (0, len(self.groups)):
            raise RuntimeError(f"the layer's output asked for after {self._next} of its linear groups")
        for b in self._batches():
            h = self.inps[b]
            if self._mid is None:
                h.copy_(_hidden(self.layer(h, **self.forward)))
            else:
                out = h.view(-1, h.shape[-1])
                for rows, piece in self._mlp_chunks(self._mid[b]):
                    out[rows] = piece[0] + self.layer.mlp(self.layer.post_attention_layernorm(piece))[0]
        self._mid = self._moe_x = None
