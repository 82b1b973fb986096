"""Calibration across processes started by torchrun: samples split, statistics summed, each
linear solved once.

Every rank loads the model and the same calibration windows and keeps a contiguous shard of
them, cut at batch boundaries, so each batch is computed exactly as a single process computes
it. What is a sum over samples is all-reduced: the Hessian H and the asymmetric statistic D of
every group of linears, the activation clip search's loss, SpinQuant's loss and gradients. The
linears of a group are solved round-robin, one rank each, and broadcast, so every rank holds the
same quantized layer before pushing its shard through it. gloo on CPU, nccl on CUDA (each rank
on cuda:LOCAL_RANK). Rank 0 writes the output. The result equals a single-process run up to the
order of floating-point sums.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rotq.quant.errors import RotqError


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group (rank 0 of 1 without torchrun) and its collectives."""

    rank: int = 0
    world: int = 1
    collective_device: str = "cpu"  # where tensors must be for the backend (nccl: this rank's GPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, n: int, batch_size: int) -> slice:
        """This rank's contiguous share of n samples, whole batches of ``batch_size`` each
        (the last batch may be short); a rank may get none when there are fewer batches than ranks."""
        batches = -(-n // batch_size)
        base, extra = divmod(batches, self.world)
        first = self.rank * base + min(self.rank, extra)
        count = base + (self.rank < extra)
        return slice(min(first * batch_size, n), min((first + count) * batch_size, n))

    def check_shardable(self, n: int, batch_size: int, what: str) -> None:
        """RotqError unless every rank gets at least one batch of the n samples."""
        if self.distributed and -(-n // batch_size) < self.world:
            raise RotqError(f"{self.world} processes need at least {self.world} batches of {what}; got {n} "
                            f"sequences in batches of {batch_size}: raise --nsamples or lower --batch-size")

    def owner(self, index: int) -> int:
        """The rank that solves the index-th linear."""
        return index % self.world

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce ``t`` in place by summation (a no-op in one process)."""
        if self.distributed:
            on = t.to(self.collective_device)
            dist.all_reduce(on)
            if on is not t:
                t.copy_(on)
        return t

    def sum(self, *values: float) -> list[float]:
        """Python floats summed over the ranks (float64)."""
        t = self.sum_(torch.tensor(values, dtype=torch.float64))
        return t.tolist()

    def broadcast(self, obj, src: int):
        """``obj`` of rank ``src`` on every rank (pickled: tensors come back on the CPU)."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=torch.device(self.collective_device))
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


SINGLE = Ranks()


def check_device(name: str) -> str:
    """``name`` as a torch device string, or a RotqError that says what this machine offers."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise RotqError(f"--device {name!r} is not a device rotq computes on; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise RotqError(f"--device {name}: this machine has no CUDA GPU that torch can use; use --device cpu")
        if device.index is not None and device.index >= count:
            raise RotqError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return str(device)


def init_from_env(device: str) -> tuple[Ranks, str]:
    """Join the torchrun group when WORLD_SIZE > 1: (Ranks, this rank's compute device). With
    --device cuda each rank takes cuda:LOCAL_RANK and the group uses nccl; otherwise gloo."""
    device = check_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return SINGLE, device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "gloo"
    if torch.device(device).type == "cuda":
        if torch.cuda.device_count() <= local:
            raise RotqError(f"rank {rank} needs cuda:{local} but this machine has {torch.cuda.device_count()} "
                            "GPUs; start at most that many processes per node")
        device, backend = f"cuda:{local}", "nccl"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    return Ranks(rank, world, device if backend == "nccl" else "cpu"), device


def shutdown(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()
