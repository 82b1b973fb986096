"""The Python API of the calibration stage: ``quantize`` a model into a checkpoint vLLM serves.

    from rotq.quant import quantize
    quantize("smollm2-135m", "out", scheme="w4a16", method="rtn", nsamples=8, seqlen=256)

``recipe`` is a :class:`~rotq.quant.recipe.Recipe`, a mapping of option names, or the path of a
YAML/JSON recipe; keyword overrides take precedence, with the same names. The command line
(`rotq quantize`) is a thin layer over this function and writes the same bytes.
Mistakes in the input raise :class:`~rotq.quant.errors.RotqError` before any work, and OUT is
written atomically (all or nothing). Progress is saved after each decoder layer in a state
directory, so that ``resume=True`` continues an interrupted run (resume.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from rotq.quant.errors import RotqError
from rotq.quant.recipe import Recipe, flag
from rotq.quant.scheme import PrefixArgs

logger = logging.getLogger(__name__)


def make_recipe(recipe: Recipe | Mapping | str | Path | None = None, **overrides) -> Recipe:
    """A Recipe from any of the accepted forms, with ``overrides`` applied (None: not given)."""
    if recipe is None:
        base = Recipe()
    elif isinstance(recipe, Recipe):
        base = recipe
    elif isinstance(recipe, Mapping):
        base = Recipe.from_mapping(recipe)
    elif isinstance(recipe, (str, Path)):
        base = Recipe.from_file(recipe)
    else:
        raise RotqError(f"recipe must be a Recipe, a mapping or a file path, got {type(recipe).__name__}")
    return base.override(**overrides)


def quantize(model: str | Path, output: str | Path, recipe: Recipe | Mapping | str | Path | None = None, *,
             resume: bool = False, state_dir: str | Path | None = None, report: str | Path | None = None,
             **overrides) -> Path:
    """Rotate and calibrate ``model`` (a Hugging Face directory, hub id or builtin name such as
    "smollm2-135m") and write the quantized checkpoint to ``output`` (which must not exist).
    ``report``: also write the calibration report JSON there. Returns ``output``."""
    from rotq.export.atomic import check_output_dir
    from rotq.export.compressed_tensors import check_exportable
    from rotq.quant.distributed import init_from_env, shutdown
    from rotq.quant.resume import check_state_dir, default_state_dir

    r = make_recipe(recipe, **overrides).resolved()
    out = Path(output)
    scheme = r.build_scheme()
    if r.format == "compressed-tensors":
        check_exportable(scheme)
    check_output_dir(out)
    state_dir = Path(state_dir) if state_dir is not None else default_state_dir(out)
    check_state_dir(state_dir, resume)
    if r.rotation_file is not None and not Path(r.rotation_file).is_file():
        from rotq.export.rotations_file import ROTATIONS_FILE

        raise RotqError(f"rotation file {r.rotation_file} does not exist; pass OUT/{ROTATIONS_FILE} of an earlier "
                        "`rotq quantize --rotation spinquant` output")
    ranks, device = init_from_env(r.device)
    try:
        if ranks.distributed and resume:
            raise RotqError("--resume works in one process only: calibration state is not saved under torchrun; "
                            "drop --resume or run without torchrun")
        with _offload_scratch(r.offload, ranks) as scratch:
            _calibrate_and_write(str(model), out, r, scheme, ranks, device, scratch, resume, state_dir, report)
    finally:
        shutdown(ranks)
    return out


def _calibrate_and_write(spec: str, out: Path, r: Recipe, scheme, ranks, device: str, scratch: Path | None,
                         resume: bool, state_dir: Path, report_path) -> None:
    from rotq.quant.act_clip import ClipSearchOptions
    from rotq.export.compressed_tensors import check_exportable
    from rotq.quant.arch import decoder_layers, release_linears, router_names
    from rotq.quant.data import calibration_batches, load_text, tokenize_text
    from rotq.quant.evaluation import check_seqlen
    from rotq.quant.models import resolve_model_dir
    from rotq.quant.pipeline import CalibrationConfig, calibrate

    learning = r.spinquant_options(device)
    torch.manual_seed(r.seed)
    text = load_text(r.calib, "train") if r.needs_data else None
    model_dir = resolve_model_dir(spec)
    model, tokenizer, offload = _load(model_dir, scratch)
    scheme = scheme.replace(ignore=(*scheme.ignore, *router_names(model)))  # a MoE's routers stay 16-bit
    check_group_size_fits(model, scheme)
    check_rotation_sizes(model.config, scheme)
    if r.format == "compressed-tensors":
        check_exportable(scheme, model.config)
    check_seqlen(model.config, r.seqlen)
    calib_ids = None
    if text is not None:
        calib_ids = calibration_batches(tokenize_text(tokenizer, text), r.nsamples, r.seqlen, r.seed)
    state = None if ranks.distributed else _open_state(state_dir, resume, r, model_dir, calib_ids,
                                                       len(decoder_layers(model)))
    prefix, prefix_info = _prefix(model, tokenizer, calib_ids, r, offload)
    if prefix is not None:
        scheme = scheme.replace(prefix=PrefixArgs(prefix.token_ids))
    rotations, rotation_info = _rotations(model, scheme, calib_ids, r, learning, state, ranks, prefix)
    cfg = CalibrationConfig(method=r.plan, act_quant_calibration=r.calib_act_quant, batch_size=r.batch_size,
                            device=device, trajectory_dir=r.trajectory_dir,
                            act_clip_search=ClipSearchOptions() if r.fits_activation_clip else None,
                            refine=r.refine_options(), options=r.method_options(), moe_all_tokens=r.moe_all_tokens)
    result = calibrate(model, scheme, calib_ids, cfg, rotations=rotations, state=state, ranks=ranks,
                       offload=offload, prefix=prefix)
    scheme = result.scheme
    options = r.to_dict() | {"a_clip": scheme.activations.clip_ratio if r.fits_activation_clip else r.a_clip}
    provenance = {"model": spec, "options": options}
    if rotation_info is not None:
        provenance["rotations"] = rotation_info
    if prefix_info is not None:
        provenance["prefix"] = prefix_info
    if ranks.distributed:
        provenance["processes"] = ranks.world
    full_report = {"provenance": provenance, **result.report.to_dict()}
    if not ranks.is_main:
        ranks.barrier()  # rank 0 writes OUT
        return
    for layer in decoder_layers(model):  # export packs the integer weights: free the float copies
        release_linears(layer)
    _export(out, r, model, result.weights, tokenizer, scheme, full_report, rotations, model_dir,
            "5GB" if offload is None else "1GB", result.prefix)  # a shard is assembled in memory before it is written
    if report_path is not None:
        Path(report_path).write_text(json.dumps(full_report, indent=2) + "\n")
    if state is not None:
        state.remove()
    ranks.barrier()
    logger.info("wrote %s in %.0f s, peak RSS %.0f MB", out, result.report.seconds, result.report.peak_rss_mb)


def _load(model_dir: Path, scratch: Path | None):
    """(model, tokenizer, Offload or None): in memory, or with its decoder layers left on disk."""
    from rotq.quant.models import load_model
    from rotq.quant.offload import Offload, OffloadedWeights, load_model_offloaded

    if scratch is None:
        return *load_model(str(model_dir)), None
    model, tokenizer, source = load_model_offloaded(model_dir)
    return model, tokenizer, Offload(source, OffloadedWeights(scratch))


def _export(out: Path, r: Recipe, model, weights, tokenizer, scheme, report: dict, rotations, model_dir: Path,
            shard: str, prefix=None) -> None:
    from rotq.export import model_card
    from rotq.export.compressed_tensors import save_compressed_tensors
    from rotq.export.rotq_format import save_rotq
    from rotq.quant.models import base_model_id

    card = model_card.ModelCard(
        base_model=base_model_id(report["provenance"]["model"], model_dir), scheme=scheme, scheme_name=r.scheme,
        format=r.format, recipe=r.portable(), method=r.method, rotation=r.rotation,
        calibration={"text": r.calib, "nsamples": r.nsamples, "seqlen": r.seqlen, "seed": r.seed})
    files = {"README.md": model_card.render(card)}
    if r.format == "rotq":
        save_rotq(model, weights, tokenizer, scheme, out, report=report, rotations=rotations, max_shard_size=shard,
                  files=files, prefix=prefix)
    else:
        save_compressed_tensors(model, weights, tokenizer, scheme, out, max_shard_size=shard, files=files)


def check_group_size_fits(model, scheme) -> None:
    """A weight group size must divide every quantized linear's input size."""
    from rotq.quant.arch import decoder_layers, layer_linears

    G = scheme.weights.group_size
    if G is None:
        return
    sizes = {lin.in_features for layer in decoder_layers(model) for lin in layer_linears(layer).values()}
    bad = sorted(k for k in sizes if k % G)
    if bad:
        raise RotqError(f"weight group size {G} does not divide input size(s) {bad} of this model; use a group "
                        "size that divides them (e.g. 64 or 32) or 0 for per-channel")


