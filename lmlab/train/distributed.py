"""Several processes, one run: torch.distributed under torchrun (DDP, FSDP2, tensor parallel).

lmlab never launches processes itself: `torchrun --nproc_per_node=N -m lmlab pretrain ...` starts
them and sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; `init` reads those.
Without them the run is a single process and every function here is a no-op. Three strategies,
all torch's own machinery (docs/distributed.md says which to pick when):

- "ddp"  `DistributedDataParallel`: every process holds the whole model and optimizer, takes its
         own slice of the global batch, and gradients are all-reduced (averaged) in backward.
- "fsdp" FSDP2 `fully_shard` (ZeRO-3, Rajbhandari et al. 2020): parameters, gradients and
         optimizer state are DTensors sharded over all processes; each block's full weights are
         all-gathered just before it runs and freed after; gradients are reduce-scattered.
- "tp"   tensor parallelism (Megatron-LM, Shoeybi et al. 2019) with DTensor `parallelize_module`:
         each block's matrices are split across processes, which all see the same batch.

Checkpoints of sharded runs (fsdp, tp) go through torch.distributed.checkpoint (DCP): every
process writes its own shards, and loading reshards onto any number of processes and any
strategy, or onto a single unsharded process. Each also holds the consolidated weights, so every
other stage reads it as an ordinary checkpoint. Data-parallel coordinates (`DistEnv.dp_rank`,
`dp_size`) say which slice of the batch a process takes: all of a tensor-parallel group share one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import STRATEGIES, DistributedConfig


@dataclass
class DistEnv:
    """This process's place in the job. Ranks are laid out data-parallel-major: the tp_size
    consecutive ranks rank // tp_size form one tensor-parallel group, which takes one slice of
    the batch (today tp_size is 1, or the whole world under strategy "tp")."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "none"  # resolved: "none" | "ddp" | "fsdp" | "tp"
    tp_size: int = 1  # processes that split each matrix between them (and so share a batch)

    def __post_init__(self) -> None:
        if self.tp_size < 1 or self.world_size % self.tp_size:
            raise ValueError(f"tp_size={self.tp_size} must divide world_size={self.world_size}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """Which slice of the global batch this process takes."""
        return self.rank // self.tp_size

    @property
    def dp_size(self) -> int:
        """How many different slices of the batch one step consumes (the data-parallel degree)."""
        return self.world_size // self.tp_size

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
    """Join the process group torchrun set up (if any) and pick this process's device. A single
    process runs unsharded whatever the strategy, so a sharded run can be resumed on one."""
    if cfg.strategy not in STRATEGIES:
        raise ValueError(f"unknown distributed.strategy {cfg.strategy!r}; choose one of {STRATEGIES}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistEnv(device=pick_device(device), strategy="none")
    if cfg.strategy == "none":
        raise ValueError(f"distributed.strategy='none' but torchrun started {world_size} processes; "
                         "choose ddp, fsdp or tp, or run a single process")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda":  # one GPU per process, chosen by its rank on this node
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    strategy = "ddp" if cfg.strategy == "auto" else cfg.strategy
    return DistEnv(rank, world_size, local_rank, dev, strategy, tp_size=world_size if strategy == "tp" else 1)


def shutdown(env: DistEnv) -> None:
    if env.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def _mesh(env: DistEnv):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(env.device.type, (env.world_size,))


# --- wrapping the model ------------------------------------------------------------------------
def wrap(model: nn.Module, env: DistEnv, precision: str, cfg: DistributedConfig) -> nn.Module:
    """The module the loop calls: `model` itself, or a DDP wrapper around it. FSDP2 and tensor
    parallelism change `model` in place (its parameters become DTensors; their names, and so
    checkpoints, stay the same) and return it. Build the optimizer after this, on `model`."""
    if env.strategy == "none":
        return model
    if env.strategy == "ddp":
        ids = [env.device.index] if env.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if env.strategy == "fsdp":
        return apply_fsdp(model, env, precision, cfg)
    if env.strategy == "tp":
        return apply_tensor_parallel(model, env, precision)
    raise ValueError(f"unknown distributed.strategy {env.strategy!r}")


def apply_fsdp(model: nn.Module, env: DistEnv, precision: str, cfg: DistributedConfig) -> nn.Module:
    """FSDP2: every parameter becomes a DTensor sharded on dim 0 over all processes. Each block is
    its own unit (one all-gather before its forward, again before its backward unless
    reshard_after_forward=False keeps it, one reduce-scatter of its gradients), and the root unit
    holds the rest (embeddings, final norm, output head), so only one block's full weights exist
    at a time. The mixed-precision policy runs the gathered weights in bf16/fp16 while the
    sharded float32 weights stay the optimizer's master copy; gradients are reduced in float32
    unless fsdp_reduce_fp32=False (half the traffic, coarser sums). fp16's loss scaler works on
    the sharded gradients: torch's GradScaler max-reduces its overflow flag across the mesh."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError("FSDP in lmlab shards an lmlab Transformer block by block; this model has no `blocks`")
    param_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    reduce_dtype = torch.float32 if cfg.fsdp_reduce_fp32 else None
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    mesh = _mesh(env)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.fsdp_reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=cfg.fsdp_reshard_after_forward)
    return model


