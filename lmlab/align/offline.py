"""Offline preference optimization: DPO, IPO, conservative DPO, KTO, ORPO and SimPO, on a fixed set of preference
data, through the one training loop.

    cfg = load_align_recipe("recipes/dpo-speedrun.toml", method="dpo", model="runs/speedrun/sft/...", data="synthetic")
    result = align_offline(cfg)      # checkpoints, metrics.jsonl, alignment.json (held-out before / after)

What each method adds to the loop (train/loop.py) is an objective over pair batches (align/preference.py: chosen
rows then rejected rows, right-padded) and its loss from align/losses.py:

    method   loss                          reference model   log-probabilities
    dpo      dpo_loss                      yes               summed over the response
    cdpo     dpo_loss, label_smoothing     yes               summed
    ipo      ipo_loss                      yes               averaged over the response (as TRL)
    kto      kto_loss (unpaired data)      yes               summed
    orpo     orpo_loss (+ SFT term)        no                averaged (the odds need a probability)
    simpo    simpo_loss                    no                averaged (the method's length normalization)

The reference model is the starting policy unless `model.ref` names another checkpoint. It is run once over the
whole training and held-out data before the first step, and its log-probabilities are stored with the examples
and cached in the run directory (reference_logps.pt, keyed by a hash of the data and the checkpoint), so a
resumed run does not recompute them and no second model stays in memory while training.

Every log line has the implicit rewards of chosen and rejected responses, the reward accuracy (how often the
chosen one's is higher), the margin, and the policy's log-probabilities of both. The held-out pairs are evaluated
before training and at every evaluation: the method's metrics, and the preference win rate, the fraction of pairs
where the policy gives the chosen response a higher log-probability than the rejected one (KTO: desirable
replies are more likely under the policy than under the reference, undesirable ones less).
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
from ..train.loop import RunResult, train
from ..train.optim import OptimConfig
from ..train.schedule import ScheduleConfig
from ..tune.adapters import AdapterConfig, apply_adapter, count_parameters
from ..tune.sft import ADAPTER_PRESETS, DTYPES, AdapterIO, BaseModelConfig
from . import losses
from . import preference as prefs

METHODS = ("dpo", "ipo", "cdpo", "kto", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")
# beta per method when the recipe gives none: DPO/IPO/KTO's 0.1 (the papers' and TRL's common setting), ORPO's
# lambda 0.1 (Hong et al. 2024), SimPO's 2.0 (Meng et al. 2024, the base-model setting)
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "cdpo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0}
DEFAULT_LR = {"full": 5e-7, "adapter": 5e-5}  # DPO moves a fine-tuned model a little: far below SFT's step
SUMMARY_FILE = "alignment.json"
REFERENCE_FILE = "reference_logps.pt"


@dataclass
class PolicyConfig(BaseModelConfig):
    """The `[model]` section: the policy to align (usually an SFT checkpoint) and its reference."""

    ref: str = ""  # the reference model pi_ref: "" = the starting policy itself


@dataclass
class PreferenceDataConfig:
    """The `[data]` section: which preference data, and how it becomes batches."""

    train: str = ""  # a .jsonl/.json of pairs (or of {prompt, completion, label} for KTO), or a dataset name
    validation: str = ""  # held-out pairs: "" = the dataset's own held-out split, else val_fraction of train; "none"
    val_fraction: float = 0.05  # held out of `train` when the data has no held-out split of its own
    seq_len: int = 0  # tokens per row (prompt + one reply), 0: the model's context; longer pairs keep the prompt's end
    limit: int = 0  # use at most this many training pairs (0: all)
    val_limit: int = 500  # evaluate on at most this many held-out pairs (0: all)
    epochs: float = 1.0  # passes over the training pairs; 0: train.steps decides

    def validate(self) -> None:
        if not self.train:
            raise ValueError("data.train is not set; give --data FILE|NAME (a .jsonl of {prompt, chosen, rejected} "
                             "pairs, or a dataset name such as synthetic or hh-rlhf)")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.seq_len and self.seq_len < 4:
            raise ValueError(f"data.seq_len must be at least 4 (or 0: the model's context), got {self.seq_len}")
        if self.epochs < 0 or self.limit < 0 or self.val_limit < 0:
            raise ValueError("data.epochs, data.limit and data.val_limit must be >= 0")


@dataclass
class PreferenceConfig:
    """The `[align]` section: the method and its constants (align/losses.py has each equation)."""

    method: str = "dpo"  # dpo | ipo | cdpo | kto | orpo | simpo
    beta: float = 0.0  # the method's beta (ORPO: lambda; IPO: tau); 0 = the method's default (DEFAULT_BETA)
    label_smoothing: float = 0.0  # dpo/simpo: assumed label-noise rate; cdpo: 0 means 0.1
    gamma: float = 1.0  # simpo: the target reward margin
    desirable_weight: float = 1.0  # kto: lambda_D
    undesirable_weight: float = 1.0  # kto: lambda_U

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"align.method={self.method!r}; choose one of {METHODS}")
        if self.beta < 0:
            raise ValueError(f"align.beta must be positive (0: the method's default), got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"align.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ValueError("align.desirable_weight and align.undesirable_weight must be positive")

    def resolved(self) -> PreferenceConfig:
        """The settings with the method's defaults filled in."""
        beta = self.beta or DEFAULT_BETA[self.method]
        smoothing = self.label_smoothing or (0.1 if self.method == "cdpo" else 0.0)
        return dataclasses.replace(self, beta=beta, label_smoothing=smoothing)


