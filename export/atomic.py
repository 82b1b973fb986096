"""Atomic checkpoint directories: a crash never leaves a directory that looks complete.

Everything is written into a hidden sibling directory that is renamed into place only when
complete (a rename within one filesystem is atomic); on any failure it is removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from rotq.quant.errors import RotqError


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


@contextlib.contextmanager
def atomic_directory(out: Path):
    """Yield a temporary directory that becomes ``out`` when the block completes."""
    out = Path(out)
    check_output_dir(out)
    tmp = out.resolve().parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        os.rename(tmp, out)
    except OSError as e:
        raise RotqError(f"writing {out} failed ({e}); nothing was written") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; a leftover after a failure