def check_rotation_sizes(config, scheme) -> None:
    """Every rotation the scheme applies needs a Hadamard matrix of its size: fail before any
    work (not with a traceback mid-run) when this model has a size rotq cannot build."""
    rot = scheme.rotation
    if rot.kind == "none":
        return
    from rotq.quant.hadamard import split_size

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    sizes = {"hidden size (R1)": config.hidden_size}
    if rot.r2 or rot.r3:
        sizes["head dimension (R2/R3)"] = head_dim
    if rot.r4:
        sizes["intermediate size (R4)"] = config.intermediate_size
        if getattr(config, "moe_intermediate_size", None):  # Qwen3-MoE's experts (Mixtral's: intermediate_size)
            sizes["expert intermediate size (R4)"] = config.moe_intermediate_size
    bad = {name: n for name, n in sizes.items() if split_size(n) is None}
    if bad:
        listed = ", ".join(f"{name} {n}" for name, n in bad.items())
        raise RotqError(f"no Hadamard matrix of the {listed} of this model: rotq builds sizes K * 2^m with K = 1 "
                        "or a Paley order (12, 20, 28, 36, 44, ...); use --rotation none")


def _open_state(state_dir: Path, resume: bool, r: Recipe, model_dir: Path, calib_ids, num_layers: int):
    """The run's CalibrationState: resumed (when asked and one exists) or new."""
    from rotq.quant.resume import CalibrationState, fingerprint

    # Every option that can change OUT or the state; --trajectory-dir only moves a buffer from RAM
    # to disk, and --offload's folder is scratch (whether layers stream from disk is recorded).
    options = {flag(k): v for k, v in r.to_dict().items() if k != "trajectory_dir"}
    options["--offload"] = r.offload is not None
    state = CalibrationState.open(state_dir, fingerprint(options, model_dir, calib_ids,
                                                         {"rotation file": r.rotation_file}), resume)
    if state.resumed:
        print(f"rotq: resuming from {state_dir}: {state.layers_done} of {num_layers} layers done", file=sys.stderr)
    elif resume:
        print(f"rotq: no calibration state in {state_dir}; starting from the first layer", file=sys.stderr)
    return state


