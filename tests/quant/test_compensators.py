"""GPTAQ, FOEM, QEP, ResComp and their composition (docs/algorithms.md: "Notation", GPTAQ to ResComp, "Tests").

Inputs are tokens in rows: X (full-precision trajectory) and X̃ (quantized model) are [T, K],
H = 2/T X̃ᵀX̃ and D = 2/T (X − X̃)ᵀX̃, i.e. D[i, j] = 2/T Σ_t (x − x̃)_ti x̃_tj, the row form of
§1's D = (X − X̃) X̃ᵀ. Everything runs in float64.
"""

import pytest
import torch

from rotq.quant.errors import RotqError
from rotq.quant.foem import FOEMCorrection, FOEMOptions, foem_solve
from rotq.quant.gptaq import GPTAQOptions, asymmetric_term, gptaq_solve
from rotq.quant.gptq import Correction, GPTQOptions, SolveContext, damped_inverse_factor, gptq_solve
from rotq.quant.methods import (NEEDS_FP_TRAJECTORY, MethodOptions, SolverPlan,
                                parse_method, solve)
from rotq.quant.qep import QEPOptions, qep_correct
from rotq.quant.quantizer import fit_weight_grid, quantize_weight_rtn
from rotq.quant.rescomp import ResCompOptions, compensation_term, rescomp_solve
from rotq.quant.scheme import WeightArgs

PERCDAMP = 0.01
ASYMMETRIC = ["gptaq", "rescomp", "qep", "qep+gptaq", "gptaq+foem", "gptaq+foem:6a", "qep+rescomp"]
ALL = ["rtn", "gptq", "foem", "foem:6a"] + ASYMMETRIC


def _problem(N, K, T=None, seed=0, shift=0.1, noise=0.05):
    """W [N, K], X and X̃ [T, K] (correlated inputs with outlier channels; X̃ = X with a
    systematic distortion plus noise), H and D."""
    g = torch.Generator().manual_seed(seed)
    T = T or 4 * K

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    X = randn(T, K) @ (randn(K, K) / K**0.5) + 0.1 * randn(T, K)
    X[:, :2] *= 10
    Xt = X + shift * X @ (randn(K, K) / K**0.5) + noise * X.abs().mean(0) * randn(T, K)
    W = randn(N, K)
    return W, X, Xt, 2 * Xt.T @ Xt / T, 2 * (X - Xt).T @ Xt / T


def _damped(H):
    return H + PERCDAMP * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)


def _options(method, **gptq):
    name, _, variant = method.partition(":")
    return name, MethodOptions(gptq=GPTQOptions(**gptq), foem=FOEMOptions(variant=variant or "6b"))


def _asym_objective(W, Q, X, Xt):
    return float((X @ W.T - Xt @ Q.T).square().sum())


def _sym_objective(W, Q, H):
    dW = W - Q
    return float((dW @ H * dW).sum())


# --- identities (§1) ----------------------------------------------------------------------

