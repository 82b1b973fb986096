import pytest
import torch

from rotq.quant.gptq import GPTQOptions, damped_inverse_factor, gptq_solve
from rotq.quant.quantizer import quantize_weight_rtn
from rotq.quant.scheme import WeightArgs


def _problem(N, K, T=None, seed=0, dtype=torch.float64):
    """Weights and a Hessian from correlated inputs (real activations are far from white)."""
    g = torch.Generator().manual_seed(seed)
    T = T or 4 * K
    mix = torch.randn(K, K, generator=g, dtype=dtype) / K**0.5
    X = torch.randn(T, K, generator=g, dtype=dtype) @ mix + 0.1 * torch.randn(T, K, generator=g, dtype=dtype)
    X[:, :2] *= 10  # a few outlier channels
    W = torch.randn(N, K, generator=g, dtype=dtype)
    return W, 2 * X.T @ X / T


def _objective(W, Q, H):
    dW = W - Q
    return float((dW @ H * dW).sum())


@pytest.mark.parametrize("N,K", [(7, 576), (37, 1536 // 4), (16, 200)])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_its_objective(N, K, act_order):
    W, H = _problem(N, K)
    args = WeightArgs(bits=4, clip_search=False)
    Q = gptq_solve(W, H, args, GPTQOptions(act_order=act_order)).Q
    assert _objective(W, Q, H) < _objective(W, quantize_weight_rtn(W, args).dequantize(), H)


@pytest.mark.parametrize("group_size", [None, 32])
def test_lazy_blocks_equal_unblocked(group_size):
    W, H = _problem(9, 192, seed=1)
    args = WeightArgs(bits=3, group_size=group_size, clip_search=False)
    Q1 = gptq_solve(W, H, args, GPTQOptions(block_size=1, act_order=False)).Q
    Q128 = gptq_solve(W, H, args, GPTQOptions(block_size=128, act_order=False)).Q
    assert torch.allclose(Q1, Q128, atol=1e-9)


def test_output_is_on_grid_and_integer_form_matches():
    W, H = _problem(11, 96, seed=2)
    for args in (WeightArgs(bits=4), WeightArgs(bits=4, symmetric=False, group_size=32)):
        res = gptq_solve(W, H, args, GPTQOptions(act_order=True))
        assert torch.allclose(res.quantized.dequantize(), res.Q, atol=1e-12)
        G = res.quantized.group_size
        for row in res.Q.reshape(-1, G):
            assert len(torch.unique(row)) <= 16


def test_sixteen_bit_quantizer_leaves_weights_unchanged():
    W, H = _problem(5, 64, seed=3)
    Q = gptq_solve(W, H, WeightArgs(bits=16, clip_search=False)).Q
    assert torch.allclose(Q, W, atol=1e-3 * W.abs().max())


def test_dead_inputs_zero_their_columns():
    W, H = _problem(6, 48, seed=4)
    H[5, :] = 0
    H[:, 5] = 0
    Q = gptq_solve(W, H, WeightArgs(bits=4)).Q
    assert torch.all(Q[:, 5] == 0)
    assert torch.isfinite(Q).all()


def test_one_column_closed_form():
    # K = 2, B = 1: after rounding column 0 the OBS update of column 1 is -(w0 - q0) H01 / H11.
    W = torch.tensor([[0.37, -1.21]], dtype=torch.float64)
    H = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
    args = WeightArgs(bits=4, clip_search=False)
    res = gptq_solve(W, H, args, GPTQOptions(percdamp=0.0, act_order=False, block_size=1))
    q0 = res.Q[0, 0]
    w1 = W[0, 1] + (W[0, 0] - q0) * 0.8 / 1.0
    from rotq.quant.quantizer import fit_weight_grid
    assert torch.isclose(res.Q[0, 1], fit_weight_grid(W, args).fake_quantize(w1.reshape(1, 1))[0, 0])


def test_damped_inverse_factor_identity():
    _, H = _problem(1, 50, seed=5)
    U = damped_inverse_factor(H, 0.01)
    Hd = H + 0.01 * torch.diag(H).mean() * torch.eye(50, dtype=H.dtype)
    assert torch.allclose(U.T @ U, torch.linalg.inv(Hd), rtol=1e-8, atol=1e-10)
    assert torch.equal(U, torch.triu(U))


def test_act_order_with_dynamic_groups_is_refused():
    W, H = _problem(4, 64, seed=6)
    with pytest.raises(ValueError, match="static_groups"):
        gptq_solve(W, H, WeightArgs(group_size=32), GPTQOptions(act_order=True, static_groups=False))


def _gptq_solve_original(W, H, args, opts):
    """Frozen copy of gptq_solve's loop before the Correction hooks (commit 062130d)."""
    from rotq.quant.gptq import _integer_form, prepare_hessian
    from rotq.quant.quantizer import check_group_size, fit_weight_grid
    N, K = W.shape
    G = check_group_size(K, args)
    W, H = prepare_hessian(W, H)
    static = opts.static_groups if opts.static_groups is not None else (opts.act_order and G < K)
    grids = [None] * (K // G)
    if G == K or static:
        for g in range(K // G):
            grids[g] = fit_weight_grid(W[:, g * G:(g + 1) * G], args)
    perm = torch.argsort(torch.diag(H), descending=True) if opts.act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U = damped_inverse_factor(H, opts.percdamp)
    original = list(perm.tolist() if perm is not None else range(K))
    Q = torch.zeros_like(W)
    for i1 in range(0, K, opts.block_size):
        i2 = min(i1 + opts.block_size, K)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E = torch.zeros_like(W1)
        for j in range(i2 - i1):
            g = original[i1 + j] // G
            if grids[g] is None:
                grids[g] = fit_weight_grid(torch.cat([W1[:, j:], W[:, i2:]], dim=1)[:, :G], args)
            w = W1[:, j]
            q = grids[g].fake_quantize(w.unsqueeze(1)).squeeze(1)
            Q[:, i1 + j] = q
            e = (w - q) / U1[j, j]
            W1[:, j:] -= e.unsqueeze(1) * U1[j, j:].unsqueeze(0)
            E[:, j] = e
        W[:, i2:] -= E @ U[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q, _integer_form(Q, grids, G)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act_order,group_size,block_size", [
    (False, None, 128), (True, None, 64), (False, 40, 64), (True, 40, 128), (False, 40, 32)])
def test_gptq_is_bit_identical_to_the_original_loop(dtype, act_order, group_size, block_size):
    W, H = _problem(13, 200, seed=7, dtype=dtype)
    H[17, :] = 0  # one dead input
    H[:, 17] = 0
    args = WeightArgs(bits=3, group_size=group_size, symmetric=group_size is None)
    opts = GPTQOptions(act_order=act_order, block_size=block_size)
    Q, qw = _gptq_solve_original(W, H, args, opts)
    res = gptq_solve(W, H, args, opts)
    assert torch.equal(res.Q, Q)
    assert torch.equal(res.quantized.codes, qw.codes)
