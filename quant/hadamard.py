"""Hadamard matrices and the fast Hadamard transform used for rotations.

Rotating activations and weights by an orthogonal Hadamard matrix spreads outliers
evenly over all channels, so 4-bit quantization loses less (QuaRot, arXiv 2404.00456).
Model widths are rarely powers of two (e.g. 576, 1536, 14336), so we build
H_n = H_K (x) H_{2^m} with H_K from a Paley construction and H_{2^m} from Sylvester's,
and apply it as small matmuls: Sylvester factors of at most 128 (H_(ab) = H_a (x) H_b) and
the K x K Paley factor, O(n (128 + K)) per vector.
The matrices are generated here from the math, not copied from tables.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["is_hadamard_size", "hadamard_matrix", "random_hadamard_matrix", "apply_hadamard", "prepare_hadamard",
           "split_size", "base_factor"]

# Largest Paley factor K. A bigger K would make the "fast" transform a dense K x K matmul
# (e.g. 11008 = 5504 * 2 with Paley I, q = 5503) and its construction check O(K^3).
MAX_BASE_ORDER = 256


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    return all(q % d for d in range(3, math.isqrt(q) + 1, 2))


def _paley_kind(k: int) -> tuple[str, int] | None:
    """How to build a base order k > 2: ("I", q) for q+1, ("II", q) for 2(q+1), else None."""
    if k > MAX_BASE_ORDER:
        return None
    if k > 2 and _is_prime(k - 1) and (k - 1) % 4 == 3:
        return ("I", k - 1)
    if k > 2 and k % 2 == 0 and _is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return ("II", k // 2 - 1)
    return None


def split_size(n: int) -> tuple[int, int] | None:
    """(K, 2^m) with n = K * 2^m and the smallest constructible K (1 or a Paley order); None if
    impossible. H_n = H_K (x) H_{2^m}: the factorisation the fast transforms (here and the Triton
    kernel) apply."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return None
    m = (n & -n).bit_length() - 1  # largest power of two dividing n
    for mm in range(m, -1, -1):
        k = n >> mm
        if k == 1 or _paley_kind(k) is not None:
            return k, 1 << mm
    return None


def _unsupported(n: object) -> ValueError:
    ks = [k for k in range(3, MAX_BASE_ORDER + 1) if _paley_kind(k) is not None and k & (k - 1)]
    return ValueError(
        f"no Hadamard matrix of order {n}: supported sizes are n = K * 2^m (m >= 0) with K = 1 "
        f"or a Paley order (q+1 for a prime q = 3 mod 4, 2(q+1) for a prime q = 1 mod 4), "
        f"K <= {MAX_BASE_ORDER} and not a power of two, i.e. K in {ks}"
    )


def is_hadamard_size(n: int) -> bool:
    """True if hadamard_matrix(n) can be built (n = K * 2^m, K = 1 or a Paley order)."""
    return split_size(n) is not None


def _jacobsthal(q: int) -> torch.Tensor:
    """Qm[i, j] = chi((j - i) mod q) with chi the Legendre symbol mod prime q (chi(0) = 0)."""
    chi = torch.full((q,), -1.0, dtype=torch.float64)
    chi[0] = 0.0
    chi[torch.tensor(sorted({(i * i) % q for i in range(1, q)}), dtype=torch.long)] = 1.0
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley(k: int) -> torch.Tensor:
    """Paley I (order q+1) or Paley II (order 2(q+1)) Hadamard matrix, checked H H^T = k I."""
    kind, q = _paley_kind(k)  # type: ignore[misc]
    qm = _jacobsthal(q)
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1.0
    c[1:, 1:] = qm
    if kind == "I":
        c[1:, 0] = -1.0  # skew: S = [[0, 1^T], [-1, Qm]], H = I + S
        h = torch.eye(q + 1, dtype=torch.float64) + c
    else:
        c[1:, 0] = 1.0  # symmetric conference matrix; 0 -> [[1,1],[1,-1]], +-1 -> +-[[1,-1],[-1,-1]]
        zero_block = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        sign_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        h = torch.kron((c == 0).to(torch.float64), zero_block) + torch.kron(c, sign_block)
    if not torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.float64)):
        raise RuntimeError(f"Paley construction of order {k} is not Hadamard (bug)")
    return h


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


_FACTORS: dict[int, torch.Tensor] = {}


def base_factor(k: int) -> torch.Tensor:
    """H_K, the K x K factor of :func:`split_size` (float64, cached: do not modify it in place;
    ones(1, 1) for K = 1); kept small so the fast path can reuse it. A plain
    dict rather than lru_cache: torch.compile inlines lru_cache'd functions (rebuilding the
    factor inside the trace) but reads a dict entry as a constant."""
    factor = _FACTORS.get(k)
    if factor is None:
        if k != 1 and _paley_kind(k) is None:
            raise ValueError(f"{k} is not a base order (1 or a Paley order, see split_size)")
        factor = _FACTORS[k] = torch.ones(1, 1, dtype=torch.float64) if k == 1 else _paley(k)
    return factor


