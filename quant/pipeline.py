"""Sequential, layer-by-layer calibration (docs/algorithms.md, "Sequential calibration").

Fuse norms and fold rotations, install the online ops (activation and KV quantizers, R3, R4),
then for each decoder layer and each group of linears that share an input ("true sequential"):
run the layer on the calibration inputs up to that group (staged.py: each part of the layer
once), accumulate H from the group's (rotated, fake-quantized) input, solve each linear and
write back its quantized weight (a mixture of experts' experts one at a time, each from the
tokens routed to it; one no token reaches is rounded without data and reported). The quantized
layer's outputs become the next layer's inputs, so H carries all earlier error.
Methods that fit the full-precision trajectory (GPTAQ, QEP, ResComp) also run a full-precision
copy of each layer on the full-precision inputs in lockstep, batch by batch, and accumulate
D from the paired inputs: nothing per linear is cached. Only the current layer (and its copy)
sits on the compute device. With a ``CalibrationState`` (resume.py) the fitted activation clip
and every completed layer, with the trajectories feeding the next one, are saved as they are
reached, and a resumed run starts from them. With ``cfg.refine`` (refine.py) each layer's
weights are first refined by gradient against the full-precision layer, then solved. Under torchrun (distributed.py) each rank
calibrates on its shard of the samples, the statistics are summed over the ranks and each
linear is solved by one rank and broadcast. With an ``Offload`` (offload.py) the decoder
layers' linears are read from disk when their layer is reached and their quantized weights
written back to disk after it, so memory stays flat in depth.
"""

from __future__ import annotations

import copy
import functools
import logging
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from rotq.quant.act_clip import ClipSearchOptions, search_activation_clip, with_activation_clip
from rotq.quant.arch import decoder_layers, layer_linears
from rotq.quant.distributed import SINGLE, Ranks
from rotq.quant.heap import release_freed_heap
from rotq.quant.hessian import group_statistics
from rotq.quant.methods import RTN, MethodOptions, SolverPlan, parse_method, solve_plan
from rotq.quant.online import install_layer_ops, install_online_ops
from rotq.quant.prefix import attach_prefix
from rotq.quant.prefix_kv import PrefixKV
from rotq.quant.quantizer import QuantizedWeight, compact_codes
from rotq.quant.refine import RefineOptions, RefineReport, check_refine, refine_layer
from rotq.export.rotations_file import RotationMatrices
from rotq.quant.rotation import (apply_rotations, fuse_layer_norms, fuse_norms, rotate_layer,
                                 rotation_matrices)
from rotq.quant.scheme import Scheme
from rotq.quant.staged import StagedLayer
from rotq.quant.trajectory import disk_buffer, trajectory_buffer

if TYPE_CHECKING:
    from rotq.quant.offload import Offload
    from rotq.quant.resume import CalibrationState

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationConfig:
    """How to calibrate (not part of the scheme: recorded for provenance only)."""

    method: SolverPlan | str = "gptq"  # a plan, or a method string of methods.py ("gptq", "gptaq+foem")
    options: MethodOptions = field(default_factory=MethodOptions)
    act_quant_calibration: bool = True  # H sees activations/KV quantized as at inference
    batch_size: int = 8
    device: str = "cpu"
    # Methods that need the full-precision trajectory keep a second copy of the calibration
    # hidden states (nsamples x seqlen x hidden), and its layer's kept attention output
    # (staged.py); with a directory both live in memory-mapped files there (deleted at once,
    # freed when no longer used) instead of in RAM. CPU only.
    trajectory_dir: str | None = None
    # Fit the activation clip ratio on the calibration data before calibrating (act_clip.py);
    # None keeps the scheme's ratio.
    act_clip_search: ClipSearchOptions | None = None
    # Learned weight refinement of each layer before its linears are solved (refine.py).
    refine: RefineOptions = field(default_factory=RefineOptions)
    # Mixtures of experts: every token in every expert's statistics (staged.py), not only the
    # tokens routed to it; the forward routes truly either way.
    moe_all_tokens: bool = False

    def __post_init__(self):
        if isinstance(self.method, str):  # parsed once, here
            object.__setattr__(self, "method", parse_method(self.method))


@dataclass
class LinearReport:
    name: str
    seconds: float
    weight_rel_err: float  # ||W - Q||^2 / ||W||^2
    output_rel_err: float | None  # tr(dW H dW^T) / tr(W H W^T), when H was collected
    solver_loss: float | None


