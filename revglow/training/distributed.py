"""torch.distributed for `revglow train`: start-up from torchrun's environment and the few collectives the
trainer needs, each a no-op in a single process.

`torchrun --nproc_per_node N -m revglow train ...` sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT; `init_from_environment` reads them and starts the process group (NCCL when the processes
train on CUDA devices, one per LOCAL_RANK; gloo on CPUs). Without those variables everything here acts
as for one process of rank 0.

Example:
    >>> ctx = DistributedContext.current()
    >>> ctx.rank, ctx.world_size, ctx.is_main
    (0, 1, True)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist

__all__ = ["DistributedContext", "end_process_group", "init_from_environment", "launched_by_torchrun"]


def launched_by_torchrun() -> bool:
    """Whether the environment asks for more than one process (torchrun sets WORLD_SIZE and RANK)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def init_from_environment(device: str = "auto") -> bool:
    """Start the default process group from torchrun's variables when they ask for > 1 process.

    Returns True when this call started it (the caller then tears it down). NCCL is used when the
    processes will train on CUDA (`device` "auto" on a machine with CUDA, or "cuda..."), else gloo.
    """
    if not launched_by_torchrun() or dist.is_initialized():
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 asks for distributed training, but this PyTorch has no torch.distributed")
    use_cuda = torch.cuda.is_available() and (device == "auto" or device.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return True


def end_process_group(after_success: bool = True) -> None:
    """Destroy the default process group. After a run that finished on this rank, first wait for every rank
    (a barrier), so that none tears its connections down while another is still in a collective; after an
    error the others may never reach that barrier, so it is skipped."""
    if not dist.is_initialized():
        return
    if after_success:
        dist.barrier()
    dist.destroy_process_group()


@dataclass
class DistributedContext:
    """This process's place in the default process group (rank 0 of 1 when there is none)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @classmethod
    def current(cls) -> "DistributedContext":
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(),
                   local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())), backend=str(dist.get_backend()))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def collective_device(self, device: torch.device) -> torch.device:
        """Where tensors handed to collectives must live: CUDA for NCCL, the CPU for gloo."""
        return device if self.backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """`obj` of rank `src` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> List[Any]:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.enabled:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def max_over_ranks(self, value: int, device: torch.device) -> int:
        """The largest of every rank's int `value`, on every rank (one small all-reduce on `device`'s collective
        device)."""
        if not self.enabled:
            return value
        flag = torch.tensor([value], dtype=torch.int64, device=self.collective_device(device))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def average_gradients(self, params: List[torch.Tensor], flags: torch.Tensor, device: torch.device,
                          drop_own: bool = False) -> torch.Tensor:
        """Replace each parameter's .grad by its mean over the ranks, and sum `flags` (a 1-d tensor of this
        rank's numbers, on the collective device) over the ranks; returns the sums.

        One pass of all-reduces over buckets of about 4M elements, the flags riding in the first (so reading them
        back is one host sync). A missing gradient counts as zeros, and so do all of this rank's with `drop_own`
        (a rank whose step failed still takes part, or the others would wait forever for its buckets).
        `device` is where the collectives run (collective_device)."""
        dtype = flags.dtype
        buckets, bucket, size = [], [], 0
        for p in params:
            bucket.append(p)
            size += p.numel()
            if size >= 1 << 22:
                buckets.append(bucket)
                bucket, size = [], 0
        if bucket or not buckets:
            buckets.append(bucket)
        summed = flags
        for index, bucket in enumerate(buckets):
            parts = [torch.zeros(p.numel(), dtype=dtype, device=device) if p.grad is None or drop_own
                     else p.grad.detach().reshape(-1).to(device, dtype) for p in bucket]
            if index == 0:
                parts.append(flags)
            flat = torch.cat(parts)
            dist.all_reduce(flat)
            if index == 0:
                summed = flat[-flags.numel():]
                flat = flat[:-flags.numel()]
            offset = 0
            for p in bucket:
                p.grad = (flat[offset:offset + p.numel()] / self.world_size).view_as(p).to(p.device, p.dtype)
                offset += p.numel()
        return summed

    def run_on_main(self, fn, *args, **kwargs) -> Any:
        """Run `fn` on rank 0 only; its result, or the ValueError/OSError it raised, reaches every rank.

        For checks and file operations that only rank 0 may do: every rank then fails (or goes on) together
        instead of the others waiting forever in the next collective.
        """
        result, error = None, None
        if self.is_main:
            try:
                result = fn(*args, **kwargs)
            except (ValueError, OSError) as exc:
                error = exc
        if self.enabled:
            shared = self.broadcast_object((result, None if error is None else (type(error), str(error))))
            if error is None and shared[1] is not None:
                kind, message = shared[1]
                raise kind(message)
            result = shared[0]
        if error is not None:
            raise error
        return result
