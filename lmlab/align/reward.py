"""Reward models: a transformer with a scalar head, trained on preference pairs with the Bradley-Terry loss, through
the one training loop.

    cfg = load_reward_recipe("recipes/reward-speedrun.toml", model="runs/speedrun/sft/...", data="synthetic")
    result = train_reward_model(cfg)      # checkpoints, metrics.jsonl, reward.json, reward.png
    rm, tok = load_reward_model(result.run.checkpoint)
    rm.score(tok, [[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]])

The model (Stiennon et al. 2020, "Learning to summarize from human feedback", section 3.4; Ouyang et al. 2022,
InstructGPT, section 3.5): the language model's output layer is replaced by a linear head d_model -> 1, and the
reward of a conversation is that head applied to the final hidden state at its LAST token. Since the rendered reply
ends with the end-of-turn token, that position has attended to the whole prompt and the whole reply (causal
attention), and right padding after it changes nothing. The head starts from N(0, 1/(d_model + 1)) (Stiennon et al.
2020, appendix; so the initial rewards have unit-scale variance for unit-scale features) or from zero (every reward
0 at the start: the first loss is exactly log 2 and the first gradient reaches only the head); its bias starts at 0.
The backbone is trained whole (float32 master weights), starting from a fine-tuned (SFT) checkpoint as InstructGPT
does: the features that predict good replies are there already.

The objective is Bradley-Terry on the chosen and rejected rows of a pair batch (align/preference.py `collate`), with
each pair's margin (Llama 2's margin loss) when `loss.margin` is on:

    L = -1/B sum log sigma(r(x, y_w) - r(x, y_l) - m)          (align/losses.py `bradley_terry_loss`)

Logged each step: the loss, the pairwise accuracy (the fraction of pairs with r(y_w) > r(y_l), ties counting half),
the mean reward of chosen and rejected replies and their mean margin. Evaluated on held-out pairs before training,
every eval_every steps and at the end: the same, plus the mean and standard deviation of every held-out reward,
which is what a policy-optimization run divides by to normalize rewards (PPO, align/ppo.py).

A reward checkpoint is an ordinary lmlab checkpoint of the backbone (model.safetensors, config.json, the
tokenizer files: `lmlab info`, `lmlab convert` and `load_checkpoint` read it as a language model) plus the head in
reward_head.safetensors, and a "reward_model" entry in config.json's metadata that marks it as a reward model. The
loop writes it atomically through `RewardIO` (its `ModelIO`) and resumes from it exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_directory, atomic_file
from ..model.checkpoint import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    is_checkpoint,
    load_checkpoint,
    read_metadata,
    write_checkpoint_files,
)
from ..model.transformer import Transformer
from ..train import checkpoint as ckpt
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
from ..train.loop import ModelIO, RunExistsError, RunResult, train
from ..train.optim import OptimConfig
from ..train.schedule import ScheduleConfig
from . import preference as prefs
from .losses import bradley_terry_loss

HEAD_FILE = "reward_head.safetensors"
MARKER = "reward_model"  # the key in a checkpoint's metadata that makes it a reward model
HEAD_INITS = ("normal", "zero")
SUMMARY_FILE = "reward.json"
PLOT_FILE = "reward.png"
# Reward models of 1-6B parameters train at ~1e-5 (Ouyang et al. 2022: 9e-6; Stiennon et al. 2020: 1.5e-5); small
# models take larger steps (recipes set their own).
DEFAULT_LR = 1e-5


# --- the model ----------------------------------------------------------------------------------------
class RewardModel(nn.Module):
    """An lmlab Transformer (`backbone`) whose final hidden state at each row's last real token goes through a
    linear head (`head`, d_model -> 1) to give one scalar reward per row."""

    def __init__(self, backbone: Transformer, head_init: str = "normal"):
        super().__init__()
        self.backbone = backbone
        param = next(backbone.parameters())
        self.head = nn.Linear(backbone.cfg.d_model, 1, device=param.device, dtype=param.dtype)
        self.max_len = backbone.cfg.max_seq_len  # `score` cuts longer conversations (training's seq_len once loaded)
        self.init_head(head_init)

    @property
    def cfg(self):
        return self.backbone.cfg

    @property
    def blocks(self) -> nn.ModuleList:
        """The backbone's blocks (so activation checkpointing applies to a reward model as to a Transformer)."""
        return self.backbone.blocks

    @torch.no_grad()
    def init_head(self, kind: str = "normal") -> None:
        """"normal": weight ~ N(0, 1/(d_model + 1)) (Stiennon et al. 2020); "zero": weight 0. The bias is 0."""
        if kind not in HEAD_INITS:
            raise ValueError(f"head_init={kind!r}; choose one of {HEAD_INITS}")
        if kind == "normal":
            nn.init.normal_(self.head.weight, std=1 / math.sqrt(self.cfg.d_model + 1))
        else:
            nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """ids (N, T) right-padded, lengths (N,) the real tokens of each row -> (N,) rewards."""
        if ids.dim() != 2 or lengths.shape != ids.shape[:1]:
            raise ValueError(f"a reward model takes ids (N, T) and lengths (N,); got {tuple(ids.shape)} and "
                             f"{tuple(lengths.shape)}")
        if bool((lengths < 1).any()) or bool((lengths > ids.shape[1]).any()):
            raise ValueError(f"every row needs 1 <= length <= {ids.shape[1]} (the padded width); got lengths "
                             f"{lengths.tolist()}")
        h = self.backbone.hidden_states(ids)
        last = h[torch.arange(ids.shape[0], device=ids.device), lengths.to(ids.device) - 1]
        return self.head(last).squeeze(-1)

    @torch.no_grad()
    def score(self, tokenizer: Any, conversations: list[list[dict]], batch_size: int = 16) -> list[float]:
        """The reward of each conversation's last message (an assistant reply) given the messages before it, rendered
        with the chat template and cut to `max_len` tokens as in training (align/preference.py `fit`)."""
        prompts, responses = [], []
        for i, conv in enumerate(conversations):
            if not conv or not isinstance(conv[-1], dict) or conv[-1].get("role") != "assistant":
                last = conv[-1].get("role") if conv and isinstance(conv[-1], dict) else None
                raise ValueError(f"conversation {i} must end with the assistant reply to score; it ends with "
                                 f"{last!r}: append {{'role': 'assistant', 'content': REPLY}}")
            prompt, response = prefs.prompt_and_response(tokenizer, conv[:-1], str(conv[-1].get("content", "")))
            prompt, (response,), _ = prefs.fit(prompt, (response,), self.max_len)
            prompts.append(prompt)
            responses.append(response)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out: list[float] = []
        for s in range(0, len(prompts), batch_size):
            batch = prefs.rows(prompts[s:s + batch_size], responses[s:s + batch_size], device)
            out += self(batch["ids"], batch["lengths"]).float().tolist()
        self.train(was_training)
        return out


