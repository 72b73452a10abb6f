"""GRPO: RL with verifiable rewards, the group of a prompt's own replies as the baseline (Shao et al. 2024,
DeepSeekMath), with the Dr. GRPO corrections as an option (Liu et al. 2025, "Understanding R1-Zero-Like Training").

    cfg = load_grpo_recipe("recipes/grpo-speedrun.toml", model="runs/speedrun/sft/checkpoints/step_00000450")
    result = grpo(cfg)         # checkpoints (plain policy checkpoints), metrics.jsonl, rl.json (accuracy before/after)

For each prompt q the policy samples a group of G replies o_1..o_G; each is scored, usually by checkers (the
exact final number, a format check; align/rewards.py). No value model: the advantage of every token of o_i is
its reply's reward measured against the group's,

    A_i = (r_i - mean(r_1..r_G)) / std(r_1..r_G)                                     (GRPO, sec. 4.1.2)

and the policy maximizes the clipped surrogate with a KL penalty to the reference (eq. 3):

    J = 1/G sum_i 1/|o_i| sum_t { min(rho_it A_i, clip(rho_it, 1 - eps, 1 + eps) A_i) - beta D_KL,it }
    rho_it = pi(o_it | q, o_i,<t) / pi_old(o_it | q, o_i,<t)
    D_KL,it = pi_ref/pi - log(pi_ref/pi) - 1                                         (k3, eq. 4)

Dr. GRPO (`scale_rewards = false`, `loss_agg = "constant"`) removes two biases of that objective: dividing by
std(r) weights prompts that are nearly always right or always wrong (small std) most, and dividing each reply's
sum by its own length |o_i| makes long wrong replies cheap and short right ones dear. It uses A_i = r_i - mean(r)
and divides the summed token losses by a constant (G x the generation budget) instead. `loss_agg = "token"` is
DAPO's token-level mean (Yu et al. 2025); `epsilon_high` its clip-higher.

A group whose replies all score the same has A = 0 everywhere: it teaches nothing but the KL term. The logs show
how many (`frac_zero_std`). Also logged: reward, accuracy (the verifiable checker's mean: the sampling
accuracy), kl (mean per-token k3 to the reference), entropy, clipfrac, approx_kl, response_length, ended, and at
every evaluation the greedy held-out accuracy (eval_accuracy).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..train.config import DistributedConfig, LoopConfig, read_recipe
from ..train.optim import OptimConfig
from ..train.schedule import ScheduleConfig
from . import rollout as ro
from .rewards import RewardSet

LOSS_AGGREGATIONS = ("sequence", "token", "constant")


# --- the math -----------------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """The advantage of each reply against its group (rewards (N,), G = group_size consecutive replies per prompt):

        GRPO:     A_i = (r_i - mean(r)) / (std(r) + eps)      (Shao et al. 2024; std unbiased, eps as in TRL)
        Dr. GRPO: A_i =  r_i - mean(r)                        (scale=False; Liu et al. 2025, sec. 3.2)
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size} consecutive replies")
    groups = rewards.view(-1, group_size)
    centered = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centered)
        centered = centered / (std + eps)
    return centered.reshape(-1)


