"""SpinQuant: learn the offline rotations R1 (residual stream, [d, d]) and R2 (one [D, D] per
decoder layer) by Cayley SGD on the Stiefel manifold, against the W16A4KV4 next-token loss.

Liu et al., "SpinQuant: LLM Quantization with Learned Rotations", ICLR 2025
(https://arxiv.org/abs/2405.16406); docs/algorithms.md#spinquant. Written from the math only.

The norms are fused into the weights first; the weights themselves are left untouched. Every
step rebuilds the rotated weights as functions of R1 and R2, in the conventions of rotation.py
(q/k/v/gate/up: W R1; o_proj/down_proj: R1^T W; v_proj rows and o_proj columns per head: R2),
and runs the model with the scheme's online ops (R3, R4 and the activation and KV fake
quantizers, with straight-through rounding) and 16-bit weights. R1 on the embedding and on
lm_head acts on the activations instead (E[ids] R1 and norm(h) R1^T): the same function,
without rotating the vocabulary-sized matrices each step. Init: the random Hadamards of
``--rotation hadamard`` with the same seed, so 0 steps is exactly the Hadamard rotation.

Cayley SGD step: G = dL/dR, A = G R^T - R G^T (skew), R <- (I + eta/2 A)^-1 (I - eta/2 A) R
(orthogonal by construction) with eta = min(lr/2, 1/||A||_1), Cayley SGD's step bound (see
:func:`cayley_step`), optional momentum on A, cosine schedule of lr; R is kept in float64 and
re-orthogonalised by QR every few steps.

Memory and batching: a step accumulates gradients over ``samples_per_step`` calibration
sequences, one at a time (SpinQuant uses 8 GPUs x 1 sequence), into the rotated weights, which
are built once per step and back-propagated to R1/R2 once. Each decoder layer is checkpointed
(recomputed during the backward pass), so one sequence keeps only the layer inputs, one layer's
activations and its logits alive. SmolLM2-135M, one 2048-token sequence per step, one CPU
thread: about 45-65 s per step and 3.6 GB peak RSS; glibc's malloc may keep freed activations
and show twice that (7.6 GB) unless MALLOC_MMAP_THRESHOLD_=131072 is set. Under torchrun a
step's sequences are split across the ranks and the loss and gradients summed (distributed.py),
so every rank takes the same step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from rotq.export.rotations_file import RotationMatrices, orthogonality_error
from rotq.quant.arch import attention_shape, decoder_layers, mlp_input_names, mlp_output_names
from rotq.quant.distributed import SINGLE, Ranks
from rotq.quant.errors import RotqError
from rotq.quant.hadamard import hadamard_matrix
from rotq.quant.online import install_online_ops, remove_online_ops
from rotq.quant.prefix import attach_prefix
from rotq.quant.prefix_kv import VALUE_BUFFER, PrefixKV
from rotq.quant.rotation import fuse_norms, hadamard_rotations
from rotq.quant.scheme import Scheme

logger = logging.getLogger(__name__)



def _rotated_input(layer: nn.Module) -> tuple[str, ...]:
    """The linears whose input is the residual stream (W R1), v_proj aside (it also gets R2)."""
    return ("self_attn.q_proj", "self_attn.k_proj", *mlp_input_names(layer))


@dataclass(frozen=True)
class SpinQuantOptions:
    """How to learn R1/R2 (method options, recorded as provenance only)."""

    steps: int = 20  # the measured default (benchmarks/RESULTS.md, levers-w4a4kv4)
    lr: float = 1.5  # initial learning rate of the cosine schedule (SpinQuant's)
    momentum: float = 0.0  # on the skew direction A; 0 is plain Cayley SGD
    samples_per_step: int = 1  # calibration sequences per step (gradient accumulation)
    reorthogonalize_every: int = 10  # steps between QR re-orthogonalisations
    checkpoint_layers: bool = True  # recompute each decoder layer in backward (memory)
    device: str = "cpu"  # where the whole model runs while learning

    def __post_init__(self):
        if self.steps < 0 or self.samples_per_step < 1 or self.reorthogonalize_every < 1:
            raise RotqError(f"rotation learning needs steps >= 0, samples_per_step >= 1 and "
                            f"reorthogonalize_every >= 1, got {self.steps}, {self.samples_per_step} "
                            f"and {self.reorthogonalize_every}")
        if not self.lr > 0 or not 0 <= self.momentum < 1:
            raise RotqError(f"rotation learning needs lr > 0 and momentum in [0, 1), "
                            f"got {self.lr} and {self.momentum}")


@dataclass
class SpinQuantResult:
    """What :func:`learn_rotations` found, and how the training loss went."""

    rotations: RotationMatrices  # float64, on the CPU
    losses: list[float] = field(default_factory=list)  # each step's loss, before its update
    seconds: float = 0.0


def cayley_step(R: torch.Tensor, G: torch.Tensor, lr: float,
                A_prev: torch.Tensor | None = None, momentum: float = 0.0):
    """One Cayley SGD step on the orthogonal group, R and G [n, n]: returns (R', A) with the skew
    descent direction A = G R^T - R G^T (+ momentum * A_prev) and
    R' = (I + eta/2 A)^-1 (I - eta/2 A) R,  eta = min(lr / 2, 1 / ||A||_1).

    ``lr`` means what it means in SpinQuant, i.e. in Cayley SGD (Li et al., ICLR 2020,
    https://arxiv.org/abs/2002.01113): there the projected skew matrix of a square R is W = A/2,
    the step alpha = min(lr, 1/||W||) and the transform uses alpha/2 W, so eta = alpha/2. The
    bound caps a step's rotation at 2 atan(1/2) per plane whatever the scale of G; without it a
    step of lr 1.5 wrecks SmolLM2 (W16A4KV4 loss 3.0 -> 8.5)."""
    A = G @ R.T - R @ G.T
    if A_prev is not None and momentum:
        A = momentum * A_prev + A
    eta = min(lr / 2, 1 / (float(torch.linalg.matrix_norm(A, 1)) + 1e-8))
    I = torch.eye(R.shape[0], dtype=R.dtype, device=R.device)
    return torch.linalg.solve(I + (eta / 2) * A, (I - (eta / 2) * A) @ R), A


def orthogonalize(R: torch.Tensor) -> torch.Tensor:
    """The Q of R = QU (QR), signs fixed so that a nearly orthogonal R barely moves."""
    Q, U = torch.linalg.qr(R.double())
    return Q * torch.sign(torch.diagonal(U))


def learn_rotations(model: nn.Module, scheme: Scheme, calib_ids: torch.Tensor,
                    options: SpinQuantOptions = SpinQuantOptions(), ranks: Ranks = SINGLE,
                    prefix: PrefixKV | None = None) -> SpinQuantResult:
    """Learn R1/R2 for ``scheme`` (rotation kind "spinquant") on ``calib_ids`` [N, L], with the
    full-precision ``prefix`` (prefix.py; K/V of the model before rotation) in every sequence's
    past: its V follows each step's R2, its K only R3 (R1 cancels in both).

    Leaves ``model`` norm-fused (as :func:`~rotq.quant.pipeline.prepare_model` would), with its
    weights otherwise unchanged and no online ops; fold the result with ``calibrate(...,
    rotations=result.rotations)``."""
    rot = scheme.rotation
    if rot.kind != "spinquant" or not (rot.r1 and rot.r2):
        raise ValueError(f"learn_rotations needs a rotation of kind 'spinquant' with r1 and r2, got {rot}")
    if calib_ids is None or calib_ids.ndim != 2 or calib_ids.shape[1] < 2:
        raise RotqError("learning rotations needs calibration sequences [N, L] with L >= 2")
    if scheme.activations is None and scheme.kv_cache is None:
        logger.warning("scheme quantizes neither activations nor KV cache: the loss does not depend "
                       "on R1/R2 and learning leaves the Hadamard init (almost) unchanged")
    start = time.perf_counter()
    fuse_norms(model)
    _attach_learning_prefix(model, scheme, prefix)
    init = hadamard_rotations(model.config, rot.seed)
    R1, R2 = init.R1.clone(), [R.clone() for R in init.R2]
    result = SpinQuantResult(RotationMatrices(R1, R2))
    if options.steps == 0:
        return result
    device = torch.device(options.device)
    with _learning_mode(model, scheme, device):
        base = _base_weights(model, rot.r4)
        A = [None] * (1 + len(R2))
        bar = tqdm(range(options.steps), desc="Learning rotations (SpinQuant)", unit="step",
                   disable=not ranks.is_main)
        for t in bar:
            ids = _step_batch(calib_ids, t, options.samples_per_step).to(device)
            loss, grads = _loss_and_grads(model, base, R1, R2, ids, options.checkpoint_layers, ranks)
            lr = options.lr * 0.5 * (1 + math.cos(math.pi * t / options.steps))
            Rs = [R1, *R2]
            for j, (R, G) in enumerate(zip(Rs, grads)):
                Rs[j], A[j] = cayley_step(R, G, lr, A[j], options.momentum)
                if (t + 1) % options.reorthogonalize_every == 0 or t + 1 == options.steps:
                    Rs[j] = orthogonalize(Rs[j])
            R1, R2 = Rs[0], Rs[1:]
            result.losses.append(loss)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}")
            logger.info("rotation step %d/%d: loss %.4f, lr %.3g", t + 1, options.steps, loss, lr)
    err = max(orthogonality_error(R) for R in [R1, *R2])
    assert err < 1e-9, f"learned rotation lost orthogonality ({err:.3g})"
    result.rotations = RotationMatrices(R1, R2)
    result.seconds = time.perf_counter() - start
    return result


def loss_and_gradients(model: nn.Module, scheme: Scheme, rotations: RotationMatrices, ids: torch.Tensor,
                       checkpoint_layers: bool = True, prefix: PrefixKV | None = None) -> tuple[float, list[torch.Tensor]]:
    """The learning objective at ``rotations``: the mean next-token loss on ``ids`` [n, L] with
    R1/R2 applied functionally and the scheme's online ops (and ``prefix`` in the past), and its
    Euclidean gradients [dL/dR1, dL/dR2 of layer 0, ...] (float64). Leaves ``model`` norm-fused,
    without online ops."""
    fuse_norms(model)
    _attach_learning_prefix(model, scheme, prefix)
    with _learning_mode(model, scheme, ids.device):
        base = _base_weights(model, scheme.rotation.r4)
        return _loss_and_grads(model, base, rotations.R1, rotations.R2, ids, checkpoint_layers)


def _attach_learning_prefix(model: nn.Module, scheme: Scheme, prefix: PrefixKV | None) -> None:
    """The prefix with K after R3 and V before R2 (each step applies its R2, see _rotated_weights)."""
    if prefix is not None:
        attach_prefix(model, prefix.rotated(scheme.rotation.r3, None))


@contextlib.contextmanager
def _learning_mode(model: nn.Module, scheme: Scheme, device: torch.device):
    """The model on ``device``, its parameters frozen (only R gets gradients), the scheme's
    online ops with straight-through rounding; all undone on exit (the model back on the CPU)."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False).to(device)
    install_online_ops(model, scheme, ste=True)
    try:
        yield
    finally:
        remove_online_ops(model)
        model.to("cpu")
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


def _step_batch(calib_ids: torch.Tensor, t: int, n: int) -> torch.Tensor:
    """Step t's sequences: the next n of the calibration set, cycling."""
    idx = (torch.arange(n) + t * n) % calib_ids.shape[0]
    return calib_ids[idx]


def _base_weights(model: nn.Module, r4: bool) -> list[tuple]:
    """Per layer: the names rotated on their input side, the down projections, and the norm-fused
    weights (and the biases R1/R2 touch) that get rotated, by name inside the layer; down_proj
    already carries the fixed R4 Hadamard (W H)."""
    base = []
    for layer in decoder_layers(model):
        w = {}
        rotated_input, down = _rotated_input(layer), mlp_output_names(layer)
        for name in (*rotated_input, "self_attn.v_proj", "self_attn.o_proj", *down):
            lin = layer.get_submodule(name)
            w[f"{name}.weight"] = lin.weight.detach()
            if getattr(lin, "bias", None) is not None and name not in rotated_input:  # input-side rotations keep b
                w[f"{name}.bias"] = lin.bias.detach()
        value = getattr(layer.self_attn, VALUE_BUFFER, None)
        if value is not None:  # the prefix's V [1, H_kv, P, D]: rotated by R2 like v_proj's output
            w[f"self_attn.{VALUE_BUFFER}"] = value
        for name in down if r4 else ():
            W, n = w[f"{name}.weight"], layer.get_submodule(name).in_features
            H = hadamard_matrix(n).to(W.device) / n**0.5
            w[f"{name}.weight"] = (W.double() @ H).to(W.dtype)
        base.append((rotated_input, down, w))
    return base


def _rotated_weights(model, base, R1f: torch.Tensor, R2f: list[torch.Tensor]) -> list[dict]:
    """The weights of each layer with R1 and the layer's R2 folded in (differentiable in R)."""
    shape = attention_shape(model.config)
    d, D = R1f.shape[0], shape.head_dim
    out = []
    for (rotated_input, down, b), R2 in zip(base, R2f):
        w = {f"{name}.weight": b[f"{name}.weight"] @ R1f for name in rotated_input}
        Wv = b["self_attn.v_proj.weight"] @ R1f  # [kv*D, d]: rows per KV head get R2^T
        w["self_attn.v_proj.weight"] = (R2.T @ Wv.view(shape.num_kv_heads, D, d)).reshape(-1, d)
        Wo = R1f.T @ b["self_attn.o_proj.weight"]  # [d, heads*D]: columns per head get R2
        w["self_attn.o_proj.weight"] = (Wo.view(d, shape.num_heads, D) @ R2).reshape(d, -1)
        for name in down:
            w[f"{name}.weight"] = R1f.T @ b[f"{name}.weight"]
        if f"self_attn.{VALUE_BUFFER}" in b:
            w[f"self_attn.{VALUE_BUFFER}"] = b[f"self_attn.{VALUE_BUFFER}"] @ R2
        if "self_attn.v_proj.bias" in b:
            w["self_attn.v_proj.bias"] = (b["self_attn.v_proj.bias"].view(-1, D) @ R2).reshape(-1)
        for name in ("self_attn.o_proj", *down):
            if f"{name}.bias" in b:
                w[f"{name}.bias"] = b[f"{name}.bias"] @ R1f
        out.append(w)
    return out


def _loss_and_grads(model, base, R1, R2, ids, use_checkpoint: bool, ranks: Ranks = SINGLE):
    """Mean next-token loss over the sequences ``ids`` [n, L] and its gradients for R1, R2...
    Each sequence's share is computed on its own (under torchrun by rank ``s % world``, then
    broadcast) and the shares are summed in sequence order in float64, so every process count
    takes bit for bit the same step."""
    n = ids.shape[0]
    mine = [s for s in range(n) if ranks.owner(s) == ranks.rank]
    shares = {}
    if mine:
        Rs = [R.detach().requires_grad_() for R in [R1, *R2]]
        with torch.enable_grad():
            R1f = Rs[0].to(ids.device, torch.float32)
            weights = _rotated_weights(model, base, R1f, [R.to(ids.device, torch.float32) for R in Rs[1:]])
            outs = [R1f] + [t for w in weights for t in w.values()]
            leaves = [t.detach().requires_grad_() for t in outs]
            it = iter(leaves[1:])
            leaf_weights = [{k: next(it) for k in w} for w in weights]
            for s in mine:
                loss = _sequence_loss(model, leaves[0], leaf_weights, ids[s:s + 1], use_checkpoint) / n
                loss.backward()
                # a MoE expert no token of this sequence reached has no gradient: leave it out
                reached = [(out, leaf.grad) for out, leaf in zip(outs, leaves) if leaf.grad is not None]
                grads = torch.autograd.grad([o for o, _ in reached], Rs, [g for _, g in reached],
                                            retain_graph=s != mine[-1], allow_unused=True)
                grads = [torch.zeros_like(R) if G is None else G for R, G in zip(Rs, grads)]
                shares[s] = float(loss.detach()), [G.detach().to("cpu", torch.float64) for G in grads]
                for leaf in leaves:
                    leaf.grad = None
    total, grads = 0.0, None
    for s in range(n):
        loss, share = ranks.broadcast(shares.get(s), ranks.owner(s))
        total += loss
        grads = share if grads is None else [G + g for G, g in zip(grads, share)]
    return total, grads


def _sequence_loss(model, R1f, weights, ids, use_checkpoint: bool) -> torch.Tensor:
    """Cross-entropy of next-token prediction on one sequence ids [1, L]."""
    position_ids = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
    h = model.model.embed_tokens(ids) @ R1f  # [1, L, d]
    forward = dict(position_ids=position_ids, position_embeddings=model.model.rotary_emb(h, position_ids),
                   attention_mask=None, use_cache=False)
    for layer, w in zip(decoder_layers(model), weights):
        if use_checkpoint:
            h = checkpoint(_layer_forward, layer, w, h, forward, use_reentrant=False)
        else:
            h = _layer_forward(layer, w, h, forward)
    logits = model.lm_head(model.model.norm(h) @ R1f.T)  # [1, L, vocab]
    return F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])


def _layer_forward(layer, weights, h, forward):
    out = torch.func.functional_call(layer, weights, (h,), forward)
    return out[0] if isinstance(out, tuple) else out