# --- checkpoints --------------------------------------------------------------------------------------
def is_reward_checkpoint(path: str | Path) -> bool:
    """True when `path` is an lmlab checkpoint whose metadata marks it as a reward model."""
    return is_checkpoint(path) and MARKER in read_metadata(path)


class RewardIO(ModelIO):
    """How the loop writes and reads a reward model: the backbone as an ordinary checkpoint, the head beside it,
    and the marker (with the head's settings and the training seq_len) in the metadata."""

    def __init__(self, info: dict[str, Any] | None = None):
        self.info = dict(info or {})

    def write(self, model: nn.Module, directory: Path, tokenizer_files: list[Path], metadata: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        marker = {"head": HEAD_FILE, "max_len": model.max_len, **self.info}
        write_checkpoint_files(model.backbone, directory, tokenizer_files, {**metadata, MARKER: marker})
        head = {k: v.detach().to("cpu").contiguous() for k, v in model.head.state_dict().items()}
        save_file(head, directory / HEAD_FILE, metadata={"format": "pt"})

    def read(self, model: nn.Module, directory: Path) -> None:
        device = next(model.parameters()).device
        if not is_reward_checkpoint(directory):
            raise CheckpointError(f"{directory} is not a reward model checkpoint (no {MARKER!r} in its metadata); "
                                  "resume a reward run from its own run directory", directory)
        backbone = load_checkpoint(directory, device=device, dtype=torch.float32)
        model.backbone.load_state_dict(backbone.state_dict(), strict=True)
        model.head.load_state_dict(_read_head(directory, model.cfg.d_model, device, torch.float32), strict=True)


def _read_head(directory: Path, d_model: int, device: str | torch.device, dtype: torch.dtype | None
               ) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    file = Path(directory) / HEAD_FILE
    if not file.is_file():
        raise CheckpointNotFoundError(f"{file} is missing: the reward model's head was not saved with its backbone; "
                                      "restore the checkpoint or train the reward model again", file)
    try:
        head = load_file(file)
    except Exception as e:  # safetensors raises SafetensorError / OSError on a damaged file
        raise CheckpointCorruptError(f"{file} is damaged or truncated ({e}); restore the checkpoint", file) from e
    expected = {"weight": (1, d_model), "bias": (1,)}
    got = {k: tuple(v.shape) for k, v in head.items()}
    if got != expected:
        raise CheckpointMismatchError(f"{file} holds {got}, but a reward head on this d_model={d_model} backbone is "
                                      f"{expected}; the head belongs to another model", file)
    return {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in head.items()}


def _resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest checkpoint of a run directory (one with checkpoints/)."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").exists():
        latest = ckpt.latest_checkpoint(path)
        if latest is not None:
            return latest
    return path