def apply_tensor_parallel(model: nn.Module, env: DistEnv, precision: str = "fp32") -> nn.Module:
    """Megatron-style tensor parallelism with DTensor: in every block the q/k/v and gate/up
    projections are split by output columns (each process owns whole attention heads and a slice
    of the MLP's hidden units) and o/down by input rows, so each sublayer costs one all-reduce in
    forward and one in backward, and nothing between the two matrices of a sublayer is exchanged.

    Embeddings, norms and the output head stay whole on every process (replicated): they are a
    small share of a large model's weights; a vocabulary-sharded head would need a vocabulary-
    parallel cross-entropy, which the fused loss (model/loss.py) does not compute; and tied
    embeddings would need the table sharded two ways at once. Their inputs are identical on every
    process after each all-reduce, so their gradients are too, and no extra communication keeps
    them in sync. To shard them as well, combine with FSDP (docs/distributed.md)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    n, cfg = env.tp_size, model.cfg
    if cfg.n_kv_heads % n or cfg.n_heads % n or cfg.d_ff % n:
        raise ValueError(f"tensor parallel over {n} processes needs n_heads ({cfg.n_heads}), n_kv_heads "
                         f"({cfg.n_kv_heads}) and d_ff ({cfg.d_ff}) divisible by {n}; change the model or "
                         "the number of processes, or use distributed.strategy='fsdp'")
    special = [name for name, on in (("moe", cfg.moe is not None), ("mla", cfg.mla is not None),
                                     ("linear or mamba layers", cfg.recurrent)) if on]
    if special:
        raise ValueError(f"tensor parallelism shards standard attention and dense MLPs; this model has {special}. "
                         "Use distributed.strategy='fsdp' or 'ddp'")
    if cfg.position == "alibi":
        raise ValueError("position='alibi' is not supported with tensor parallelism (the bias is built for all "
                         "heads, not this process's); use distributed.strategy='fsdp' or 'ddp'")
    if precision == "fp16":
        raise ValueError("train.precision='fp16' is not supported with tensor parallelism: torch's GradScaler "
                         "cannot unscale a mix of sharded (DTensor) and replicated gradients; use 'bf16', which "
                         "needs no loss scaling")
    columns = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.up_proj"]
    if cfg.mlp_gated:
        columns.append("mlp.gate_proj")
    plan = {f"blocks.*.{name}": ColwiseParallel() for name in columns}
    plan.update({f"blocks.*.{name}": RowwiseParallel() for name in ("attn.o_proj", "mlp.down_proj")})
    parallelize_module(model, _mesh(env), plan)
    for block in model.blocks:  # the projections now yield this process's heads only
        block.attn.n_heads //= n
        block.attn.n_kv_heads //= n
    _local_kv_cache(model, n)
    return model


def _local_kv_cache(model: nn.Module, n: int) -> None:
    """Make `model.new_cache` (used by generation, e.g. the samples at evaluation) allocate this
    process's share of the heads. An instance attribute, so model.cfg (saved in checkpoints)
    keeps the full sizes."""
    from ..model.cache import KVCache

    local = dataclasses.replace(model.cfg, n_heads=model.cfg.n_heads // n, n_kv_heads=model.cfg.n_kv_heads // n)

    def new_cache(batch_size: int, max_len: int | None = None) -> KVCache:
        weight = model.embed.weight  # replicated: a plain tensor with the model's device and dtype
        return KVCache(local, batch_size, max_len or local.max_seq_len, weight.device, weight.dtype)

    model.new_cache = new_cache


@contextlib.contextmanager
def root_unsharded(model: nn.Module) -> Iterator[nn.Module]:
    """Within this block an FSDP2 model's own (root) parameters, embeddings, final norm and
    output head, are gathered whole. Needed by code that calls the model's methods rather than
    the model (generation calls `hidden_states` and `logits`), since FSDP gathers on `model(...)`
    only; the blocks are still called as modules and gather themselves. Use it after the model's first
    call (FSDP sets itself up there, as in training). Other models: a no-op."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield model
        return
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper (FSDP2/TP modules are their own model)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# --- checkpoints of sharded runs ---------------------------------------------------------------
def save_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, train_state: dict[str, Any],
                 tokenizer_files, metadata: dict[str, Any], env: DistEnv) -> Path:
    """Write a checkpoint of a sharded run at `path`; every process must call it.

    Contents: dcp/ (model and optimizer in torch.distributed.checkpoint format: a file per
    process plus metadata), train_state.pt (the rest of the train state, from rank 0), and the
    consolidated model.safetensors + config.json + tokenizer files, so that `lmlab generate` and
    every other stage read it like any checkpoint. Atomic: rank 0 creates one temporary
    directory and broadcasts its name, all processes write into it (so on several nodes it must
    be on a filesystem they share), and rank 0 renames it into place once everything is written
    (dcp.save returns on rank 0 only after every process has written its shards)."""
    from ..atomic import atomic_directory
    from ..model.checkpoint import TRAIN_STATE_FILE
    from .checkpoint import STATE_VERSION

    path = Path(path)
    if not env.is_main:
        _write_shards(Path(_broadcast(None)), model, optimizer)
        return path
    with atomic_directory(path, overwrite=True) as tmp:
        _broadcast(str(tmp))
        full = _write_shards(tmp, model, optimizer)
        _write_consolidated(tmp, model, full, tokenizer_files, {**metadata, "step": train_state["step"]})
        torch.save({"version": STATE_VERSION, **train_state}, tmp / TRAIN_STATE_FILE)
    return path