@dataclass
class AlignConfig:
    model: PolicyConfig = field(default_factory=PolicyConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    align: PreferenceConfig = field(default_factory=PreferenceConfig)
    adapter: AdapterConfig | None = None  # None: every weight trains; else an adapter on the frozen policy
    train: LoopConfig = field(default_factory=lambda: LoopConfig(out_dir="runs/dpo", sample_prompts=[],
                                                                 sample_tokens=0))
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self) -> None:
        if not self.model.path:
            raise ValueError("model.path is not set; give --model DIR (the policy: usually an SFT checkpoint)")
        if self.model.dtype not in DTYPES:
            raise ValueError(f"model.dtype={self.model.dtype!r}; choose one of {tuple(DTYPES)}")
        if self.model.dtype != "float32" and self.adapter is None:
            raise ValueError("model.dtype other than float32 keeps the frozen policy in half precision; it needs an "
                             "[adapter]")
        self.data.validate()
        self.align.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"model": PolicyConfig, "data": PreferenceDataConfig, "align": PreferenceConfig,
                             "adapter": AdapterConfig, "train": LoopConfig, "optim": OptimConfig,
                             "schedule": ScheduleConfig, "distributed": DistributedConfig}


def resolve_align(d: dict[str, Any], overrides: list[str] = (), *, method: str | None = None,
                  model: str | None = None, data: str | None = None, ref: str | None = None,
                  adapter: str | None = None) -> AlignConfig:
    """An AlignConfig from a recipe dict, `--set` overrides and the command line (which wins over the recipe)."""
    d = apply_overrides(d, list(overrides), SECTIONS)
    for section, key, value in (("align", "method", method), ("model", "path", model), ("data", "train", data),
                                ("model", "ref", ref)):
        if value:
            d.setdefault(section, {})[key] = value
    if adapter:
        if adapter not in ADAPTER_PRESETS:
            raise ValueError(f"--adapter {adapter!r}; choose one of {list(ADAPTER_PRESETS)}")
        d["adapter"] = {**(d.get("adapter") or {}), **ADAPTER_PRESETS[adapter]}
    if d.get("adapter") is not None and "method" not in d["adapter"]:
        d["adapter"] = None  # settings without a method wait for --adapter
    if "steps" in (d.get("train") or {}) and "epochs" not in (d.get("data") or {}):
        d["data"] = {**(d.get("data") or {}), "epochs": 0.0}
    defaults = {"out_dir": f"runs/{(d.get('align') or {}).get('method', 'dpo')}", "sample_prompts": [],
                "sample_tokens": 0, "lr": DEFAULT_LR["adapter" if d.get("adapter") else "full"]}
    return build_sections(AlignConfig, SECTIONS, d, "alignment", train_defaults=defaults, optional=("adapter",))


def load_align_recipe(path: str | Path | None, overrides: list[str] = (), **cli: str | None) -> AlignConfig:
    """Read an alignment TOML recipe (or none: defaults), apply overrides and the command line's choices."""
    return resolve_align(read_recipe(path) if path else {}, overrides, **cli)