def load_reward_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
                      ) -> tuple[RewardModel, Any]:
    """(reward model, tokenizer) of a reward checkpoint (or the newest checkpoint of a reward run directory), in eval
    mode; dtype None keeps the stored one. A checkpoint that is not a reward model is an error that says so."""
    from ..tokenizer import load_tokenizer

    path = _resolve_checkpoint(path)
    if not path.is_dir():
        raise CheckpointNotFoundError(f"reward model {path} does not exist; give a checkpoint directory written by "
                                      "`lmlab reward train` (or its run directory)", path)
    if not is_checkpoint(path):
        raise CheckpointError(f"{path} is not an lmlab checkpoint (no lmlab config.json), so not a reward model; "
                              "give a checkpoint directory written by `lmlab reward train`", path)
    meta = read_metadata(path)
    if MARKER not in meta:
        raise CheckpointError(f"{path} is a language model checkpoint, not a reward model (its metadata has no "
                              f"{MARKER!r} marker); train a reward model from it with `lmlab reward train --model "
                              f"{path} --data PAIRS`", path)
    backbone = load_checkpoint(path, device=device, dtype=dtype)
    model = RewardModel(backbone, head_init="zero")
    model.head.load_state_dict(_read_head(path, backbone.cfg.d_model, device, dtype))
    model.max_len = int(meta[MARKER].get("max_len") or backbone.cfg.max_seq_len)
    tokenizer = load_tokenizer(path)
    if tokenizer is None:
        raise CheckpointNotFoundError(f"{path} has no tokenizer file; a reward model scores chats rendered with its "
                                      "own tokenizer, copy the base model's tokenizer files into it", path)
    return model.eval(), tokenizer


