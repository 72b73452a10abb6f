"""Several processes, one run: torch.distributed under torchrun (DDP, FSDP2, tensor parallel).

lmlab never launches processes itself: `torchrun --nproc_per_node=N -m lmlab pretrain ...` starts
them and sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; `init` reads those.
Without them the run is a single process and every function here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .config import DistributedConfig


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "none"  # resolved: "none" | "ddp" | "fsdp" | "tp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Whether no single process holds the whole model (checkpoints go through DCP)."""
        return self.strategy in ("fsdp", "tp")


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def init(cfg: DistributedConfig, device: str = "auto") -> DistEnv:
    """Join the process group torchrun set up (if any) and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        if cfg.strategy not in ("auto", "none", "ddp", "fsdp", "tp"):
            raise ValueError(f"unknown distributed.strategy {cfg.strategy!r}")
        return DistEnv(device=pick_device(device), strategy="none")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    strategy = "ddp" if cfg.strategy in ("auto", "none") else cfg.strategy
    if cfg.strategy == "none":
        raise ValueError(f"distributed.strategy='none' but torchrun started {world_size} processes; "
                         "choose ddp, fsdp or tp, or run a single process")
    return DistEnv(rank, world_size, local_rank, dev, strategy)


def shutdown(env: DistEnv) -> None:
    if env.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, env: DistEnv, precision: str, cfg: DistributedConfig) -> nn.Module:
    """The module the loop calls: `model` itself, or a DDP wrapper. FSDP2 and tensor parallelism
    change `model` in place (its parameters become DTensors) and return it."""
    if env.strategy == "none":
        return model
    if env.strategy == "ddp":
        ids = [env.device.index] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    raise NotImplementedError(f"distributed.strategy={env.strategy!r} is not available yet")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper (FSDP2/TP modules are their own model)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The mean of a tensor over all processes (itself in a single process)."""
    if env.world_size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / env.world_size


def all_sum(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.world_size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every process when `flag` is True on any (so all stop at the same step)."""
    if env.world_size == 1:
        return flag
    t = torch.tensor([int(flag)], device=env.device if env.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        dist.barrier()
