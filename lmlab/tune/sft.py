"""Supervised fine-tuning: a pretrained checkpoint learns to answer in the chat format, through the one loop.

    cfg = load_finetune_recipe("recipes/sft-speedrun.toml", model="runs/x/step_00001500", data="synthetic")
    result = finetune(cfg)        # checkpoints (whole model, or only the adapter), metrics.jsonl, forgetting.json

What SFT adds to the loop (train/loop.py) is data and an objective:
- data (tune/chat_data.py): conversations rendered with the base's chat template, loss on assistant tokens only,
  packed several to a row with attention kept inside each conversation;
- objective: cross-entropy over the assistant tokens of a micro-batch, L = -(1/|A|) sum_{t in A} log p(x_{t+1} |
  x_{<=t}) with A the positions whose next token is the assistant's (Ouyang et al. 2022, completion-only loss);
- the base: any checkpoint `lmlab.model.loading.load` reads (lmlab's, or Hugging Face's through the converter),
  trained whole (full fine-tuning, float32 master weights) or frozen under an adapter (`[adapter]`: LoRA, DoRA,
  QLoRA, IA3, prefix tuning; tune/adapters.py), in which case every checkpoint holds only the adapter;
- evaluation: the held-out conversations' loss (every assistant token weighted equally) and greedy answers to a
  few held-out prompts;
- forgetting: the pretraining validation loss (the base's own token shards when its checkpoint records them, or
  `data.pretrain_val`) before and after, in forgetting.json and the run's summary, so catastrophic forgetting
  (McCloskey & Cohen 1989; Luo et al. 2023 for LLM fine-tuning) is visible in every run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_file
from ..model.loading import load as load_model
from ..train import distributed
from ..train.config import (
    DataConfig,
    DistributedConfig,
    LoopConfig,
    TrainConfig,
    apply_overrides,
    build_sections,
    read_recipe,
)
from ..train.distributed import DistEnv
from ..train.loop import ModelIO, RunResult, train
from ..train.optim import OptimConfig
from ..train.schedule import ScheduleConfig
from . import chat_data
from .adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    AdapterConfig,
    apply_adapter,
    count_parameters,
    load_adapter_weights,
    write_adapter_files,
)

# Peak learning rates when the recipe names none: full fine-tuning moves every weight and wants a small step;
# adapters start from zero (LoRA's B) or identity (IA3) and are commonly trained 10-100x higher
# (LoRA: Hu et al. 2021 use 2e-4; IA3: Liu et al. 2022 use 3e-3; prefix tuning is usually run near 1e-2).
DEFAULT_LR = {"full": 2e-5, "lora": 2e-4, "ia3": 3e-3, "prefix": 1e-2}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORGETTING_FILE = "forgetting.json"


@dataclass
class BaseModelConfig:
    """The `[model]` section: the checkpoint to fine-tune."""

    path: str = ""  # an lmlab checkpoint or a Hugging Face checkpoint directory (with its tokenizer)
    dtype: str = "float32"  # the frozen base's weights under an adapter (bfloat16 halves them; needs bf16/fp16)


@dataclass
class SFTDataConfig:
    """The `[data]` section: which conversations, and how they become batches."""

    train: str = ""  # a .jsonl/.json file or a dataset name ("synthetic", "alpaca:sample"); see tune/chat_data.py
    validation: str = ""  # held-out conversations: "" = the dataset's own split, else val_fraction of train; "none"
    val_fraction: float = 0.05  # held out of `train` when the data has no validation split of its own
    seq_len: int = 512  # tokens per row; longer conversations are cut
    packing: bool = True  # several conversations per row, each attending only to itself
    system: str = ""  # a system prompt for conversations that have none
    limit: int = 0  # use at most this many training conversations (0: all)
    epochs: float = 1.0  # passes over the training conversations; 0: train.steps decides
    pretrain_val: str = ""  # token shards for the forgetting check: "" = the base's own, "none" = skip
    pretrain_val_batches: int = 20  # batches of it, before and after (0: the whole split)
    eval_samples: int = 2  # held-out prompts answered greedily at each evaluation (train.sample_prompts wins)

    def validate(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid fine-tuning data config: {msg}")

        check(bool(self.train), "data.train is not set; give --data FILE|NAME (a .jsonl of chats, an Alpaca-style "
                                "file, or a dataset name such as synthetic or alpaca)")
        check(0 <= self.val_fraction < 1, f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        check(self.seq_len >= 2, f"data.seq_len must be at least 2, got {self.seq_len}")
        check(self.epochs >= 0, f"data.epochs must be >= 0, got {self.epochs}")
        check(self.limit >= 0 and self.pretrain_val_batches >= 0 and self.eval_samples >= 0,
              "data.limit, data.pretrain_val_batches and data.eval_samples must be >= 0")


@dataclass
class FinetuneConfig:
    model: BaseModelConfig = field(default_factory=BaseModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    adapter: AdapterConfig | None = None  # None: full fine-tuning; used when [adapter] sets method or --adapter
    train: LoopConfig = field(default_factory=lambda: LoopConfig(out_dir="runs/sft", sample_prompts=[]))
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @property
    def method(self) -> str:
        return self.adapter.method if self.adapter is not None else "full"

    def validate(self) -> None:
        if not self.model.path:
            raise ValueError("model.path is not set; give --model DIR (an lmlab or Hugging Face checkpoint)")
        if self.model.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.model.dtype!r}; choose one of {tuple(DTYPES)}")
        if self.model.dtype != "float32" and (self.adapter is None or self.train.precision == "fp32"):
            raise ValueError(f"model.dtype={self.model.dtype} keeps the frozen base in half precision: it needs an "
                             "[adapter] (full fine-tuning trains float32 master weights) and train.precision bf16 "
                             "or fp16")
        self.data.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"model": BaseModelConfig, "data": SFTDataConfig, "adapter": AdapterConfig,
                             "train": LoopConfig, "optim": OptimConfig, "schedule": ScheduleConfig,
                             "distributed": DistributedConfig}


def resolve_finetune(d: dict[str, Any], overrides: list[str] = (), *, model: str | None = None,
                     data: str | None = None, adapter: str | None = None) -> FinetuneConfig:
    """A FinetuneConfig from a recipe dict, `--set` overrides and the command line's --model / --data /
    --adapter (which win over the recipe). An [adapter] section trains an adapter when it names a `method` or
    --adapter is given; without either its settings wait for --adapter and the run fine-tunes every weight.
    Defaults that depend on the method: the learning rate (DEFAULT_LR); data.epochs gives way to train.steps when
    the recipe sets steps and no epochs."""
    d = apply_overrides(d, list(overrides), SECTIONS)
    if model:
        d.setdefault("model", {})["path"] = model
    if data:
        d.setdefault("data", {})["train"] = data
    if adapter:  # the named method's settings win; the recipe's [adapter] keeps the rest (rank, targets, ...)
        if adapter not in ADAPTER_PRESETS:
            raise ValueError(f"--adapter {adapter!r}; choose one of {list(ADAPTER_PRESETS)}")
        d["adapter"] = {**(d.get("adapter") or {}), **ADAPTER_PRESETS[adapter]}
    if d.get("adapter") is not None and "method" not in d["adapter"]:
        d["adapter"] = None  # settings without a method are a preset for --adapter, not a request to use one
    method = (d.get("adapter") or {}).get("method", "lora") if d.get("adapter") is not None else "full"
    if "steps" in (d.get("train") or {}) and "epochs" not in (d.get("data") or {}):
        d["data"] = {**(d.get("data") or {}), "epochs": 0.0}
    defaults = {"out_dir": "runs/sft", "sample_prompts": [], "lr": DEFAULT_LR.get(method, DEFAULT_LR["lora"])}
    return build_sections(FinetuneConfig, SECTIONS, d, "fine-tuning", train_defaults=defaults,
                          optional=("adapter",))


# `lmlab sft --adapter NAME`: the common methods by name (the recipe's [adapter] settings refine them).
ADAPTER_PRESETS: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora"},
    "rslora": {"method": "lora", "rslora": True},
    "dora": {"method": "lora", "dora": True},
    "qlora": {"method": "lora", "quantize": "nf4"},
    "ia3": {"method": "ia3"},
    "prefix": {"method": "prefix"},
}


def load_finetune_recipe(path: str | Path | None, overrides: list[str] = (), **cli: str | None) -> FinetuneConfig:
    """Read a fine-tuning TOML recipe (or none: defaults), apply overrides and the command line's choices."""
    return resolve_finetune(read_recipe(path) if path else {}, overrides, **cli)


