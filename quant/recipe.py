"""The recipe of a `rotq quantize` run: every option, its default, and its checks, in one place.

A YAML/JSON recipe file, the command-line flags and the Python API (``quantize(..., **overrides)``)
all build a :class:`Recipe`, so the three cannot disagree. Options whose default depends on the
scheme (rotation, method, activation clip) are ``None`` until :meth:`Recipe.resolved` fills them
from the policy below; the method hyperparameters stay ``None`` for "the method's own default",
which lives in that method's options dataclass (gptaq.py, foem.py, qep.py, rescomp.py).
The defaults come from the ablations in benchmarks/RESULTS.md (docs/research-log.md has the runs).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from rotq.quant.errors import RotqError
from rotq.quant.foem import DEFAULT_ALPHA, DEFAULT_BETA, FOEMOptions
from rotq.quant.gptaq import GPTAQOptions
from rotq.quant.gptq import GPTQOptions
from rotq.quant.methods import MethodOptions, SolverPlan, parse_method
from rotq.quant.prefix import parse_prefix
from rotq.quant.qep import QEPOptions
from rotq.quant.refine import REFINE_KINDS, RefineOptions
from rotq.quant.rescomp import ResCompOptions
from rotq.quant.scheme import PRESETS, ROTATION_KINDS, UNROTATED_CLIP_MAX_SHRINK, KVCacheArgs, Scheme, WeightArgs, preset
from rotq.quant.spinquant import SpinQuantOptions

FORMATS = ("rotq", "compressed-tensors")
# Keyed by "does the scheme quantize activations?". With activations (and KV) quantized, QEP's
# pre-correction + GPTQ was best, on SpinQuant's learned rotation with the clip fitted on the
# calibration data; weight-only, GPTAQ beat GPTQ (W4A16 and W3A16) on the Hadamard rotation.
DEFAULT_ROTATION = {True: "spinquant", False: "hadamard"}
DEFAULT_METHOD = {True: "qep+gptq", False: "gptaq"}
DEFAULT_A_CLIP = {True: "auto", False: None}  # None: 16-bit activations have no clip
# A full-precision prefix of the sink tokens (prefix.py) where activations are quantized: their
# massive activations are what 4-bit activations handle worst. compressed-tensors cannot carry it.
DEFAULT_PREFIX = {True: "auto", False: "none"}

# Option groups, in the order `rotq quantize --help` lists them.
GROUPS = ("scheme", "rotation", "method", "calibration data", "memory and devices", "experimental")


def _opt(default, help: str, group: str, kind: type | str | None = None, shown: str | None = None):
    """A recipe field: ``kind`` is the value's type (default: the default's), ``shown`` the
    default as --help states it when the field's own default is None (a policy or the method's)."""
    return field(default=default, metadata={"help": help, "group": group,
                                            "kind": kind or type(default), "shown": shown})


def _by_activations(table: dict) -> str:
    return f"{table[True]} where activations are quantized, else {table[False]}"


@dataclass(frozen=True)
class Recipe:
    """Every option of a calibration run (see ``rotq quantize --help`` for each one's meaning)."""

    scheme: str = _opt("w4a4kv4", f"preset: {' | '.join(PRESETS)}", "scheme")
    w_bits: int | None = _opt(None, "override the scheme's weight bits", "scheme", int, "the scheme's")
    w_group_size: int | None = _opt(None, "weight group size, 0 = one scale per output channel", "scheme", int,
                                    "the scheme's (per channel)")
    w_asym: bool | None = _opt(None, "asymmetric weights (integer zero point)", "scheme", bool, "symmetric")
    w_clip_max_shrink: float | None = _opt(None, "weight clip search tries range shrinks p in [1 - this, 1]",
                                           "scheme", float, f"{WeightArgs.clip_max_shrink} with a rotation, "
                                           f"{UNROTATED_CLIP_MAX_SHRINK} without")
    a_clip: float | str | None = _opt(None, "activation clip ratio in (0, 1], or auto: the ratio with the lowest "
                                      "loss on the calibration data (weights in full precision)", "scheme", "a_clip",
                                      "auto where activations are quantized")
    kv_clip: float | None = _opt(None, "KV-cache clip ratio in (0, 1]", "scheme", float, str(KVCacheArgs.clip_ratio))
    prefix: str | None = _opt(None, "full-precision attention prefix of sink tokens: auto (chosen from outlier "
                              "statistics of the calibration data) | none | comma-separated token ids", "scheme",
                              str, "auto where activations are quantized (rotq format), else none")
    format: str = _opt("rotq", "rotq (the rotq vLLM plugin, every scheme) | compressed-tensors (stock vLLM; "
                       "symmetric W4A16/W4A4/W8A8 without KV quantization)", "scheme")

    rotation: str | None = _opt(None, f"{' | '.join(ROTATION_KINDS)}", "rotation", str,
                                _by_activations(DEFAULT_ROTATION))
    rotation_steps: int | None = _opt(None, "spinquant: Cayley SGD steps on the calibration data", "rotation", int,
                                      str(SpinQuantOptions.steps))
    rotation_lr: float | None = _opt(None, "spinquant: initial learning rate, cosine decay", "rotation", float,
                                     str(SpinQuantOptions.lr))
    rotation_samples: int | None = _opt(None, "spinquant: calibration sequences per step (split across torchrun's "
                                        "processes)", "rotation", int, str(SpinQuantOptions.samples_per_step))
    rotation_file: str | None = _opt(None, "spinquant: reuse the R1/R2 of an earlier output's "
                                     "spinquant/rotations.safetensors instead of learning", "rotation", str, "learn")

    method: str | None = _opt(None, "rtn | gptq | gptaq | foem | qep | rescomp, or a combination such as "
                              "qep+gptq, gptaq+foem", "method", str, _by_activations(DEFAULT_METHOD))
    gptaq_alpha: float | None = _opt(None, "GPTAQ's asymmetric term (gptaq, gptaq+foem, rescomp)", "method", float,
                                     f"{GPTAQOptions.alpha}; gptaq+foem: "
                                     + ", ".join(f"{a} ({v})" for v, a in DEFAULT_ALPHA.items()))
    foem_variant: str | None = _opt(None, "FOEM's first-order term: 6b (GPTQModel's) | 6a (the paper's)", "method",
                                    str, "6b")
    foem_beta: float | None = _opt(None, "FOEM's beta (0 is GPTQ)", "method", float,
                                   ", ".join(f"{b} ({v})" for v, b in DEFAULT_BETA.items()))
    qep_alpha: float | None = _opt(None, "fraction of QEP's correction applied (0 is off)", "method", float,
                                   str(QEPOptions.alpha))
    rescomp_alpha2: float | None = _opt(None, "ResComp's compensation-aware term", "method", float,
                                        str(ResCompOptions.alpha2))
    act_order: bool = _opt(GPTQOptions.act_order, "GPTQ act-order (columns by decreasing H_jj)", "method")
    percdamp: float = _opt(GPTQOptions.percdamp, "GPTQ damping, a fraction of mean(diag H)", "method")
    block_size: int = _opt(GPTQOptions.block_size, "GPTQ lazy-update block", "method")
    calib_act_quant: bool = _opt(True, "quantize activations and KV while collecting H", "method")
    moe_all_tokens: bool = _opt(False, "mixtures of experts: every calibration token in every expert's statistics "
                                "(the forward keeps the router's choice); off: each expert sees its routed tokens, "
                                "and one no token reaches is rounded (RTN)", "method")

    calib: str = _opt("wikisum", "wikisum (train split) | wikitext2 | PATH of a UTF-8 text file",
                      "calibration data")
    nsamples: int = _opt(64, "calibration sequences", "calibration data")
    seqlen: int = _opt(1024, "tokens per calibration sequence", "calibration data")
    seed: int = _opt(0, "seed of the sampling and of the random Hadamards", "calibration data")
    batch_size: int = _opt(8, "calibration sequences per forward", "calibration data")

    device: str = _opt("cpu", "compute device of the current layer: cpu | cuda | cuda:N", "memory and devices")
    offload: str | None = _opt(None, "memory flat in depth: read each decoder layer from the checkpoint when it "
                               "is reached, keep the quantized layers in a scratch folder under this DIR "
                               "(needs a fixed --a-clip and, for spinquant, --rotation-file)",
                               "memory and devices", str, "off")
    trajectory_dir: str | None = _opt(None, "keep the full-precision trajectory (gptaq, qep, rescomp) in a "
                                      "memory-mapped file in this DIR instead of RAM", "memory and devices", str,
                                      "RAM")

    refine: str = _opt("none", f"learned weight refinement before the method: {' | '.join(REFINE_KINDS)}. Measured "
                       "to hurt behind every compensator (W4A4KV4 GPTQ WikiText-2 44.76 -> 54.54), to help RTN",
                       "experimental")
    refine_steps: int | None = _opt(None, "refinement: AdamW steps per layer", "experimental", int,
                                    str(RefineOptions.steps))
    refine_lr: float | None = _opt(None, "refinement: initial learning rate, cosine decay", "experimental", float,
                                   str(RefineOptions.lr))
    cross_layer: int | None = _opt(None, "refinement: also match the output K layers ahead", "experimental", int,
                                   str(RefineOptions.cross_layer))

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f, getattr(self, f.name)))
        _check_values(self)

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "recipe") -> "Recipe":
        """A recipe from option names (underscores); unknown keys are an error naming them."""
        if not isinstance(values, Mapping):
            raise RotqError(f"{source} must be a mapping of option names to values, got {type(values).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise RotqError(f"{source} has unknown key(s) {unknown}; allowed: {sorted(names)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        """A YAML or JSON recipe file."""
        try:
            values = yaml.safe_load(Path(path).read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise RotqError(f"cannot read recipe {path}: {e}") from None
        return cls.from_mapping(values or {}, f"recipe {path}")

    def override(self, **changes) -> "Recipe":
        """This recipe with ``changes`` (None values are ignored: an unset flag)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        return Recipe.from_mapping(dataclasses.asdict(self) | changes, "options")

    def resolved(self) -> "Recipe":
        """The recipe with the scheme-dependent defaults filled in and the method in canonical form;
        every combination check runs here."""
        act = PRESETS[self.scheme].activations is not None
        resolved = dataclasses.replace(self, rotation=self.rotation or DEFAULT_ROTATION[act], method=self.plan.name,
                                       a_clip=_given(self.a_clip, DEFAULT_A_CLIP[act]),
                                       prefix=_given(self.prefix, DEFAULT_PREFIX[act and self.format == "rotq"]))
        _check_combinations(resolved)
        return resolved

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def portable(self) -> dict:
        """The options without those that only choose where memory lives on this machine (they
        leave the output bit for bit the same): what a model card records."""
        return {k: v for k, v in self.to_dict().items() if k not in ("offload", "trajectory_dir")}

    # -- what the recipe means ----------------------------------------------------------------

    @functools.cached_property
    def plan(self) -> SolverPlan:
        """The method, parsed once (``None``: the scheme's default)."""
        return parse_method(self.method or DEFAULT_METHOD[PRESETS[self.scheme].activations is not None])

    @property
    def fits_activation_clip(self) -> bool:
        return self.a_clip == "auto"

    @property
    def prefix_tokens(self) -> str | tuple[int, ...]:
        """"auto", "none" or the given token ids (of a resolved recipe)."""
        return parse_prefix(self.prefix or "none")

    @property
    def learns_rotations(self) -> bool:
        return self.rotation == "spinquant" and self.rotation_file is None

    @property
    def needs_data(self) -> bool:
        return (self.plan.needs_data or self.learns_rotations or self.fits_activation_clip or self.refine != "none"
                or self.prefix == "auto")

    def build_scheme(self) -> Scheme:
        """The Scheme the run calibrates for (before any fitted activation clip)."""
        scheme = preset(self.scheme, self.rotation or "none", self.seed)
        w = scheme.weights
        changes = {"weights": dataclasses.replace(
            w, bits=_given(self.w_bits, w.bits),
            group_size=(self.w_group_size or None) if self.w_group_size is not None else w.group_size,
            symmetric=(not self.w_asym) if self.w_asym is not None else w.symmetric,
            clip_max_shrink=_given(self.w_clip_max_shrink, w.clip_max_shrink))}
        if isinstance(self.a_clip, float):
            changes["activations"] = dataclasses.replace(scheme.activations, clip_ratio=self.a_clip)
        if self.kv_clip is not None and scheme.kv_cache is not None:
            changes["kv_cache"] = dataclasses.replace(scheme.kv_cache, clip_ratio=self.kv_clip)
        return scheme.replace(**changes)

    def method_options(self) -> MethodOptions:
        """The solvers' options; GPTAQ's alpha goes to the options of the solver that carries it
        (FOEMOptions in gptaq+foem, ResCompOptions in rescomp)."""
        solver, alpha = self.plan.solver, self.gptaq_alpha
        return MethodOptions(
            gptq=GPTQOptions(percdamp=self.percdamp, block_size=self.block_size, act_order=self.act_order),
            gptaq=GPTAQOptions(alpha=alpha) if alpha is not None and solver == "gptaq" else GPTAQOptions(),
            foem=FOEMOptions(variant=self.foem_variant or "6b", beta=self.foem_beta,
                             alpha=alpha if solver == "gptaq+foem" else None),
            qep=QEPOptions() if self.qep_alpha is None else QEPOptions(alpha=self.qep_alpha),
            rescomp=ResCompOptions(**{k: v for k, v in (("alpha", alpha if solver == "rescomp" else None),
                                                         ("alpha2", self.rescomp_alpha2)) if v is not None}))

    def spinquant_options(self, device: str) -> SpinQuantOptions | None:
        """How to learn R1/R2, or None when they are not learned."""
        if not self.learns_rotations:
            return None
        learn = {"steps": self.rotation_steps, "lr": self.rotation_lr, "samples_per_step": self.rotation_samples}
        return SpinQuantOptions(**{k: v for k, v in learn.items() if v is not None}, device=device)

    def refine_options(self) -> RefineOptions:
        given = {"steps": self.refine_steps, "lr": self.refine_lr, "cross_layer": self.cross_layer}
        return RefineOptions(kind=self.refine, seed=self.seed, **{k: v for k, v in given.items() if v is not None})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _given(value, default):
    return default if value is None else value


def _coerce(f: dataclasses.Field, value):
    """``value`` as the field's type, or a RotqError naming the option."""
    kind = f.metadata["kind"]
    if value is None:
        return None
    if kind == "a_clip":
        if value == "auto":
            return value
        kind = float
    ok = {int: isinstance(value, int) and not isinstance(value, bool), bool: isinstance(value, bool),
          str: isinstance(value, str), float: isinstance(value, (int, float)) and not isinstance(value, bool)}[kind]
    if kind is float and isinstance(value, str):  # "0.9" from the command line
        try:
            value, ok = float(value), True
        except ValueError:
            pass
    if not ok:
        expected = {int: "an integer", bool: "true or false", str: "a string", float: "a number"}[kind]
        raise RotqError(f"{flag(f.name)} must be {expected}, got {value!r}")
    return float(value) if kind is float else value


def _check_values(r: Recipe) -> None:
    """Each option on its own."""
    choices = {"scheme": tuple(PRESETS), "rotation": ROTATION_KINDS, "format": FORMATS, "refine": REFINE_KINDS,
               "foem_variant": tuple(DEFAULT_BETA)}
    for name, allowed in choices.items():
        value = getattr(r, name)
        if value is not None and value not in allowed:
            what = flag(name) if name in ("refine", "foem_variant") else name
            raise RotqError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
    if r.method is not None:
        parse_method(r.method)
    positive = {"nsamples": 1, "seqlen": 2, "batch_size": 1, "block_size": 1, "rotation_steps": 0,
                "rotation_samples": 1, "refine_steps": 0, "cross_layer": 0, "w_bits": 2, "w_group_size": 0,
                "seed": 0}
    for name, low in positive.items():
        value = getattr(r, name)
        if value is not None and value < low:
            raise RotqError(f"{flag(name)} must be at least {low}, got {value}")
    for name in ("percdamp", "gptaq_alpha", "foem_beta", "qep_alpha", "rescomp_alpha2"):
        value = getattr(r, name)
        if value is not None and not 0 <= value < float("inf"):
            raise RotqError(f"{flag(name)} must be a number >= 0, got {value!r}")
    for name in ("rotation_lr", "refine_lr"):
        value = getattr(r, name)
        if value is not None and not value > 0:
            raise RotqError(f"{flag(name)} must be positive, got {value!r}")
    for name in ("a_clip", "kv_clip"):
        value = getattr(r, name)
        if isinstance(value, float) and not 0 < value <= 1:
            raise RotqError(f"{flag(name)} must be a ratio in (0, 1]{' or auto' if name == 'a_clip' else ''}, "
                            f"got {value!r}")
    if r.prefix is not None:
        parse_prefix(r.prefix)
    if r.w_clip_max_shrink is not None and not 0 <= r.w_clip_max_shrink < 1:
        raise RotqError(f"--w-clip-max-shrink must be in [0, 1), got {r.w_clip_max_shrink}")


def _check_combinations(r: Recipe) -> None:
    """Options that only make sense together; runs on a resolved recipe."""
    act = PRESETS[r.scheme].activations is not None
    if r.a_clip is not None and not act:
        raise RotqError(f"--a-clip applies to schemes that quantize activations; {r.scheme} keeps them 16-bit")
    solver, qep = r.plan.solver, r.plan.qep
    readers = {"gptaq_alpha": solver in ("gptaq", "gptaq+foem", "rescomp"), "foem_variant": "foem" in solver,
               "foem_beta": "foem" in solver, "qep_alpha": qep, "rescomp_alpha2": solver == "rescomp"}
    for name, read in readers.items():
        if getattr(r, name) is not None and not read:
            raise RotqError(f"{flag(name)} does not apply to --method {r.method}; drop it or choose a method with "
                            f"{name.split('_')[0]}")
    if r.prefix != "none" and r.format != "rotq":
        raise RotqError(f"--prefix {r.prefix}: the {r.format} format cannot store a full-precision prefix (stock "
                        "vLLM would serve the model without it); use --format rotq or --prefix none")
    given = [flag(k) for k in ("rotation_steps", "rotation_lr", "rotation_samples", "rotation_file")
             if getattr(r, k) is not None]
    if given and r.rotation != "spinquant":
        raise RotqError(f"{', '.join(given)}: for --rotation spinquant only, got --rotation {r.rotation}")
    if r.rotation_file is not None and len(given) > 1:
        raise RotqError("--rotation-file reuses learned rotations, so --rotation-steps/-lr/-samples do not apply; "
                        "give one or the other")
    if r.offload is not None:
        if r.learns_rotations:
            raise RotqError("--offload cannot learn SpinQuant rotations (every step runs the whole model): learn "
                            "them without --offload and pass --rotation-file, or use --rotation hadamard")
        if r.fits_activation_clip:
            raise RotqError("--offload cannot fit --a-clip auto (it runs the whole model once per ratio): give "
                            "a ratio, e.g. --a-clip 0.9")
        if r.cross_layer:
            raise RotqError("--cross-layer needs the next layers in memory, which --offload keeps on disk; drop "
                            "one of them (--cross-layer 0 works with --offload)")
