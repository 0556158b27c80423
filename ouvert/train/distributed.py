"""torch.distributed, applied from outside the model: torchrun init, DDP or FSDP2 wrapping,
rank-aware printing, and full (world-size independent) state dicts for checkpoints.

Run with `torchrun --nproc_per_node N -m ouvert.train CONFIG.toml`; a plain `python` run is a
world of one and touches no process group. gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init(device: str = "auto") -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK in the environment)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local}" if device == "cuda" else device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def print0(d: Dist, *args, **kwargs) -> None:
    if d.is_main:
        print(*args, **kwargs)


def wrap(model: nn.Module, d: Dist, strategy: str) -> nn.Module:
    """DDP or FSDP2 (`fully_shard` on each block, then the root). In a world of one, the model as is."""
    if not d.active or strategy == "none":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        for m in model.mtp:
            fully_shard(m)
        fully_shard(model)
        return model
    raise ValueError(f"distributed strategy must be ddp, fsdp or none, got {strategy!r}")


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def all_reduce_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.active:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= d.world_size
    return x


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.active:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    """Model and optimizer state with full tensors keyed by parameter name, on the CPU (on rank 0
    for FSDP; every rank gets it for DDP and single process). The same format whatever the world
    size, so a run saved by 2 ranks resumes on 1, and back."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    m = unwrap(model)
    msd = get_model_state_dict(m, options=opts)
    osd = get_optimizer_state_dict(m, optimizer, options=opts) if optimizer is not None else None
    return msd, osd


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, msd: dict, osd: dict | None) -> None:
    """Inverse of full_state: every rank passes the full dicts; each keeps its own shard."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    m = unwrap(model)
    set_model_state_dict(m, msd, options=opts)
    if optimizer is not None and osd is not None:
        set_optimizer_state_dict(m, optimizer, osd, options=opts)