# --- checkpoints of adapter runs ----------------------------------------------------------------
class AdapterIO(ModelIO):
    """Checkpoints that hold only the adapter (adapter_config.json + adapter_model.safetensors): they load with
    `tune.adapters.load_adapter` onto the base named in their config, and resume by reloading the base."""

    def __init__(self, cfg: AdapterConfig, base: str):
        self.cfg, self.base = cfg, base

    def write(self, model: nn.Module, directory: Path, tokenizer_files: list[Path], metadata: dict[str, Any]) -> None:
        import shutil

        write_adapter_files(model, directory, self.cfg, base=self.base, metadata=metadata)
        for src in tokenizer_files:
            shutil.copyfile(src, directory / src.name)

    def read(self, model: nn.Module, directory: Path) -> None:
        from safetensors.torch import load_file

        if not (directory / ADAPTER_CONFIG).is_file():
            raise ValueError(f"{directory} holds no adapter: it was written by a run without [adapter]; resume "
                             "with the recipe that run used")
        load_adapter_weights(model, load_file(directory / ADAPTER_WEIGHTS), "default", source=str(directory))


# --- objective and evaluation -------------------------------------------------------------------
def sft_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """The completion-only cross-entropy of one packed batch (the module docstring's L)."""
    out = model(**chat_data.model_inputs(batch), targets=batch["targets"], return_logits=False)
    return out.loss, {}