def save_reward_model(model: RewardModel, path: str | Path, tokenizer_files: Sequence[str | Path] = (),
                      metadata: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write `model` as a reward checkpoint at `path`, atomically (what the loop writes, without train_state.pt)."""
    with atomic_directory(path, overwrite=overwrite) as tmp:
        RewardIO().write(model, tmp, [Path(p) for p in tokenizer_files], dict(metadata or {}))
    return Path(path)


# --- objective and evaluation -------------------------------------------------------------------------
def pairwise_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """The fraction of pairs the rewards order correctly: 1 when r(y_w) > r(y_l), 1/2 on a tie (a coin flip would
    break it), 0 otherwise."""
    return ((chosen > rejected).double() + 0.5 * (chosen == rejected).double()).mean()


def split_rewards(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B,) chosen and (B,) rejected rewards of a `collate` batch's 2B rows (chosen rows first)."""
    if rewards.shape[0] % 2:
        raise ValueError(f"a pair batch has an even number of rows (chosen, then rejected); got {rewards.shape[0]}")
    half = rewards.shape[0] // 2
    return rewards[:half], rewards[half:]


def bradley_terry_objective(use_margin: bool = False) -> Callable[[nn.Module, dict], tuple[torch.Tensor, dict]]:
    """The loop's objective for a reward model on pair batches: Bradley-Terry loss (with the batch's `margin` when
    use_margin) and the step's accuracy, mean chosen / rejected reward and mean margin r(y_w) - r(y_l)."""

    def objective(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        chosen, rejected = split_rewards(model(batch["ids"], batch["lengths"]).float())
        loss = bradley_terry_loss(chosen, rejected, batch["margin"] if use_margin else None)
        c, r = chosen.detach(), rejected.detach()
        return loss, {"accuracy": pairwise_accuracy(c, r), "reward_chosen": c.mean(), "reward_rejected": r.mean(),
                      "reward_margin": (c - r).mean()}

    objective.count = lambda batch: batch["margin"].numel()  # the loss is a mean over pairs
    return objective


@torch.no_grad()
def pair_rewards(model: nn.Module, examples: Sequence[prefs.PairExample], batch_size: int = 16,
                 env: DistEnv | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen rewards, rejected rewards), float64 on the CPU, one per example in order. Under several processes
    each scores its share and the shares are summed into the whole on every process."""
    env = env or DistEnv(device=next(model.parameters()).device)
    n = len(examples)
    both = torch.zeros(2, n, dtype=torch.float64, device=env.device)
    mine = list(range(env.dp_rank, n, env.dp_size))
    for s in range(0, len(mine), batch_size):
        index = mine[s:s + batch_size]
        batch = prefs.collate([examples[i] for i in index], env.device)
        chosen, rejected = split_rewards(model(batch["ids"], batch["lengths"]).double())
        both[0, index], both[1, index] = chosen, rejected
    if env.dp_size > 1:
        both = distributed.all_sum(both, env)
    return both[0].cpu(), both[1].cpu()


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None
                   ) -> dict[str, float]:
    """Held-out metrics of the rewards of n pairs: val_loss (Bradley-Terry, with `margin` when given), accuracy (ties
    count half), reward_chosen / reward_rejected / reward_margin (means), and reward_mean / reward_std over all 2n
    rewards (population std: what a policy-optimization run normalizes rewards with)."""
    if chosen.numel() == 0:
        return {}
    everything = torch.cat([chosen, rejected]).double()
    return {"val_loss": float(bradley_terry_loss(chosen.double(), rejected.double(), margin)),
            "accuracy": float(pairwise_accuracy(chosen, rejected)),
            "reward_chosen": float(chosen.mean()), "reward_rejected": float(rejected.mean()),
            "reward_margin": float((chosen - rejected).mean()),
            "reward_mean": float(everything.mean()), "reward_std": float(everything.std(correction=0))}


def evaluate_pairs(model: nn.Module, examples: Sequence[prefs.PairExample], batch_size: int = 16,
                   use_margin: bool = False, env: DistEnv | None = None) -> dict[str, float]:
    """`reward_metrics` of `model` on held-out examples (eval mode for the call, then the mode it had)."""
    was_training = model.training
    model.eval()
    chosen, rejected = pair_rewards(model, examples, batch_size, env)
    model.train(was_training)
    margin = torch.tensor([e.margin for e in examples], dtype=torch.float64) if use_margin else None
    return reward_metrics(chosen, rejected, margin)


# --- configuration ------------------------------------------------------------------------------------
@dataclass
class RewardModelConfig:
    """The `[model]` section: where the backbone comes from and how the head starts."""

    path: str = ""  # an lmlab or Hugging Face checkpoint (usually an SFT model), or a reward checkpoint to go on from
    head_init: str = "normal"  # "normal": N(0, 1/(d_model+1)) (Stiennon et al. 2020); "zero": every reward 0 at first


@dataclass
class RewardDataConfig:
    """The `[data]` section: which preference pairs, and how they become batches."""

    train: str = ""  # a .jsonl/.json of {prompt|messages, chosen, rejected[, margin]} or a dataset[:split] name
    validation: str = ""  # held-out pairs: "" = the dataset's own held-out split, else val_fraction of train; "none"
    val_fraction: float = 0.1  # held out of `train` (seeded by train.seed) when there is no held-out split
    seq_len: int = 512  # tokens per row (prompt + one response); longer pairs keep the prompt's end
    limit: int = 0  # read at most this many pairs of `train` (0: all), before the held-out part is split off
    val_limit: int = 0  # evaluate on a seeded sample of at most this many held-out pairs (0: all)
    epochs: float = 1.0  # passes over the training pairs; 0: train.steps decides

    def validate(self) -> None:
        if not self.train:
            raise ValueError("data.train is not set; give --data FILE|NAME (a .jsonl of {prompt, chosen, rejected} "
                             "pairs, or a dataset name such as synthetic or hh-rlhf:test)")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.seq_len < 4:
            raise ValueError(f"data.seq_len must be at least 4, got {self.seq_len}")
        if self.epochs < 0 or self.limit < 0 or self.val_limit < 0:
            raise ValueError(f"data.epochs, data.limit and data.val_limit must be >= 0; got {self.epochs}, "
                             f"{self.limit}, {self.val_limit}")


@dataclass
class RewardLossConfig:
    """The `[loss]` section: the Bradley-Terry objective's options."""

    margin: bool = False  # subtract each pair's "margin" field from r(y_w) - r(y_l) (Llama 2, eq. 2); pairs without
    # one have margin 0


@dataclass
class RewardConfig:
    model: RewardModelConfig = field(default_factory=RewardModelConfig)
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    loss: RewardLossConfig = field(default_factory=RewardLossConfig)
    train: LoopConfig = field(default_factory=lambda: LoopConfig(out_dir="runs/reward", lr=DEFAULT_LR,
                                                                 sample_prompts=[], sample_tokens=0))
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self) -> None:
        if not self.model.path:
            raise ValueError("model.path is not set; give --model DIR (the backbone: usually an SFT checkpoint)")
        if self.model.head_init not in HEAD_INITS:
            raise ValueError(f"model.head_init={self.model.head_init!r}; choose one of {HEAD_INITS}")
        if self.distributed.strategy in ("fsdp", "tp"):
            raise ValueError(f"distributed.strategy={self.distributed.strategy!r}: reward models train on one "
                             "process or with ddp; set distributed.strategy = 'ddp'")
        self.data.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"model": RewardModelConfig, "data": RewardDataConfig, "loss": RewardLossConfig,
                             "train": LoopConfig, "optim": OptimConfig, "schedule": ScheduleConfig,
                             "distributed": DistributedConfig}


