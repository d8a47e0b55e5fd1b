"""Running the same training command on several processes (`torchrun --nproc_per_node=N ...`).

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and the rendezvous address) for every process; this module
turns them into a process group (gloo on CPU, nccl on CUDA) and a device per process. A plain
`scratchllm pretrain` (no torchrun) is world size 1 and touches none of this.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from ..device import pick_device
from ..errors import ScratchLLMError
from ..model.gpt import GPTModel


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only the main process writes files, logs and progress bars."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether several processes train together."""
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    """Whether torchrun started this process (it sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when started by torchrun; otherwise a single-process `DistInfo`."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return DistInfo(device=pick_device(device))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    want = pick_device(device)
    if want.type == "cuda":
        if torch.cuda.device_count() <= local_rank:
            raise ScratchLLMError(
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); lower "
                "--nproc_per_node"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    elif want.type == "cpu":
        dev, backend = want, "gloo"
    else:
        raise ScratchLLMError(f"multi-process training supports CPU (gloo) and CUDA (nccl), not {want.type}")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev)


def all_reduce_mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a tensor over all processes (a no-op in a single process)."""
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def barrier(info: DistInfo) -> None:
    """Wait until every process gets here (a no-op in a single process)."""
    if info.enabled:
        dist.barrier()


def max_over_processes(values: list[float], info: DistInfo) -> list[float]:
    """Each of `values`, the largest any process has, on every process (one all-reduce)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def broadcast_flag(flag: bool, info: DistInfo) -> bool:
    """True on every process if it is True on any (e.g. a stop signal that reached one process)."""
    return bool(max_over_processes([float(flag)], info)[0])


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every process's `obj`, in rank order, on every process."""
    if not info.enabled:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """`model` under DistributedDataParallel: gradients averaged over the processes at each backward."""
    ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def shard_model(model: GPTModel, device: torch.device, world_size: int) -> None:
    """FSDP2: each transformer block, then the rest, becomes a unit whose parameters, gradients and
    optimizer state are split over the processes and gathered only while the unit computes."""
    try:
        # most of a second to import: only --fsdp runs pay it
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:
        raise ScratchLLMError("--fsdp needs PyTorch 2.6 or newer (torch.distributed.fsdp.fully_shard)") from e
    mesh = init_device_mesh(device.type, (world_size,))
    for block in model.trf_blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def leave_process_group() -> None:
    """Destroy torchrun's process group, if this process joined one, before the process exits: left to
    the interpreter's exit, gloo's threads can abort the process (SIGABRT) after a finished run."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
