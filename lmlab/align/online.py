"""Online preference optimization: the policy's own replies, labeled as they come, trained on with DPO, round after
round (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; Xu et al. 2023, iterative DPO).

Offline DPO learns from pairs some other model wrote; its preferences say little about the replies the policy
itself now gives, and they grow staler as it moves. Online DPO asks for fresh labels on its own samples:

    for round in 1..N:                                                           (the batch iterator, OnlinePairs)
        take the round's prompts; sample two replies to each from the CURRENT policy (inference engine, seeded)
        label each pair: a reward model or any reward function (the higher reward is chosen; ties dropped),
            or a judge (an lmlab checkpoint or an OpenAI-compatible endpoint) asked in both orders
            (evals/judge.py; a verdict the two orders disagree on is dropped)
        the reference model's log-probabilities of the new pairs (the starting policy, frozen)
        `epochs` passes of DPO (or any offline loss of align/offline.py) over them: one loop step per minibatch

Like PPO and GRPO (align/rollout.py), the generation phase lives in the loop's batch iterator, so checkpoints,
exact resume (the round's pairs and every counter are in its state), logging and plots are the loop's. Every log
line carries the round's labeling statistics (the chosen and rejected replies' rewards, how many pairs tied or
were inconsistent), and each evaluation reports the held-out win rate of the policy's greedy replies against the
starting policy's, judged by the same labeler.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..train.config import DistributedConfig, LoopConfig
from ..train.optim import OptimConfig
from ..train.schedule import ScheduleConfig
from . import preference as prefs
from . import rollout as ro
from .offline import PreferenceConfig, preference_objective
from .rewards import RewardSet


@dataclass
class JudgeConfig:
    """The `[judge]` section: an AI judge that labels the pairs instead of reward functions."""

    model: str = ""  # an lmlab checkpoint directory or an OpenAI-compatible URL (http://host:port/v1); "" = rewards
    name: str = ""  # the endpoint's model name (URL judges)
    max_new_tokens: int = 256  # the judge's verdict length
    rubric: str = ""  # what "better" means ("" = evals/judge.py's default rubric)


@dataclass
class OnlineConfig:
    model: ro.PolicyConfig = field(default_factory=ro.PolicyConfig)
    rollout: ro.RolloutConfig = field(default_factory=ro.RolloutConfig)
    reward: ro.RewardConfig = field(default_factory=ro.RewardConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    align: PreferenceConfig = field(default_factory=PreferenceConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self) -> None:
        if not self.model.path:
            raise ValueError("model.path is not set; give --model DIR (the policy: usually an SFT checkpoint)")
        if not self.judge.model and not self.reward.functions:
            raise ValueError("online DPO needs a labeler: --reward (a reward model rm:DIR or a function) or --judge "
                             "(an lmlab checkpoint or an OpenAI-compatible URL)")
        if self.judge.model and self.reward.functions:
            raise ValueError("give either --reward or --judge as the labeler, not both")
        if self.reward.functions:
            self.reward.validate()
        self.rollout.validate()
        self.align.validate()
        if self.align.method == "kto":
            raise ValueError("online preference optimization labels pairs; align.method may be dpo, ipo, cdpo, orpo or "
                             "simpo")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"model": ro.PolicyConfig, "rollout": ro.RolloutConfig, "reward": ro.RewardConfig,
                             "judge": JudgeConfig, "align": PreferenceConfig, "train": LoopConfig,
                             "optim": OptimConfig, "schedule": ScheduleConfig, "distributed": DistributedConfig}


def resolve_online(d: dict[str, Any], overrides: list[str] = (), *, model: str | None = None,
                   prompts: str | None = None, rewards: Sequence[str] = (), judge: str | None = None) -> OnlineConfig:
    """An OnlineConfig from a recipe dict, `--set` overrides and the command line (which wins)."""
    d = dict(d)
    if judge:
        d["judge"] = {**dict(d.get("judge") or {}), "model": judge}
    return ro.resolve_rl(OnlineConfig, SECTIONS, d, overrides, model=model, prompts=prompts, rewards=rewards,
                         out_dir="runs/online-dpo")


def load_online_recipe(path: str | Path | None, overrides: list[str] = (), **cli: Any) -> OnlineConfig:
    return resolve_online(ro.read_recipe(path) if path else {}, overrides, **cli)


# --- labeling ---------------------------------------------------------------------------------------------------
Labeler = Callable[[Sequence[ro.PromptRecord], list[str], list[str], list[bool], list[bool]],
                   tuple[list[int | None], dict[str, float]]]


def reward_labeler(rewards: RewardSet) -> Labeler:
    """Label by reward: per pair 0 (the first reply is better), 1 (the second) or None (equal rewards)."""

    def label(records, first, second, first_ended, second_ended):
        both = list(records) + list(records)
        columns = {k: [r.columns.get(k) for r in both] for k in sorted({k for r in records for k in r.columns})}
        columns["ended"] = list(first_ended) + list(second_ended)
        scores, _ = rewards.score([r.messages for r in both], list(first) + list(second), columns)
        a, b = scores[:len(first)], scores[len(first):]
        labels = [None if x == y else (0 if x > y else 1) for x, y in zip(a, b, strict=True)]
        kept = [(max(x, y), min(x, y)) for x, y, lab in zip(a, b, labels, strict=True) if lab is not None]
        stats = {"label_ties": labels.count(None) / len(labels),
                 "label_reward_chosen": sum(c for c, _ in kept) / len(kept) if kept else 0.0,
                 "label_reward_rejected": sum(r for _, r in kept) / len(kept) if kept else 0.0,
                 "label_reward_mean": (sum(a) + sum(b)) / (2 * len(a))}
        return labels, stats

    return label


def judge_labeler(judge: Any, cfg: JudgeConfig) -> Labeler:
    """Label by an AI judge asked in both orders (evals/judge.py `compare`); ties and order-inconsistent verdicts
    give None."""
    from ..evals import judge as jd

    def label(records, first, second, first_ended, second_ended):
        items = [jd.Pair(question=r.messages[-1]["content"], answer_a=a, answer_b=b)
                 for r, a, b in zip(records, first, second, strict=True)]
        kwargs = {"rubric": cfg.rubric} if cfg.rubric else {}
        report = jd.compare(judge, items, max_new_tokens=cfg.max_new_tokens, **kwargs)
        labels = [{"A": 0, "B": 1}.get(r.final) if r.consistent else None for r in report.results]
        stats = {"label_ties": sum(r.final == "tie" for r in report.results) / len(items),
                 "label_inconsistent": sum(r.consistent is False for r in report.results) / len(items),
                 "label_unparsed": sum(r.consistent is None for r in report.results) / len(items)}
        return labels, stats

    return label


def judge_generator(cfg: JudgeConfig, device: str | torch.device = "cpu") -> Any:
    """The judge as an evals.lm Generator: an OpenAI-compatible endpoint for a URL, else a local checkpoint."""
    from ..evals.lm import LM, OpenAIEndpoint

    if cfg.model.startswith(("http://", "https://")):
        return OpenAIEndpoint(cfg.model, cfg.name or "default")
    if not Path(cfg.model).is_dir():
        raise FileNotFoundError(f"judge {cfg.model} is neither an http(s) URL nor a checkpoint directory")
    return LM.from_dir(cfg.model, device=str(device), progress=False)


# --- the iterator ----------------------------------------------------------------------------------------------
class OnlinePairs:
    """The loop's batch iterator for online DPO: each round samples and labels pairs (see the module docstring) and
    serves `steps_per_rollout` pair batches (align/preference.py `collate`) over them, each carrying the round's
    labeling statistics. Rounds with every pair tied are skipped (up to 8 in a row)."""

    def __init__(self, prompts: Sequence[ro.PromptRecord], policy: nn.Module, ref: nn.Module, tokenizer: Any,
                 labeler: Labeler, rollout: ro.RolloutConfig, *, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        if rollout.prompts_per_rollout * world_size > len(prompts):
            raise ValueError(f"rollout.prompts_per_rollout={rollout.prompts_per_rollout} x {world_size} process(es) "
                             f"is more than the {len(prompts)} training prompts")
        self.prompts, self.policy, self.ref, self.tokenizer = list(prompts), policy, ref, tokenizer
        self.labeler, self.cfg, self.batch_size, self.seed = labeler, rollout, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.prompt_order: list[int] = []
        self.prompt_pos, self.rounds, self.served = 0, 0, 0
        self.examples: list[prefs.PairExample] = []
        self.pairs: prefs.PairBatches | None = None
        self.stats: dict[str, float] = {}

    @property
    def rollout_size(self) -> int:
        return 2 * self.cfg.prompts_per_rollout

    @property
    def steps_per_rollout(self) -> int:
        """Pair batches per round: `epochs` passes over the round's pairs were none of them tied."""
        return max(1, self.cfg.epochs * self.cfg.prompts_per_rollout // self.batch_size)

    def __iter__(self) -> OnlinePairs:
        return self

    def _next_prompts(self) -> list[ro.PromptRecord]:
        need = self.cfg.prompts_per_rollout * self.world_size
        if self.prompt_pos + need > len(self.prompt_order):
            self.prompt_order = torch.randperm(len(self.prompts), generator=self.generator).tolist()
            self.prompt_pos = 0
        start = self.prompt_pos + self.rank * self.cfg.prompts_per_rollout
        picked = self.prompt_order[start:start + self.cfg.prompts_per_rollout]
        self.prompt_pos += need
        return [self.prompts[i] for i in picked]

    def _round(self) -> None:
        c = self.cfg
        for _ in range(8):
            records = self._next_prompts()
            base = ((self.seed * 1_000_003 + self.rank) * 1_000_003 + self.rounds) * 1_000_003
            self.rounds += 1
            prompt_ids = [self.tokenizer.render_chat(r.messages, add_generation_prompt=True)[0] for r in records]
            s = ro.sample(self.policy, self.tokenizer, prompt_ids + prompt_ids, max_new_tokens=c.max_new_tokens,
                          temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
                          seeds=[(base + i) % 2**63 for i in range(2 * len(records))], engine_batch=c.engine_batch)
            n = len(records)
            labels, stats = self.labeler(records, s.texts[:n], s.texts[n:], s.ended[:n], s.ended[n:])
            examples = []
            for i, lab in enumerate(labels):
                a, b = s.response_ids[i], s.response_ids[n + i]
                if lab is None or a == b:
                    continue
                chosen, rejected = (a, b) if lab == 0 else (b, a)
                examples.append(prefs.PairExample(list(prompt_ids[i]), list(chosen), list(rejected)))
            if examples:
                break
        else:
            raise RuntimeError("8 rounds in a row gave no usable pair (every pair tied, identical or unjudged): "
                               "raise rollout.temperature for more varied replies, or check the labeler")
        prefs.reference_logps(self.ref, examples, batch_size=self.batch_size, progress=False)
        self.examples = examples
        self.pairs = prefs.PairBatches(examples, self.batch_size, seed=self.seed * 1_000_003 + self.rounds)
        self.stats = {**stats, "rounds": float(self.rounds), "pairs": float(len(examples)),
                      "response_length": sum(map(len, s.response_ids)) / len(s.response_ids)}
        self.served = 0

    def __next__(self) -> dict[str, Any]:
        if self.pairs is None or self.served >= self.steps_per_rollout:
            self._round()
        batch = next(self.pairs)
        device = next(self.policy.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["stats"] = dict(self.stats)
        self.served += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "prompt_order": list(self.prompt_order),
                "prompt_pos": self.prompt_pos, "rounds": self.rounds, "served": self.served,
                "examples": [(e.prompt, e.chosen, e.rejected, e.ref_chosen, e.ref_rejected) for e in self.examples],
                "pairs": None if self.pairs is None else self.pairs.state_dict(), "stats": dict(self.stats),
                "n_prompts": len(self.prompts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["n_prompts"] != len(self.prompts):
            raise ValueError(f"cannot resume: the run trained on {state['n_prompts']} prompts and this data has "
                             f"{len(self.prompts)}; resume with the same prompts and settings")
        self.generator.set_state(state["generator"])
        self.prompt_order, self.prompt_pos = list(state["prompt_order"]), int(state["prompt_pos"])
        self.rounds, self.served, self.stats = int(state["rounds"]), int(state["served"]), dict(state["stats"])
        self.examples = [prefs.PairExample(p, c, r, ref_chosen=rc, ref_rejected=rr)
                         for p, c, r, rc, rr in state["examples"]]
        self.pairs = None
        if state["pairs"] is not None:
            self.pairs = prefs.PairBatches(self.examples, self.batch_size, seed=self.seed * 1_000_003 + self.rounds)
            self.pairs.load_state_dict(state["pairs"])


def online_objective(cfg: PreferenceConfig) -> Callable[[nn.Module, dict], tuple[torch.Tensor, dict[str, Any]]]:
    """The offline method's loss on a round's pair batch, with the round's labeling statistics in the metrics."""
    inner = preference_objective(cfg)

    def objective(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, metrics = inner(model, {k: v for k, v in batch.items() if k != "stats"})
        return loss, {**metrics, **ro.stats_metrics(batch)}

    objective.count = inner.count
    return objective


# --- evaluation: win rate against the starting policy -------------------------------------------------------------
def win_rate_evaluator(policy: nn.Module, tokenizer: Any, held: Sequence[ro.PromptRecord], labeler: Labeler,
                       rollout: ro.RolloutConfig) -> Callable[[nn.Module], dict[str, Any]]:
    """An evaluation that compares the policy's greedy replies to held-out prompts with the starting policy's
    (computed now, once), labeled by the run's labeler: eval_win_rate (ties and unlabeled pairs count half)."""
    if not held:
        return lambda _: {}
    prompt_ids = [tokenizer.render_chat(r.messages, add_generation_prompt=True)[0] for r in held]

    def greedy() -> ro.Samples:
        return ro.sample(policy, tokenizer, prompt_ids, max_new_tokens=rollout.max_new_tokens, temperature=0.0,
                         engine_batch=rollout.engine_batch)

    start = greedy()

    def evaluate(_: nn.Module) -> dict[str, Any]:
        now = greedy()
        labels, _ = labeler(held, now.texts, start.texts, now.ended, start.ended)
        wins = sum(1.0 if lab == 0 else 0.5 if lab is None else 0.0 for lab in labels)
        return {"eval_win_rate": wins / len(labels),
                "eval_response_length": sum(map(len, now.response_ids)) / len(now.response_ids),
                "samples": [f"{r.messages[-1]['content'][:200]!r} -> {t[:300]!r}"
                            for r, t in zip(held[:3], now.texts[:3], strict=False)]}

    return evaluate


# --- the run -----------------------------------------------------------------------------------------------------
def online_dpo(cfg: OnlineConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
               log: Callable[[str], None] = print) -> ro.RLResult:
    """Online preference optimization per `cfg` (see the module docstring), through rollout.run_rl's run."""
    judge = judge_generator(cfg.judge) if cfg.judge.model else None

    def setup(policy, ref, tokenizer, rewards, c, env) -> ro.MethodSetup:
        labeler = judge_labeler(judge, c.judge) if judge is not None else reward_labeler(rewards)
        reference = ref if ref is not None else copy.deepcopy(policy).eval().requires_grad_(False)

        def batches(prompts, held):
            it = OnlinePairs(prompts, policy, reference, tokenizer, labeler, c.rollout, batch_size=c.train.batch_size,
                             seed=c.train.seed, rank=env.dp_rank, world_size=env.dp_size)
            return it, win_rate_evaluator(policy, tokenizer, held, labeler, c.rollout)

        return ro.MethodSetup(policy, None, online_objective(c.align), batches=batches)

    return ro.run_rl(cfg, "online-dpo", setup, resume=resume, overwrite=overwrite, progress=progress, log=log,
                     plot_keys=("loss", "reward_accuracy", "reward_margin", "label_reward_mean",
                                "label_reward_chosen", "eval_win_rate"))


__all__ = ["JudgeConfig", "OnlineConfig", "OnlinePairs", "judge_generator", "judge_labeler", "load_online_recipe",
           "online_dpo", "online_objective", "resolve_online", "reward_labeler", "win_rate_evaluator"]