def resolve_reward(d: dict[str, Any], overrides: Sequence[str] = (), *, model: str | None = None,
                   data: str | None = None) -> RewardConfig:
    """A RewardConfig from a recipe dict, `--set` overrides and the command line's --model / --data (which win).
    data.epochs gives way to train.steps when the recipe sets steps and no epochs, or when the overrides set
    train.steps and not data.epochs (`--set train.steps=60` on a recipe that trains for an epoch)."""
    keys = {text.partition("=")[0].strip() for text in overrides}
    if "train.steps" in keys and "data.epochs" not in keys:
        d = {**d, "data": {k: v for k, v in (d.get("data") or {}).items() if k != "epochs"}}
    d = apply_overrides(d, list(overrides), SECTIONS)
    if model:
        d.setdefault("model", {})["path"] = model
    if data:
        d.setdefault("data", {})["train"] = data
    if "steps" in (d.get("train") or {}) and "epochs" not in (d.get("data") or {}):
        d["data"] = {**(d.get("data") or {}), "epochs": 0.0}
    defaults = {"out_dir": "runs/reward", "lr": DEFAULT_LR, "sample_prompts": [], "sample_tokens": 0}
    return build_sections(RewardConfig, SECTIONS, d, "reward model", train_defaults=defaults)


def load_reward_recipe(path: str | Path | None, overrides: Sequence[str] = (), **cli: str | None) -> RewardConfig:
    """Read a reward-model TOML recipe (or none: defaults), apply overrides and the command line's choices."""
    return resolve_reward(read_recipe(path) if path else {}, overrides, **cli)