def grpo_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor | None,
                    advantages: torch.Tensor, epsilon: float, epsilon_high: float | None = None,
                    beta: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The per-token GRPO loss (the negated summand of eq. 3): -min(rho A, clip(rho) A) + beta k3(pi, pi_ref), with
    A (N,) one advantage per reply. Returns (loss (N, R), clipped (N, R), k3 (N, R) or None without a reference;
    with beta = 0 the KL is only measured)."""
    loss, clipped = ro.clipped_surrogate(logps, old_logps, advantages[:, None], epsilon, epsilon_high)
    kl = None
    if ref_logps is not None:
        kl = ro.kl_k3(logps, ref_logps)
        if beta:
            loss = loss + beta * kl
    return loss, clipped, kl


def aggregate(loss: torch.Tensor, mask: torch.Tensor, how: str, max_tokens: int | None = None) -> torch.Tensor:
    """Reduce per-token losses (N, R) to the minibatch's loss:

        sequence:  1/N sum_i 1/|o_i| sum_t l_it          GRPO (eq. 3): each reply weighs the same
        token:     sum_it l_it / sum_i |o_i|             DAPO: each token weighs the same
        constant:  sum_it l_it / (N max_tokens)           Dr. GRPO: no length normalization at all
    """
    mask = mask.to(loss.dtype)
    if how == "sequence":
        return ((loss * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    if how == "token":
        return (loss * mask).sum() / mask.sum().clamp(min=1)
    if how == "constant":
        if not max_tokens:
            raise ValueError("the constant aggregation (Dr. GRPO) needs max_tokens, the generation budget")
        return (loss * mask).sum() / (loss.shape[0] * max_tokens)
    raise ValueError(f"loss aggregation {how!r}; choose one of {LOSS_AGGREGATIONS}")


# --- configuration ------------------------------------------------------------------------------------------------
@dataclass
class GRPOSettings:
    """The `[grpo]` section: the constants of the method (module docstring)."""

    num_generations: int = 8  # G: replies sampled per prompt (the group)
    beta: float = 0.04  # weight of the k3 KL penalty to the reference (0: no reference model is run)
    epsilon: float = 0.2  # the ratio's clip range, below and above
    epsilon_high: float = 0.0  # the clip's upper side when > 0 (DAPO's clip-higher, e.g. 0.28); 0: epsilon
    scale_rewards: bool = True  # divide advantages by the group's std (false: Dr. GRPO)
    loss_agg: str = "sequence"  # "sequence" (GRPO), "token" (DAPO), "constant" (Dr. GRPO)
    log_kl: bool = True  # with beta = 0, still run the reference to log the KL (false: save its memory and time)

    def validate(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid grpo config: {msg}")

        check(self.num_generations >= 2, f"grpo.num_generations must be at least 2 (a group needs a baseline), got "
                                         f"{self.num_generations}")
        check(self.beta >= 0, f"grpo.beta must be >= 0, got {self.beta}")
        check(self.epsilon > 0 and self.epsilon_high >= 0, "grpo.epsilon must be > 0 and grpo.epsilon_high >= 0")
        check(self.loss_agg in LOSS_AGGREGATIONS, f"grpo.loss_agg={self.loss_agg!r}; choose one of "
                                                  f"{LOSS_AGGREGATIONS}")


DR_GRPO = {"scale_rewards": False, "loss_agg": "constant"}  # `lmlab align grpo --dr-grpo`


@dataclass
class GRPOConfig:
    model: ro.PolicyConfig = field(default_factory=ro.PolicyConfig)
    rollout: ro.RolloutConfig = field(default_factory=ro.RolloutConfig)
    reward: ro.RewardConfig = field(default_factory=ro.RewardConfig)
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    train: LoopConfig = field(default_factory=lambda: LoopConfig(out_dir="runs/grpo", sample_prompts=[],
                                                                 sample_tokens=0, lr=ro.DEFAULT_LR))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(weight_decay=0.0))
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self) -> None:
        if not self.model.path:
            raise ValueError("model.path is not set; give --model DIR (the policy: usually an SFT checkpoint)")
        self.rollout.validate()
        self.reward.validate()
        self.grpo.validate()

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"model": ro.PolicyConfig, "rollout": ro.RolloutConfig, "reward": ro.RewardConfig,
                             "grpo": GRPOSettings, "train": LoopConfig, "optim": OptimConfig,
                             "schedule": ScheduleConfig, "distributed": DistributedConfig}


def resolve_grpo(d: dict[str, Any], overrides: list[str] = (), *, model: str | None = None,
                 prompts: str | None = None, rewards: list[str] = (), dr_grpo: bool = False) -> GRPOConfig:
    """A GRPOConfig from a recipe dict, `--set` overrides and the command line's --model / --prompts / --reward /
    --dr-grpo (which sets grpo.scale_rewards = false and grpo.loss_agg = "constant")."""
    return ro.resolve_rl(GRPOConfig, SECTIONS, d, overrides, model=model, prompts=prompts, rewards=rewards,
                         out_dir="runs/grpo", presets={"grpo": DR_GRPO} if dr_grpo else None)


def load_grpo_recipe(path: str | Path | None, overrides: list[str] = (), **cli: Any) -> GRPOConfig:
    """Read a GRPO TOML recipe (or none: defaults), apply overrides and the command line's choices."""
    return resolve_grpo(read_recipe(path) if path else {}, overrides, **cli)


