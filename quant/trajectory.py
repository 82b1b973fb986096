"""Where the full-precision trajectory lives: methods that fit it (GPTAQ, QEP, ResComp) keep a
second copy of the calibration hidden states, in RAM or in an unlinked memory-mapped file (the
disk space is freed with the tensor), which is what ``--trajectory-dir`` chooses."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch

from rotq.quant.errors import RotqError


def trajectory_buffer(inps: torch.Tensor, directory: str | None) -> torch.Tensor:
    """A copy of ``inps``: in RAM, or in an unlinked memory-mapped file under ``directory``."""
    if directory is None:
        return inps.clone()
    if inps.device.type != "cpu":
        raise RotqError("the full-precision trajectory can live on disk only when calibrating on the CPU "
                        "(--device cpu); drop --trajectory-dir")
    return disk_buffer(tuple(inps.shape), inps.dtype, directory).copy_(inps)


def disk_buffer(shape: tuple[int, ...], dtype: torch.dtype, directory: str) -> torch.Tensor:
    """An uninitialised CPU tensor in an unlinked memory-mapped file under ``directory``."""
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=directory, prefix="rotq-fp-trajectory-", suffix=".bin")
        os.close(fd)
        buf = torch.from_file(name, shared=True, size=math.prod(shape), dtype=dtype).view(shape)
        os.unlink(name)  # the mapping stays valid; the disk space is released with the tensor
    except OSError as e:
        raise RotqError(f"cannot keep the full-precision trajectory in {directory}: {e}") from None
    return buf
