"""The interim output layout of `rotq quantize` (until the export formats land).

OUT/ is a plain Hugging Face checkpoint of the rotated model whose quantized linears hold
their dequantized (on-grid) values, plus ``rotq.json`` (the scheme and how it was calibrated)
and ``calibration_report.json``. Loading it re-installs the scheme's online ops, so
`rotq eval OUT` computes the simulated W4A4KV4 numerics. Writes are atomic: everything goes to
a hidden sibling directory that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from rotq.quant.errors import RotqError
from rotq.quant.models import load_model
from rotq.quant.online import install_online_ops
from rotq.quant.scheme import Scheme

MANIFEST = "rotq.json"
REPORT = "calibration_report.json"
LAYOUT = "rotq-interim"


def check_output_dir(out: Path) -> None:
    """Fail early (before any work) when OUT exists or its parent cannot be written."""
    if out.exists():
        raise RotqError(f"output directory {out} already exists; choose a new path or remove it")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RotqError(f"cannot create {parent} for the output: {e.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise RotqError(f"cannot write the output into {parent}: permission denied")


def save_quantized(model, tokenizer, scheme: Scheme, provenance: dict, report: dict, out: Path) -> None:
    check_output_dir(out)
    tmp = out.resolve().parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        manifest = {"layout": LAYOUT, "scheme": scheme.to_dict(), "provenance": provenance}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        os.rename(tmp, out)
    except OSError as e:
        raise RotqError(f"writing {out} failed ({e}); nothing was written") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; a leftover after a failure


def load_for_eval(spec: str):
    """(model, tokenizer, scheme or None): a plain model, or a rotq output with its online ops."""
    model, tokenizer = load_model(spec)
    manifest_path = Path(spec) / MANIFEST
    if not manifest_path.is_file():
        return model, tokenizer, None
    try:
        manifest = json.loads(manifest_path.read_text())
        layout = manifest["layout"]
        scheme = Scheme.from_dict(manifest["scheme"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise RotqError(f"{manifest_path} is not a valid rotq manifest ({e!r})") from None
    if layout != LAYOUT:
        raise RotqError(f"{manifest_path}: unknown layout {layout!r}, expected {LAYOUT!r}")
    install_online_ops(model, scheme)
    return model, tokenizer, scheme