# --- the objective -----------------------------------------------------------------------------------
def preference_objective(cfg: PreferenceConfig) -> Callable[[nn.Module, dict], tuple[torch.Tensor, dict[str, Any]]]:
    """The loss of `cfg.method` on a pair batch (align/preference.py `collate`), with the logged metrics.
    Its `count` is the number of pairs, so micro-batches weigh by pairs."""
    cfg = cfg.resolved()

    def objective(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        return preference_loss(cfg, batch, *prefs.sequence_logps(model, batch))

    objective.count = lambda batch: batch["margin"].shape[0]
    return objective


def preference_loss(cfg: PreferenceConfig, batch: dict[str, torch.Tensor], logps: torch.Tensor,
                    n: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """(loss, metrics) of the resolved method `cfg` from the policy's log-probabilities of a pair batch's rows
    (`sequence_logps`: summed log-probs and reply lengths, chosen rows first)."""
    method, beta = cfg.method, cfg.beta
    B = batch["margin"].shape[0]
    n = n.clamp(min=1)
    first, second = logps[:B], logps[B:]
    averaged = logps / n
    metrics: dict[str, Any] = {}
    if method in ("dpo", "cdpo", "ipo", "kto") and "ref_chosen" not in batch:
        raise ValueError(f"{method} needs the reference model's log-probabilities in the batch "
                         "(align/preference.py reference_logps fills them)")
    if method in ("dpo", "cdpo"):
        out = losses.dpo_loss(first, second, batch["ref_chosen"].to(logps.dtype),
                              batch["ref_rejected"].to(logps.dtype), beta, cfg.label_smoothing)
    elif method == "ipo":
        out = losses.ipo_loss(averaged[:B], averaged[B:], batch["ref_chosen"].to(logps.dtype) / n[:B],
                              batch["ref_rejected"].to(logps.dtype) / n[B:], beta)
    elif method == "kto":
        kl = losses.kl_estimate(second, batch["ref_rejected"].to(logps.dtype))
        kl = distributed_mean(kl)
        out = losses.kto_loss(first, batch["ref_chosen"].to(logps.dtype), batch["desirable"], kl, beta,
                              cfg.desirable_weight, cfg.undesirable_weight)
        metrics["kl"] = kl
    elif method == "orpo":
        nll = -first.sum() / n[:B].sum()
        out = losses.orpo_loss(averaged[:B], averaged[B:], nll, beta)
        metrics["nll"] = nll.detach()
    else:  # simpo
        out = losses.simpo_loss(averaged[:B], averaged[B:], beta, cfg.gamma, cfg.label_smoothing)
    metrics.update(_reward_metrics(out, method))
    if method == "kto":
        desirable = batch["desirable"]
        metrics["logp_desirable"] = _mean(first.detach()[desirable])
        metrics["logp_undesirable"] = _mean(first.detach()[~desirable])
    else:
        metrics["logp_chosen"], metrics["logp_rejected"] = first.detach().mean(), second.detach().mean()
    return out.loss, metrics


def distributed_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean over data-parallel processes (KTO's KL estimate is over the global batch, as TRL's)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value)
        value /= torch.distributed.get_world_size()
    return value


def _mean(t: torch.Tensor) -> torch.Tensor | None:
    return t.mean() if t.numel() else None


def _reward_metrics(out: losses.PreferenceLoss, method: str) -> dict[str, Any]:
    c, r = out.chosen_rewards, out.rejected_rewards
    metrics = {"reward_chosen": _mean(c), "reward_rejected": _mean(r)}
    if method != "kto":  # KTO's rewards are of different examples: no pairwise accuracy or margin
        metrics["reward_accuracy"] = (c > r).float().mean()
        metrics["reward_margin"] = (c - r).mean()
    return {k: v for k, v in metrics.items() if v is not None}


# --- held-out evaluation -----------------------------------------------------------------------------
@torch.no_grad()
def evaluate_pairs(model: nn.Module, examples: list[prefs.PairExample], cfg: PreferenceConfig,
                   batch_size: int) -> dict[str, Any]:
    """The method's metrics averaged over the held-out examples (weighted by pairs), and the win rate; one forward
    pass per batch serves both."""
    if not examples:
        return {}
    cfg = cfg.resolved()
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    wins, total = 0.0, 0
    for batch in prefs.eval_batches(examples, batch_size, device):
        B = batch["margin"].shape[0]
        logps, n = prefs.sequence_logps(model, batch)
        loss, metrics = preference_loss(cfg, batch, logps, n)
        for k, v in {"val_loss": loss, **metrics}.items():
            sums[k] = sums.get(k, 0.0) + float(v) * B
        if cfg.method == "kto":  # did the policy move the reply the way its label asks, relative to the reference?
            moved = logps[:B].double() - batch["ref_chosen"]
            wins += float(torch.where(batch["desirable"], moved > 0, moved < 0).sum())
        else:
            wins += float((logps[:B] > logps[B:]).sum() + 0.5 * (logps[:B] == logps[B:]).sum())
        total += B
    out = {k: v / total for k, v in sums.items()}
    out["win_rate"] = wins / total
    return out


# --- the run ---------------------------------------------------------------------------------------------
@dataclass
class AlignResult:
    run: RunResult
    before: dict[str, Any]  # held-out metrics of the starting policy
    after: dict[str, Any]  # held-out metrics at the end
    data: dict[str, int]


def _tokenized(cfg: AlignConfig, tokenizer: Any, progress: bool) -> tuple[prefs.Tokenized, prefs.Tokenized]:
    d = cfg.data
    kto = cfg.align.method == "kto"
    load = prefs.load_unpaired if kto else prefs.load_pairs
    tokenize = prefs.tokenize_unpaired if kto else prefs.tokenize_pairs
    items = load(d.train, limit=d.limit, progress=progress)
    val_spec = d.validation or prefs.validation_spec(d.train)
    if d.validation == "none":
        held: list = []
    elif val_spec:
        held = load(val_spec, limit=d.val_limit)
    else:
        items, held = prefs.split_held_out(items, d.val_fraction, cfg.train.seed)
        held = held[:d.val_limit] if d.val_limit else held
    return tokenize(tokenizer, items, d.seq_len), tokenize(tokenizer, held, d.seq_len)


def _reference(cfg: AlignConfig, policy: nn.Module, train_set: list, val_set: list, device: torch.device,
               out_dir: Path, progress: bool, log: Callable[[str], None]) -> None:
    """Fill the examples' reference log-probs: from the run's cache when it matches, else computed and cached."""
    ref_path = cfg.model.ref or cfg.model.path
    key = prefs.fingerprint(train_set + val_set, ref_path)
    cache = out_dir / REFERENCE_FILE
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved.get("fingerprint") == key:
            for e, (c, r) in zip(train_set + val_set, saved["logps"], strict=True):
                e.ref_chosen, e.ref_rejected = c, r
            log(f"reference log-probs: reused {cache}")
            return
    ref = policy if not cfg.model.ref else load_model(cfg.model.ref, device=device, dtype=torch.float32)
    prefs.reference_logps(ref, train_set + val_set, batch_size=cfg.train.batch_size, progress=progress)
    del ref
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(cache, "wb") as f:
        torch.save({"fingerprint": key, "reference": str(ref_path),
                    "logps": [(e.ref_chosen, e.ref_rejected) for e in train_set + val_set]}, f)


def align_offline(cfg: AlignConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
                  log: Callable[[str], None] = print) -> AlignResult:
    """Align the policy per `cfg` (see the module docstring)."""
    from ..tokenizer import load_tokenizer, tokenizer_files

    cfg.validate()
    cfg = copy.deepcopy(cfg)
    method = cfg.align.method
    env = distributed.init(cfg.distributed, cfg.train.device)
    try:
        if env.sharded:
            raise ValueError("preference optimization runs on one process or with ddp; set distributed.strategy = "
                             "'ddp'")
        tokenizer = load_tokenizer(cfg.model.path)
        if tokenizer is None:
            raise FileNotFoundError(f"{cfg.model.path} has no tokenizer; preference data is rendered with the "
                                    "policy's own tokenizer and chat template")
        torch.manual_seed(cfg.train.seed)
        dtype = DTYPES[cfg.model.dtype] if cfg.adapter is not None else torch.float32
        model = load_model(cfg.model.path, device=env.device, dtype=dtype)
        cfg.data.seq_len = cfg.data.seq_len or model.cfg.max_seq_len
        if cfg.data.seq_len > model.cfg.max_seq_len:
            raise ValueError(f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len="
                             f"{model.cfg.max_seq_len}; lower data.seq_len")
        train_set, val_set = _tokenized(cfg, tokenizer, progress and env.is_main)
        if not train_set.examples:
            raise ValueError(f"no training pair of {cfg.data.train} is left after tokenizing (all dropped)")
        out_dir = Path(cfg.train.out_dir)
        if method not in REFERENCE_FREE:
            _reference(cfg, model, train_set.examples, val_set.examples, env.device, out_dir,
                       progress and env.is_main, log if env.is_main else (lambda _: None))
        batches = prefs.PairBatches(train_set.examples, cfg.train.batch_size, seed=cfg.train.seed, rank=env.dp_rank,
                                    world_size=env.dp_size, device=env.device)
        if cfg.data.epochs > 0:
            cfg.train.steps = max(1, math.ceil(cfg.data.epochs * batches.batches_per_epoch / cfg.train.grad_accum))
        data_info = {"train_examples": len(train_set.examples), "held_out_examples": len(val_set.examples),
                     "truncated": train_set.truncated + val_set.truncated,
                     "dropped": train_set.dropped + val_set.dropped, "steps": cfg.train.steps}
        if env.is_main:
            log(f"data: {data_info['train_examples']:,} training {'examples' if method == 'kto' else 'pairs'}, "
                f"{data_info['held_out_examples']:,} held out; {data_info['truncated']} cut to seq_len, "
                f"{data_info['dropped']} dropped; {cfg.train.steps:,} steps of {method}")

        model_io = None
        if cfg.adapter is not None:
            apply_adapter(model, cfg.adapter)
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
            model_io = AdapterIO(cfg.adapter, base=str(cfg.model.path))
        counts = count_parameters(model)
        objective = preference_objective(cfg.align)
        val_examples = val_set.examples[env.dp_rank::env.dp_size]

        def evaluate(m: nn.Module) -> dict[str, Any]:
            return evaluate_pairs(m, val_examples, cfg.align, cfg.train.batch_size)

        summary_path = out_dir / SUMMARY_FILE
        previous = json.loads(summary_path.read_text()) if resume and summary_path.is_file() else {}
        before = previous.get("before")
        if before is None:
            model.eval()
            before = evaluate(model)
            model.train()
        if env.is_main:
            log(f"{method}: {counts}; held-out before: " + _brief(before))
        tcfg = TrainConfig(model=model.cfg, data=DataConfig(tokenizer=str(cfg.model.path), seq_len=cfg.data.seq_len),
                           train=cfg.train, optim=cfg.optim, schedule=cfg.schedule, distributed=cfg.distributed)
        run = train(tcfg, model, objective, batches, env=env, evaluate=evaluate,
                    tokenizer_files=tokenizer_files(cfg.model.path), resume=resume, overwrite=overwrite,
                    progress=progress, desc=method, model_io=model_io,
                    metadata={"align_config": cfg.to_dict(), "base_model": str(cfg.model.path)})
        after = run.eval
        if env.is_main:
            with atomic_file(summary_path, "w") as f:
                f.write(json.dumps({"method": method, "before": before, "after": after, "data": data_info,
                                    "params": {"trainable": counts.trainable, "total": counts.total}}, indent=2))
            plot_alignment(out_dir, before)
        return AlignResult(run, before, after, data_info)
    finally:
        distributed.shutdown(env)


def _brief(metrics: dict[str, Any]) -> str:
    keys = ("win_rate", "reward_accuracy", "val_loss")
    return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics) or "no held-out data"


def plot_alignment(out_dir: str | Path, before: dict[str, Any] | None = None,
                   keys: tuple[str, ...] = ("loss", "reward_accuracy", "reward_margin", "win_rate")) -> Path | None:
    """The run's curves (training metrics per logged step, held-out ones per evaluation, the starting policy's at
    step 0) as align.png."""
    from ..train.metrics import plot_metrics

    extra = [{"kind": "eval", "step": 0, **before}] if before else []
    return plot_metrics(out_dir, Path(out_dir) / "align.png", keys, extra=extra)


__all__ = ["AlignConfig", "AlignResult", "METHODS", "PolicyConfig", "PreferenceConfig", "PreferenceDataConfig",
           "align_offline", "evaluate_pairs", "load_align_recipe", "preference_loss", "preference_objective",
           "resolve_align"]
