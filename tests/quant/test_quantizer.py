import pytest
import torch

from rotq.quant.quantizer import (
    Grid, check_group_size, fake_quantize_activation, fake_quantize_kv, fit_weight_grid, quantize_weight_rtn,
)
from rotq.quant.scheme import ActivationArgs, KVCacheArgs, WeightArgs


def _w(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 32, 64])
def test_rtn_round_trip_bound_and_grid(bits, symmetric, group_size):
    W = _w((37, 576))
    args = WeightArgs(bits=bits, symmetric=symmetric, group_size=group_size, clip_search=False)
    qw = quantize_weight_rtn(W, args)
    G = group_size or 576
    assert qw.scale.shape == (37, 576 // G)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert qw.codes.min() >= lo and qw.codes.max() <= hi
    assert torch.equal(qw.codes, qw.codes.round())
    err = (qw.dequantize() - W).abs().reshape(-1, G)
    assert (err <= qw.scale.reshape(-1, 1) / 2 + 1e-12).all()  # no clipping: within half a step


def test_symmetric_scale_convention():
    # max / (2^(b-1) - 0.5): the compressed-tensors convention (docs/algorithms.md, "Quantizer conventions")
    W = torch.tensor([[1.0, -3.75, 2.0, 0.5]], dtype=torch.float64)
    grid = fit_weight_grid(W, WeightArgs(bits=4, clip_search=False))
    assert grid.scale.item() == pytest.approx(3.75 / 7.5)
    assert grid.quantize(W).tolist() == [[2.0, -8.0, 4.0, 1.0]]


def test_asymmetric_range_contains_zero_and_edge_rows():
    W = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [-2.0, -2.0, -2.0, -2.0]], dtype=torch.float64)
    qw = quantize_weight_rtn(W, WeightArgs(bits=4, symmetric=False, clip_search=False))
    Wq = qw.dequantize()
    assert torch.equal(Wq[1], W[1])  # all-zero row stays zero
    assert torch.allclose(Wq[2], W[2])  # constant row is exact (range [-2, 0])
    assert qw.zero_point[0].item() == 0  # range [0, 4] includes zero


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_never_worse_on_its_metric(symmetric):
    W = _w((64, 256), seed=1)
    W[:, :3] *= 8  # outliers make clipping worthwhile
    plain = fit_weight_grid(W, WeightArgs(symmetric=symmetric, clip_search=False))
    searched = fit_weight_grid(W, WeightArgs(symmetric=symmetric, clip_search=True))
    err = lambda g: (g.fake_quantize(W) - W).abs().pow(2.4).sum(dim=1)  # noqa: E731
    assert (err(searched) <= err(plain) + 1e-12).all()
    assert (err(searched) < err(plain)).any()


def _clip_search_by_scan(W, args):
    """The search written as the plain scan over shrink factors that keeps a strictly better one."""
    xmin, xmax = W.min(1, keepdim=True).values.clamp(max=0), W.max(1, keepdim=True).values.clamp(min=0)
    best = fit_weight_grid(W, WeightArgs(bits=args.bits, symmetric=args.symmetric, clip_search=False))
    best_err = (best.fake_quantize(W) - W).abs().pow(2.4).sum(1, keepdim=True)
    for k in range(1, round(args.clip_max_shrink * 100)):
        p = 1 - k / 100
        lo, hi = p * xmin, p * xmax
        if args.symmetric:
            scale = torch.maximum(-lo, hi) / (2 ** (args.bits - 1) - 0.5)
            grid = Grid(torch.where(scale > 0, scale, torch.ones_like(scale)), None, args.bits)
        else:
            scale = (hi - lo) / (2**args.bits - 1)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            grid = Grid(scale, torch.round(-lo / scale), args.bits)
        err = (grid.fake_quantize(W) - W).abs().pow(2.4).sum(1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best.scale = torch.where(better, grid.scale, best.scale)
        if not args.symmetric:
            best.zero_point = torch.where(better, grid.zero_point, best.zero_point)
    return best


@pytest.mark.parametrize("shape", [(7, 5), (576, 1536), (1536, 577), (3, 300_001)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocked_clip_search_equals_the_plain_scan(shape, symmetric, dtype):
    """The search runs in cache-sized blocks of rows; it must pick exactly the grid the plain
    scan picks (rows longer than a block, several blocks, a last partial block, zero rows)."""
    g = torch.Generator().manual_seed(sum(shape))
    W = (torch.randn(*shape, generator=g) * 0.02).to(dtype)
    W[0, :2] = 0.5  # an outlier worth clipping
    W[-1] = 0  # a dead row: every candidate ties
    args = WeightArgs(bits=3 if symmetric else 4, symmetric=symmetric)
    got, want = fit_weight_grid(W, args), _clip_search_by_scan(W, args)
    assert torch.equal(got.scale, want.scale)
    if not symmetric:
        assert torch.equal(got.zero_point, want.zero_point)


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="group size 128 does not divide its 576"):
        check_group_size(576, WeightArgs(group_size=128))


def test_activation_quantizer_per_token():
    x = _w((5, 7, 1536), seed=2).float()
    args = ActivationArgs(bits=4, symmetric=True, clip_ratio=0.9)
    xq = fake_quantize_activation(x, args)
    scale = 0.9 * x.abs().amax(dim=-1, keepdim=True) / 7
    codes = xq / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.min() >= -8 - 1e-4 and codes.max() <= 7 + 1e-4
    inside = x.abs() <= 7 * scale
    assert ((xq - x).abs()[inside] <= scale.expand_as(x)[inside] / 2 + 1e-6).all()
    # each token depends only on itself
    assert torch.equal(fake_quantize_activation(x[:, 3:4], args), xq[:, 3:4])


def test_kv_quantizer_asymmetric_per_head():
    x = _w((2, 3, 11, 64), seed=3).float() + 0.3
    args = KVCacheArgs(bits=4, symmetric=False, clip_ratio=1.0)
    xq = fake_quantize_kv(x, args)
    rows = xq.reshape(-1, 64)
    assert max(len(torch.unique(r)) for r in rows) <= 16
    xmin = x.reshape(-1, 64).min(1, keepdim=True).values.clamp(max=0)
    xmax = x.reshape(-1, 64).max(1, keepdim=True).values.clamp(min=0)
    step = (xmax - xmin) / 15
    assert ((rows - x.reshape(-1, 64)).abs() <= step / 2 + 1e-5).all()
    assert torch.equal(fake_quantize_kv(x[:, 1:2], args), xq[:, 1:2])  # per head


def test_clip_max_shrink_bounds_the_search():
    W = _w((32, 128), seed=4)
    W[:, 0] *= 20  # one huge outlier per row: the wide search clips it hard
    amax = W.abs().max(dim=1, keepdim=True).values
    for shrink in (0.0, 0.2, 0.8):
        grid = fit_weight_grid(W, WeightArgs(clip_max_shrink=shrink))
        p = grid.scale * 7.5 / amax
        assert (p <= 1 + 1e-12).all() and (p >= 1 - shrink - 1e-12).all()
    assert torch.equal(fit_weight_grid(W, WeightArgs(clip_max_shrink=0.0)).scale,
                       fit_weight_grid(W, WeightArgs(clip_search=False)).scale)
