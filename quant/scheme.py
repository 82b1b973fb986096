"""The one versioned description of a quantization scheme, from calibration to serving.

Calibration reads it to simulate the quantizers, export writes it into
``config.json["quantization_config"]`` and serving parses it back with :meth:`Scheme.from_dict`.
Unknown keys and versions fail with a message that names the field
(docs/design.md#one-schema-from-calibration-to-serving).
Method options (damping, block size, sample counts) are not part of the scheme.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from rotq.quant.errors import RotqError

FORMAT_VERSION = 2
# Version 2 added ``prefix`` (a full-precision attention prefix stored beside the weights):
# a version-1 file reads as before (no prefix), and a version-1 reader refuses a version-2 file
# instead of serving it without its prefix. Adding a kind keeps the version: an older reader
# refuses the new kind by name.
READABLE_VERSIONS = (1, 2)
# R1/R2 are folded into the weights, so serving treats "spinquant" exactly like "hadamard"
# (only r3/r4 run online).
ROTATION_KINDS = ("none", "hadamard", "spinquant")


class SchemeError(RotqError):
    """A scheme dict or preset that cannot be used; the message names the offending field."""


@dataclass(frozen=True)
class WeightArgs:
    """Integer weights. Symmetric scale = max / (2^(b-1) - 0.5) on [-2^(b-1), 2^(b-1) - 1]
    (the compressed-tensors convention); asymmetric uses an integer zero point."""

    bits: int = 4
    symmetric: bool = True
    group_size: int | None = None  # None: one scale per output channel
    clip_search: bool = True  # per-row search of the range shrink minimising sum |Q(w) - w|^2.4
    clip_max_shrink: float = 0.8  # search p = 1 - k/100 for k < 100 * clip_max_shrink (GPTQ/QuaRot)


# Without a rotation, a row's few large weights are the ones a deep range shrink clips: the presets
# search p in [0.8, 1] there, and down to 0.21 on rotated weights (each choice measured better on
# calibration text; docs/algorithms.md, "Quantizer conventions").
UNROTATED_CLIP_MAX_SHRINK = 0.2


@dataclass(frozen=True)
class ActivationArgs:
    """Dynamic per-token quantization of the inputs of every quantized linear.

    Symmetric scale = clip * max|x| / (2^(b-1) - 1) (QuaRot); asymmetric: the range
    [min(x, 0), max(x, 0)] * clip on 2^b levels with an integer zero point."""

    bits: int = 4
    symmetric: bool = True
    clip_ratio: float = 0.9


@dataclass(frozen=True)
class KVCacheArgs:
    """Dynamic per-(token, head) quantization of K (after RoPE and R3) and V; group = head_dim."""

    bits: int = 4
    symmetric: bool = False
    clip_ratio: float = 0.95


@dataclass(frozen=True)
class RotationArgs:
    """What was folded offline and what must run online.

    ``r1``/``r2`` are folded into the weights: random Hadamards (signs from ``seed``) for kind
    "hadamard", orthogonal matrices learned from that same initialisation for kind "spinquant"
    (stored beside the checkpoint, not needed to run it); ``r3`` is an online Hadamard of size
    head_dim on Q and K after RoPE; ``r4`` an online Hadamard of size intermediate_size on the
    input of down_proj (its transpose is folded into down_proj).
    """

    kind: str = "none"  # "none" | "hadamard" | "spinquant"
    r1: bool = False
    r2: bool = False
    r3: bool = False
    r4: bool = False
    seed: int = 0

    @staticmethod
    def hadamard(seed: int = 0, online_qk: bool = True) -> "RotationArgs":
        return RotationArgs(kind="hadamard", r1=True, r2=True, r3=online_qk, r4=True, seed=seed)

    @staticmethod
    def spinquant(seed: int = 0, online_qk: bool = True) -> "RotationArgs":
        """Learned R1/R2 (initialised from the Hadamards of ``seed``); R3/R4 stay Hadamards."""
        return RotationArgs(kind="spinquant", r1=True, r2=True, r3=online_qk, r4=True, seed=seed)


@dataclass(frozen=True)
class PrefixArgs:
    """A full-precision attention prefix (quant/prefix.py): sink tokens in the past of every
    sequence whose K and V, computed in full precision, are stored beside the weights (the
    checkpoint's prefix file). Served at positions -P..-1; the text keeps positions 0, 1, ..."""

    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Scheme:
    weights: WeightArgs = field(default_factory=WeightArgs)
    activations: ActivationArgs | None = None  # None: 16-bit activations
    kv_cache: KVCacheArgs | None = None  # None: 16-bit KV cache
    rotation: RotationArgs = field(default_factory=RotationArgs)
    ignore: tuple[str, ...] = ("lm_head",)
    prefix: PrefixArgs | None = None  # None: no prefix (format version 2)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        _validate(self)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self) | {"ignore": list(self.ignore)}
        if self.prefix is not None:
            d["prefix"] = {"token_ids": list(self.prefix.token_ids)}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Scheme":
        """Parse a dict written by :meth:`to_dict`; ``quant_method`` (if present) must be rotq."""
        d = dict(d)
        method = d.pop("quant_method", "rotq")
        if method != "rotq":
            raise SchemeError(f"quantization_config.quant_method is {method!r}, expected 'rotq'")
        version = d.get("format_version")
        if version not in READABLE_VERSIONS:
            raise SchemeError(
                f"quantization_config.format_version is {version!r}; this rotq reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}. Re-export the checkpoint or upgrade rotq."
            )
        _check_keys("quantization_config", d, cls)
        if version == 1 and d.get("prefix") is not None:
            raise SchemeError("quantization_config.prefix needs format_version 2, the file says 1")
        sub = {"weights": WeightArgs, "activations": ActivationArgs, "kv_cache": KVCacheArgs,
               "rotation": RotationArgs, "prefix": PrefixArgs}
        kwargs = {}
        for name, value in d.items():
            if name in sub and value is not None:
                if not isinstance(value, dict):
                    raise SchemeError(f"quantization_config.{name} must be a mapping, got {value!r}")
                _check_keys(f"quantization_config.{name}", value, sub[name])
                if name == "prefix":
                    value = {"token_ids": _token_ids(value.get("token_ids"))}
                value = sub[name](**value)
            elif name == "ignore":
                value = tuple(value)
            kwargs[name] = value
        return cls(**kwargs)

    def replace(self, **changes) -> "Scheme":
        return dataclasses.replace(self, **changes)

    @property
    def label(self) -> str:
        """Short name of the bit widths, e.g. W4A4KV4 or W4A16 (logs and tables)."""
        a = self.activations.bits if self.activations else 16
        kv = f"KV{self.kv_cache.bits}" if self.kv_cache else ""
        return f"W{self.weights.bits}A{a}{kv}"


def _token_ids(value) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(t, int) and t >= 0 for t in value):
        raise SchemeError(f"quantization_config.prefix.token_ids must be a non-empty list of token ids, got {value!r}")
    return tuple(value)