@dataclass
class ExpertTokens:
    """A mixture-of-experts layer's calibration tokens per expert (routed token slots, over
    every rank), and the experts no token reached, which were rounded without data (RTN)."""

    layer: int
    tokens: list[int]
    rounded_without_data: list[int]


@dataclass
class CalibrationReport:
    method: str
    nsamples: int
    seqlen: int
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    linears: list[LinearReport] = field(default_factory=list)
    act_clip_search: dict | None = None  # ClipSearchResult.to_dict() when the ratio was fitted
    refine: list[RefineReport] = field(default_factory=list)  # one per decoder layer, with --refine
    experts: list[ExpertTokens] = field(default_factory=list)  # one per mixture-of-experts layer

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QuantizedModel:
    """What export needs: the rotated model (quantized linears hold their dequantized values),
    its scheme (with any fitted activation clip ratio), and the integer form of every quantized
    linear, by module name."""

    model: nn.Module
    scheme: Scheme
    weights: dict[str, QuantizedWeight]
    report: CalibrationReport
    prefix: PrefixKV | None = None  # the full-precision prefix in the rotated model's basis


def prepare_model(model: nn.Module, scheme: Scheme, rotations: RotationMatrices | None = None,
                  layers: bool = True) -> None:
    """Fold norms and offline rotations (when the scheme rotates; ``rotations``: the learned
    R1/R2 of kind "spinquant") and install the online ops; ``layers=False`` leaves the decoder
    layers' weights to :class:`_LayerStream` (they are still on disk)."""
    if scheme.rotation.kind != "none":
        fuse_norms(model, layers)
        apply_rotations(model, scheme.rotation, rotations, layers)
    install_online_ops(model, scheme)


class _LayerStream:
    """Entering and leaving a decoder layer: nothing for a model in memory; with an Offload,
    read the layer's linears from disk and fold norms and rotations into them on entry, and on
    leaving write its quantized weights to disk and free the linears."""

    def __init__(self, model: nn.Module, scheme: Scheme, rotations, offload: Offload | None):
        self.config, self.rotation, self.offload = model.config, scheme.rotation, offload
        self.matrices = None
        if offload is not None and scheme.rotation.kind != "none":
            self.matrices = rotation_matrices(model.config, scheme.rotation, rotations)

    def enter(self, i: int, layer: nn.Module) -> None:
        if self.offload is None:
            return
        self.offload.source.load(i, layer, self.config)
        if self.rotation.kind != "none":
            fuse_layer_norms(layer)
            rotate_layer(layer, i, self.config, self.rotation, self.matrices)

    def leave(self, i: int, layer: nn.Module) -> None:
        if self.offload is None:
            return
        self.offload.source.release(layer)
        self.offload.weights.spill(f"layer-{i:05d}")


