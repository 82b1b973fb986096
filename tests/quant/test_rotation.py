"""Computational invariance: the fused and rotated model in full precision keeps its logits."""

import copy

import pytest
import torch

from rotq.quant.models import load_model
from rotq.quant.online import install_online_ops, remove_online_ops
from rotq.quant.rotation import apply_rotations, fuse_norms
from rotq.quant.scheme import RotationArgs, Scheme

ARCHS = [(a, n) for a in ("llama", "qwen2", "qwen3", "mistral") for n in (False, True)]


def _ids(seed=0, vocab=512):
    return torch.randint(0, vocab, (2, 37), generator=torch.Generator().manual_seed(seed))


def _rotate(model, seed):
    """Fuse norms, fold R1/R2/R4 and install the online R3/R4 with every quantizer off."""
    rot = RotationArgs.hadamard(seed=seed)
    fuse_norms(model)
    apply_rotations(model, rot)
    install_online_ops(model, Scheme(rotation=rot))


@pytest.mark.parametrize("arch,nonpow2", ARCHS)
def test_rotated_fp_model_keeps_logits(tiny_model_dir, arch, nonpow2):
    model, _ = load_model(str(tiny_model_dir(arch, nonpow2)))
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        _rotate(model, seed=7)  # still the same function
        out = model(ids).logits
    assert model.config._attn_implementation == "rotq"
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_rotation_really_rotates(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir("llama")))
    before = copy.deepcopy(model.model.layers[0].self_attn.q_proj.weight)
    fuse_norms(model)
    apply_rotations(model, RotationArgs.hadamard(seed=0))
    after = model.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(before, after, atol=1e-3)
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied after fusion
    assert model.config.tie_word_embeddings is False
    assert torch.all(model.model.norm.weight == 1)


def test_without_online_r4_the_model_differs(tiny_model_dir):
    """R4 folded into down_proj but not applied online must change the output (the test above
    would pass vacuously if the online ops did nothing)."""
    model, _ = load_model(str(tiny_model_dir("llama")))
    ids = _ids(1)
    with torch.no_grad():
        ref = model(ids).logits
        _rotate(model, seed=1)
        remove_online_ops(model)
        out = model(ids).logits
    assert not torch.allclose(out, ref, atol=1e-2)


@pytest.mark.parametrize("n", [64, 576, 1536, 28 * 8])
def test_r1_fast_fold_equals_the_dense_product(n):
    """A signed Hadamard R1 is folded by the fast transform: x R1 and R1^T x as the dense
    float64 products, on awkward sizes; any other orthogonal R1 takes the dense path."""
    from rotq.quant.hadamard import random_hadamard_matrix
    from rotq.quant.rotation import _R1

    g = torch.Generator().manual_seed(n)
    R = random_hadamard_matrix(n, seed=n)
    fold = _R1(R)
    assert fold.signs is not None
    x = torch.randn(37, n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(fold.right(x), x @ R, rtol=0, atol=1e-12)
    torch.testing.assert_close(fold.left_t(x.T), R.T @ x.T, rtol=0, atol=1e-12)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    R_off = R.clone()
    R_off[0, 0] += 1e-15 if R_off[0, 0] > 0 else -1e-15  # one last bit off: no longer a Hadamard
    for other in (Q, R_off):
        dense = _R1(other)
        assert dense.signs is None
        torch.testing.assert_close(dense.right(x), x @ other, rtol=0, atol=1e-12)