# --- the rollout and the objective --------------------------------------------------------------------------------
class GRPORollout(ro.RolloutMethod):
    """A GRPO rollout: G replies per prompt and their rewards (RolloutMethod.generate), group advantages, old
    log-probs, and reference log-probs when there is a reference (beta > 0, or log_kl)."""

    def __init__(self, policy: nn.Module, ref: nn.Module | None, tokenizer: Any, rewards: RewardSet,
                 rollout: ro.RolloutConfig, reward: ro.RewardConfig, cfg: GRPOSettings, **kw: Any):
        super().__init__(policy, tokenizer, rewards, rollout, reward, **kw)
        self.ref, self.grpo = ref, cfg

    def __call__(self, records: list[ro.PromptRecord], seeds: list[int]) -> tuple[dict, dict]:
        G = self.grpo.num_generations
        batch, scores, stats = self.generate(records, seeds)
        advantages = group_advantages(scores, G, self.grpo.scale_rewards)
        groups = scores.view(-1, G)
        stats["frac_zero_std"] = float((groups.max(1).values == groups.min(1).values).float().mean())
        stats["reward_group_std"] = float(groups.std(1).mean())
        buffer = {**batch, "advantages": advantages, "old_logps": self.logps(self.policy, batch)}
        if self.ref is not None:
            buffer["ref_logps"] = self.logps(self.ref, batch)
        return buffer, stats


def grpo_objective(cfg: GRPOSettings, max_tokens: int,
                   temperature: float = 1.0) -> Callable[[nn.Module, dict], tuple[torch.Tensor, dict]]:
    """The GRPO loss of a minibatch (`grpo_token_loss`, reduced by `aggregate`); its `count` is the minibatch's
    reply tokens for the token mean and its replies otherwise, so micro-batches weigh as in one big batch.
    max_tokens: the generation budget (Dr. GRPO's constant); temperature: the rollouts' sampling temperature."""

    def objective(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        mask = batch["mask"]
        logits = model(batch["ids"]).logits
        logps, entropy = ro.response_logps(logits, batch["ids"], batch["prompt_len"], mask.shape[1], temperature)
        per_token, clipped, kl = grpo_token_loss(logps, batch["old_logps"], batch.get("ref_logps"),
                                                 batch["advantages"], cfg.epsilon, cfg.epsilon_high or None, cfg.beta)
        loss = aggregate(per_token, mask, cfg.loss_agg, max_tokens)
        with torch.no_grad():
            metrics = {**ro.stats_metrics(batch), "entropy": ro.masked_mean(entropy, mask),
                       "clipfrac": ro.masked_mean(clipped, mask),
                       "approx_kl": ro.masked_mean(ro.kl_k3(logps, batch["old_logps"]), mask)}
            if kl is not None:
                metrics["kl"] = ro.masked_mean(kl, mask)
        return loss, metrics

    if cfg.loss_agg == "token":
        objective.count = lambda batch: batch["mask"].sum()
    else:
        objective.count = lambda batch: batch["mask"].shape[0]
    return objective


# --- the run ------------------------------------------------------------------------------------------------------
PLOT_KEYS = ("reward", "accuracy", "eval_accuracy", "kl", "entropy", "response_length")


def _setup(policy: nn.Module, ref: nn.Module | None, tokenizer: Any, rewards: RewardSet, cfg: GRPOConfig,
           env: Any) -> ro.MethodSetup:
    if cfg.grpo.beta > 0 or cfg.grpo.log_kl:
        ref = ref if ref is not None else copy.deepcopy(policy)
        ref.eval().requires_grad_(False)
    else:
        ref = None
    method = GRPORollout(policy, ref, tokenizer, rewards, cfg.rollout, cfg.reward, cfg.grpo,
                         precision=cfg.train.precision, forward_batch=cfg.train.batch_size)
    objective = grpo_objective(cfg.grpo, cfg.rollout.max_new_tokens, cfg.rollout.temperature)
    return ro.MethodSetup(policy, method, objective, samples_per_prompt=cfg.grpo.num_generations)


def grpo(cfg: GRPOConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
         log: Callable[[str], None] = print) -> ro.RLResult:
    """Train the policy per `cfg` (see the module docstring); returns the run, the held-out metrics before and
    after, and the data's counts. Writes rl.json and align.png into train.out_dir."""
    return ro.run_rl(cfg, "grpo", _setup, resume=resume, overwrite=overwrite, progress=progress, log=log,
                     plot_keys=PLOT_KEYS)


__all__ = ["DR_GRPO", "GRPOConfig", "GRPORollout", "GRPOSettings", "aggregate", "group_advantages", "grpo",
           "grpo_objective", "grpo_token_loss", "load_grpo_recipe", "resolve_grpo"]
