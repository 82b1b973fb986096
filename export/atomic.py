"""Atomic checkpoint directories: a crash never leaves a directory that looks complete.

Everything is written into a hidden sibling directory that is renamed into place only when
complete (a rename within one filesystem is atomic); on any failure it is removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from safetensors import SafetensorError

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


def _reason(e: Exception) -> str:
    """The OS's words for a write failure, with what to do about a full disk."""
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left" in text:
        return f"{text}: free space on that filesystem or choose another output path"
    return text


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
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
        raise RotqError(f"writing {out} failed ({_reason(e)}); nothing was written") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; a leftover after a failure