@torch.no_grad()
def calibrate(model: nn.Module, scheme: Scheme, calib_ids: torch.Tensor | None,
              cfg: CalibrationConfig = CalibrationConfig(),
              rotations: RotationMatrices | None = None,
              state: CalibrationState | None = None, ranks: Ranks = SINGLE,
              offload: Offload | None = None, prefix: PrefixKV | None = None) -> QuantizedModel:
    """Quantize ``model`` in place (weights become their dequantized quantized values) and
    leave it computing the scheme's online ops. ``calib_ids`` [N, L] may be None for RTN;
    ``rotations`` are the learned R1/R2 a "spinquant" scheme folds (spinquant.py); ``state``
    saves progress after each layer and, when it holds completed layers, skips them; ``ranks``:
    this process's place among torchrun's (every rank passes the same ``calib_ids``); ``offload``:
    the decoder layers' linears are on disk (offload.py) and the quantized weights go there;
    ``prefix``: the full-precision prefix (prefix.py, computed on the model before rotation) that
    every sequence then has in its past, in calibration as at inference; the scheme must name it."""
    plan = cfg.method
    check_refine(cfg.refine, ranks.distributed)
    n, seqlen = (0, 0) if calib_ids is None else tuple(calib_ids.shape)
    report = CalibrationReport(plan.name, n, seqlen)
    result = QuantizedModel(model, scheme, {} if offload is None else offload.weights, report)
    # An interrupted run's seconds count too: the clock starts that much earlier.
    clock = time.perf_counter() - (state.report["seconds"] if state is not None else 0.0)
    if (prefix is None) != (scheme.prefix is None):
        raise ValueError("the scheme's prefix and the prefix K/V passed to calibrate must be given together")
    prepare_model(model, scheme, rotations, layers=offload is None)
    if prefix is not None:
        result.prefix = rotated_prefix(model.config, scheme, prefix, rotations)
        attach_prefix(model, result.prefix)
    stream = _LayerStream(model, scheme, rotations, offload)
    if cfg.act_clip_search is not None:
        report.act_clip_search = _fit_activation_clip(model, scheme, calib_ids, cfg.act_clip_search, state, ranks,
                                                      cfg.device)
        scheme = result.scheme = with_activation_clip(scheme, report.act_clip_search["clip_ratio"])
        install_online_ops(model, scheme)  # the search leaves them installed; a restored fit does not
        logger.info("activation clip ratio fitted on calibration data: %s", report.act_clip_search["clip_ratio"])
    checkpoint = _Checkpoint(state, result, clock, offload)
    if plan.needs_data or cfg.refine.enabled:
        if calib_ids is None:
            raise ValueError(f"method {plan.name!r} (or --refine) needs calibration data")
        if not cfg.act_quant_calibration:
            install_online_ops(model, _without_quantizers(scheme))
        ranks.check_shardable(n, cfg.batch_size, "calibration sequences")
        _calibrate_sequential(result, calib_ids, cfg, plan, checkpoint, ranks, stream)
        install_online_ops(model, scheme)
    else:
        layers = decoder_layers(model)
        bar = _layer_bar(layers, checkpoint.start, f"Quantizing ({plan.name})", ranks)
        for i, layer in enumerate(bar, checkpoint.start):
            stream.enter(i, layer)
            _solve_group(i, list(layer_linears(layer)), layer, None, None, cfg, result, ranks)
            checkpoint.save(i, layer)
            stream.leave(i, layer)
    report.seconds = time.perf_counter() - clock
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def rotated_prefix(config, scheme: Scheme, prefix: PrefixKV, rotations: RotationMatrices | None = None) -> PrefixKV:
    """The prefix's K/V as the scheme's rotated model computes them (R3 on K, R2 on V)."""
    matrices = rotation_matrices(config, scheme.rotation, rotations) if scheme.rotation.r2 else None
    return prefix.rotated(scheme.rotation.r3, None if matrices is None else matrices.R2)


def _fit_activation_clip(model, scheme, calib_ids, options, state, ranks, device: str) -> dict:
    """ClipSearchResult.to_dict() of the clip search, or of the interrupted run's search. The
    search runs the whole model, on ``device`` (then back on the CPU, where calibration keeps it)."""
    if state is not None and state.act_clip_search is not None:
        return state.act_clip_search
    model.to(device)
    try:
        fit = search_activation_clip(model, scheme, calib_ids, options, ranks).to_dict()
    finally:
        model.to("cpu")
    if state is not None:
        state.save_act_clip_search(fit)
    return fit


class _Checkpoint:
    """The pipeline's side of a CalibrationState (or of none): restores the completed layers
    into ``result`` on creation (``start``: the first layer to calibrate) and saves each new one.
    Under an Offload the state keeps a layer's integer weights and its other tensors, not its
    float linears (which are on disk in the checkpoint and no longer needed)."""

    def __init__(self, state: CalibrationState | None, result: QuantizedModel, clock: float,
                 offload: Offload | None = None):
        self.state, self.result, self.clock, self.start = state, result, clock, 0
        self.offloaded = offload is not None
        if state is not None and state.layers_done:
            for i, weights in enumerate(state.restore_layers(decoder_layers(result.model), not self.offloaded)):
                result.weights.update(weights)
                if self.offloaded:
                    offload.weights.spill(f"layer-{i:05d}")
            result.report.linears = [LinearReport(**r) for r in state.report["linears"]]
            result.report.refine = [RefineReport(**r) for r in state.report.get("refine", [])]
            result.report.experts = [ExpertTokens(**r) for r in state.report.get("experts", [])]
            self.start = state.layers_done

    def save(self, i: int, layer: nn.Module, inps=None, fp_inps=None) -> None:
        if self.state is None:
            return
        prefix = f"model.layers.{i}."  # keys first: under --offload reading a value loads its layer's file
        weights = {k: self.result.weights[k] for k in list(self.result.weights) if k.startswith(prefix)}
        report = {"seconds": time.perf_counter() - self.clock,
                  "linears": [asdict(r) for r in self.result.report.linears],
                  "refine": [asdict(r) for r in self.result.report.refine],
                  "experts": [asdict(r) for r in self.result.report.experts]}
        self.state.save_layer(i, layer, weights, report, inps, fp_inps, linears=not self.offloaded)