def assistant_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """How many terms the SFT mean is over: the batch's targets. The loop weighs micro-batches by it, so a step's
    gradient is the mean over every assistant token of the global batch, however they fell into micro-batches
    and processes (train/loop.py `_micro_weights`)."""
    return (batch["targets"] != chat_data.IGNORE).sum()


sft_loss.count = assistant_tokens


def held_out_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]], env: DistEnv,
                  objective: Callable = sft_loss) -> float:
    """The mean loss per assistant token over all held-out batches (of every process)."""
    total = torch.zeros(2, dtype=torch.float64, device=env.device)
    for batch in batches:
        batch = {k: v.to(env.device) for k, v in batch.items()}
        n = int((batch["targets"] != chat_data.IGNORE).sum())
        loss, _ = objective(model, batch)
        total += torch.tensor([float(loss) * n, n], dtype=torch.float64, device=env.device)
    total = distributed.all_sum(total, env)
    return float(total[0] / total[1]) if total[1] else float("nan")


def answer(model: nn.Module, tokenizer: Any, prompts: list[list[dict]], max_new_tokens: int,
           batch_size: int = 32) -> list[str]:
    """Greedy assistant replies to conversations that end with a user turn (no random numbers are drawn)."""
    from ..infer.generate import generate
    from ..infer.sampling import SamplingParams
    from ..tokenizer.chat import end_of_turn_ids

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=end_of_turn_ids(tokenizer))
    out = []
    for s in range(0, len(prompts), batch_size):
        ids = [tokenizer.render_chat(m, add_generation_prompt=True)[0] for m in prompts[s:s + batch_size]]
        out += [c.text.strip() for c in generate(model, ids, params, decode=tokenizer.decode)]
    return out


# --- forgetting ---------------------------------------------------------------------------------
def pretraining_data(cfg: FinetuneConfig) -> tuple[str | None, int | None, str]:
    """(token shard directory, sequence length, why) for the forgetting check."""
    from ..model.checkpoint import is_checkpoint, read_metadata

    spec = cfg.data.pretrain_val
    if spec == "none":
        return None, None, "data.pretrain_val = 'none'"
    seq_len = None
    if not spec and is_checkpoint(cfg.model.path):
        recorded = read_metadata(cfg.model.path).get("train_config") or {}
        spec = (recorded.get("data") or {}).get("path") or ""
        seq_len = (recorded.get("data") or {}).get("seq_len")
    if not spec:
        return None, None, ("the base checkpoint records no pretraining data; set data.pretrain_val to a token shard "
                            "directory to measure forgetting")
    if not (Path(spec) / "meta.json").is_file():
        return None, None, f"pretraining data {spec} is not a token shard directory (no meta.json)"
    return spec, seq_len, ""


