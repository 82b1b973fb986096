"""Reference integer quantizers: weights (per channel or group, MSE clip search), activations
(dynamic per token) and KV cache (dynamic per token and head).

Conventions (docs/algorithms.md#quantizer-conventions): a b-bit symmetric weight scale is
max|w| / (2^(b-1) - 0.5) on the grid [-2^(b-1), 2^(b-1) - 1] (compressed-tensors); symmetric
activations use clip * max|x| / (2^(b-1) - 1) (QuaRot); asymmetric quantizers stretch the range
[min(x, 0), max(x, 0)] (times the clip ratio) over 2^b levels with an integer zero point.
Every function here is pure torch and runs in the input's dtype; kernels and serving reuse them
as their reference. The activation and KV quantizers take ``ste=True`` for rotation learning
(SpinQuant): the forward value is unchanged (bit for bit), but the rounding passes gradients
straight through, so they reach the scale and the input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rotq.quant.scheme import ActivationArgs, KVCacheArgs, WeightArgs

CLIP_GRID = 100  # shrink factors 1 - k/100 for k < CLIP_GRID * WeightArgs.clip_max_shrink
CLIP_NORM = 2.4  # the error norm of the clip search (GPTQ / QuaRot `mse=True`)
_CLIP_BLOCK = 1 << 18  # elements per block of rows in the clip search: 1 MiB of float32, in L2


@dataclass
class Grid:
    """Scale and zero point of one quantization grid per row; ``zero_point`` is None when
    symmetric. Shapes [R, 1]."""

    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: int
    ste: bool = False  # straight-through rounding: identity gradient, same forward value

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of x (as floats): signed when symmetric, unsigned otherwise."""
        rnd = round_ste if self.ste else torch.round
        if self.zero_point is None:
            half = 2 ** (self.bits - 1)
            return torch.clamp(rnd(x / self.scale), -half, half - 1)
        return torch.clamp(rnd(x / self.scale) + self.zero_point, 0, 2**self.bits - 1)

    def dequantize(self, q: torch.Tensor) -> torch.Tensor:
        if self.zero_point is None:
            return q * self.scale
        return (q - self.zero_point) * self.scale

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.quantize(x))

    def clamp(self, x: torch.Tensor) -> torch.Tensor:
        """x clamped to the grid's representable range, without rounding."""
        if self.zero_point is None:
            half = 2 ** (self.bits - 1)
            return torch.clamp(x, -half * self.scale, (half - 1) * self.scale)
        top = 2**self.bits - 1
        return torch.clamp(x, -self.zero_point * self.scale, (top - self.zero_point) * self.scale)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, identity in the backward pass. The forward value equals
    torch.round(x) exactly: round(x) - x is exact in floating point (Sterbenz), so adding x back
    gives round(x) again."""
    return x + (torch.round(x) - x).detach()


def _range_grid(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool,
                sym_levels: float) -> Grid:
    """Grid covering [xmin, xmax] (xmin <= 0 <= xmax), rows of shape [R, 1]."""
    if symmetric:
        scale = torch.maximum(-xmin, xmax) / sym_levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return Grid(scale, None, bits)
    scale = (xmax - xmin) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return Grid(scale, torch.round(-xmin / scale), bits)


def fit_weight_grid(W: torch.Tensor, args: WeightArgs) -> Grid:
    """One grid per row of W [R, C] (per channel: the whole row; for groups pass a slice or
    reshape rows into groups). With ``clip_search`` the range is shrunk per row by the factor
    that minimises sum |Q(w) - w|^2.4."""
    xmin = torch.clamp(W.min(dim=1, keepdim=True).values, max=0)
    xmax = torch.clamp(W.max(dim=1, keepdim=True).values, min=0)
    levels = 2 ** (args.bits - 1) - 0.5
    best = _range_grid(xmin, xmax, args.bits, args.symmetric, levels)
    if not args.clip_search:
        return best
    shrinks = [1 - k / CLIP_GRID for k in range(1, round(args.clip_max_shrink * CLIP_GRID))]
    candidates = [best] + [_range_grid(p * xmin, p * xmax, args.bits, args.symmetric, levels) for p in shrinks]
    scale = torch.cat([g.scale for g in candidates], dim=1)
    zero = None if best.zero_point is None else torch.cat([g.zero_point for g in candidates], dim=1)
    # argmin keeps the first minimum: on a tie the wider range wins, as a strict "<" scan would.
    with torch.no_grad():  # the pick is discrete; the chosen scale keeps its autograd history
        pick = _clip_errors(W.detach(), scale.detach(), None if zero is None else zero.detach(),
                            args.bits).argmin(dim=1, keepdim=True)
    return Grid(scale.gather(1, pick), None if zero is None else zero.gather(1, pick), args.bits)


def _clip_errors(W: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """sum |Q(w) - w|^2.4 of each row of W [R, C] on each candidate grid (column c of ``scale``
    and ``zero`` [R, n]), as [R, n]. On the CPU computed a block of rows at a time in one reused
    buffer, so the working set stays in cache across the candidates (4-5x faster on large
    weights than whole-matrix passes), with the operations of Grid.fake_quantize, so the values
    are the same."""
    R, C = W.shape
    # blocks on the CPU (cache); the whole matrix at once on a GPU, where small blocks would be
    # bound by kernel launches
    rows = max(1, _CLIP_BLOCK // max(C, 1)) if W.device.type == "cpu" else max(R, 1)
    errors = torch.empty(R, scale.shape[1], dtype=W.dtype, device=W.device)
    buf = torch.empty(min(rows, R), C, dtype=W.dtype, device=W.device)
    half = 2 ** (bits - 1)
    for r0 in range(0, R, rows):
        w = W[r0:r0 + rows]
        b = buf[:w.shape[0]]
        for c in range(scale.shape[1]):
            s = scale[r0:r0 + rows, c:c + 1]
            torch.div(w, s, out=b).round_()
            if zero is None:
                b.clamp_(-half, half - 1)
            else:
                z = zero[r0:r0 + rows, c:c + 1]
                b.add_(z).clamp_(0, 2**bits - 1).sub_(z)
            # |e|^2.4 as exp(2.4 log|e|) (log 0 = -inf gives 0): 4x faster than pow on the CPU
            b.mul_(s).sub_(w).abs_().log_().mul_(CLIP_NORM).exp_()
            torch.sum(b, dim=1, out=errors[r0:r0 + rows, c])
    return errors


@dataclass
class QuantizedWeight:
    """Integer codes [N, K] and grids [N, K/G] (G = K per channel)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    group_size: int

    def dequantize(self) -> torch.Tensor:
        N, K = self.codes.shape
        zp = self.zero_point
        grid = Grid(self.scale.reshape(-1, 1), None if zp is None else zp.reshape(-1, 1), 0)
        q = self.codes.reshape(-1, self.group_size)
        return grid.dequantize(q).reshape(N, K)


