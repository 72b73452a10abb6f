"""Pretraining: next-token prediction on packed token shards, through the one training loop.

    cfg = load_recipe("recipes/speedrun.toml", ["train.steps=100"])
    result = pretrain(cfg)            # checkpoints, metrics.jsonl and loss.png in cfg.train.out_dir

Builds what the loop needs from the config: the process group (under torchrun), the model (fresh
from model/, or train.init_from's weights), the shuffled resumable loader over the train split,
and an evaluation of validation loss, perplexity and a few greedy samples.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.loader import Batch, PackedLoader, ValidationLoader
from ..model.loading import load as load_model
from ..model.transformer import build_model
from . import distributed
from .config import TrainConfig
from .distributed import DistEnv
from .loop import RunResult, train
from .objectives import next_token


def validation_loss(model: nn.Module, cfg: TrainConfig, env: DistEnv, max_batches: int | None = None) -> float:
    """Mean next-token loss over the validation split (its first max_batches batches on each
    process), weighting every token equally across batches and processes."""
    loader = ValidationLoader(cfg.data.path, "val", cfg.data.seq_len, cfg.train.batch_size, rank=env.dp_rank,
                              world_size=env.dp_size, doc_mask=cfg.data.doc_mask, device=env.device,
                              max_batches=max_batches)
    # Sharded data parallel (FSDP): every forward all-gathers weights, so every process must run as
    # many as the one with the most batches; the extra passes run on a dummy batch and count for nothing.
    passes = distributed.all_max(len(loader), env) if env.sharded and env.dp_size > 1 else len(loader)
    filler = torch.zeros(1, cfg.data.seq_len, dtype=torch.long, device=env.device)
    batches = iter(loader)
    total = torch.zeros(2, dtype=torch.float64, device=env.device)
    for _ in range(passes):
        batch = next(batches, None)
        loss, _ = next_token(model, batch if batch is not None else Batch(filler, filler))
        if batch is not None:
            total += torch.stack([loss.double() * batch.y.numel(), torch.tensor(batch.y.numel(), device=env.device)])
    total = distributed.all_sum(total, env)
    if total[1] == 0:
        raise ValueError(f"the validation split of {cfg.data.path} is empty; write shards with a val_fraction > 0")
    return float(total[0] / total[1])


def sample_texts(model: nn.Module, tokenizer: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations of `prompts` (no random numbers drawn, so training is unaffected)."""
    from ..infer.generate import generate
    from ..infer.sampling import SamplingParams

    ids = [tokenizer.encode(p) for p in prompts]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=list(tokenizer.eos_ids))
    completions = generate(model, ids, params, decode=tokenizer.decode)
    return [p + c.text for p, c in zip(prompts, completions, strict=True)]


def _tokenizer(cfg: TrainConfig):
    from ..tokenizer import load_tokenizer

    if not cfg.data.tokenizer:
        return None
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    if tokenizer is None:
        raise FileNotFoundError(f"data.tokenizer={cfg.data.tokenizer} holds no tokenizer (tokenizer.json, ...)")
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer in {cfg.data.tokenizer} has {tokenizer.vocab_size:,} tokens but "
                         f"model.vocab_size is {cfg.model.vocab_size:,}; leave model.vocab_size unset to take it "
                         "from the data")
    return tokenizer


def build(cfg: TrainConfig, env: DistEnv) -> nn.Module:
    """The model to train, float32 on env.device: fresh (seeded by train.seed, identical on every
    process) or with train.init_from's weights."""
    if cfg.train.init_from:
        model = load_model(cfg.train.init_from, device=env.device, dtype=torch.float32)
        if model.cfg != cfg.model:
            cfg.model = model.cfg  # the checkpoint's architecture wins; the recipe's [model] is ignored
        return model
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg.model, device=env.device)


def pretrain(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> RunResult:
    """Pretrain per `cfg` (see train/config.py); returns the run's summary."""
    if not cfg.data.path or not (Path(cfg.data.path) / "meta.json").is_file():
        raise FileNotFoundError(f"data.path={cfg.data.path!r} is not a token shard directory (no meta.json); write "
                                "one with `lmlab data tokenize` or `lmlab data prepare`")
    env = distributed.init(cfg.distributed, cfg.train.device)
    try:
        tokenizer = _tokenizer(cfg)
        model = build(cfg, env)
        loader = PackedLoader(cfg.data.path, "train", cfg.data.seq_len, cfg.train.batch_size, seed=cfg.train.seed,
                              rank=env.dp_rank, world_size=env.dp_size, shuffle=cfg.data.shuffle,
                              doc_mask=cfg.data.doc_mask, device=env.device, tokenizer=tokenizer)

        def evaluate(m: nn.Module) -> dict[str, Any]:
            loss = validation_loss(m, cfg, env, cfg.train.eval_batches or None)  # 0: the whole split
            result: dict[str, Any] = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}
            if tokenizer is not None and cfg.train.sample_tokens and cfg.train.sample_prompts:
                with distributed.root_unsharded(m):  # generation calls the model's methods, not the model
                    result["samples"] = sample_texts(m, tokenizer, cfg.train.sample_prompts, cfg.train.sample_tokens)
            return result

        from ..tokenizer import tokenizer_files
        files = tokenizer_files(cfg.data.tokenizer) if cfg.data.tokenizer else []
        return train(cfg, model, next_token, loader, env=env, evaluate=evaluate, tokenizer_files=files,
                     resume=resume, overwrite=overwrite, progress=progress, desc="pretrain")
    finally:
        distributed.shutdown(env)