# --- the run ------------------------------------------------------------------------------------------
@dataclass
class RewardResult:
    run: RunResult
    before: dict[str, float]  # held-out metrics of the starting model (the fresh head)
    after: dict[str, float]  # held-out metrics at the end (run.eval)
    data: dict[str, Any]  # pairs used, held out, truncated, dropped; where the held-out pairs came from


def _pairs(cfg: RewardConfig, seed: int, progress: bool) -> tuple[list[prefs.Pair], list[prefs.Pair], str]:
    """(training pairs, held-out pairs, where the held-out ones come from)."""
    d = cfg.data
    pairs = prefs.load_pairs(d.train, limit=d.limit, progress=progress)
    if d.validation == "none":
        return pairs, [], "none"
    spec = d.validation or prefs.validation_spec(d.train)
    if spec:
        train_pairs, held, source = pairs, prefs.load_pairs(spec), spec
    else:
        train_pairs, held = prefs.split_held_out(pairs, d.val_fraction, seed)
        source = f"{d.val_fraction:g} of {d.train} (seed {seed})"
    if d.val_limit and len(held) > d.val_limit:  # a seeded sample, not the first ones (datasets come in blocks)
        keep = sorted(random.Random(seed).sample(range(len(held)), d.val_limit))
        held, source = [held[i] for i in keep], f"{source}, {d.val_limit} of them"
    return train_pairs, held, source


def _build_model(path: str, head_init: str, device: torch.device) -> RewardModel:
    """A fresh head on any checkpoint, or a reward checkpoint's own head (to train it further)."""
    from ..model.loading import load as load_model

    if is_reward_checkpoint(path):
        model, _ = load_reward_model(path, device=device, dtype=torch.float32)
        return model.train()
    return RewardModel(load_model(path, device=device, dtype=torch.float32), head_init=head_init)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    with atomic_file(path, "w") as f:
        f.write(json.dumps(value, indent=2) + "\n")


def _brief(m: dict[str, float]) -> str:
    if not m:
        return "no held-out pairs"
    return (f"accuracy {m['accuracy']:.4f}, loss {m['val_loss']:.4f}, reward {m['reward_mean']:+.3f} +- "
            f"{m['reward_std']:.3f} (chosen {m['reward_chosen']:+.3f}, rejected {m['reward_rejected']:+.3f})")