def test_identity_a_trailing_inverses():
    _, _, _, H, _ = _problem(1, 96, seed=1)
    U, Hd = damped_inverse_factor(H, PERCDAMP), _damped(H)
    for i in (0, 1, 37, 95):
        expect = torch.linalg.inv(Hd[i:, i:])
        torch.testing.assert_close(U[i:, i:].T @ U[i:, i:], expect, rtol=1e-9, atol=1e-12)
    # a middle block A = [32, 64) gives the A-block of the trailing inverse, not inv(Hd[A, A])
    A = U[32:64, 32:64].T @ U[32:64, 32:64]
    torch.testing.assert_close(A, torch.linalg.inv(Hd[32:, 32:])[:32, :32], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(A, torch.linalg.inv(Hd[32:64, 32:64]), rtol=1e-3)


def test_identity_b_asymmetric_term():
    _, _, _, H, D = _problem(1, 96, seed=2)
    U, Hd = damped_inverse_factor(H, PERCDAMP), _damped(H)
    P = asymmetric_term(D, U, 0.25)
    assert torch.equal(P, torch.triu(P, diagonal=1))
    R = compensation_term(D, H, U, 0.3)  # ResComp's term: the same with X X~^T = D + H (undamped)
    assert torch.equal(R, torch.triu(R, diagonal=1))
    for i in (0, 5, 50, 94):
        inv = torch.linalg.inv(Hd[i + 1:, i + 1:])
        torch.testing.assert_close(P[i, i + 1:], 0.25 * D[i, i + 1:] @ inv, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(R[i, i + 1:], 0.3 * (D + H)[i, i + 1:] @ inv, rtol=1e-9, atol=1e-12)


def test_identity_c_and_rescomp_term_without_d():
    _, _, _, H, _ = _problem(1, 96, seed=3)
    U, Hd = damped_inverse_factor(H, PERCDAMP), _damped(H)
    expect = torch.eye(96, dtype=H.dtype) - U / torch.diag(U).unsqueeze(1)
    torch.testing.assert_close(torch.triu(Hd @ U.T, diagonal=1) @ U, expect, rtol=0, atol=1e-10)
    # ResComp uses the undamped H; triu1(lambda U^T) = 0, so the identity still holds exactly
    torch.testing.assert_close(compensation_term(None, H, U, 0.3), 0.3 * expect, rtol=0, atol=1e-10)


def test_fact_d_gptq_keeps_the_damped_gradient_zero():
    # GPTQ's latent weights after fixing columns < c minimise the damped objective over the
    # rest, so column c is quant(that minimiser); the undamped gradient is -2 lambda (W_F - W0_F).
    W, _, _, H, _ = _problem(7, 96, seed=4)
    args = WeightArgs(bits=4, clip_search=False)
    Q = gptq_solve(W, H, args, GPTQOptions(act_order=False, block_size=32)).Q
    grid, Hd = fit_weight_grid(W, args), _damped(H)
    lam = PERCDAMP * torch.diag(H).mean()
    for c in range(96):
        F = slice(c, 96)
        latent = W[:, F] - (Q[:, :c] - W[:, :c]) @ Hd[:c, F] @ torch.linalg.inv(Hd[F, F])
        assert torch.equal(grid.fake_quantize(latent[:, :1]), Q[:, c:c + 1])
        dW = torch.cat([Q[:, :c], latent], dim=1) - W
        torch.testing.assert_close(2 * dW @ Hd[:, F], torch.zeros_like(latent), rtol=0, atol=1e-9)
        torch.testing.assert_close(2 * dW @ H[:, F], -2 * lam * (latent - W[:, F]), rtol=0, atol=1e-9)


def _context(W, H):
    return SolveContext(W.clone(), H, damped_inverse_factor(H, PERCDAMP), None,
                        torch.zeros(H.shape[0], dtype=torch.bool))


def test_foem_6a_terms_use_the_trailing_inverses():
    # in-block: -beta (W1[:, j:] - W0) times the block's part of (Hd[F, F])^-1, F = {c..K-1};
    # block end: -beta (W[:, i2:] - W0) (Hd[i2:, i2:])^-1, the exact trailing inverse (Identity A)
    W0, _, _, H, _ = _problem(5, 96, seed=13)
    corr = FOEMCorrection("6a", 0.01)
    corr.prepare(_context(W0, H))
    g = torch.Generator().manual_seed(0)
    W = W0 + 0.1 * torch.randn(W0.shape, generator=g, dtype=W0.dtype)
    Hd, i1, j, i2 = _damped(H), 32, 5, 64
    c = i1 + j
    inblock = torch.linalg.inv(Hd[c:, c:])[:i2 - c, :i2 - c]
    expect = -0.01 * (W[:, c:i2] - W0[:, c:i2]) @ inblock
    torch.testing.assert_close(corr.step(W[:, i1:i2], W[:, c], i1, j), expect, rtol=1e-9, atol=1e-12)
    expect = -0.01 * (W[:, i2:] - W0[:, i2:]) @ torch.linalg.inv(Hd[i2:, i2:])
    torch.testing.assert_close(corr.block(W, W[:, i1:i2], i1, i2), expect, rtol=1e-9, atol=1e-12)


def test_foem_6b_error_and_pull():
    W0, _, _, H, _ = _problem(5, 96, seed=14)
    corr = FOEMCorrection("6b", 0.2)
    corr.prepare(_context(W0, H))
    w, q = W0[:, 7] + 0.3, W0[:, 7].round()
    torch.testing.assert_close(corr.residual(w, q, 7), (w - q) - 0.2 * 0.3 * torch.ones_like(w))
    W1 = W0[:, 0:32] + 1.0
    corr.after_step(W1, 0, 7)  # pulls column 8 a fraction beta toward W0, nothing else
    torch.testing.assert_close(W1[:, 8], W0[:, 8] + 0.8)
    torch.testing.assert_close(W1[:, 9:], W0[:, 9:32] + 1.0, rtol=0, atol=0)
    before = W1.clone()
    corr.after_step(W1, 0, 31)  # last column of the block: no pull across the block boundary
    assert torch.equal(W1, before)


@pytest.mark.parametrize("symmetric", [True, False])
def test_grid_clamp_keeps_the_rounding(symmetric):
    # 'allw' clamps latent weights to the grid's range: rounding is unchanged, values stay in range
    g = torch.Generator().manual_seed(1)
    W = torch.randn(6, 40, generator=g, dtype=torch.float64)
    grid = fit_weight_grid(W, WeightArgs(bits=3, symmetric=symmetric))
    X = 3 * torch.randn(6, 40, generator=g, dtype=torch.float64)
    assert torch.equal(grid.fake_quantize(grid.clamp(X)), grid.fake_quantize(X))
    lo, hi = grid.fake_quantize(torch.full_like(X, -1e9)), grid.fake_quantize(torch.full_like(X, 1e9))
    assert torch.all((grid.clamp(X) >= lo) & (grid.clamp(X) <= hi))
    inside = (X > lo) & (X < hi)
    assert inside.any() and torch.equal(grid.clamp(X)[inside], X[inside])


# --- reductions to GPTQ (§11) -------------------------------------------------------------

def _zero_strength_solvers(D):
    Z = torch.zeros_like(D)
    qep0 = QEPOptions(alpha=0.0)
    return {
        "base correction": lambda W, H, a, o: gptq_solve(W, H, a, o, Correction()),
        "gptaq alpha=0": lambda W, H, a, o: gptaq_solve(W, H, D, a, GPTAQOptions(alpha=0.0), o),
        "gptaq allw alpha=0": lambda W, H, a, o: gptaq_solve(W, H, D, a, GPTAQOptions(0.0, "allw"), o),
        "gptaq X=X~": lambda W, H, a, o: gptaq_solve(W, H, Z, a, GPTAQOptions(), o),
        "foem 6b beta=0": lambda W, H, a, o: foem_solve(W, H, a, FOEMOptions(beta=0.0), o),
        "foem 6a beta=0": lambda W, H, a, o: foem_solve(W, H, a, FOEMOptions("6a", beta=0.0), o),
        "qep alpha=0": lambda W, H, a, o: solve("qep+gptq", W, H, a, MethodOptions(o, qep=qep0), D),
        "rescomp 0": lambda W, H, a, o: rescomp_solve(W, H, D, a, ResCompOptions(0, 0), o),
        "rescomp org 0": lambda W, H, a, o: rescomp_solve(W, H, D, a, ResCompOptions(0, 0, "org"), o),
    }


@pytest.mark.parametrize("N,K,group_size,act_order", [(7, 576, None, False), (37, 200, 40, True)])
def test_zero_strength_equals_gptq_bit_for_bit(N, K, group_size, act_order):
    W, _, _, H, D = _problem(N, K, T=2 * K, seed=5)
    args = WeightArgs(bits=3, group_size=group_size)
    opts = GPTQOptions(act_order=act_order, block_size=64)
    Q = gptq_solve(W, H, args, opts).Q
    for name, solver in _zero_strength_solvers(D).items():
        assert torch.equal(solver(W, H, args, opts).Q, Q), name


def test_foem_with_beta_zero_is_gptaq():
    W, _, _, H, D = _problem(37, 200, seed=6)
    args, opts = WeightArgs(bits=4), GPTQOptions(act_order=True)
    Q = gptaq_solve(W, H, D, args, GPTAQOptions(alpha=0.3), opts).Q
    for variant in ("6a", "6b"):
        assert torch.equal(foem_solve(W, H, args, FOEMOptions(variant, 0.0, 0.3), opts, D=D).Q, Q)


@pytest.mark.parametrize("method", ALL)
def test_sixteen_bits_leave_weights_nearly_unchanged(method):
    W, _, _, H, D = _problem(5, 96, seed=7)
    name, options = _options(method)
    Q = solve(name, W, H, WeightArgs(bits=16, clip_search=False), options, torch.zeros_like(D)).Q
    torch.testing.assert_close(Q, W, rtol=0, atol=1e-3 * float(W.abs().max()))


# --- objectives ---------------------------------------------------------------------------

@pytest.mark.parametrize("N,K,seed", [(7, 576, 0), (37, 200, 1), (37, 200, 2)])
def test_asymmetric_methods_beat_rtn_and_gptq_on_their_objective(N, K, seed):
    W, X, Xt, H, D = _problem(N, K, seed=seed)
    args = WeightArgs(bits=4)
    rtn = _asym_objective(W, quantize_weight_rtn(W, args).dequantize(), X, Xt)
    gptq = _asym_objective(W, gptq_solve(W, H, args, GPTQOptions()).Q, X, Xt)
    for method in ASYMMETRIC:
        name, options = _options(method)
        loss = _asym_objective(W, solve(name, W, H, args, options, D).Q, X, Xt)
        assert loss < min(rtn, gptq), (method, loss, gptq, rtn)


@pytest.mark.parametrize("variant", ["6a", "6b"])
def test_foem_beats_rtn_on_its_objective(variant):
    W, _, _, H, _ = _problem(37, 200, seed=8)
    args = WeightArgs(bits=4)
    Q = foem_solve(W, H, args, FOEMOptions(variant)).Q
    assert _sym_objective(W, Q, H) < _sym_objective(W, quantize_weight_rtn(W, args).dequantize(), H)


def test_qep_closed_form_is_the_least_squares_optimum():
    W, X, Xt, H, D = _problem(7, 96, seed=9)
    # lambda = 0: min ||X W^T - X~ W*^T||, i.e. W* = W X X~^T (X~ X~^T)^-1 in column form
    lstsq = torch.linalg.lstsq(Xt, X @ W.T).solution.T
    torch.testing.assert_close(qep_correct(W, H, D, QEPOptions(1.0, 0.0)), lstsq, rtol=1e-8, atol=1e-9)
    options = MethodOptions(qep=QEPOptions(alpha=1.0, percdampqep=0.0))
    Q = solve("qep+gptq", W, H, WeightArgs(bits=16, clip_search=False), options, D).Q
    torch.testing.assert_close(Q, lstsq, rtol=0, atol=1e-3 * float(lstsq.abs().max()))
    # lambda > 0: the ridge toward W, W* = (W X X~^T + lambda W)(X~ X~^T + lambda I)^-1
    lam = torch.diag(H).mean() * torch.eye(96, dtype=H.dtype)
    ridge = torch.linalg.solve(H + lam, (W @ (2 * X.T @ Xt / X.shape[0]) + W @ lam).T).T
    torch.testing.assert_close(qep_correct(W, H, D, QEPOptions(1.0, 1.0)), ridge, rtol=1e-9, atol=1e-10)


# --- modes, ordering, dead inputs ----------------------------------------------------------

def _unclamped_problem():
    """Small weights next to one large negative column, so that no latent weight leaves its
    (symmetric, per-row) grid range and 'allw' never clamps."""
    W, _, _, H, D = _problem(7, 200, seed=3)
    W = 0.1 * W
    W[:, 0] = -10
    return W, H, D


def test_allw_is_block_size_invariant_and_org_is_not():
    W, H, D = _unclamped_problem()
    args = WeightArgs(bits=4, clip_search=False)

    def run(solver, B):
        return solver(GPTQOptions(act_order=False, block_size=B)).Q

    for solver in (lambda o: gptaq_solve(W, H, D, args, GPTAQOptions(mode="allw"), o),
                   lambda o: rescomp_solve(W, H, D, args, ResCompOptions(mode="allw"), o)):
        torch.testing.assert_close(run(solver, 1), run(solver, 64), rtol=0, atol=1e-9)
    org = lambda o: gptaq_solve(W, H, D, args, GPTAQOptions(mode="org"), o)  # noqa: E731
    assert not torch.allclose(run(org, 1), run(org, 64))  # quirk 1: its block term sees Q


def test_rescomp_without_d_is_foem_6b_without_the_pull():
    # §8: with D = 0 and alpha = 0, ResComp's step is FOEM 6b's with beta = alpha2; with B = 1
    # FOEM's next-column pull never runs.
    W, H, _ = _unclamped_problem()
    args, opts = WeightArgs(bits=4, clip_search=False), GPTQOptions(act_order=False, block_size=1)
    Q = rescomp_solve(W, H, None, args, ResCompOptions(alpha=0.0, alpha2=0.2), opts).Q
    expect = foem_solve(W, H, args, FOEMOptions(beta=0.2), opts).Q
    torch.testing.assert_close(Q, expect, rtol=0, atol=1e-9)


@pytest.mark.parametrize("method", ["gptaq", "rescomp", "gptaq+foem", "gptaq+foem:6a"])
def test_act_order_permutes_d_like_h(method):
    W, _, _, H, D = _problem(11, 96, seed=10)
    args = WeightArgs(bits=4, clip_search=False)
    perm = torch.argsort(torch.diag(H), descending=True)
    name, options = _options(method, act_order=True)
    Q = solve(name, W, H, args, options, D).Q
    name, options = _options(method, act_order=False)
    Qp = solve(name, W[:, perm], H[perm][:, perm], args, options, D[perm][:, perm]).Q
    assert torch.equal(Q[:, perm], Qp)


@pytest.mark.parametrize("method", ALL[1:])  # RTN leaves dead columns alone
def test_dead_inputs_zero_their_columns_and_d(method):
    W, X, Xt, _, _ = _problem(6, 48, seed=11)
    Xt[:, 5] = 0  # input 5 is dead in the quantized model but not along the FP trajectory
    H, D = 2 * Xt.T @ Xt / 192, 2 * (X - Xt).T @ Xt / 192
    name, options = _options(method, act_order=True)
    Q = solve(name, W, H, WeightArgs(bits=4), options, D).Q
    assert torch.isfinite(Q).all() and torch.all(Q[:, 5] == 0)
    D[:, 5] = 1.0  # garbage in the dead column of D is ignored
    assert torch.equal(solve(name, W, H, WeightArgs(bits=4), options, D).Q, Q)


# --- composition ---------------------------------------------------------------------------

@pytest.mark.parametrize("method,plan", [
    ("gptq", SolverPlan(False, "gptq")), ("rtn", SolverPlan(False, "rtn")),
    ("gptaq", SolverPlan(False, "gptaq")), ("foem", SolverPlan(False, "foem")),
    ("qep", SolverPlan(True, "gptq")), ("rescomp", SolverPlan(False, "rescomp")),
    ("gptaq+foem", SolverPlan(False, "gptaq+foem")), ("foem+gptaq", SolverPlan(False, "gptaq+foem")),
    ("qep+gptq", SolverPlan(True, "gptq")), ("qep+gptaq", SolverPlan(True, "gptaq")),
    ("gptaq+rescomp", SolverPlan(False, "rescomp")), ("qep+rtn", SolverPlan(True, "rtn")),
    ("qep+gptaq+foem", SolverPlan(True, "gptaq+foem")),
])
def test_method_strings_parse(method, plan):
    assert parse_method(method) == plan


@pytest.mark.parametrize("method,a,b", [
    ("foem+rescomp", "foem", "rescomp"), ("gptaq+foem+rescomp", "foem", "rescomp"),
    ("rtn+gptq", "gptq", "rtn"), ("rtn+gptaq", "gptaq", "rtn"), ("qep+qep", "qep", "qep"),
    ("gptq+gptaq", "gptaq", "gptq"), ("foem+gptq", "foem", "gptq"),
])
def test_bad_combinations_name_both_methods(method, a, b):
    with pytest.raises(RotqError, match=f"'{a}' and '{b}' cannot be combined: .+"):
        parse_method(method)


@pytest.mark.parametrize("method", ["awq", "gptq+", "GPTQ", "qep+awq"])
def test_unknown_methods_are_refused(method):
    with pytest.raises(RotqError, match="unknown method"):
        parse_method(method)


def test_plan_flags_and_canonical_names():
    assert [m for m, fp in NEEDS_FP_TRAJECTORY.items() if fp] == ["gptaq", "qep", "rescomp"]
    assert not parse_method("foem").needs_fp_trajectory
    assert parse_method("gptaq+foem").needs_fp_trajectory
    assert not parse_method("rtn").needs_data and parse_method("qep+rtn").needs_data
    assert parse_method("foem").needs_data
    assert parse_method("foem").name == "foem" and parse_method("qep").name == "qep+gptq"
    with pytest.raises(RotqError, match="unknown method 'awq'"):
        parse_method("gptaq+awq")


def test_solve_entry_point():
    W, _, _, H, D = _problem(9, 96, seed=12)
    args = WeightArgs(bits=4)
    gptq = GPTQOptions(act_order=False)
    assert torch.equal(solve("gptq", W, H, args, gptq).Q, gptq_solve(W, H, args, gptq).Q)
    assert torch.equal(solve("rtn", W, None, args, gptq).Q, quantize_weight_rtn(W, args).dequantize())
    # QEP leaves excluded linears (mlp.down_proj by default) to the solver alone
    down = solve("qep+gptq", W, H, args, gptq, D, name="model.layers.3.mlp.down_proj").Q
    assert torch.equal(down, gptq_solve(W, H, args, gptq).Q)
    up = solve("qep+gptq", W, H, args, gptq, D, name="model.layers.3.mlp.up_proj").Q
    assert not torch.equal(up, down)
    with pytest.raises(ValueError, match="needs D"):
        solve("gptaq", W, H, args, gptq)
    with pytest.raises(ValueError, match="needs D"):
        solve("foem", W, H, args, MethodOptions(foem=FOEMOptions(alpha=0.3)))
    with pytest.raises(ValueError, match="FOEMOptions.alpha"):
        solve("gptaq+foem", W, H, args, MethodOptions(gptaq=GPTAQOptions(alpha=0.1)), D)
    with pytest.raises(ValueError, match="mode"):
        GPTAQOptions(mode="all")
    with pytest.raises(ValueError, match="variant"):
        FOEMOptions(variant="6c")
