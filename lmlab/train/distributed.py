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
    def dp_rank(self) -> int:
        """This process's slot among the data-parallel replicas (tensor parallel: all share one)."""
        return 0 if self.strategy == "tp" else self.rank

    @property
    def dp_size(self) -> int:
        """How many different batches one step consumes."""
        return 1 if self.strategy == "tp" else self.world_size

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


def _mesh(env: DistEnv):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(env.device.type, (env.world_size,))


def wrap(model: nn.Module, env: DistEnv, precision: str, cfg: DistributedConfig) -> nn.Module:
    """The module the loop calls: `model` itself, or a DDP wrapper. FSDP2 and tensor parallelism
    change `model` in place (its parameters become DTensors) and return it."""
    if env.strategy == "none":
        return model
    if env.strategy == "ddp":
        ids = [env.device.index] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if env.strategy == "fsdp":
        return apply_fsdp(model, env, precision, cfg)
    if env.strategy == "tp":
        return apply_tensor_parallel(model, env)
    raise ValueError(f"unknown distributed.strategy {env.strategy!r}")


def apply_fsdp(model: nn.Module, env: DistEnv, precision: str, cfg: DistributedConfig) -> nn.Module:
    """FSDP2 (ZeRO-3): every parameter is a DTensor sharded on dim 0 over all processes; each
    block is its own unit, so only one block's full weights exist at a time (all-gathered before
    its forward and backward, freed after; gradients reduce-scattered). The mixed-precision
    policy computes in bf16/fp16 with float32 master weights and float32 gradient reduction."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if precision == "fp16":
        raise ValueError("FSDP2 with fp16 needs a sharded gradient scaler, which lmlab does not provide; "
                         "use train.precision='bf16' (no scaler needed) or 'fp32'")
    dtype = {"bf16": torch.bfloat16, "fp32": None}[precision]
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if cfg.fsdp_reduce_fp32 else None)
    mesh = _mesh(env)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.fsdp_reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.fsdp_reshard_after_forward)
    return model


def apply_tensor_parallel(model: nn.Module, env: DistEnv) -> nn.Module:
    """Megatron-style tensor parallelism (Shoeybi et al. 2019) with DTensor: in every block the
    q/k/v and gate/up projections are split by output columns (each process owns whole heads and
    a slice of the MLP's hidden units) and o/down by input rows, so each sublayer needs one
    all-reduce forward and one backward. Embeddings, norms and the output head stay replicated
    (identical on every process, their gradients identical too). Every process sees the same batch."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    n = env.world_size
    cfg = model.cfg
    if cfg.n_kv_heads % n or cfg.n_heads % n or cfg.d_ff % n:
        raise ValueError(f"tensor parallel over {n} processes needs n_heads ({cfg.n_heads}), n_kv_heads "
                         f"({cfg.n_kv_heads}) and d_ff ({cfg.d_ff}) divisible by {n}")
    plan = {}
    for i in range(len(model.blocks)):
        for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"blocks.{i}.{name}"] = ColwiseParallel()
        for name in ("attn.o_proj", "mlp.down_proj"):
            plan[f"blocks.{i}.{name}"] = RowwiseParallel()
    if not cfg.mlp_gated:  # a plain MLP has no gate
        plan = {k: v for k, v in plan.items() if not k.endswith("gate_proj")}
    parallelize_module(model, _mesh(env), plan)
    for block in model.blocks:  # each process now computes its own heads
        block.attn.n_heads //= n
        block.attn.n_kv_heads //= n
    return model


def save_sharded(path, model: nn.Module, optimizer, train_state: dict, tokenizer_files, metadata: dict,
                 env: DistEnv) -> None:
    """A checkpoint of a sharded run: model and optimizer in torch.distributed.checkpoint format
    (dcp/, one file per process plus metadata; loads back onto any number of processes), the
    rest of the train state in train_state.pt, and the consolidated weights as model.safetensors
    so that `lmlab generate` and every other stage read it like any checkpoint. All processes write
    into rank 0's temporary directory, which is renamed into place once everything is written."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    from ..atomic import atomic_directory
    from ..model.checkpoint import TRAIN_STATE_FILE, write_checkpoint_files
    from ..model.transformer import Transformer

    def write(tmp) -> dict:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "dcp"))
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    if env.is_main:
        with atomic_directory(path, overwrite=True) as tmp:
            dist.broadcast_object_list([str(tmp)], src=0)
            full = write(tmp)
            with torch.device("meta"):
                plain = Transformer(model.cfg)
            plain.load_state_dict(full, assign=True)
            write_checkpoint_files(plain, tmp, tokenizer_files, {**metadata, "step": train_state["step"]})
            torch.save({"version": 1, **train_state}, tmp / TRAIN_STATE_FILE)
    else:
        name = [None]
        dist.broadcast_object_list(name, src=0)
        from pathlib import Path

        write(Path(name[0]))


def load_sharded(path, model: nn.Module, optimizer) -> dict:
    """Restore model and optimizer from a checkpoint's dcp/ directory onto however many processes
    run now (resharding as needed; a single unsharded process works too); returns train_state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from .checkpoint import load_train_state

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return load_train_state(path)


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