def train_reward_model(cfg: RewardConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
                       log: Callable[[str], None] = print) -> RewardResult:
    """Train a reward model per `cfg` through the loop; writes checkpoints, metrics.jsonl, reward.json (held-out
    metrics before and after, the data used) and reward.png (loss and accuracy curves) into train.out_dir."""
    from ..tokenizer import load_tokenizer, tokenizer_files
    from ..train.metrics import plot_metrics

    cfg.validate()
    cfg = copy.deepcopy(cfg)  # the run fills in train.steps (from data.epochs) on its copy
    out_dir = Path(cfg.train.out_dir)
    found = ckpt.latest_checkpoint(out_dir)
    if found is not None and not resume and not overwrite:  # say so before the data and the first evaluation
        raise RunExistsError(f"{out_dir} already holds checkpoints (latest: {found.name}); pass --resume to continue "
                             "that run, --overwrite to start over (deleting it), or choose another train.out_dir")
    env = distributed.init(cfg.distributed, cfg.train.device)
    try:
        tokenizer = load_tokenizer(cfg.model.path)
        if tokenizer is None:
            raise FileNotFoundError(f"{cfg.model.path} has no tokenizer; a reward model renders chats with the "
                                    "checkpoint's own tokenizer and chat template")
        torch.manual_seed(cfg.train.seed)  # the head's initialization
        model = _build_model(cfg.model.path, cfg.model.head_init, env.device)
        model.max_len = cfg.data.seq_len
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"the tokenizer of {cfg.model.path} has {tokenizer.vocab_size:,} tokens, more than the "
                             f"model's {model.cfg.vocab_size:,} embeddings")
        if cfg.data.seq_len > model.cfg.max_seq_len:
            raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len="
                             f"{model.cfg.max_seq_len}; lower data.seq_len")

        # the data
        train_pairs, held_pairs, held_from = _pairs(cfg, cfg.train.seed, progress and env.is_main)
        train_set = prefs.tokenize_pairs(tokenizer, train_pairs, cfg.data.seq_len)
        val_set = prefs.tokenize_pairs(tokenizer, held_pairs, cfg.data.seq_len)
        batches = prefs.PairBatches(train_set.examples, cfg.train.batch_size, seed=cfg.train.seed, rank=env.dp_rank,
                                    world_size=env.dp_size, device=env.device)
        if cfg.data.epochs > 0:
            cfg.train.steps = max(1, math.ceil(cfg.data.epochs * batches.batches_per_epoch / cfg.train.grad_accum))
        data_info = {"train": cfg.data.train, "held_out": held_from, "train_pairs": len(train_set.examples),
                     "held_out_pairs": len(val_set.examples), "truncated": train_set.truncated + val_set.truncated,
                     "dropped": train_set.dropped + val_set.dropped, "steps": cfg.train.steps}
        if env.is_main:
            log(f"data: {data_info['train_pairs']:,} training pairs, {data_info['held_out_pairs']:,} held out "
                f"({held_from}); {data_info['truncated']} cut to seq_len {cfg.data.seq_len}, {data_info['dropped']} "
                f"dropped (identical or empty responses); {cfg.train.steps:,} steps")

        # the objective and evaluation
        objective = bradley_terry_objective(cfg.loss.margin)
        batch_size = cfg.train.batch_size

        def evaluate(m: nn.Module) -> dict[str, Any]:
            return evaluate_pairs(m, val_set.examples, batch_size, cfg.loss.margin, env)

        summary_file = out_dir / SUMMARY_FILE
        previous = json.loads(summary_file.read_text()) if resume and summary_file.is_file() else {}
        before = previous.get("before") or evaluate_pairs(model, val_set.examples, batch_size, cfg.loss.margin, env)
        if env.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            _write_json(summary_file, {"before": before, "data": data_info})  # a resumed run reads `before` here
            log(f"held out before training: {_brief(before)}")

        tcfg = TrainConfig(model=model.cfg, data=DataConfig(tokenizer=str(cfg.model.path), seq_len=cfg.data.seq_len),
                           train=cfg.train, optim=cfg.optim, schedule=cfg.schedule, distributed=cfg.distributed)
        model_io = RewardIO({"head_init": cfg.model.head_init, "base_model": str(cfg.model.path)})
        run = train(tcfg, model, objective, batches, env=env, evaluate=evaluate,
                    tokenizer_files=tokenizer_files(cfg.model.path), resume=resume, overwrite=overwrite,
                    progress=progress, desc="reward", model_io=model_io,
                    metadata={"reward_config": cfg.to_dict(), "base_model": str(cfg.model.path)})
        after = {k: v for k, v in run.eval.items() if isinstance(v, (int, float))}
        if env.is_main:
            _write_json(summary_file, {"before": before, "after": after, "data": data_info,
                                       "checkpoint": str(run.checkpoint) if run.checkpoint else None})
            plot_metrics(out_dir, out_dir / PLOT_FILE, ("loss", "val_loss", "accuracy", "reward_margin",
                                                        "reward_chosen", "reward_rejected"))
            if not run.interrupted:
                log(f"held out after training: {_brief(after)}")
        return RewardResult(run, before, after, data_info)
    finally:
        distributed.shutdown(env)


__all__ = ["HEAD_FILE", "MARKER", "RewardConfig", "RewardDataConfig", "RewardIO", "RewardLossConfig", "RewardModel",
           "RewardModelConfig", "RewardResult", "bradley_terry_objective", "evaluate_pairs", "is_reward_checkpoint",
           "load_reward_model", "load_reward_recipe", "pair_rewards", "pairwise_accuracy", "resolve_reward",
           "reward_metrics", "save_reward_model", "split_rewards", "train_reward_model"]