def _prefix(model, tokenizer, calib_ids, r: Recipe, offload):
    """(PrefixKV or None, what the report records): the full-precision prefix (prefix.py), chosen
    from the calibration data's outlier statistics (``auto``) or given as token ids, computed on
    the model as loaded (before any rotation)."""
    from rotq.quant.prefix import choose_prefix, compute_prefix_kv, outliers_with_prefix

    wanted = r.prefix_tokens
    if wanted == "none":
        return None, None
    source = None if offload is None else offload.source
    started = time.perf_counter()
    info, left = {"source": "given"}, None
    if wanted == "auto":
        choice = choose_prefix(model, calib_ids, tokenizer, source)
        info = {"source": "auto", **choice.to_dict()}
        if not choice.token_ids:
            return None, info
        wanted, left = choice.token_ids, choice.outliers_left
    prefix = compute_prefix_kv(model, wanted, source)
    info["token_ids"] = list(wanted)
    info["tokens"] = [tokenizer.decode([t]) for t in wanted]
    if left is None and calib_ids is not None:  # not measured by the choice already
        left = outliers_with_prefix(model, calib_ids, prefix, source)
    if left is not None:
        info["outliers_per_sequence_with_prefix"] = round(left, 3)
    info["seconds"] = round(time.perf_counter() - started, 1)
    logger.info("full-precision prefix %s (%s)", info["token_ids"], info["tokens"])
    return prefix, info


def _rotations(model, scheme, calib_ids, r: Recipe, learning, state, ranks, prefix=None):
    """(R1/R2 to fold, provenance) for spinquant: learned (or the ones an interrupted run learned,
    from ``state``), or read from the rotation file; (None, None) for the other rotations."""
    from rotq.export.rotations_file import load_rotations
    from rotq.quant.spinquant import learn_rotations

    if r.rotation != "spinquant":
        return None, None
    if state is not None and state.rotation_info is not None:
        return state.load_rotations(model.config), state.rotation_info
    if learning is None:
        return load_rotations(Path(r.rotation_file), model.config), {"source": "file", "file": r.rotation_file}
    result = learn_rotations(model, scheme, calib_ids, learning, ranks, prefix)
    losses = result.losses
    info = {"source": "learned", "steps": learning.steps, "lr": learning.lr,
            "samples_per_step": learning.samples_per_step, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "seconds": round(result.seconds, 1)}
    logger.info("learned R1/R2 in %d steps: loss %s -> %s", learning.steps, info["first_loss"], info["last_loss"])
    if state is not None:
        state.save_rotations(result.rotations, info)
    return result.rotations, info


@contextlib.contextmanager
def _offload_scratch(directory: str | None, ranks):
    """A fresh folder under the offload DIR for this run's (this rank's) quantized layers,
    removed when the run ends, whether it succeeds or not."""
    if directory is None:
        yield None
        return
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=directory, prefix=f"rotq-offload-rank{ranks.rank}-"))
    except OSError as e:
        raise RotqError(f"cannot use --offload {directory}: {e.strerror}") from None
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