def compact_codes(codes: torch.Tensor) -> torch.Tensor:
    """Integer codes (held as floats by the solvers) in the smallest integer type that holds
    them exactly: 1 byte per weight on disk instead of 4."""
    lo, hi = (int(codes.min()), int(codes.max())) if codes.numel() else (0, 0)
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max and torch.equal(codes, codes.round()):
            return codes.to(dtype).contiguous()
    return codes.contiguous()


def check_group_size(K: int, args: WeightArgs, name: str = "weight") -> int:
    """The effective group size for K input features; fails when the group does not divide K."""
    G = args.group_size or K
    if K % G:
        raise ValueError(
            f"{name}: group size {G} does not divide its {K} input features; choose a group size "
            f"that divides every linear's input size (e.g. 64 or 32) or per-channel (no group)"
        )
    return G


def quantize_weight_rtn(W: torch.Tensor, args: WeightArgs) -> QuantizedWeight:
    """Round-to-nearest quantization of W [N, K], per channel or per group along K."""
    N, K = W.shape
    G = check_group_size(K, args)
    rows = W.reshape(N * K // G, G)
    grid = fit_weight_grid(rows, args)
    codes = grid.quantize(rows).reshape(N, K)
    zp = None if grid.zero_point is None else grid.zero_point.reshape(N, K // G)
    return QuantizedWeight(codes, grid.scale.reshape(N, K // G), zp, G)


def fake_quantize_activation(x: torch.Tensor, args: ActivationArgs, ste: bool = False) -> torch.Tensor:
    """Quantize-dequantize each token (row of the last dim) of x; ``ste``: straight-through rounding."""
    return _fake_quantize_rows(x, args.bits, args.symmetric, args.clip_ratio, ste)


def fake_quantize_kv(x: torch.Tensor, args: KVCacheArgs, ste: bool = False) -> torch.Tensor:
    """Quantize-dequantize K or V [..., D] per (token, head): one grid per head vector."""
    return _fake_quantize_rows(x, args.bits, args.symmetric, args.clip_ratio, ste)


def activation_grid(rows: torch.Tensor, args: ActivationArgs) -> Grid:
    """The activation quantizer's grid of each token (row) of rows [R, K]: ``grid.quantize(rows)``
    gives the integer codes, ``grid.scale`` [R, 1] the per-token scales (kernels/int4_gemm.py's
    reference; :func:`fake_quantize_activation` is ``grid.fake_quantize(rows)``)."""
    return _row_grid(rows, args.bits, args.symmetric, args.clip_ratio)


def kv_grid(rows: torch.Tensor, args: KVCacheArgs) -> Grid:
    """The KV quantizer's grid of each row [R, D] (kernels/kv4.py stores it in the paged cache)."""
    return _row_grid(rows, args.bits, args.symmetric, args.clip_ratio)


def _row_grid(rows: torch.Tensor, bits: int, symmetric: bool, clip: float) -> Grid:
    xmin = torch.clamp(rows.min(dim=1, keepdim=True).values, max=0) * clip
    xmax = torch.clamp(rows.max(dim=1, keepdim=True).values, min=0) * clip
    return _range_grid(xmin, xmax, bits, symmetric, 2 ** (bits - 1) - 1)


def _fake_quantize_rows(x: torch.Tensor, bits: int, symmetric: bool, clip: float,
                        ste: bool = False) -> torch.Tensor:
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    grid = _row_grid(rows, bits, symmetric, clip)
    grid.ste = ste
    return grid.fake_quantize(rows).reshape(shape)
