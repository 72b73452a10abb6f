"""THE training loop: one loop for pretraining, SFT, reward models, DPO and distillation.

What is trained is decided by the caller: an *objective* `(model, batch) -> (loss, metrics)` (its scalar
metrics are averaged like the loss and logged beside it; it may
carry `count(batch)`, the number of terms its mean loss averages, for token-weighted accumulation) and
an iterator of batches that can report and restore its position (`state_dict` /
`load_state_dict`, as `lmlab.data.loader.PackedLoader` does). Everything else is the loop's, and
so every stage gets the same of it:

    for step in range(start, steps):
        lr = train.lr x schedule(step)                                  (train/schedule.py)
        for each of grad_accum micro-batches:                           gradient accumulation
            with autocast(bf16 | fp16):  loss = objective(model, batch)  mixed precision
            backward(loss x weight)        (1 / grad_accum, or by token counts: _micro_weights;
                                            x scale with fp16's GradScaler; DDP syncs the last)
        clip the global gradient norm; optimizer step; zero grads
        every log_every: a metrics line; every eval_every: evaluate; every save_every: checkpoint

Exact resume: the state after step k is the model, the optimizer, the gradient scaler, the data
position, the RNG states and k itself, and all of it is in the checkpoint (train/checkpoint.py).
The schedule is a pure function of the step, so it has no state. Evaluation draws no random
numbers from the global generators and restores train mode, so evaluating or not does not change
the steps that follow: a run killed and resumed from its last checkpoint takes, bit for bit, the
steps the uninterrupted run took (tests/train/test_resume.py, CPU float32).

SIGINT / SIGTERM: the current step finishes, a checkpoint is written, and the run returns with
`interrupted=True` (a second signal aborts at once). Under torchrun every process stops at the
same step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..model.checkpoint import load_checkpoint
from ..model.counting import flops_per_token
from ..model.moe import update_expert_biases
from . import checkpoint as ckpt
from . import distributed
from .config import TrainConfig
from .distributed import DistEnv
from .metrics import MetricsLog, peak_flops_of, plot_losses
from .optim import build_optimizer
from .schedule import lr_multiplier

Objective = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, Any]]]
Evaluate = Callable[[nn.Module], dict[str, Any]]


class ModelIO:
    """How a checkpoint holds the model's weights. The default writes the whole model (model.safetensors and
    config.json, a checkpoint `lmlab generate` reads). A run that trains an adapter on a frozen base passes one
    that writes only the adapter (tune/sft.py), so each checkpoint is megabytes, not the whole base again."""

    def write(self, model: nn.Module, directory: Path, tokenizer_files: list[Path], metadata: dict[str, Any]) -> None:
        from ..model.checkpoint import write_checkpoint_files

        write_checkpoint_files(model, directory, tokenizer_files, metadata)

    def read(self, model: nn.Module, directory: Path) -> None:
        device = next(model.parameters()).device
        weights = load_checkpoint(directory, device=device, dtype=torch.float32).state_dict()
        model.load_state_dict(weights, strict=True)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class RunResult:
    step: int  # optimizer steps taken in total
    tokens: int  # training tokens consumed in total
    loss: float | None  # the last logged training loss
    eval: dict[str, Any]  # the last evaluation's metrics (val_loss, val_ppl, ...)
    checkpoint: Path | None  # the last checkpoint written
    out_dir: Path
    interrupted: bool = False  # stopped early by SIGINT / SIGTERM (after writing a checkpoint)


class RunExistsError(FileExistsError):
    """The run directory already has checkpoints and neither resume nor overwrite was asked."""


# --- signals -----------------------------------------------------------------------------------
class _StopSignals:
    """Turn the first SIGINT / SIGTERM into a flag the loop checks between steps; a second one
    raises KeyboardInterrupt at once. Only the main thread can install handlers; elsewhere
    (a notebook worker thread, say) signals keep their default behavior."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


