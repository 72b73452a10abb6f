"""RLHF with PPO: a policy and a value head learn from the reward of the policy's own replies, held near a
reference policy by a per-token KL penalty (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022).

    cfg = load_ppo_recipe("recipes/ppo-speedrun.toml", model="runs/speedrun/sft/checkpoints/step_00000450")
    result = ppo(cfg)          # checkpoints (the policy, loadable by `lmlab generate`), metrics.jsonl, rl.json

One rollout (align/rollout.py serves it to the one training loop as minibatches):

1. sample a reply y ~ pi_old(. | x) to each prompt x, and score it: s(x, y) from a reward model, a Python
   function or a checker (align/rewards.py);
2. per-token rewards with the KL penalty to the reference pi_ref (the starting policy):
       r_t = -beta KL_t          KL_t = k1 (log pi_old - log pi_ref) or k3 (Schulman 2020)
       r_T += s(x, y)            at the reply's last token
3. values V(s_t) of the value head, and GAE advantages and returns (Schulman et al. 2016);
4. `epochs` passes of minibatch steps on the clipped policy loss and the clipped value loss (Schulman et al. 2017);
5. the adaptive KL controller moves beta toward a target KL (Ziegler et al. 2019, eq. 2).

Policy and value (`ppo.value_model`): "head" puts a scalar head on the policy's own final hidden states (one
trunk, one forward for both; the value loss shapes the trunk too, so `vf_coef` keeps it small; the head starts
at zero so that it cannot disturb the policy before it has learned anything), "separate" gives the critic its
own copy of the starting trunk (twice the compute, no interference; the InstructGPT and TRL arrangement, there
initialized from the reward model). Checkpoints hold the policy as a normal checkpoint (`lmlab generate` reads
it) and the head (and separate trunk) in value.safetensors beside it, which resume reads back.

Logged per step: reward (the reward functions' weighted sum, mean over the rollout), rlhf_reward (reward minus
beta times the reply's KL), kl (the reply's summed KL estimate to the reference, mean over replies), kl_coef
(beta), entropy, clipfrac, approx_kl (k3 between the minibatch's policy before and after the updates so far),
policy_loss, value_loss, value_clipfrac, response_length, ended (replies that closed their turn).
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
from ..train.loop import ModelIO
from ..train.optim import OptimConfig
from ..train.schedule import ScheduleConfig
from . import rollout as ro
from .rewards import RewardSet

VALUE_FILE = "value.safetensors"
VALUE_MODELS = ("head", "separate")


# --- the math -----------------------------------------------------------------------------------------------------
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eqs. 11-16) over replies laid out (N, R), each row's
    tokens a prefix of length sum(mask):

        delta_t = r_t + gamma V(s_{t+1}) - V(s_t)          V(s_{T}) = 0 after the last token
        A_t     = sum_l (gamma lambda)^l delta_{t+l}       computed backwards: A_t = delta_t + gamma lambda A_{t+1}
        R_t     = A_t + V(s_t)                             the value target (the lambda-return)

    Returns (advantages, returns), 0 past each row's end."""
    mask = mask.to(rewards.dtype)
    N, R = rewards.shape
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(N, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(R)):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -beta KL_t on every reply token, plus the reply's score s(x, y) on its last token (Ziegler et al.
    2019, eq. 1 spread over tokens, as in Stiennon et al. 2020 and TRL)."""
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    return rewards.scatter_add(1, last[:, None], scores.to(kl.dtype)[:, None])


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token clipped value loss of PPO2 (OpenAI baselines; TRL):

        V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
        L_V    = 1/2 max((V - R)^2, (V_clip - R)^2)

    Returns (L_V per token, clipped_t: 1.0 where the clipped error is the larger one)."""
    v_clip = old_values + torch.clamp(values - old_values, -clip, clip)
    loss1, loss2 = (values - returns) ** 2, (v_clip - returns) ** 2
    return 0.5 * torch.maximum(loss1, loss2), (loss2 > loss1).to(values.dtype)


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, n_steps: int, horizon: int) -> float:
    """The adaptive KL controller (Ziegler et al. 2019, eq. 2):

        e_t       = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_t+1  = beta_t (1 + K_beta e_t),      K_beta = n_steps / horizon

    as in their code (lm-human-preferences), n_steps being the replies in the batch just used: beta grows while
    the policy drifts further than the target KL from the reference and shrinks while it stays closer."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_steps / horizon)


# --- configuration ------------------------------------------------------------------------------------------------
@dataclass
class PPOSettings:
    """The `[ppo]` section: the constants of the method (module docstring)."""

    kl_coef: float = 0.05  # beta: the per-token KL penalty's coefficient (the start value when adaptive)
    kl_estimator: str = "k1"  # "k1" (log pi - log pi_ref, unbiased) or "k3" (low variance, >= 0); Schulman 2020
    adaptive_kl: bool = False  # move kl_coef toward kl_target (Ziegler et al. 2019)
    kl_target: float = 6.0  # nats per reply the adaptive controller aims at
    kl_horizon: int = 10000  # replies over which the controller moves beta by up to 20%
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE's lambda
    cliprange: float = 0.2  # eps of the policy ratio's clip
    cliprange_value: float = 0.2  # eps_v of the value's clip around its rollout value
    vf_coef: float = 0.1  # weight of the value loss in the total loss
    ent_coef: float = 0.0  # entropy bonus (0: none, as in RLHF practice)
    whiten_advantages: bool = True  # normalize the rollout's advantages to mean 0, variance 1
    value_model: str = "head"  # "head" on the policy's trunk, or "separate" (a copy of the trunk)

    def validate(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid ppo config: {msg}")

        check(self.kl_coef >= 0, f"ppo.kl_coef must be >= 0, got {self.kl_coef}")
        check(self.kl_estimator in ro.KL_ESTIMATORS, f"ppo.kl_estimator={self.kl_estimator!r}; choose one of "
                                                     f"{tuple(ro.KL_ESTIMATORS)}")
        check(self.kl_target > 0 and self.kl_horizon >= 1, "ppo.kl_target must be > 0 and ppo.kl_horizon >= 1")
        check(not self.adaptive_kl or self.kl_coef > 0, "ppo.adaptive_kl scales ppo.kl_coef, which is 0: set it > 0")
        check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, f"ppo.gamma and ppo.lam must be in [0, 1], got "
                                                           f"{self.gamma}, {self.lam}")
        check(self.cliprange > 0 and self.cliprange_value > 0, "ppo.cliprange and ppo.cliprange_value must be > 0")
        check(self.vf_coef >= 0 and self.ent_coef >= 0, "ppo.vf_coef and ppo.ent_coef must be >= 0")
        check(self.value_model in VALUE_MODELS, f"ppo.value_model={self.value_model!r}; choose one of {VALUE_MODELS}")


@dataclass
class PPOConfig:
    model: ro.PolicyConfig = field(default_factory=ro.PolicyConfig)
    rollout: ro.RolloutConfig = field(default_factory=ro.RolloutConfig)
    reward: ro.RewardConfig = field(default_factory=ro.RewardConfig)
    ppo: PPOSettings = field(default_factory=PPOSettings)
    train: LoopConfig = field(default_factory=lambda: LoopConfig(out_dir="runs/ppo", sample_prompts=[],
                                                                 sample_tokens=0, lr=ro.DEFAULT_LR))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(weight_decay=0.0))
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self) -> None:
        if not self.model.path:
            raise ValueError("model.path is not set; give --model DIR (the policy: usually an SFT checkpoint)")
        self.rollout.validate()
        self.reward.validate()
        self.ppo.validate()

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"model": ro.PolicyConfig, "rollout": ro.RolloutConfig, "reward": ro.RewardConfig,
                             "ppo": PPOSettings, "train": LoopConfig, "optim": OptimConfig,
                             "schedule": ScheduleConfig, "distributed": DistributedConfig}


def resolve_ppo(d: dict[str, Any], overrides: list[str] = (), *, model: str | None = None,
                prompts: str | None = None, rewards: list[str] = ()) -> PPOConfig:
    """A PPOConfig from a recipe dict, `--set` overrides and the command line's --model / --prompts / --reward."""
    return ro.resolve_rl(PPOConfig, SECTIONS, d, overrides, model=model, prompts=prompts, rewards=rewards,
                         out_dir="runs/ppo")


