"""Data-parallel runs under `torchrun`: which process this is, and the few collectives the loop needs.

torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) starts one process
per device; `session` joins them into PyTorch's process group (nccl on CUDA, gloo on CPU) and gives each its
device. A plain `python -m zsq` run is world size 1: every helper here is then a no-op, so the single-process
path has no distributed code in it.

Control decisions (skip a non-finite step, stop on a signal) must be taken by every rank alike, or one rank
would wait forever in the next all-reduce; they travel as one small CPU tensor over gloo, also beside nccl.
"""
from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from .errors import UserError

T = TypeVar("T")
RANK_SEED_STRIDE = 1_000_003  # rank r draws its batches from seed + r·stride: distinct streams, rank 0 = 1 process


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str = ""
    control: Any = None  # the gloo group of control decisions (the default group when it is gloo already)

    @property
    def main(self) -> bool:
        """Only the main rank writes files and prints."""
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one."""
        if not self.on:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def mean_(self, tensors: list[torch.Tensor]) -> None:
        """Average tensors (one device, any shapes) across ranks in place, in one all-reduce."""
        if not self.on or not tensors:
            return
        flat = torch.cat([t.detach().float().reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world
        for t, chunk in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            t.copy_(chunk.view_as(t))

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.on:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def from_main(self, fn: Callable[[], T]) -> T:
        """`fn()` run on the main rank only, its value (or its UserError) handed to every rank, so a decision
        that reads files (resume, cache) is the same everywhere and a refusal stops all ranks alike."""
        if not self.on:
            return fn()
        box: list[Any] = [None]
        if self.main:
            try:
                box[0] = ("ok", fn())
            except UserError as e:
                box[0] = ("error", str(e))
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise UserError(value)
        return value

    def barrier(self) -> None:
        if self.on:
            dist.barrier(group=self.control)


SINGLE = Dist()  # a plain one-process run


def _env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"WORLD_SIZE must be an integer, got '{os.environ['WORLD_SIZE']}'") from None


def rank_device(device: str, local_rank: int, world: int) -> str:
    """Each process's device: cuda:LOCAL_RANK on GPUs, the CPU otherwise."""
    if world == 1 or device == "cpu":
        return device
    if device != "cuda":
        raise UserError(f"under torchrun each process takes cuda:LOCAL_RANK; pass --device auto or cuda, not "
                        f"'{device}'")
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s): lower "
                        f"--nproc_per_node")
    torch.cuda.set_device(local_rank)
    return f"cuda:{local_rank}"


@contextlib.contextmanager
def session(device: str) -> Iterator[tuple[Dist, str]]:
    """Join the distributed job this process belongs to for the duration of one command; yields the Dist and
    this rank's device (`device` already resolved: cpu, cuda or cuda:N). Called by every rank alike. A process
    group that already exists (the caller's, or one an earlier command in this process made) is used; otherwise
    torchrun's variables make one, which stays open for the process's later commands and is destroyed at exit:
    destroyed and made again at each command, ranks met again on the same MASTER_PORT while the other could still
    hold the previous group: three `zsq.quantize` calls per rank in a two-rank script hung or failed to connect
    in 6 of 9 attempts."""
    made = not dist.is_initialized()
    if made and _env_world() == 1:
        yield SINGLE, device
        return
    local_rank = int(os.environ.get("LOCAL_RANK", 0 if made else dist.get_rank()))
    dev = rank_device(device, local_rank, _env_world() if made else dist.get_world_size())
    if made:
        if not dist.is_available():
            raise UserError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
        backend = "nccl" if dev.startswith("cuda") else "gloo"
        try:
            dist.init_process_group(backend, **({"device_id": torch.device(dev)} if backend == "nccl" else {}))
        except ValueError as e:  # a launcher variable missing (MASTER_ADDR, RANK...)
            raise UserError(f"cannot join the distributed job: {e}; launch with torchrun") from None
        atexit.register(_leave)
    rank, world, backend = dist.get_rank(), dist.get_world_size(), dist.get_backend()
    control = dist.new_group(backend="gloo") if backend != "gloo" else None
    try:
        yield Dist(rank, world, local_rank, backend, control), dev
    finally:
        if control is not None:
            dist.destroy_process_group(control)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