def pretraining_loss(model: nn.Module, cfg: FinetuneConfig, shards: str, seq_len: int | None, env: DistEnv) -> float:
    from ..train.pretrain import validation_loss

    seq_len = min(seq_len or cfg.data.seq_len, model.cfg.max_seq_len)
    tcfg = TrainConfig(model=model.cfg, data=DataConfig(path=shards, seq_len=seq_len),
                       train=cfg.train)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = validation_loss(model, tcfg, env, cfg.data.pretrain_val_batches or None)
    model.train(was_training)
    return loss


# --- the run -------------------------------------------------------------------------------------
@dataclass
class SFTResult:
    run: RunResult
    forgetting: dict[str, Any]  # {"before", "after", "data"} or {"skipped": why}
    params: dict[str, int]  # trainable and total parameters
    data: dict[str, int]  # conversations and tokens used


def _write_json(path: Path, value: dict[str, Any]) -> None:
    with atomic_file(path, "w") as f:
        f.write(json.dumps(value, indent=2) + "\n")


def finetune(cfg: FinetuneConfig, *, objective_factory: Callable[[nn.Module], Callable] | None = None,
             resume: bool = False, overwrite: bool = False, progress: bool = True, desc: str = "sft",
             log: Callable[[str], None] = print) -> SFTResult:
    """Fine-tune per `cfg`. objective_factory(model) -> objective replaces the SFT loss (distillation uses it);
    the data, adapters, evaluation and forgetting check stay the same."""
    from ..tokenizer import load_tokenizer, tokenizer_files

    cfg.validate()
    cfg = copy.deepcopy(cfg)  # the run fills in train.steps (from data.epochs) and adapter.token_ids on its copy
    env = distributed.init(cfg.distributed, cfg.train.device)
    try:
        if cfg.adapter is not None and env.sharded:
            raise ValueError("adapters train with ddp (or one process); FSDP / tensor parallelism of a frozen base "
                             "is not supported yet: set distributed.strategy = 'ddp'")
        tokenizer = load_tokenizer(cfg.model.path)
        if tokenizer is None:
            raise FileNotFoundError(f"{cfg.model.path} has no tokenizer; fine-tuning renders chats with the "
                                    "checkpoint's own tokenizer and chat template")
        dtype = DTYPES[cfg.model.dtype] if cfg.adapter is not None else torch.float32
        torch.manual_seed(cfg.train.seed)
        model = load_model(cfg.model.path, device=env.device, dtype=dtype)
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"the tokenizer of {cfg.model.path} has {tokenizer.vocab_size:,} tokens, more than the "
                             f"model's {model.cfg.vocab_size:,} embeddings")
        if cfg.data.seq_len > model.cfg.max_seq_len:
            raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len="
                             f"{model.cfg.max_seq_len}; lower data.seq_len")

        # the data
        conversations = chat_data.load_conversations(cfg.data.train, system=cfg.data.system, limit=cfg.data.limit,
                                                     progress=progress and env.is_main)
        val_spec = cfg.data.validation or chat_data.validation_spec(cfg.data.train)
        if cfg.data.validation == "none":
            held_out: list = []
        elif val_spec:
            held_out = chat_data.load_conversations(val_spec, system=cfg.data.system)
        else:
            conversations, held_out = chat_data.split_validation(conversations, cfg.data.val_fraction,
                                                                 cfg.train.seed)
        train_set = chat_data.render(tokenizer, conversations, cfg.data.seq_len)
        val_set = chat_data.render(tokenizer, held_out, cfg.data.seq_len)
        batches = chat_data.ChatBatches(train_set.examples, cfg.data.seq_len, cfg.train.batch_size,
                                        packing=cfg.data.packing, seed=cfg.train.seed, rank=env.dp_rank,
                                        world_size=env.dp_size, device=env.device)
        if cfg.data.epochs > 0:
            cfg.train.steps = max(1, math.ceil(cfg.data.epochs * batches.batches_per_epoch / cfg.train.grad_accum))
        data_info = {"train_conversations": len(train_set.examples),
                     "validation_conversations": len(val_set.examples),
                     "truncated": train_set.truncated + val_set.truncated,
                     "dropped": train_set.dropped + val_set.dropped,
                     "train_tokens": sum(len(e.ids) for e in train_set.examples),
                     "train_target_tokens": sum(e.n_targets for e in train_set.examples),
                     "rows_per_epoch": len(batches.rows(0)), "steps": cfg.train.steps}
        if env.is_main:
            info = data_info
            log(f"data: {info['train_conversations']:,} training conversations ({info['train_tokens']:,} tokens, "
                f"{info['train_target_tokens']:,} of them assistant tokens) in {info['rows_per_epoch']:,} rows of "
                f"{cfg.data.seq_len}; {info['validation_conversations']:,} held out; {info['truncated']} cut to "
                f"seq_len, {info['dropped']} dropped (no assistant token left); {cfg.train.steps:,} steps")

        # the model
        model_io = None
        if cfg.adapter is not None:
            if cfg.adapter.trainable_tokens:
                from .tokens import resolve_tokens

                cfg.adapter.token_ids = resolve_tokens(tokenizer, cfg.adapter.trainable_tokens)
            apply_adapter(model, cfg.adapter)
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # the adapter trains in float32 whatever the base's dtype
            model_io = AdapterIO(cfg.adapter, base=str(cfg.model.path))
        counts = count_parameters(model)
        if env.is_main:
            log(f"{cfg.method}: {counts}")

        # forgetting: before
        out_dir = Path(cfg.train.out_dir)
        shards, pre_len, why = pretraining_data(cfg)
        forgetting: dict[str, Any] = {"skipped": why} if shards is None else {"data": shards}
        previous = out_dir / FORGETTING_FILE
        if shards is not None:
            if resume and previous.is_file() and "before" in json.loads(previous.read_text()):
                forgetting["before"] = json.loads(previous.read_text())["before"]
            else:
                forgetting["before"] = pretraining_loss(model, cfg, shards, pre_len, env)
            if env.is_main:
                log(f"pretraining validation loss before fine-tuning: {forgetting['before']:.4f}")

        # evaluation
        eval_batches = chat_data.eval_batches(val_set.examples, cfg.data.seq_len, cfg.train.batch_size,
                                              packing=cfg.data.packing, rank=env.dp_rank, world_size=env.dp_size)
        sample_prompts = ([[{"role": "user", "content": p}] for p in cfg.train.sample_prompts]
                          or [chat_data.prompt_of(c) for c in held_out[:cfg.data.eval_samples]])
        objective = objective_factory(model) if objective_factory is not None else sft_loss
        if not hasattr(objective, "count"):  # a custom objective on SFT batches: a mean over the same tokens
            objective.count = assistant_tokens

        def evaluate(m: nn.Module) -> dict[str, Any]:
            result: dict[str, Any] = {}
            if eval_batches or env.dp_size > 1:
                loss = held_out_loss(m, eval_batches, env)
                result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}
            if sample_prompts and cfg.train.sample_tokens:
                with distributed.root_unsharded(m):
                    replies = answer(m, tokenizer, sample_prompts, cfg.train.sample_tokens)
                result["samples"] = [f"{p[-1]['content']!r} -> {r!r}" for p, r in zip(sample_prompts, replies,
                                                                                      strict=True)]
            return result

        tcfg = TrainConfig(model=model.cfg, data=DataConfig(tokenizer=str(cfg.model.path), seq_len=cfg.data.seq_len),
                           train=cfg.train, optim=cfg.optim, schedule=cfg.schedule, distributed=cfg.distributed)
        if env.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        run = train(tcfg, model, objective, batches, env=env, evaluate=evaluate,
                    tokenizer_files=tokenizer_files(cfg.model.path), resume=resume, overwrite=overwrite,
                    progress=progress, desc=desc, model_io=model_io,
                    metadata={"finetune_config": cfg.to_dict(), "base_model": str(cfg.model.path)})

        # forgetting: after
        if shards is not None and not run.interrupted:
            forgetting["after"] = pretraining_loss(model, cfg, shards, pre_len, env)
            forgetting["change"] = forgetting["after"] - forgetting["before"]
            if env.is_main:
                log(f"pretraining validation loss after fine-tuning: {forgetting['after']:.4f} "
                    f"({forgetting['change']:+.4f})")
        if env.is_main:
            _write_json(previous, forgetting)
        return SFTResult(run, forgetting, {"trainable": counts.trainable, "total": counts.total}, data_info)
    finally:
        distributed.shutdown(env)
