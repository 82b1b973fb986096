"""Resumable calibration: the state of a `rotq quantize` run, saved after each completed decoder
layer, so that ``--resume`` continues an interrupted run (a crash, kill -9, a lost machine) and
writes the same checkpoint, bit for bit, as an uninterrupted run with the same options.

The state directory (``OUT.partial`` next to the output by default, or ``--state-dir``) holds:

    manifest.json                  the commit point: the run's fingerprint, layers done, the
                                   fitted activation clip, the learned rotations' provenance,
                                   the calibration report so far, the file of activations
    rotations.safetensors          learned R1/R2 (--rotation spinquant), saved before the loop
    layer-00003.safetensors        decoder layer 3 once calibrated: its state dict ("state.*";
                                   under --offload without the linears' float weights), the
                                   integer form of its linears ("qweight.<name>.*", codes in
                                   the smallest integer type that holds them) and torch's CPU
                                   RNG state ("rng") at that point
    activations-00003.safetensors  the inputs of layer 4: "inps" (the quantized model's
                                   trajectory) and, for gptaq/qep/rescomp, "fp_inps" (the
                                   full-precision trajectory)

Identity: everything the layer loop carries from one layer to the next (quantized layers, both
trajectories, report entries, RNG) is saved exactly, and everything before the loop (norm fusion,
Hadamard rotations, calibration sampling) is deterministic or saved (learned rotations, the
activation clip search), so a resumed run continues with bitwise the same tensors.

Crash safety: each file is written as ``NAME.tmp``, fsynced and renamed into place; the manifest
is rewritten the same way only after the files it names are complete. A kill at any moment so
leaves the previous complete state; a resume reads only what the manifest names and deletes the
rest (partial ``.tmp`` files, an unfinished layer's files).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from rotq.export.rotations_file import RotationMatrices, load_rotations, save_rotations
from rotq.quant.arch import layer_linears
from rotq.quant.errors import RotqError
from rotq.quant.quantizer import QuantizedWeight, compact_codes
from rotq.quant.tensorfile import write_safetensors

logger = logging.getLogger(__name__)

FORMAT, VERSION = "rotq-calibration-state", 2  # 2: integer codes stored compact
MANIFEST = "manifest.json"
ROTATIONS = "rotations.safetensors"
# Every name the state writes; a directory holding anything else is not ours to delete.
_OWN_FILE = re.compile(r"(manifest\.json|rotations\.safetensors|(layer|activations)-\d{5}\.safetensors)(\.tmp)?")


def default_state_dir(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".partial")


def fingerprint(options: dict, model_dir: Path, calib_ids: torch.Tensor | None,
                files: dict[str, str | None]) -> dict[str, str]:
    """What makes two runs give the same checkpoint, as {what: value} with readable keys: the
    options (``options``, by flag), the model's files (size and mtime), the calibration tokens
    (sha256), other input files (``files``: {what: path or None}) and the library versions."""
    fp = {name: json.dumps(value) for name, value in options.items()}
    model_dir = Path(model_dir).resolve()
    fp["model directory"] = str(model_dir)
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file() and ".cache" not in p.parts):
        fp[f"model file {path.relative_to(model_dir)}"] = _file_stamp(path)
    fp["calibration tokens"] = "none" if calib_ids is None else "sha256 " + hashlib.sha256(
        calib_ids.contiguous().numpy().tobytes()).hexdigest()
    for what, path in files.items():
        fp[what] = "none" if path is None else _file_stamp(Path(path))
    for package in ("rotq", "torch", "transformers"):
        fp[f"{package} version"] = metadata.version(package)
    return fp


def _file_stamp(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size} bytes, mtime_ns {st.st_mtime_ns}"


def check_state_dir(directory: Path, resume: bool) -> None:
    """Before any work: refuse a state that a run without ``--resume`` would throw away, and a
    directory that is not a calibration state."""
    directory = Path(directory)
    if not directory.exists():
        return
    if not directory.is_dir() or any(not _OWN_FILE.fullmatch(p.name) for p in directory.iterdir()):
        raise RotqError(f"state directory {directory} exists and is not a rotq calibration state; "
                        "choose another --state-dir or remove it")
    if (directory / MANIFEST).is_file() and not resume:
        raise RotqError(f"{directory} holds the calibration state of an interrupted run; pass --resume "
                        f"to continue it, or remove {directory} to start over")


def _manifest_field(key: str, doc: str) -> property:
    """A read-only view of one manifest entry."""
    return property(lambda self: self.manifest[key], doc=doc)


class CalibrationState:
    """The state directory of one run (see the module docstring); open it with :meth:`open`.
    ``resumed``: it holds an interrupted run's progress."""

    def __init__(self, directory: Path, manifest: dict, resumed: bool):
        self.directory, self.manifest, self.resumed = Path(directory), manifest, resumed

    @classmethod
    def open(cls, directory: Path, fp: dict[str, str], resume: bool) -> CalibrationState:
        """The saved state if ``resume`` and one exists (RotqError when ``fp`` differs from its
        fingerprint, naming each difference), else a new empty state."""
        directory = Path(directory)
        check_state_dir(directory, resume)
        manifest = _read_manifest(directory) if resume else None
        if manifest is not None:
            _check_fingerprint(directory, manifest["fingerprint"], fp)
            state = cls(directory, manifest, resumed=True)
            state._sweep()
            return state
        shutil.rmtree(directory, ignore_errors=True)  # only our files, or a state with no commit yet
        try:
            directory.mkdir(parents=True)
        except OSError as e:
            raise RotqError(f"cannot create the state directory {directory}: {e.strerror}; "
                            "choose another --state-dir") from None
        state = cls(directory, {"format": FORMAT, "version": VERSION, "fingerprint": fp, "layers_done": 0,
                                "activations": None, "rotation_info": None, "act_clip_search": None,
                                "report": {"seconds": 0.0, "linears": []}}, resumed=False)
        state._commit()
        return state

    layers_done = _manifest_field("layers_done", "decoder layers calibrated and saved (int)")
    act_clip_search = _manifest_field("act_clip_search", "the fitted activation clip search, or None")
    report = _manifest_field("report", '{"seconds", "linears"}: the calibration report of the completed layers')
    rotation_info = _manifest_field("rotation_info", "provenance of the learned rotations, or None")

    def save_rotations(self, rotations: RotationMatrices, info: dict) -> None:
        self._write(ROTATIONS, lambda tmp: save_rotations(rotations, tmp))
        self.manifest["rotation_info"] = info
        self._commit()

    def load_rotations(self, config) -> RotationMatrices | None:
        return None if self.rotation_info is None else load_rotations(self.directory / ROTATIONS, config)

    def save_act_clip_search(self, fit: dict) -> None:
        self.manifest["act_clip_search"] = fit
        self._commit()

    def save_layer(self, i: int, layer: nn.Module, weights: dict[str, QuantizedWeight], report: dict,
                   inps: torch.Tensor | None = None, fp_inps: torch.Tensor | None = None,
                   linears: bool = True) -> None:
        """Record decoder layer ``i`` as done: its state dict (without the linears' weights when
        not ``linears``: under --offload their integer form is all that is kept) and quantized
        ``weights``, the ``report`` so far, and the trajectories ``inps`` / ``fp_inps`` [N, L, d]
        feeding layer i + 1."""
        skip = set() if linears else {f"{name}.weight" for name in layer_linears(layer)}
        tensors = {f"state.{k}": v for k, v in layer.state_dict().items() if k not in skip}
        for name, qw in weights.items():
            tensors |= {f"qweight.{name}.{k}": t for k, t in
                        (("codes", compact_codes(qw.codes)), ("scale", qw.scale), ("zero_point", qw.zero_point))
                        if t is not None}
        tensors["rng"] = torch.get_rng_state()
        group_sizes = json.dumps({name: qw.group_size for name, qw in weights.items()})
        code_dtypes = json.dumps({name: str(qw.codes.dtype).removeprefix("torch.") for name, qw in weights.items()})
        self._save_tensors(_layer_file(i), tensors, {"group_sizes": group_sizes, "code_dtypes": code_dtypes})
        old = self.manifest["activations"]
        if inps is not None:
            trajectories = {"inps": inps} | ({} if fp_inps is None else {"fp_inps": fp_inps})
            self.manifest["activations"] = f"activations-{i:05d}.safetensors"
            self._save_tensors(self.manifest["activations"], trajectories)
        self.manifest["layers_done"], self.manifest["report"] = i + 1, report
        self._commit()
        if old is not None and old != self.manifest["activations"]:
            (self.directory / old).unlink()

    def restore_layers(self, layers: list[nn.Module], linears: bool = True) -> Iterator[dict[str, QuantizedWeight]]:
        """Load the completed layers into ``layers`` (all but the linears' weights when not
        ``linears``), yielding each layer's quantized weights by module name as it is read (one
        layer in memory at a time); torch's RNG state is left as it was after the last of them."""
        for i in range(self.layers_done):
            tensors, meta = self._load_tensors(_layer_file(i))
            layers[i].load_state_dict({k.removeprefix("state."): v for k, v in tensors.items()
                                       if k.startswith("state.")}, strict=linears)
            weights, dtypes = {}, json.loads(meta["code_dtypes"])
            for lin, G in json.loads(meta["group_sizes"]).items():
                codes, scale, zero = (tensors.get(f"qweight.{lin}.{k}") for k in ("codes", "scale", "zero_point"))
                weights[lin] = QuantizedWeight(codes.to(getattr(torch, dtypes[lin])), scale, zero, G)
            torch.set_rng_state(tensors["rng"])
            yield weights

    def load_activations(self, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(inps, fp_inps or None) feeding the first layer not done."""
        tensors, _ = self._load_tensors(self.manifest["activations"])
        fp_inps = tensors.get("fp_inps")
        return tensors["inps"].to(device), None if fp_inps is None else fp_inps.to(device)

    def remove(self) -> None:
        """Delete the state once the checkpoint is written."""
        shutil.rmtree(self.directory)

    def _save_tensors(self, name: str, tensors: dict[str, torch.Tensor], meta: dict | None = None) -> None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        self._write(name, lambda tmp: write_safetensors(tmp, tensors, meta))

    def _load_tensors(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        try:
            with safe_open(self.directory / name, framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        except (OSError, SafetensorError) as e:
            raise RotqError(f"calibration state file {self.directory / name} cannot be read ({e}); "
                            f"remove {self.directory} to start over") from None

    def _commit(self) -> None:
        text = json.dumps(self.manifest, indent=1) + "\n"
        self._write(MANIFEST, lambda tmp: Path(tmp).write_text(text))

    def _write(self, name: str, write) -> None:
        """write(tmp) then fsync and rename: ``name`` is either its old or its new content."""
        path = self.directory / name
        tmp = path.with_name(name + ".tmp")
        try:
            write(tmp)
            _fsync(tmp)
            os.replace(tmp, path)
            _fsync(self.directory)
        except (OSError, SafetensorError) as e:
            tmp.unlink(missing_ok=True)  # leave only complete files behind
            raise RotqError(f"cannot save the calibration state to {path} ({e}); free some space or choose "
                            "another --state-dir, then rerun with --resume") from None

    def _sweep(self) -> None:
        """Delete what the manifest does not name: partial .tmp files, an unfinished layer's files."""
        keep = {MANIFEST, self.manifest["activations"], *map(_layer_file, range(self.layers_done))}
        if self.rotation_info is not None:
            keep.add(ROTATIONS)
        for path in self.directory.iterdir():
            if path.name not in keep:
                logger.info("removing %s: not part of the last complete state", path)
                path.unlink()


def _layer_file(i: int) -> str:
    return f"layer-{i:05d}.safetensors"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_manifest(directory: Path) -> dict | None:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RotqError(f"{directory / MANIFEST} cannot be read ({e}); remove {directory} to start over") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise RotqError(f"{directory} holds a calibration state of format {manifest.get('format')!r} version "
                        f"{manifest.get('version')!r}; this rotq reads version {VERSION}: remove it to start over")
    return manifest


def _check_fingerprint(directory: Path, saved: dict[str, str], now: dict[str, str]) -> None:
    diffs = [f"{k}: {saved.get(k, 'absent')} in the state, {now.get(k, 'absent')} now"
             for k in [*now, *(k for k in saved if k not in now)] if saved.get(k) != now.get(k)]
    if diffs:
        raise RotqError(f"--resume: the calibration state in {directory} belongs to a different run ("
                        f"{'; '.join(diffs)}); resume with the same model and options, or remove "
                        f"{directory} to start over")
