"""Data-parallel training across processes: `torchrun` (or `--nproc N`, which starts it) runs one process per
rank; gradients are averaged by DistributedDataParallel over gloo on CPU or NCCL on GPUs.

Each rank draws the *global* batch from the same random state and trains on its own rows of it. So a run on N
processes sees the same examples in the same order as a run on one process with the same `batch_size`, and the
loop counters, random state and checkpoints do not depend on N: a checkpoint written by 2 processes resumes on 1,
and the other way round. Every rank computes the same validation (identical weights, identical data), so early
stopping agrees without a message; the clock does not, so time limits are agreed through an all-reduce. Only rank
0 writes files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from core.errors import UserError


@dataclass
class DataParallel:
    rank: int = 0
    world: int = 1
    device: str = "cpu"

    @classmethod
    def from_env(cls, device: str = "cpu") -> DataParallel:
        """The process group torchrun describes in the environment (WORLD_SIZE, RANK, MASTER_ADDR ...), joined;
        a single process when there is none."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=device)
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
        rank = dist.get_rank()
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
            torch.cuda.set_device(device)
        return cls(rank=rank, world=world, device=device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> slice:
        """This rank's rows of a global batch."""
        if batch_size % self.world:
            raise UserError(f"batch_size {batch_size} does not split evenly over {self.world} processes")
        per = batch_size // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def wrap(self, model: torch.nn.Module, find_unused_parameters: bool = False) -> torch.nn.Module:
        """The model to train: DDP over the group (its `.module` is the model itself), or the model alone."""
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        if self.device.startswith("cuda"):
            # batch statistics over the global batch, as one process would compute them (CUDA only in torch)
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            return DistributedDataParallel(
                model, device_ids=[torch.device(self.device).index], find_unused_parameters=find_unused_parameters
            )
        return DistributedDataParallel(model, find_unused_parameters=find_unused_parameters)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (e.g. one rank's clock ran out)."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def mean(self, value: float) -> float:
        """The mean over ranks of a number (each rank's loss on its rows: the global batch's loss)."""
        if self.world == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item()) / self.world

    def from_main(self, value: int) -> int:
        """Rank 0's value of an integer, on every rank."""
        if self.world == 1:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.long, device=self.device)
        dist.broadcast(t, src=0)
        return int(t.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def threads_per_rank(threads: int) -> int:
    """Each of N local processes takes its share of the cores the params allow."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return max(1, int(threads) // max(1, local))


def check_split(batch_size: int, nproc: int, section: str) -> None:
    """One line before any process starts when `nproc` processes cannot share the global batch."""
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if batch_size % nproc:
        raise UserError(f"{section}.batch_size {batch_size} does not split evenly over {nproc} processes")


def relaunch_with_torchrun(nproc: int, argv: list[str] | None = None) -> int:
    """Run this same command under torchrun with `nproc` processes on this machine (what `--nproc N` does); the
    exit code is torchrun's. `argv`: the command line (default: this process's), from which `--nproc` is dropped."""
    if os.environ.get("WORLD_SIZE"):
        raise UserError("--nproc is for a plain command; under torchrun already, the launcher sets the processes")
    args, rest = [], list(sys.argv[1:] if argv is None else argv)
    while rest:
        a = rest.pop(0)
        if a == "--nproc":
            rest.pop(0)
        elif not a.startswith("--nproc="):
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(nproc)}"]
    return subprocess.call([*cmd, "-m", "generation.cli", *args])


def leave_group() -> None:
    """End this process's membership of the group (a command's last step under torchrun)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