@functools.lru_cache(maxsize=16)
def _build(n: int) -> torch.Tensor:
    split = split_size(n)
    if split is None:
        raise _unsupported(n)
    k, p = split
    return torch.kron(base_factor(k), _sylvester(p))


def prepare_hadamard(n: int) -> None:
    """Build and cache the factors of size n now. Under torch.compile (vLLM compiles the model)
    the first call would run the construction on fake tensors, whose exactness check is
    data-dependent and cannot be traced; serving calls this while loading weights."""
    split = split_size(n)
    if split is None:
        raise _unsupported(n)
    base_factor(split[0])
    for d in _chunks(split[1]):
        _sylvester_factor(d)


def hadamard_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """A +-1 matrix [n, n] with H H^T = n I (a fresh copy; the float64 original is cached)."""
    return _build(n).clone().to(dtype)


def random_hadamard_matrix(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Orthogonal diag(s) H_n / sqrt(n) with +-1 signs s from the seed: deterministic, and
    randomised so different layers/runs can use different rotations (QuaRot's random Hadamard)."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(torch.float64)
    return (s[:, None] * _build(n) / math.sqrt(n)).to(dtype)


_SYLVESTER_CHUNK = 128  # largest Sylvester factor applied as one matmul


def _sylvester_factor(d: int) -> torch.Tensor:
    """H_d (Sylvester, float64, cached in a plain dict for the same reason as :func:`base_factor`)."""
    factor = _FACTORS.get(-d)
    if factor is None:
        factor = _FACTORS[-d] = _sylvester(d)
    return factor


_PLACED: dict[tuple, torch.Tensor] = {}


def _placed(factor: torch.Tensor, key: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``factor`` (the float64 original of cache entry ``key``) on ``device`` in ``dtype``, kept
    after the first use so that a GPU does not receive (and wait for) a host copy on every call;
    under torch.compile the conversion is left to the trace."""
    if torch.compiler.is_compiling():
        return factor.to(device=device, dtype=dtype)
    placed = _PLACED.get((key, device, dtype))
    if placed is None:
        placed = _PLACED[(key, device, dtype)] = factor.to(device=device, dtype=dtype)
    return placed


def _chunks(p: int) -> list[int]:
    """p = 2^m as a product of powers of two of at most _SYLVESTER_CHUNK, largest first."""
    dims = []
    while p > 1:
        d = min(p, _SYLVESTER_CHUNK)
        dims.append(d)
        p //= d
    return dims or [1]


def _sylvester_apply(x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """x @ H_p (Sylvester, unnormalised) along the last dim, in ``dtype``. H_(ab) = H_a (x) H_b, so
    with x viewed row-major as X[a, b] it is H_a^T X H_b: one small matmul per factor of at most
    128, which on a CPU is 2-3x faster than a butterfly stage per bit. float64, because a BLAS
    sums in an order that depends on the number of rows (one decode token against a whole
    prompt): float64 sums of float32 values round to the same float32 whatever the order, so a
    token's result does not depend on its batch, as serving needs (it must equal calibration)."""
    p, lead = x.shape[-1], x.shape[:-1]
    dims = _chunks(p)
    y = x.reshape(*lead, *dims).to(dtype)
    for axis in range(len(dims)):
        h = _placed(_sylvester_factor(dims[axis]), -dims[axis], x.device, dtype)
        if axis == len(dims) - 1:
            y = y @ h
        else:
            y = torch.movedim(torch.movedim(y, len(lead) + axis, -1) @ h, -1, len(lead) + axis)
    return y.reshape(*lead, p)


def apply_hadamard(x: torch.Tensor, n: int | None = None, exact: bool = True) -> torch.Tensor:
    """x @ (H_n / sqrt(n)) along the last dim, computed in float64 and returned in x's dtype
    (each row's result independent of the other rows). ``exact=False`` computes in x's dtype:
    4-5x faster on a CPU, equal to the float64 result within x's rounding, but a row's last bit
    may then depend on how many rows share the call (the BLAS blocking).

    If n < width and divides it, the rotation is block-diagonal over consecutive blocks of
    size n (what each tensor-parallel shard can apply locally). With the length-n vector
    viewed row-major as X[K, 2^m], x (A (x) B) = A^T X B: B by Sylvester factors, K x K matmul for A
    (A^T matters: Paley I matrices are not symmetric).
    """
    width = x.shape[-1]
    n = width if n is None else n
    split = split_size(n)
    if split is None:
        raise _unsupported(n)
    if width % n != 0:
        raise ValueError(f"Hadamard size {n} does not divide the last dimension {width} of x")
    k, p = split
    lead = x.shape[:-1]
    dtype = torch.float64 if exact else x.dtype
    y = _sylvester_apply(x.reshape(*lead, width // n, k, p), dtype)
    if k > 1:
        y = torch.einsum("...ib,ia->...ab", y, _placed(base_factor(k), k, x.device, dtype))
    return (y * (1.0 / math.sqrt(n))).reshape(*lead, width).to(x.dtype)
