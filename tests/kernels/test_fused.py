"""The fused quantizers of kernels/fused.py against their PyTorch references and the unfused kernels,
on fresh random rows (a zero row and an outlier included) of awkward sizes: codes, scales and cache
bytes compared exactly, except against the float64 Hadamard, where float32 butterflies may land a
value on the other side of a rounding tie or boundary."""

import pytest
import torch

from rotq.kernels.fused import (
    rmsnorm_act_quant,
    rmsnorm_act_quant_reference,
    rmsnorm_reference,
    rope_hadamard_kv_store,
    rope_hadamard_kv_store_reference,
    rope_reference,
    silu_mul_hadamard_act_quant,
    silu_mul_hadamard_act_quant_reference,
    silu_mul_reference,
)
from rotq.kernels.hadamard import hadamard, hadamard_act_quant
from rotq.kernels.kv4 import dequantize_kv, kv_quant_store, new_cache, page_views

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rows(M: int, K: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Tokens of different magnitudes; the first all zero, the last with an outlier feature."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * (torch.rand(M, 1, generator=g) * 3 + 0.01)
    x[-1, K // 3] = 60.0
    x[0] = 0.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,K,bits,weight,residual", [
    (1, 576, 4, False, False), (3, 1536, 4, True, False), (37, 576, 4, False, True),
    (37, 1536, 8, True, True), (3, 576, 8, False, False),
])
def test_rmsnorm_act_quant_matches_reference(dtype, M, K, bits, weight, residual):
    seed = K + M + bits + 2 * weight + 4 * residual
    x = _rows(M, K, dtype, seed)
    w = (1 + 0.3 * torch.randn(K, generator=torch.Generator().manual_seed(seed))).to(dtype) if weight else None
    r = _rows(M, K, dtype, seed + 1) if residual else None
    if r is not None:
        r[0] = 0.0  # x + r stays an all-zero token
    out = rmsnorm_act_quant(x.to(DEVICE), None if w is None else w.to(DEVICE), 1e-5, 0.9, bits,
                            residual=None if r is None else r.to(DEVICE))
    ref = rmsnorm_act_quant_reference(x, w, 1e-5, 0.9, bits, residual=r)
    assert len(out) == len(ref) and out[0].dtype == torch.int8 and out[0].shape == (M, K)
    for got, want in zip(out, ref):
        assert torch.equal(got.cpu(), want)
    assert torch.equal(out[0][0].cpu(), torch.zeros(K, dtype=torch.int8)) and out[1][0] == 1.0