def _layer_bar(layers, start: int, desc: str, ranks: Ranks):
    """tqdm over the layers from ``start`` on, counting the ones a resumed run skips (rank 0's only)."""
    return tqdm(layers[start:], desc=desc, unit="layer", initial=start, total=len(layers), disable=not ranks.is_main)


def _without_quantizers(scheme: Scheme) -> Scheme:
    """The full-precision model's online ops: the rotations only."""
    return scheme.replace(activations=None, kv_cache=None)


def _calibrate_sequential(result: QuantizedModel, calib_ids, cfg, plan, checkpoint: _Checkpoint, ranks: Ranks,
                          stream: _LayerStream) -> None:
    model, scheme, report = result.model, result.scheme, result.report
    fp_trajectory = plan.needs_fp_trajectory
    installed = scheme if cfg.act_quant_calibration else _without_quantizers(scheme)
    device = torch.device(cfg.device)
    if checkpoint.start:
        inps, fp_inps = checkpoint.state.load_activations(device)
    else:
        shard = calib_ids[ranks.shard(calib_ids.shape[0], cfg.batch_size)]
        inps = fp_inps = _embed(model, shard, cfg.batch_size, device)
    fp_inps = trajectory_buffer(fp_inps, cfg.trajectory_dir) if fp_trajectory else None
    position_ids = torch.arange(calib_ids.shape[1], device=device).unsqueeze(0)
    rotary = model.model.rotary_emb.to(device)
    position_embeddings = rotary(inps[:1], position_ids)
    forward = dict(position_ids=position_ids, position_embeddings=position_embeddings,
                   attention_mask=None, use_cache=False)
    layers = decoder_layers(model)
    bar = _layer_bar(layers, checkpoint.start, f"Calibrating ({plan.name})", ranks)
    for i, layer in enumerate(bar, checkpoint.start):
        stream.enter(i, layer)
        layer.to(device)
        fp_layer = None
        if fp_trajectory or cfg.refine.enabled:  # copied before refinement changes the weights
            fp_layer = _full_precision_copy(layer, scheme)
        if cfg.refine.enabled:
            ahead = [_full_precision_copy(block, scheme).to(device)
                     for block in layers[i + 1:i + 1 + cfg.refine.cross_layer]]
            report.refine.append(refine_layer(i, layer, fp_layer, ahead, inps, fp_inps, forward, scheme, installed,
                                              cfg.refine, cfg.batch_size, ranks.is_main))
            logger.info("layer %d refined (%s): loss %.4g -> %.4g, %.1fs", i, cfg.refine.kind,
                        report.refine[-1].loss_start, report.refine[-1].loss_end, report.refine[-1].seconds)
            del ahead
            if not fp_trajectory:  # only the refinement needed it: free it before the solves
                fp_layer = None
        staged = StagedLayer(layer, inps, forward, cfg.batch_size, all_tokens=cfg.moe_all_tokens)
        fp_staged = None
        if fp_trajectory:  # its kept attention output lives where the trajectory does
            allocate = None
            if cfg.trajectory_dir is not None:
                allocate = functools.partial(disk_buffer, dtype=fp_inps.dtype, directory=cfg.trajectory_dir)
            fp_staged = StagedLayer(fp_layer, fp_inps, forward, cfg.batch_size, allocate, routing=staged,
                                    all_tokens=cfg.moe_all_tokens)
        without_data = []
        for g, group in enumerate(staged.groups):
            H = D = None
            if plan.needs_data:
                size = layer.get_submodule(group[0]).in_features if staged.moe else None
                H, D = group_statistics(staged.group_inputs(g), inps.shape[0],
                                        fp_staged.group_inputs(g) if fp_staged else None, ranks, size)
                tokens = staged.statistics_tokens(g)
                if tokens is not None and ranks.sum(tokens)[0] == 0:  # an expert no token reached
                    H = D = None
                    without_data.append(group)
                if staged.moe and g >= 2:
                    bar.set_postfix(expert=f"{(g - 2) // 2 + 1}/{(len(staged.groups) - 2) // 2}")
            _solve_group(i, group, layer, H, D, cfg, result, ranks)
        if staged.moe and staged.routed is not None:
            tokens = [int(t) for t in ranks.sum(*[len(t) for t in staged.routed])]
            rounded = sorted({(g - 2) // 2 for g, group in enumerate(staged.groups) if group in without_data})
            report.experts.append(ExpertTokens(i, tokens, rounded))
            if rounded:
                logger.warning("layer %d: no calibration token reached expert(s) %s; rounded without data (RTN)%s",
                               i, rounded, "" if cfg.moe_all_tokens else "; --moe-all-tokens gives them statistics")
        staged.propagate()
        if fp_staged:
            fp_staged.propagate()
        layer.to("cpu")
        checkpoint.save(i, layer, inps, fp_inps)
        stream.leave(i, layer)
        release_freed_heap()  # the layer's transients, or the heap grows fragmented layer by layer
        if report.linears[-1].output_rel_err is not None:
            bar.set_postfix(out_err=f"{report.linears[-1].output_rel_err:.3g}")
    rotary.to("cpu")


def _full_precision_copy(layer: nn.Module, scheme: Scheme) -> nn.Module:
    """A copy of a decoder layer computing in full precision: the scheme's rotations, no quantizers."""
    fp_layer = copy.deepcopy(layer)
    install_layer_ops(fp_layer, _without_quantizers(scheme))
    return fp_layer


def _embed(model, calib_ids, batch_size, device) -> torch.Tensor:
    emb = model.model.embed_tokens
    return torch.cat([emb(b).to(device) for b in calib_ids.split(batch_size)])


def _solve_group(i: int, group, layer: nn.Module, H, D, cfg, qmodel: QuantizedModel, ranks: Ranks) -> None:
    """Solve the linears ``group`` of layer i (which share H and D) and write their quantized
    weights: each rank solves its round-robin share first, then every result is broadcast."""
    linears = layer_linears(layer)
    first = len(qmodel.report.linears)  # the same on every rank: spreads the solves evenly
    mine = {name: _solve_linear(f"model.layers.{i}.{name}", linears[name], H, D, cfg, qmodel.scheme)
            for j, name in enumerate(group) if ranks.owner(first + j) == ranks.rank}
    for j, name in enumerate(group):
        solved = ranks.broadcast(mine.get(name), ranks.owner(first + j))
        lin = linears[name]
        # in place: a weight still backed by the checkpoint's memory-mapped file turns into private
        # memory page by page, instead of keeping the file's pages resident beside a new copy
        lin.weight.data.copy_(solved.Q)
        qmodel.weights[solved.report.name] = solved.weight
        qmodel.report.linears.append(solved.report)


@dataclass
class _Solved:
    """One linear's solution, on the CPU (it may travel to other ranks)."""

    Q: torch.Tensor  # the dequantized quantized weight
    weight: QuantizedWeight
    report: LinearReport


def _solve_linear(name, lin: nn.Linear, H, D, cfg, scheme: Scheme) -> _Solved:
    t0 = time.perf_counter()
    W = lin.weight.data.float()
    to_w = lambda S: None if S is None else S.to(W.device, torch.float32)  # noqa: E731
    Hs = to_w(H)
    plan = cfg.method if Hs is not None or not cfg.method.needs_data else RTN  # a MoE expert without tokens
    result = solve_plan(plan, W, Hs, to_w(D), scheme.weights, cfg.options, name)
    q = result.quantized  # codes kept in one byte each until export: a quarter of float32's memory
    weight = QuantizedWeight(compact_codes(q.codes.cpu()), q.scale.cpu(),
                             None if q.zero_point is None else q.zero_point.cpu(), q.group_size)
    dW = W - result.Q
    w_err = float(dW.square().sum(dtype=torch.float64) / W.square().sum(dtype=torch.float64).clamp_min(1e-30))
    out_err = None
    if Hs is not None:  # float32 products, float64 sums: the float64 products cost a third of a big solve
        out_err = float((dW @ Hs * dW).sum(dtype=torch.float64)
                        / (W @ Hs * W).sum(dtype=torch.float64).clamp_min(1e-30))
    seconds = time.perf_counter() - t0
    loss = None if result.loss != result.loss else result.loss  # NaN -> None (RTN)
    logger.info("%s: weight err %.3g, output err %s, %.2fs", name, w_err,
                "n/a" if out_err is None else f"{out_err:.3g}", seconds)
    return _Solved(result.Q.to("cpu", lin.weight.dtype), weight, LinearReport(name, seconds, w_err, out_err, loss))