def load_ppo_recipe(path: str | Path | None, overrides: list[str] = (), **cli: Any) -> PPOConfig:
    """Read a PPO TOML recipe (or none: defaults), apply overrides and the command line's choices."""
    return resolve_ppo(read_recipe(path) if path else {}, overrides, **cli)


# --- policy and value ---------------------------------------------------------------------------------------------
class PolicyWithValue(nn.Module):
    """The policy (an lmlab Transformer) and its critic: `forward(ids) -> (logits (N, T, V), values (N, T))`, the
    value at position t estimating the return of the reply from the state ids[:t+1]."""

    def __init__(self, policy: nn.Module, value_model: str = "head"):
        super().__init__()
        if value_model not in VALUE_MODELS:
            raise ValueError(f"value_model={value_model!r}; choose one of {VALUE_MODELS}")
        self.policy = policy
        self.critic = None
        if value_model == "separate":
            self.critic = copy.deepcopy(policy)
            self.critic.lm_head = None  # the critic reads hidden states only; an unused head would stall DDP
            self.critic.requires_grad_(True)
        param = next(policy.parameters())
        self.value_head = nn.Linear(policy.cfg.d_model, 1, device=param.device, dtype=torch.float32)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    @property
    def cfg(self):
        return self.policy.cfg

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.policy.hidden_states(ids)
        logits = self.policy.logits(h)
        hv = self.critic.hidden_states(ids) if self.critic is not None else h
        return logits, self.value_head(hv.to(self.value_head.weight.dtype)).squeeze(-1)

    def value_state_dict(self) -> dict[str, torch.Tensor]:
        """The critic's weights (head, and trunk when separate): what value.safetensors holds."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("policy.")}


class PolicyValueIO(ModelIO):
    """Checkpoints of a PPO run: the policy as a normal lmlab checkpoint (model.safetensors, config.json, tokenizer;
    `lmlab generate` reads it) and the critic in value.safetensors beside it."""

    def write(self, model: nn.Module, directory: Path, tokenizer_files: list[Path], metadata: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        super().write(model.policy, directory, tokenizer_files, metadata)
        save_file({k: v.detach().contiguous().cpu() for k, v in model.value_state_dict().items()},
                  directory / VALUE_FILE)

    def read(self, model: nn.Module, directory: Path) -> None:
        from safetensors.torch import load_file

        super().read(model.policy, directory)
        if not (directory / VALUE_FILE).is_file():
            raise FileNotFoundError(f"{directory} has no {VALUE_FILE}: it was not written by a PPO run; resume a "
                                    "PPO run from its own run directory")
        device = next(model.parameters()).device
        missing, unexpected = model.load_state_dict(load_file(directory / VALUE_FILE, device=str(device)),
                                                    strict=False)
        missing = [k for k in missing if not k.startswith("policy.")]
        if missing or unexpected:
            raise ValueError(f"{directory / VALUE_FILE} does not fit this critic (missing {missing}, unexpected "
                             f"{unexpected}): resume with the ppo.value_model the run was started with")


# --- the rollout and the objective --------------------------------------------------------------------------------
class KLController:
    """beta of the KL penalty: fixed, or adaptive (`adaptive_kl_coef`). Its value is part of the resume state."""

    def __init__(self, cfg: PPOSettings):
        self.cfg, self.value = cfg, cfg.kl_coef

    def update(self, kl: float, n_steps: int) -> None:
        if self.cfg.adaptive_kl:
            self.value = adaptive_kl_coef(self.value, kl, self.cfg.kl_target, n_steps, self.cfg.kl_horizon)


class PPORollout(ro.RolloutMethod):
    """A PPO rollout: replies and rewards (RolloutMethod.generate), then old log-probs and values of the policy,
    reference log-probs, KL-penalized per-token rewards, GAE advantages and returns."""

    def __init__(self, model: PolicyWithValue, ref: nn.Module, tokenizer: Any, rewards: RewardSet,
                 rollout: ro.RolloutConfig, reward: ro.RewardConfig, cfg: PPOSettings, **kw: Any):
        super().__init__(model.policy, tokenizer, rewards, rollout, reward, **kw)
        self.model, self.ref, self.ppo = model, ref, cfg
        self.kl_ctl = KLController(cfg)

    def __call__(self, records: list[ro.PromptRecord], seeds: list[int]) -> tuple[dict, dict]:
        batch, scores, stats = self.generate(records, seeds)
        mask = batch["mask"]
        old_logps, values = self.logps(self.model, batch, with_values=True)
        ref_logps = self.logps(self.ref, batch)
        kl = ro.kl_estimate(old_logps, ref_logps, self.ppo.kl_estimator) * mask
        beta = self.kl_ctl.value
        rewards = token_rewards(scores, kl, mask, beta)
        advantages, returns = gae(rewards, values, mask, self.ppo.gamma, self.ppo.lam)
        if self.ppo.whiten_advantages:
            advantages = ro.masked_whiten(advantages, mask)
        kl_seq = kl.sum(1)
        stats.update({"kl": float(kl_seq.mean()), "kl_coef": beta,
                      "rlhf_reward": float((scores - beta * kl_seq).mean()),
                      "value_mean": float(ro.masked_mean(values, mask)),
                      "return_mean": float(ro.masked_mean(returns, mask))})
        self.kl_ctl.update(float(kl_seq.mean()), n_steps=len(records))
        buffer = {**batch, "old_logps": old_logps, "old_values": values, "advantages": advantages,
                  "returns": returns}
        return buffer, stats

    def state_dict(self) -> dict[str, Any]:
        return {"kl_coef": self.kl_ctl.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kl_ctl.value = float(state["kl_coef"])


def ppo_objective(cfg: PPOSettings,
                  temperature: float = 1.0) -> Callable[[nn.Module, dict], tuple[torch.Tensor, dict[str, Any]]]:
    """The PPO loss of a minibatch, L = L_clip + vf_coef L_V - ent_coef H, each a mean over the minibatch's reply
    tokens (its `count`, so micro-batches weigh by tokens). `temperature`: the rollouts' sampling temperature
    (log-probs are of the distribution the replies were sampled from)."""

    def objective(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        mask = batch["mask"]
        R = mask.shape[1]
        logits, values_all = model(batch["ids"])
        logps, entropy = ro.response_logps(logits, batch["ids"], batch["prompt_len"], R, temperature)
        values = ro.gather_response(values_all.float(), batch["prompt_len"], R)
        pg, clipped = ro.clipped_surrogate(logps, batch["old_logps"], batch["advantages"], cfg.cliprange)
        vf, vf_clipped = clipped_value_loss(values, batch["old_values"], batch["returns"], cfg.cliprange_value)
        policy_loss, value_loss = ro.masked_mean(pg, mask), ro.masked_mean(vf, mask)
        mean_entropy = ro.masked_mean(entropy, mask)
        loss = policy_loss + cfg.vf_coef * value_loss - cfg.ent_coef * mean_entropy
        with torch.no_grad():
            approx_kl = ro.masked_mean(ro.kl_k3(logps, batch["old_logps"]), mask)
        metrics = {**ro.stats_metrics(batch), "policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(),
                   "entropy": mean_entropy.detach(), "clipfrac": ro.masked_mean(clipped, mask).detach(),
                   "value_clipfrac": ro.masked_mean(vf_clipped, mask).detach(), "approx_kl": approx_kl}
        return loss, metrics

    objective.count = lambda batch: batch["mask"].sum()
    return objective


# --- the run ------------------------------------------------------------------------------------------------------
PLOT_KEYS = ("reward", "eval_reward", "kl", "kl_coef", "entropy", "clipfrac", "value_loss", "response_length")


def _setup(policy: nn.Module, ref: nn.Module | None, tokenizer: Any, rewards: RewardSet, cfg: PPOConfig,
           env: Any) -> ro.MethodSetup:
    ref = ref if ref is not None else copy.deepcopy(policy)
    ref.eval().requires_grad_(False)
    model = PolicyWithValue(policy, cfg.ppo.value_model)
    method = PPORollout(model, ref, tokenizer, rewards, cfg.rollout, cfg.reward, cfg.ppo,
                        precision=cfg.train.precision, forward_batch=cfg.train.batch_size)
    return ro.MethodSetup(model, method, ppo_objective(cfg.ppo, cfg.rollout.temperature), PolicyValueIO(),
                          samples_per_prompt=1)


def ppo(cfg: PPOConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
        log: Callable[[str], None] = print) -> ro.RLResult:
    """Train the policy per `cfg` (see the module docstring); returns the run, the held-out metrics before and
    after, and the data's counts. Writes rl.json and align.png into train.out_dir."""
    return ro.run_rl(cfg, "ppo", _setup, resume=resume, overwrite=overwrite, progress=progress, log=log,
                     plot_keys=PLOT_KEYS)


__all__ = ["PPOConfig", "PPORollout", "PPOSettings", "PolicyValueIO", "PolicyWithValue", "KLController",
           "adaptive_kl_coef", "clipped_value_loss", "gae", "load_ppo_recipe", "ppo", "ppo_objective", "resolve_ppo",
           "token_rewards"]