def _check_keys(where: str, d: dict, cls) -> None:
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise SchemeError(f"{where} has unknown field(s) {unknown}; allowed: {sorted(allowed)}")


def _validate(s: Scheme) -> None:
    w = s.weights
    if not 2 <= w.bits <= 16:
        raise SchemeError(f"weights.bits must be in 2..16, got {w.bits}")
    if not 0.0 <= w.clip_max_shrink < 1.0:
        raise SchemeError(f"weights.clip_max_shrink must be in [0, 1), got {w.clip_max_shrink}")
    if w.group_size is not None and (w.group_size <= 0 or w.group_size % 8):
        raise SchemeError(f"weights.group_size must be a positive multiple of 8 or null, got {w.group_size}")
    for name, a in (("activations", s.activations), ("kv_cache", s.kv_cache)):
        if a is None:
            continue
        if not 2 <= a.bits <= 8:
            raise SchemeError(f"{name}.bits must be in 2..8 (use null for 16-bit), got {a.bits}")
        if not 0.0 < a.clip_ratio <= 1.0:
            raise SchemeError(f"{name}.clip_ratio must be in (0, 1], got {a.clip_ratio}")
    if s.rotation.kind not in ROTATION_KINDS:
        raise SchemeError(f"rotation.kind must be one of {', '.join(map(repr, ROTATION_KINDS))}, "
                          f"got {s.rotation.kind!r}")
    if s.prefix is not None and not s.prefix.token_ids:
        raise SchemeError("prefix.token_ids is empty; use prefix null for no prefix")
    if s.rotation.kind == "none" and any((s.rotation.r1, s.rotation.r2, s.rotation.r3, s.rotation.r4)):
        raise SchemeError("rotation.kind is 'none' but r1..r4 are set; use kind 'hadamard'")


PRESETS: dict[str, Scheme] = {
    "w4a4kv4": Scheme(activations=ActivationArgs(), kv_cache=KVCacheArgs()),
    "w4a4": Scheme(activations=ActivationArgs()),
    "w4a8kv4": Scheme(activations=ActivationArgs(bits=8, clip_ratio=1.0), kv_cache=KVCacheArgs()),
    "w4a8": Scheme(activations=ActivationArgs(bits=8, clip_ratio=1.0)),
    "w4a16": Scheme(),
    "w4a16kv4": Scheme(kv_cache=KVCacheArgs()),
    "w3a16": Scheme(weights=WeightArgs(bits=3)),
    "w8a8": Scheme(weights=WeightArgs(bits=8), activations=ActivationArgs(bits=8, clip_ratio=1.0)),
}


def preset(name: str, rotation: str = "none", seed: int = 0) -> Scheme:
    """A named preset with the chosen rotation and the weight clip-search range that suits it."""
    if name not in PRESETS:
        raise SchemeError(f"unknown scheme {name!r}; choose one of {', '.join(PRESETS)}")
    base = PRESETS[name]
    if rotation == "none":
        return base.replace(weights=dataclasses.replace(base.weights, clip_max_shrink=UNROTATED_CLIP_MAX_SHRINK))
    if rotation in ("hadamard", "spinquant"):
        # R3 only serves the KV quantizer: without KV4 it would be an online op for nothing
        make = RotationArgs.hadamard if rotation == "hadamard" else RotationArgs.spinquant
        return base.replace(rotation=make(seed, online_qk=base.kv_cache is not None))
    raise SchemeError(f"unknown rotation {rotation!r}; choose one of {', '.join(ROTATION_KINDS)}")