def _broadcast(value: str | None) -> str:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _write_shards(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Save this process's shards into directory/dcp; return the full model state dict gathered
    to rank 0's CPU (empty on the other ranks). Both steps are collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(directory / "dcp"))
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _write_consolidated(directory: Path, model: nn.Module, full: dict[str, torch.Tensor], tokenizer_files,
                        metadata: dict[str, Any]) -> None:
    from ..model.checkpoint import write_checkpoint_files
    from ..model.transformer import Transformer

    with torch.device("meta"):
        plain = Transformer(model.cfg)
    plain.load_state_dict(full, assign=True)  # the gathered CPU tensors, without a copy
    write_checkpoint_files(plain, directory, tokenizer_files, metadata)


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer from a checkpoint's dcp/ onto however many processes run now
    and whatever their strategy (resharding as needed; a single unsharded process works too);
    every process must call it. Returns the checkpoint's train_state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from .checkpoint import load_train_state

    path = Path(path)
    train_state = load_train_state(path)  # first: it says clearly what is wrong with a bad checkpoint
    model_sd, optim_sd = get_state_dict(model, optimizer)  # the layout to fill: this run's shards
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return train_state


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an unsharded optimizer state_dict (from a single-process or DDP checkpoint) into the
    optimizer of a sharded `model`: each process keeps its shard of every state tensor.

    torch's state_dict numbers parameters in the order of the optimizer's groups; the sharded
    model has the same parameter names in the same groups (build_optimizer is deterministic), so
    the numbers are renamed to parameter names, the form set_optimizer_state_dict shards from."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved = [i for group in state["param_groups"] for i in group["params"]]
    if len(saved) != len(order) or len(state["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint's optimizer state has {len(saved)} parameters in "
                         f"{len(state['param_groups'])} groups but this optimizer has {len(order)} in "
                         f"{len(optimizer.param_groups)}; resume with the same model and [optim] settings")
    by_name = {
        "state": {order[i]: value for i, value in state["state"].items()},
        "param_groups": [{**group, "params": [order[i] for i in group["params"]]} for group in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


# --- collectives the loop needs ----------------------------------------------------------------
def _reduce(value: torch.Tensor, env: DistEnv, op) -> torch.Tensor:
    value = value.detach().clone()
    dist.all_reduce(value, op=op)
    return value


def all_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The mean of a tensor over all processes (itself in a single process)."""
    return value if env.world_size == 1 else _reduce(value, env, dist.ReduceOp.SUM) / env.world_size


def all_sum(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    return value if env.world_size == 1 else _reduce(value, env, dist.ReduceOp.SUM)


def all_max(value: int, env: DistEnv) -> int:
    """The largest of an integer over all processes."""
    if env.world_size == 1:
        return value
    t = torch.tensor([value], device=env.device if env.device.type == "cuda" else "cpu")
    return int(_reduce(t, env, dist.ReduceOp.MAX).item())


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every process when `flag` is True on any (so all stop at the same step)."""
    return bool(all_max(int(flag), env))


def barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        dist.barrier()