def test_rmsnorm_reference_is_hf_llama_rmsnorm():
    """The reference's norm is HF's (what calibration runs) in the served dtype; only its float32
    mean of squares differs (HF's accumulates in float32), rarely by enough to move a value by
    one bfloat16 step."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = _rows(37, 1536, torch.bfloat16, 7)
    norm = LlamaRMSNorm(1536, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(1536))
        hf = norm(x)
    ours = rmsnorm_reference(x, norm.weight.detach(), 1e-5)
    assert ours.dtype == hf.dtype == torch.bfloat16
    assert (ours != hf).sum() <= 2 and torch.allclose(ours.float(), hf.float(), rtol=2 ** -7, atol=0)


def _gate_up(M: int, n: int, dtype: torch.dtype, seed: int, saturated: bool = False) -> torch.Tensor:
    """gate_up [M, 2n]; ``saturated``: gates in [20, 30], where SiLU(g) = g exactly in float32
    (exp(−g) < 2^-28 vanishes beside 1), so no exp implementation can change the result."""
    gate = _rows(M, n, torch.float32, seed) * 2
    if saturated:
        gate = 20 + 10 * torch.rand(M, n, generator=torch.Generator().manual_seed(seed))
        gate[0] = 0.0
    return torch.cat([gate.to(dtype), _rows(M, n, dtype, seed + 1)], dim=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,n,bits", [(1, 1536, 4), (3, 1408, 4), (37, 1536, 8), (37, 1408, 4)])
def test_silu_mul_hadamard_act_quant_equals_the_unfused_kernels(dtype, M, n, bits):
    """Bit for bit SiLU·mul in PyTorch then hadamard_act_quant, on gates where SiLU is exact."""
    gate_up = _gate_up(M, n, dtype, n + M, saturated=True)
    q, s = silu_mul_hadamard_act_quant(gate_up.to(DEVICE), 0.9, bits, hadamard_size=n)
    q2, s2 = hadamard_act_quant(silu_mul_reference(gate_up).to(DEVICE), 0.9, bits)
    assert q.dtype == torch.int8 and q.shape == (M, n) and s.shape == (M,)
    assert torch.equal(q, q2) and torch.equal(s, s2)
    assert torch.equal(q[0].cpu(), torch.zeros(n, dtype=torch.int8)) and s[0] == 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,n", [(3, 1536), (37, 1408)])
def test_silu_mul_hadamard_act_quant_matches_float64_reference(dtype, M, n):
    """Against SiLU·mul in PyTorch and calibration's float64 Hadamard, on gates of both signs.
    Triton's exp and torch's differ by float32 ulps, so a 16-bit SiLU output may round the other
    way, and the float32 butterflies differ from float64: scales agree to 1e-4, codes but for a
    few near rounding ties, by one."""
    gate_up = _gate_up(M, n, dtype, 5 * n + M)
    q, s = silu_mul_hadamard_act_quant(gate_up.to(DEVICE), 0.9)
    codes, scale = silu_mul_hadamard_act_quant_reference(gate_up, 0.9)
    torch.testing.assert_close(s.cpu(), scale, rtol=1e-4, atol=0)
    diff = q.cpu().to(torch.int16) - codes.to(torch.int16)
    assert diff.abs().max() <= 1 and (diff != 0).float().mean() <= 1e-3


def _cos_sin_cache(D: int, positions: int = 4096, base: float = 500000.0) -> torch.Tensor:
    """vLLM's table [positions, D]: cos then sin of position · base^(−2i/D) (Llama-3's base)."""
    inv = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    ang = torch.arange(positions, dtype=torch.float32)[:, None] * inv[None]
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


def _attention_inputs(T: int, Hq: int, H: int, D: int, dtype: torch.dtype, seed: int):
    """q, k, v as the strided views of one qkv output, positions, slots (one −1) and a zero cache."""
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(T, (Hq + 2 * H) * D, generator=g) * 2).to(dtype)
    q, k, v = qkv.split([Hq * D, H * D, H * D], dim=-1)
    positions = torch.randint(0, 4096, (T,), generator=g)
    blocks = T // 16 + 3
    slots = torch.randperm(blocks * 16, generator=g)[:T]
    slots[T // 2] = -1
    return (q.reshape(T, Hq, D), k.reshape(T, H, D), v.reshape(T, H, D), positions, slots,
            new_cache(blocks, 16, H, D))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("T,Hq,H,D,symmetric", [(1, 4, 2, 64, False), (37, 8, 2, 128, False),
                                                 (3, 6, 3, 128, True)])
def test_rope_hadamard_kv_store_equals_the_unfused_kernels(dtype, T, Hq, H, D, symmetric):
    """Q and every cache byte exactly as RoPE in PyTorch, then hadamard and kv_quant_store."""
    q, k, v, positions, slots, cache = _attention_inputs(T, Hq, H, D, dtype, T + D + symmetric)
    cs = _cos_sin_cache(D).to(dtype)
    cache, expected_cache = cache.to(DEVICE), cache.clone().to(DEVICE)
    out = rope_hadamard_kv_store(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), positions.to(DEVICE), cs.to(DEVICE),
                                 cache, slots.to(DEVICE), 0.95, symmetric)
    # the unfused transform in float32, rounded by torch (Triton's interpreter truncates to bfloat16)
    q2, k2 = (hadamard(rope_reference(x, positions, cs).float().to(DEVICE)).to(dtype) for x in (q, k))
    kv_quant_store(k2, v.to(DEVICE), expected_cache, slots.to(DEVICE), 0.95, symmetric)
    assert out.dtype == dtype and out.shape == (T, Hq, D)
    assert torch.equal(out, q2)
    assert torch.equal(cache, expected_cache)


@pytest.mark.parametrize("T,Hq,H,D", [(37, 8, 2, 128), (3, 4, 1, 64)])
def test_rope_hadamard_kv_store_matches_float64_reference(T, Hq, H, D):
    """Against calibration's float64 R3 (bfloat16 heads): Q within one bfloat16 step, V's bytes
    equal, K's codes equal but where a value sits at a rounding boundary (then one step apart)."""
    q, k, v, positions, slots, cache = _attention_inputs(T, Hq, H, D, torch.bfloat16, 3 * T + D)
    cs = _cos_sin_cache(D).to(torch.bfloat16)
    cache, ref_cache = cache.to(DEVICE), cache.clone()
    out = rope_hadamard_kv_store(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), positions.to(DEVICE), cs.to(DEVICE),
                                 cache, slots.to(DEVICE), 0.95).cpu()
    ref = rope_hadamard_kv_store_reference(q, k, v, positions, cs, ref_cache, slots, 0.95)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -7, atol=0)
    assert (out != ref).float().mean() < 0.01
    K, V = dequantize_kv(cache.cpu(), D)
    K_ref, V_ref = dequantize_kv(ref_cache, D)
    assert torch.equal(V, V_ref)
    step = page_views(ref_cache, D)[1][..., 0].max()
    assert (K - K_ref).abs().max() <= 1.01 * step and (K != K_ref).float().mean() < 0.01


def test_fused_quantizers_refuse_what_they_cannot_do():
    x = torch.zeros(2, 64)
    with pytest.raises(ValueError, match="norm weight"):
        rmsnorm_act_quant(x, torch.ones(64, dtype=torch.float16), 1e-5, 0.9)
    with pytest.raises(ValueError, match="at most"):
        rmsnorm_act_quant(torch.zeros(1, 65536), None, 1e-5, 0.9)
    with pytest.raises(ValueError, match="4 or 8 bits"):
        rmsnorm_act_quant(x, None, 1e-5, 0.9, bits=6)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        rmsnorm_act_quant(x.double(), None, 1e-5, 0.9)
    with pytest.raises(ValueError, match="whole"):
        silu_mul_hadamard_act_quant(torch.zeros(2, 256), 0.9, hadamard_size=64)
    with pytest.raises(ValueError, match="no Hadamard matrix"):
        silu_mul_hadamard_act_quant(torch.zeros(2, 36), 0.9)
    q, k, v, positions, slots, cache = _attention_inputs(3, 4, 2, 64, torch.float32, 0)
    with pytest.raises(ValueError, match="whole head"):
        rope_hadamard_kv_store(q, k, v, positions, _cos_sin_cache(32), cache, slots, 0.95)
    with pytest.raises(ValueError, match="disagree"):
        rope_hadamard_kv_store(q, k, v[:, :1], positions, _cos_sin_cache(64), cache, slots, 0.95)