# --- model preparation -----------------------------------------------------------------------
def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block's activations during backward instead of storing them
    (Chen et al. 2016): memory per layer drops to the block's input, at the cost of one more
    forward. Done by replacing each block's `forward` on the instance, so parameter names, and
    hence checkpoints, are unchanged."""
    from torch.utils.checkpoint import checkpoint

    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError("activation checkpointing needs a model with `blocks` (an lmlab Transformer)")
    for block in blocks:
        block.forward = functools.partial(checkpoint, type(block).forward.__get__(block), use_reentrant=False)


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])


def _prepare_run_dir(out_dir: Path, resume: bool, overwrite: bool, env: DistEnv) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); clears the run with overwrite."""
    found = ckpt.latest_checkpoint(out_dir)
    if resume:
        if found is None:
            raise FileNotFoundError(f"nothing to resume: {out_dir} has no checkpoint in {ckpt.CHECKPOINTS}/; "
                                    "start the run without --resume")
        return found
    if found is not None and not overwrite:
        raise RunExistsError(f"{out_dir} already holds checkpoints (latest: {found.name}); pass --resume to continue "
                             "that run, --overwrite to start over (deleting it), or choose another train.out_dir")
    if found is not None and env.is_main:
        shutil.rmtree(out_dir / ckpt.CHECKPOINTS)
        (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    distributed.barrier(env)
    return None


def _set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * multiplier


def _grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm to max_norm (0: no clipping) and return the norm before.
    Under FSDP every gradient is a DTensor shard; under tensor parallelism the split matrices'
    are and the replicated parameters' are plain tensors, which torch's clip_grad_norm_ cannot
    take in one list. So each kind's norm is computed apart (a DTensor's over all its shards),
    the two are combined, and both kinds are scaled by the same factor."""
    params = [p for p in model.parameters() if p.grad is not None]
    sharded = [p for p in params if hasattr(p.grad, "full_tensor")]
    kinds = [k for k in (sharded, [p for p in params if not hasattr(p.grad, "full_tensor")]) if k]
    if not kinds:
        return torch.zeros(())
    norms = [torch.nn.utils.get_total_norm([p.grad for p in k]) for k in kinds]
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    if max_norm > 0:
        for k in kinds:
            torch.nn.utils.clip_grads_with_norm_(k, max_norm, total)
    return total


def _micro_weights(objective: Objective, micro_batches: list, env: DistEnv, device: torch.device) -> list[float]:
    """What each micro-batch's loss is multiplied by before backward, so that the step's gradient is that of the
    mean over the whole global batch. A loss that is a mean over equal-sized micro-batches (pretraining) gets
    1 / grad_accum. An objective with a `count(batch)` attribute (the number of terms its mean is over, e.g. the
    assistant tokens of an SFT batch, which differ from batch to batch) gets count_i * dp_size / total, total
    being the count over every micro-batch of every data-parallel process: each term then weighs the same
    wherever it landed, as in one big batch (DDP and FSDP average gradients over the dp_size processes)."""
    count = getattr(objective, "count", None)
    if count is None:
        return [1.0 / len(micro_batches)] * len(micro_batches)
    counts = [float(count(b)) for b in micro_batches]
    total = distributed.all_sum(torch.tensor(sum(counts), dtype=torch.float64, device=device), env)
    total = float(total) / env.tp_size  # the processes of a tensor-parallel group share one batch
    if total == 0:
        raise ValueError("no micro-batch of this step has anything to learn from (count 0 everywhere)")
    return [c * env.dp_size / total for c in counts]


def _accumulate(window: dict[str, torch.Tensor], metrics: dict[str, Any], weight: float,
                device: torch.device) -> None:
    """Add a micro-batch's scalar metrics (numbers or one-element tensors, e.g. DPO's reward accuracy) into the
    window's sums, weighted as its loss is, so that each logged value is the step's mean averaged over the
    window's steps. Anything else an objective returns (text, lists) is not logged. Kept on the device: no
    synchronization until the log line."""
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
            continue
        if isinstance(value, torch.Tensor) and value.numel() != 1:
            continue
        value = torch.as_tensor(value, device=device).detach().float().reshape(())
        window[name] = window.get(name, torch.zeros((), device=device)) + value * weight


# --- the loop ------------------------------------------------------------------------------------
def train(cfg: TrainConfig, model: nn.Module, objective: Objective, batches: Iterator, *,
          env: DistEnv | None = None, evaluate: Evaluate | None = None,
          tokenizer_files: Iterable[str | Path] = (), resume: bool = False, overwrite: bool = False,
          progress: bool = True, desc: str = "train", model_io: ModelIO | None = None,
          metadata: dict[str, Any] | None = None) -> RunResult:
    """Train `model` (a plain lmlab Transformer on its device, float32 master weights) on
    `batches` with `objective` for cfg.train.steps optimizer steps.

    env: this process's place in a torchrun job (default: a single process on model's device).
    evaluate: called every eval_every steps and at the end with the model (eval mode, no grad);
      returns metrics for the log (e.g. val_loss, samples).
    tokenizer_files: copied into every checkpoint, so each one is ready for `lmlab generate`.
    resume: continue from the newest checkpoint in cfg.train.out_dir (weights, optimizer, data
      position, RNG, step); the config may change (e.g. more steps), the model and data may not.
    overwrite: delete an existing run in out_dir first (without it an existing run is an error).
    model_io: how checkpoints write and read the model (default: all of its weights; see ModelIO).
    metadata: more JSON stored in every checkpoint's config beside the training config.
    """
    t = cfg.train
    device = next(model.parameters()).device
    model_io = model_io or ModelIO()
    env = env or DistEnv(device=device)
    out_dir = Path(t.out_dir)
    tokenizer_files = [Path(p) for p in tokenizer_files]
    start = _prepare_run_dir(out_dir, resume, overwrite, env)
    if t.threads:
        torch.set_num_threads(t.threads)

    tokens_per_step = t.batch_size * cfg.data.seq_len * t.grad_accum * env.dp_size
    state: dict[str, Any] = {}
    sharded_start = start is not None and (start / "dcp").is_dir()  # written by FSDP / TP: reshards on load
    if start is not None and not sharded_start:  # whole weights: load them before any sharding
        state = ckpt.load_train_state(start)
        model_io.read(model, start)
    plain = model
    if t.activation_checkpointing:
        apply_activation_checkpointing(plain)
    wrapped = distributed.wrap(plain, env, t.precision, cfg.distributed)
    if t.compile:
        plain.compile()  # in place: parameter names (and so checkpoints) stay the same
    optimizer = build_optimizer(plain, dataclasses.replace(cfg.optim, lr=t.lr))
    scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" else None
    if sharded_start:
        state = distributed.load_sharded(start, plain, optimizer)
    step, tokens = 0, 0
    if start is not None:
        if env.sharded and not sharded_start:  # a whole optimizer state, to be sharded like the model
            distributed.load_full_optimizer_state(plain, optimizer, state["optimizer"])
        elif not sharded_start:
            optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        batches.load_state_dict(state["loader"])
        ckpt.set_rng_state(state["rng"])
        step, tokens = int(state["step"]), int(state["tokens"])
        if state.get("tokens_per_step", tokens_per_step) != tokens_per_step:  # e.g. grad_accum changed
            raise ValueError(f"cannot resume {start}: it trained on {state['tokens_per_step']:,} tokens per step and "
                             f"this run takes {tokens_per_step:,}; keep batch_size x grad_accum x data-parallel "
                             "processes x seq_len as it was")

    log = MetricsLog(out_dir, enabled=env.is_main, tensorboard=t.tensorboard)
    if start is not None:
        log.truncate_after(step)
    flops_per_step = flops_per_token(plain.cfg, cfg.data.seq_len) * tokens_per_step if hasattr(plain, "cfg") else 0
    peak = (t.peak_flops or (peak_flops_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else 0.0))
    peak *= env.world_size
    metadata = {"train_config": cfg.to_dict(), **(metadata or {})}

    def save(at: int) -> Path:
        path = ckpt.checkpoint_dir(out_dir, at)
        train_state = {"step": at, "tokens": tokens, "optimizer": None if env.sharded else optimizer.state_dict(),
                       "scaler": scaler.state_dict() if scaler is not None else None,
                       "loader": batches.state_dict(), "rng": ckpt.rng_state(), "world_size": env.world_size,
                       "tokens_per_step": tokens_per_step}
        if env.sharded:
            distributed.save_sharded(path, plain, optimizer, train_state, tokenizer_files, metadata, env)
        elif env.is_main:
            ckpt.save(path, plain, train_state, tokenizer_files, {**metadata, "step": at}, overwrite=True,
                      write_model=model_io.write)
        distributed.barrier(env)
        if env.is_main:
            ckpt.rotate(out_dir, t.keep_last)
            plot_losses(out_dir, out_dir / "loss.png")
        return path

    def run_eval(at: int) -> dict[str, Any]:
        if evaluate is None:
            return {}
        plain.eval()
        with torch.no_grad(), _autocast(t.precision, device):
            result = evaluate(plain)
        plain.train()
        log.write({"kind": "eval", "step": at, "tokens": tokens, **result})
        return result

    bar = tqdm(total=t.steps, initial=step, desc=desc, unit="step", disable=not (progress and env.is_main),
               dynamic_ncols=True)
    last_ckpt: Path | None = ckpt.latest_checkpoint(out_dir) if start is not None else None
    last_loss, last_eval, interrupted = None, {}, False
    window_loss = torch.zeros((), device=device)
    window_metrics: dict[str, torch.Tensor] = {}  # the objective's scalar metrics, summed over the window's steps
    window_steps, window_start = 0, time.perf_counter()
    wrapped.train()
    with _StopSignals() as stop:
        while step < t.steps:
            multiplier = lr_multiplier(step, t.steps, cfg.schedule)
            _set_lr(optimizer, multiplier)
            lr = t.lr * multiplier  # what is logged (Muon's matrices follow optim.muon_lr x multiplier)
            micro_batches = [next(batches) for _ in range(t.grad_accum)]
            weights = _micro_weights(objective, micro_batches, env, device)
            for micro, batch in enumerate(micro_batches):
                sync = micro == t.grad_accum - 1  # DDP all-reduces gradients on the last backward only
                no_sync = wrapped.no_sync if (not sync and hasattr(wrapped, "no_sync")) else contextlib.nullcontext
                with no_sync(), _autocast(t.precision, device):
                    loss, metrics = objective(wrapped, batch)
                    scaled = loss * weights[micro]
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
                window_loss += scaled.detach().float()
                _accumulate(window_metrics, metrics, weights[micro] / sum(weights), device)
            if scaler is not None:
                scaler.unscale_(optimizer)
            grad_norm = _grad_norm(plain, t.grad_clip)
            (scaler.step(optimizer) if scaler is not None else optimizer.step())
            if scaler is not None:
                scaler.update()
            optimizer.zero_grad(set_to_none=True)
            update_expert_biases(plain)  # MoE bias balancing (DeepSeek-V3, model/moe.py); a no-op without it
            step, tokens = step + 1, tokens + tokens_per_step
            window_steps += 1
            bar.update(1)

            if step % t.log_every == 0 or step == t.steps:
                loss_value = distributed.all_mean(window_loss / window_steps, env).item()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - window_start
                tok_s = window_steps * tokens_per_step / max(elapsed, 1e-9)
                record = {"kind": "train", "step": step, "tokens": tokens, "loss": loss_value, "lr": lr,
                          "grad_norm": float(grad_norm), "tokens_per_s": tok_s}
                for name, total in sorted(window_metrics.items()):
                    record.setdefault(name, distributed.all_mean(total / window_steps, env).item())
                if peak:
                    record["mfu"] = flops_per_step * window_steps / max(elapsed, 1e-9) / peak
                log.write(record)
                postfix = {"loss": f"{loss_value:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tok_s:,.0f}"}
                if "mfu" in record:
                    postfix["mfu"] = f"{100 * record['mfu']:.1f}%"
                bar.set_postfix(postfix, refresh=False)
                if not math.isfinite(loss_value):
                    raise FloatingPointError(
                        f"training loss is {loss_value} at step {step}; lower train.lr, keep train.grad_clip on, or "
                        "use bf16 instead of fp16; resume from the last good checkpoint with --resume")
                last_loss = loss_value
                window_loss.zero_()
                window_metrics.clear()
                window_steps, window_start = 0, time.perf_counter()

            stopping = distributed.any_rank(stop.signum is not None, env)
            final = step == t.steps
            paused = time.perf_counter()
            if (t.eval_every and step % t.eval_every == 0) or final:
                last_eval = run_eval(step)
            if (t.save_every and step % t.save_every == 0) or final or stopping:
                last_ckpt = save(step)
            window_start += time.perf_counter() - paused  # tokens/s counts training time only
            if stopping:
                interrupted = True
                break
    bar.close()
    log.close()
    return RunResult(step, tokens, last_loss, last_eval, last_ckpt, out_dir, interrupted)
