"""The rollout phase that PPO and GRPO put around the one training loop, and the math the two share.

RL on a language model alternates two phases (Ouyang et al. 2022; Shao et al. 2024): sample replies from the
current policy and score them, then take a few optimizer steps on that batch. lmlab keeps its one loop
(train/loop.py) for the second phase and puts the first one inside the batch iterator, `RolloutBatches`:

    next(batches):
        if the buffer is used up:                                         (the rollout phase)
            take the next prompts (a seeded order over the prompt set, repeated G times for GRPO)
            generate replies with the CURRENT policy through infer.Engine (sampling, a seed per reply)
            score them (align/rewards.py), and let the method (ppo.py, grpo.py) add what it needs:
            old log-probs, reference log-probs, values, KL-penalized rewards, advantages
            serve the rollout in minibatches, `epochs` passes in fresh random orders
        return the next minibatch                                         (one loop step = one optimizer step)

The objective `(model, minibatch) -> (loss, metrics)` is the method's clipped loss; each minibatch carries its
rollout's statistics (reward, KL, accuracy, reply length) so the loop logs them beside the loss. Checkpoints,
resume, mixed precision, clipping, logging and plots are the loop's, as for every other stage.

Exact resume: `state_dict()` holds the buffer (the rollout's tensors), the position in it, the minibatch order,
the prompt order, the counters, the method's state (PPO's KL coefficient) and the iterator's own random
generator. Sampling draws from a per-reply seed derived from (seed, rollout index, reply index), never from the
global generators, and each rollout builds a fresh engine, so a run resumed from a checkpoint generates the same
rollouts from the same weights, and takes, bit for bit, the steps the uninterrupted run took (tests/align/
test_rollout.py for the iterator, test_grpo.py and test_ppo.py through the loop). A fresh engine per rollout is
also what keeps generation honest: with prefix caching on, an engine kept across rollouts would reuse keys and
values the previous weights computed.

Layout of a rollout: prompt + reply token ids right-padded to one length T, `ids` (N, T); per-token quantities
of the replies in a reply-major layout (N, R), position j being the reply's j-th token, with `mask` (N, R) 1 on
real tokens. A reply that ended its turn keeps its end-of-turn token (the engine reports it apart), so the
policy is trained on when to stop. Right padding needs no attention mask: attention is causal, so padding after
a row's end changes nothing before it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_file
from ..train.config import apply_overrides, build_sections
from .rewards import RewardSet

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
SUMMARY_FILE = "rl.json"


# --- the math both methods share ----------------------------------------------------------------------------------
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask), over `dim` or everything; 0 where the mask is empty."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries (the unbiased variance), 0 elsewhere: advantage
    normalization as in OpenAI's baselines PPO2 and TRL (`masked_whiten`)."""
    mask = mask.to(x.dtype)
    n = mask.sum()
    mean = (x * mask).sum() / n.clamp(min=1)
    var = (((x - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k1 = log pi(x) - log pi_ref(x) = -log r, r = pi_ref(x) / pi(x), x ~ pi (Schulman 2020, "Approximating KL
    divergence"): unbiased for KL(pi || pi_ref), high variance, negative for some samples."""
    return logp - ref_logp


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r, r = pi_ref(x) / pi(x), x ~ pi (Schulman 2020): unbiased for KL(pi || pi_ref) (E[r] = 1),
    lower variance than k1, and >= 0 for every sample since e^y >= 1 + y. DeepSeekMath's GRPO penalty (eq. 4):
    D_KL = pi_ref/pi - log(pi_ref/pi) - 1."""
    log_r = ref_logp - logp
    return torch.exp(log_r) - 1 - log_r


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"KL estimator {kind!r}; choose one of {tuple(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[kind](logp, ref_logp)


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float,
                      eps_high: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token PPO-clip loss (Schulman et al. 2017, eq. 7), negated to be minimized:

        rho_t = pi(a_t | s_t) / pi_old(a_t | s_t) = exp(logp - old_logp)
        L_t   = -min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t)

    eps_high defaults to eps_low (DAPO's "clip-higher", Yu et al. 2025, raises it). Returns (L_t, clipped_t), the
    second 1.0 where the clipped term is the smaller one (the gradient of that token is zero): its mean is the
    logged clip fraction."""
    eps_high = eps_low if eps_high is None else eps_high
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).to(logp.dtype)


def gather_response(x: torch.Tensor, prompt_len: torch.Tensor, length: int) -> torch.Tensor:
    """The entries of x (N, T, ...) at the positions that predict each reply's tokens: row i's reply starts at
    prompt_len[i], and position prompt_len[i] - 1 + j predicts its j-th token. Returns (N, length, ...); entries
    past a row's end are clamped to its last position (mask them)."""
    T = x.shape[1]
    pos = (prompt_len[:, None] - 1 + torch.arange(length, device=x.device)[None, :]).clamp(max=T - 1)
    if x.dim() == 2:
        return x.gather(1, pos)
    return x.gather(1, pos[..., None].expand(-1, -1, x.shape[-1]))


def response_logps(logits: torch.Tensor, ids: torch.Tensor, prompt_len: torch.Tensor, length: int,
                   temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi(y_j | x, y_<j), entropy of pi(. | x, y_<j)) for each reply token j: (N, length) each, float32.

    pi is the distribution the replies were sampled from, softmax(logits / temperature), so that the importance
    ratios and KL estimates are of the sampling policy (as TRL does); top-p / top-k truncation is not modelled."""
    T = ids.shape[1]
    targets = ids.gather(1, (prompt_len[:, None] + torch.arange(length, device=ids.device)[None, :]).clamp(max=T - 1))
    logp_all = F.log_softmax(gather_response(logits, prompt_len, length).float() / temperature, dim=-1)
    logps = logp_all.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logps, entropy


# --- prompts ------------------------------------------------------------------------------------------------------
@dataclass
class PromptRecord:
    """A conversation to answer (it ends with the user's turn) and the record's other fields (`answer`, `task`,
    ...), which reach the reward functions as keyword columns."""

    messages: list[dict]
    columns: dict[str, Any] = field(default_factory=dict)


def to_prompt(record: dict, system: str = "") -> PromptRecord:
    """One record as a prompt. Accepted: {"messages": [...]} (the prompt is what precedes the last assistant turn,
    whose content becomes `answer` unless the record has one), {"prompt": text or messages, ...} (the synthetic
    eval files: prompt, answer, task), {"question": ..., "answer" / "final_answer": ...} (GSM8K)."""
    from ..tune.chat_data import prompt_of

    columns = {k: v for k, v in record.items() if k not in ("messages", "prompt", "question")}
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list of {role, content} dicts")
        prompt = prompt_of(messages)
        replies = [m for m in messages[len(prompt):] if m.get("role") == "assistant"]
        if replies and "answer" not in columns:
            columns["answer"] = replies[0].get("content", "")
    elif "prompt" in record:
        p = record["prompt"]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else [dict(m) for m in p]
    elif "question" in record:
        prompt = [{"role": "user", "content": record["question"]}]
        if record.get("final_answer") is not None:
            columns["answer"] = record["final_answer"]
    else:
        raise ValueError(f"a prompt record needs 'messages', 'prompt' or 'question'; this one has {sorted(record)}")
    if not prompt or prompt[-1].get("role") != "user":
        raise ValueError("a prompt must end with a user message (the turn the policy answers)")
    if system and prompt[0].get("role") != "system":
        prompt = [{"role": "system", "content": system}, *prompt]
    return PromptRecord(prompt, columns)


def _records(spec: str) -> Iterable[dict]:
    from ..tune.chat_data import _read_file

    path = Path(spec)
    if path.is_dir():
        files = sorted(path.glob("*.jsonl")) + sorted(path.glob("*.json"))
        if not files:
            raise FileNotFoundError(f"prompt directory {spec} holds no .jsonl or .json file")
        for f in files:
            yield from _read_file(f)
        return
    if path.suffix in (".json", ".jsonl") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"prompt file {spec} does not exist")
        yield from _read_file(path)
        return
    from ..data import sources

    name, _, split = spec.partition(":")
    try:
        source = sources.get_source(name)
    except (KeyError, ValueError) as e:
        raise ValueError(f"prompts {spec!r} are neither a file, a directory nor a dataset name ({e})") from e
    default = next((s for s in ("train", "sft") if s in source.splits), next(iter(source.splits)))
    yield from sources.records(name, split or default, progress=False)


def load_prompts(spec: str, *, tasks: Sequence[str] = (), match: str = "", limit: int = 0,
                 system: str = "") -> list[PromptRecord]:
    """The prompts of a .jsonl/.json file, of every .jsonl/.json file in a directory (the synthetic corpus's eval/),
    or of a registry dataset ("gsm8k:train"); only records whose `task` is in `tasks` and whose question (the last
    user message) matches the regular expression `match`, when given; `limit` at most."""
    try:
        pattern = re.compile(match) if match else None
    except re.error as e:
        raise ValueError(f"rollout.match {match!r} is not a regular expression: {e}") from e
    out = []
    for i, record in enumerate(_records(spec)):
        if tasks and record.get("task") not in tasks:
            continue
        if limit and len(out) >= limit:
            break
        try:
            prompt = to_prompt(record, system)
        except ValueError as e:
            raise ValueError(f"{spec}, record {i}: {e}") from None
        if pattern is None or pattern.search(prompt.messages[-1].get("content") or ""):
            out.append(prompt)
    if not out:
        which = [f"of the tasks {list(tasks)}"] * bool(tasks) + [f"matching {match!r}"] * bool(match)
        raise ValueError(f"prompts {spec} hold no usable record {' '.join(which)}".rstrip())
    return out


# --- configuration ------------------------------------------------------------------------------------------------
@dataclass
class PolicyConfig:
    """The `[model]` section: the policy to train (usually an SFT checkpoint) and its reference."""

    path: str = ""  # an lmlab or Hugging Face checkpoint directory, with its tokenizer and chat template
    ref: str = ""  # the reference policy of the KL penalty: "" = the starting policy (a frozen copy of it)


@dataclass
class RolloutConfig:
    """The `[rollout]` section: the prompts, how replies are sampled, and how a rollout becomes optimizer steps."""

    prompts: str = ""  # training prompts: a .jsonl/.json file, a directory of them, or a dataset name[:split]
    validation: str = ""  # held-out prompts for evaluation (same forms); "" = val_fraction of `prompts`; "none"
    val_fraction: float = 0.05  # held out of `prompts` when `validation` is ""
    val_limit: int = 200  # evaluate on at most this many held-out prompts (0: all)
    tasks: list[str] = field(default_factory=list)  # keep only records whose "task" is one of these ([]: all)
    match: str = ""  # keep only prompts whose question (last user message) matches this regular expression
    limit: int = 0  # use at most this many training prompts (0: all)
    system: str = ""  # a system prompt for prompts that have none
    max_prompt_tokens: int = 192  # prompts longer than this (rendered with the chat template) are left out
    max_new_tokens: int = 64  # reply length limit: a reply cut here did not end its turn
    temperature: float = 1.0  # sampling temperature of the rollouts (evaluation is greedy)
    top_p: float = 1.0  # nucleus sampling of the rollouts (1: off)
    top_k: int = 0  # top-k sampling of the rollouts (0: off)
    prompts_per_rollout: int = 16  # prompts per rollout (per process); GRPO samples num_generations replies each
    epochs: int = 1  # passes over each rollout batch (PPO's K epochs, GRPO's mu iterations)
    rollouts: int = 0  # rollouts to train for; sets train.steps (0: train.steps decides)
    engine_batch: int = 64  # replies generated at the same time by the inference engine

    def validate(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid rollout config: {msg}")

        check(bool(self.prompts), "rollout.prompts is not set; give --prompts FILE|DIR|NAME (a .jsonl of "
                                  "{\"prompt\": ...} or {\"messages\": [...]} records, or a dataset name)")
        check(0 <= self.val_fraction < 1, f"rollout.val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("max_prompt_tokens", "max_new_tokens", "prompts_per_rollout", "epochs", "engine_batch"):
            check(getattr(self, name) >= 1, f"rollout.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("val_limit", "limit", "rollouts", "top_k"):
            check(getattr(self, name) >= 0, f"rollout.{name} must be >= 0, got {getattr(self, name)}")
        check(self.temperature > 0, f"rollout.temperature must be > 0 (RL samples; evaluation is greedy), got "
                                    f"{self.temperature}")
        check(0 < self.top_p <= 1, f"rollout.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class RewardConfig:
    """The `[reward]` section: what a reply is worth (align/rewards.py lists the functions)."""

    functions: list[str] = field(default_factory=list)  # e.g. ["number", "format"], ["rm:runs/rm/..."], ["m:f"]
    weights: list[float] = field(default_factory=list)  # one per function ([]: all 1); the reward is the sum
    missing_eos_penalty: float = 0.0  # subtracted from the reward of a reply that did not end its turn (TRL's)
    batch_size: int = 16  # replies per forward pass of a reward model

    def validate(self) -> None:
        if not self.functions:
            raise ValueError("reward.functions is empty; name at least one reward with --reward (number, synthetic, "
                             "format, ended, sentiment, length=N, rm:DIR, module:function, file.py:function)")
        if self.weights and len(self.weights) != len(self.functions):
            raise ValueError(f"reward.weights has {len(self.weights)} values for {len(self.functions)} functions; "
                             "give one weight per function, or none")
        if self.missing_eos_penalty < 0 or self.batch_size < 1:
            raise ValueError("reward.missing_eos_penalty must be >= 0 and reward.batch_size >= 1")


DEFAULT_LR = 1e-6  # TRL's default for PPO and GRPO on billion-parameter models; small models want far more


def resolve_rl(config_cls: type, sections: dict[str, type], d: dict[str, Any], overrides: Sequence[str] = (),
               *, model: str | None = None, prompts: str | None = None, rewards: Sequence[str] = (),
               out_dir: str = "runs/rl", presets: dict[str, Any] | None = None) -> Any:
    """An RL config (PPOConfig, GRPOConfig) from a recipe dict, `--set` overrides and the command line (which wins
    over the recipe). Defaults that differ from pretraining's: no weight decay (RL fine-tunes a finished model;
    TRL's default too) and train.lr = DEFAULT_LR unless given."""
    d = apply_overrides(d, list(overrides), sections)
    if model:
        d.setdefault("model", {})["path"] = model
    if prompts:
        d.setdefault("rollout", {})["prompts"] = prompts
    if rewards:
        d.setdefault("reward", {})["functions"] = list(rewards)
    for section, values in (presets or {}).items():
        d.setdefault(section, {}).update(values)
    d["optim"] = {"weight_decay": 0.0, **dict(d.get("optim") or {})}
    defaults = {"out_dir": out_dir, "sample_prompts": [], "sample_tokens": 0, "lr": DEFAULT_LR}
    return build_sections(config_cls, sections, d, "RL", train_defaults=defaults)


# --- sampling -----------------------------------------------------------------------------------------------------
@dataclass
class Samples:
    """Replies to a list of prompts: token ids (with the end-of-turn token when the reply ended its turn), text
    (without it), and whether each one ended its turn."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    texts: list[str]
    ended: list[bool]


def sample(model: nn.Module, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, seeds: Sequence[int] | None = None,
           engine_batch: int = 64) -> Samples:
    """Replies of `model` through a fresh inference engine (no prefix caching: the weights change between
    rollouts), one seed per reply (None: greedy when temperature is 0). The model's train/eval mode is restored
    (the engine switches it to eval)."""
    from ..infer.engine import Engine, EngineConfig
    from ..infer.sampling import SamplingParams
    from ..tokenizer.chat import end_of_turn_ids

    was_training = model.training
    context = model.cfg.max_seq_len
    stops = end_of_turn_ids(tokenizer)
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=engine_batch, max_batch_tokens=max(2048, engine_batch),
                                                   prefix_caching=False))
    try:
        params = [SamplingParams(max_new_tokens=max(1, min(max_new_tokens, context - len(p))), temperature=temperature,
                                 top_p=top_p, top_k=top_k or None, stop_token_ids=stops,
                                 seed=None if seeds is None else int(seeds[i]))
                  for i, p in enumerate(prompt_ids)]
        completions = engine.generate([list(p) for p in prompt_ids], params)
    finally:
        model.train(was_training)
    response_ids, texts, ended = [], [], []
    for c in completions:
        stopped = c.finish_reason == "stop" and isinstance(c.stop_reason, int)
        response_ids.append(list(c.token_ids) + ([c.stop_reason] if stopped else []))
        texts.append((c.text or "").strip())
        ended.append(stopped)
    return Samples([list(p) for p in prompt_ids], response_ids, texts, ended)


def pad_rollout(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                device: torch.device | str = "cpu", pad_id: int = 0) -> dict[str, torch.Tensor]:
    """ids (N, T) = prompt + reply right-padded with pad_id; prompt_len, resp_len (N,); mask (N, R) 1.0 on the
    reply's tokens, R the longest reply."""
    if any(len(r) == 0 for r in response_ids):
        raise ValueError("a reply with no token cannot be trained on; the engine always generates at least one")
    rows = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
    T, R = max(len(r) for r in rows), max(len(r) for r in response_ids)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
    resp_len = torch.tensor([len(r) for r in response_ids])
    mask = (torch.arange(R)[None, :] < resp_len[:, None]).float()
    return {"ids": ids.to(device), "prompt_len": torch.tensor([len(p) for p in prompt_ids]).to(device),
            "resp_len": resp_len.to(device), "mask": mask.to(device)}


def autocast(precision: str, device: torch.device):
    """The loop's mixed precision (train/loop.py), so that old log-probs are computed as the training step does."""
    if precision not in AUTOCAST:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=AUTOCAST[precision])


def trim(batch: dict[str, Any], rows: torch.Tensor | None = None) -> dict[str, Any]:
    """The rows of a rollout batch, cut to the longest row (ids) and the longest reply (every (N, R) tensor)."""
    if rows is not None:
        batch = {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    T = int((batch["prompt_len"] + batch["resp_len"]).max())
    R = int(batch["resp_len"].max())
    out = {}
    for k, v in batch.items():
        if k == "ids":
            v = v[:, :T]
        elif isinstance(v, torch.Tensor) and v.dim() == 2:
            v = v[:, :R]
        out[k] = v
    return out


# --- the rollout methods ------------------------------------------------------------------------------------------
class RolloutMethod:
    """What PPO and GRPO share of a rollout: sample replies from the current policy, score them, and compute
    per-token log-probabilities. `__call__(records, seeds) -> (buffer, stats)` is each method's (ppo.py, grpo.py):
    the buffer is a dict of tensors with N rows, stats the rollout's scalar metrics."""

    def __init__(self, policy: nn.Module, tokenizer: Any, rewards: RewardSet, rollout: RolloutConfig,
                 reward: RewardConfig, *, precision: str = "fp32", forward_batch: int = 16):
        self.policy, self.tokenizer, self.rewards = policy, tokenizer, rewards
        self.cfg, self.reward_cfg = rollout, reward
        self.precision, self.forward_batch = precision, forward_batch

    def generate(self, records: Sequence[PromptRecord], seeds: Sequence[int]) -> tuple[dict, torch.Tensor, dict]:
        """(padded batch, rewards (N,), stats) for replies to `records` sampled with `seeds`."""
        c = self.cfg
        device = next(self.policy.parameters()).device
        prompt_ids = [self.tokenizer.render_chat(r.messages, add_generation_prompt=True)[0] for r in records]
        s = sample(self.policy, self.tokenizer, prompt_ids, max_new_tokens=c.max_new_tokens,
                   temperature=c.temperature, top_p=c.top_p, top_k=c.top_k, seeds=seeds, engine_batch=c.engine_batch)
        scores, parts, stats = score_samples(self.rewards, records, s, self.reward_cfg.missing_eos_penalty)
        batch = pad_rollout(s.prompt_ids, s.response_ids, device)
        return batch, torch.tensor(scores, dtype=torch.float32, device=device), stats

    @torch.no_grad()
    def logps(self, model: nn.Module, batch: dict[str, torch.Tensor], with_values: bool = False):
        """Per-token log-probs (N, R) of the replies under `model` (a Transformer; or, with_values, a policy with a
        value head returning (logits, values)), in chunks of forward_batch rows, under the loop's precision."""
        R = batch["mask"].shape[1]
        device = batch["ids"].device
        logps, values = [], []
        for s in range(0, batch["ids"].shape[0], self.forward_batch):
            chunk = trim({k: v[s:s + self.forward_batch] for k, v in batch.items()})
            with autocast(self.precision, device):
                out = model(chunk["ids"])
            logits, v = out if with_values else (out.logits, None)
            lp, _ = response_logps(logits, chunk["ids"], chunk["prompt_len"], chunk["mask"].shape[1],
                                   self.cfg.temperature)
            logps.append(F.pad(lp, (0, R - lp.shape[1])))
            if with_values:
                v = gather_response(v.float(), chunk["prompt_len"], chunk["mask"].shape[1])
                values.append(F.pad(v, (0, R - v.shape[1])))
        logps = torch.cat(logps) * batch["mask"]
        return (logps, torch.cat(values) * batch["mask"]) if with_values else logps

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def score_samples(rewards: RewardSet, records: Sequence[PromptRecord], s: Samples,
                  missing_eos_penalty: float = 0.0) -> tuple[list[float], dict[str, list[float]], dict[str, float]]:
    """(reward per reply, each reward function's values, the rollout's statistics)."""
    columns: dict[str, list] = {}
    for key in sorted({k for r in records for k in r.columns}):
        columns[key] = [r.columns.get(key) for r in records]
    columns["ended"] = list(s.ended)
    scores, parts = rewards.score([r.messages for r in records], s.texts, columns)
    if missing_eos_penalty:
        scores = [v - missing_eos_penalty * (not e) for v, e in zip(scores, s.ended, strict=True)]
    t = torch.tensor(scores, dtype=torch.float64)
    stats = {"reward": float(t.mean()), "reward_std": float(t.std()) if len(scores) > 1 else 0.0,
             "response_length": sum(len(r) for r in s.response_ids) / len(s.response_ids),
             "ended": sum(s.ended) / len(s.ended)}
    for name, values in parts.items():
        if len(parts) > 1:
            stats[f"reward_{name}"] = sum(values) / len(values)
    if rewards.verifier is not None:
        values = parts[rewards.verifier]
        stats["accuracy"] = sum(v >= 1.0 for v in values) / len(values)
    return scores, parts, stats


# --- the iterator -------------------------------------------------------------------------------------------------
class RolloutBatches:
    """The loop's batch iterator for RL (see the module docstring): each rollout of N = prompts_per_rollout x
    samples_per_prompt replies is served as `epochs` passes of minibatches of `batch_size` rows, each pass in a
    fresh random order. Prompts are visited in a seeded random order, epoch after epoch; under data parallelism
    every process takes its own slice of the same order."""

    def __init__(self, prompts: Sequence[PromptRecord], method: RolloutMethod, *, prompts_per_rollout: int,
                 samples_per_prompt: int = 1, batch_size: int, epochs: int = 1, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        n = prompts_per_rollout * samples_per_prompt
        if n % batch_size:
            raise ValueError(f"a rollout of {prompts_per_rollout} prompts x {samples_per_prompt} samples = {n} replies "
                             f"does not split into minibatches of train.batch_size={batch_size}; make the rollout a "
                             "multiple of the batch size")
        if prompts_per_rollout * world_size > len(prompts):
            raise ValueError(f"rollout.prompts_per_rollout={prompts_per_rollout} x {world_size} process(es) is more "
                             f"than the {len(prompts)} training prompts")
        self.prompts, self.method = list(prompts), method
        self.prompts_per_rollout, self.samples_per_prompt = prompts_per_rollout, samples_per_prompt
        self.batch_size, self.epochs, self.seed = batch_size, epochs, seed
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.prompt_order: list[int] = []
        self.prompt_pos = 0
        self.rollouts = 0  # rollouts generated so far
        self.buffer: dict[str, Any] | None = None
        self.stats: dict[str, float] = {}
        self.order: list[int] = []  # rows of the buffer, in serving order
        self.pos = 0

    @property
    def rollout_size(self) -> int:
        return self.prompts_per_rollout * self.samples_per_prompt

    @property
    def steps_per_rollout(self) -> int:
        """Minibatches served per rollout (loop steps, with grad_accum 1)."""
        return self.epochs * self.rollout_size // self.batch_size

    def __iter__(self) -> RolloutBatches:
        return self

    def _next_prompts(self) -> list[PromptRecord]:
        need = self.prompts_per_rollout * self.world_size
        if self.prompt_pos + need > len(self.prompt_order):  # a new pass over the prompts, in a new order
            self.prompt_order = torch.randperm(len(self.prompts), generator=self.generator).tolist()
            self.prompt_pos = 0
        start = self.prompt_pos + self.rank * self.prompts_per_rollout
        picked = self.prompt_order[start:start + self.prompts_per_rollout]
        self.prompt_pos += need
        return [self.prompts[i] for i in picked]

    def _seeds(self) -> list[int]:
        base = ((self.seed * 1_000_003 + self.rank) * 1_000_003 + self.rollouts) * 1_000_003
        return [(base + i) % 2**63 for i in range(self.rollout_size)]

    def _rollout(self) -> None:
        records = [r for r in self._next_prompts() for _ in range(self.samples_per_prompt)]
        self.buffer, self.stats = self.method(records, self._seeds())
        self.rollouts += 1
        self.stats["rollouts"] = float(self.rollouts)
        n = self.rollout_size
        self.order = [i for _ in range(self.epochs) for i in torch.randperm(n, generator=self.generator).tolist()]
        self.pos = 0

    def __next__(self) -> dict[str, Any]:
        if self.buffer is None or self.pos >= len(self.order):
            self._rollout()
        rows = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        batch = trim(self.buffer, torch.tensor(rows, device=self.buffer["ids"].device))
        batch["stats"] = dict(self.stats)
        return batch

    def state_dict(self) -> dict[str, Any]:
        buffer = None if self.buffer is None else {k: v.detach().cpu().clone() for k, v in self.buffer.items()}
        return {"seed": self.seed, "generator": self.generator.get_state(), "prompt_order": list(self.prompt_order),
                "prompt_pos": self.prompt_pos, "rollouts": self.rollouts, "buffer": buffer, "stats": dict(self.stats),
                "order": list(self.order), "pos": self.pos, "method": self.method.state_dict(),
                "rollout_size": self.rollout_size, "batch_size": self.batch_size, "epochs": self.epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("rollout_size", "batch_size", "epochs"):
            if state[key] != getattr(self, key):
                raise ValueError(f"cannot resume: the run was made with {key}={state[key]} and this one has "
                                 f"{getattr(self, key)}; resume with the same rollout settings and train.batch_size")
        self.seed = state["seed"]  # the replies' seeds derive from it
        self.generator.set_state(state["generator"])
        self.prompt_order, self.prompt_pos = list(state["prompt_order"]), state["prompt_pos"]
        self.rollouts, self.stats = state["rollouts"], dict(state["stats"])
        self.order, self.pos = list(state["order"]), state["pos"]
        device = next(self.method.policy.parameters()).device
        self.buffer = None if state["buffer"] is None else {k: v.to(device) for k, v in state["buffer"].items()}
        self.method.load_state_dict(state["method"])


def stats_metrics(batch: dict[str, Any]) -> dict[str, float]:
    """The rollout statistics a minibatch carries, for the objective's metrics."""
    return dict(batch.get("stats") or {})


# --- evaluation ---------------------------------------------------------------------------------------------------
def evaluate_policy(policy: nn.Module, tokenizer: Any, prompts: Sequence[PromptRecord], rewards: RewardSet, *,
                    max_new_tokens: int, engine_batch: int = 64, n_samples: int = 3) -> dict[str, Any]:
    """Greedy replies to held-out prompts, scored by the run's rewards: eval_reward, eval_reward_<name> (several
    rewards), eval_accuracy (with a verifiable checker), eval_response_length, eval_ended, and a few samples. Greedy,
    so it draws no random numbers and evaluating does not change the run."""
    if not prompts:
        return {}
    prompt_ids = [tokenizer.render_chat(r.messages, add_generation_prompt=True)[0] for r in prompts]
    s = sample(policy, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, temperature=0.0, engine_batch=engine_batch)
    _, _, stats = score_samples(rewards, prompts, s)
    out: dict[str, Any] = {f"eval_{k}": v for k, v in stats.items() if k != "reward_std"}
    if n_samples:
        out["samples"] = [f"{r.messages[-1]['content'][:200]!r} -> {t[:300]!r}"
                          for r, t in zip(prompts[:n_samples], s.texts[:n_samples], strict=True)]
    return out


# --- the run ------------------------------------------------------------------------------------------------------
@dataclass
class RLResult:
    run: Any  # train.loop.RunResult
    before: dict[str, Any]  # held-out metrics of the starting policy
    after: dict[str, Any]  # held-out metrics at the end
    data: dict[str, Any]


@dataclass
class MethodSetup:
    """What a method (ppo.py, grpo.py) puts into the shared run: the module the loop trains, the rollout method,
    the objective, how checkpoints hold the model, and replies per prompt."""

    model: nn.Module
    method: RolloutMethod | None
    objective: Callable
    model_io: Any = None
    samples_per_prompt: int = 1
    # a method with its own generation phase (online DPO): batches(prompts, held) -> (the loop's batch iterator,
    # with steps_per_rollout and rollout_size; the evaluation), in place of RolloutBatches and evaluate_policy
    batches: Callable[..., tuple[Any, Callable[[nn.Module], dict[str, Any]]]] | None = None


def _split(prompts: list[PromptRecord], fraction: float, seed: int) -> tuple[list, list]:
    n = int(round(len(prompts) * fraction))
    if n == 0:
        return prompts, []
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n])
    return [p for i, p in enumerate(prompts) if i not in held], [p for i, p in enumerate(prompts) if i in held]


def _fits(tokenizer: Any, prompts: list[PromptRecord], max_tokens: int) -> tuple[list[PromptRecord], int]:
    kept = [p for p in prompts
            if len(tokenizer.render_chat(p.messages, add_generation_prompt=True)[0]) <= max_tokens]
    return kept, len(prompts) - len(kept)


def run_rl(cfg: Any, kind: str, setup: Callable[..., MethodSetup], *, resume: bool = False, overwrite: bool = False,
           progress: bool = True, log: Callable[[str], None] = print,
           plot_keys: Sequence[str] = ()) -> RLResult:
    """The run PPO and GRPO share: load the policy, its tokenizer, the prompts and the rewards; let `setup(policy,
    ref, tokenizer, rewards, cfg, env)` build the method; evaluate the starting policy; train through the loop;
    write rl.json (before / after) and align.png."""
    from ..model.loading import load as load_model
    from ..tokenizer import load_tokenizer, tokenizer_files
    from ..train import distributed
    from ..train.config import DataConfig, TrainConfig
    from ..train.loop import train

    cfg.validate()
    cfg = copy.deepcopy(cfg)
    env = distributed.init(cfg.distributed, cfg.train.device)
    try:
        if env.sharded:
            raise ValueError(f"{kind} runs on one process or with ddp; set distributed.strategy = 'ddp'")
        tokenizer = load_tokenizer(cfg.model.path)
        if tokenizer is None:
            raise FileNotFoundError(f"{cfg.model.path} has no tokenizer; prompts are rendered with the policy's own "
                                    "tokenizer and chat template")
        torch.manual_seed(cfg.train.seed)
        policy = load_model(cfg.model.path, device=env.device, dtype=torch.float32)
        context = policy.cfg.max_seq_len
        r = cfg.rollout
        max_prompt = min(r.max_prompt_tokens, context - 1)  # a longer prompt leaves no room for a reply
        prompts = load_prompts(r.prompts, tasks=r.tasks, match=r.match, limit=r.limit, system=r.system)
        if r.validation == "none":
            held: list[PromptRecord] = []
        elif r.validation:
            held = load_prompts(r.validation, tasks=r.tasks, match=r.match, system=r.system)
        else:
            prompts, held = _split(prompts, r.val_fraction, cfg.train.seed)
        prompts, dropped = _fits(tokenizer, prompts, max_prompt)
        held, held_dropped = _fits(tokenizer, held, max_prompt)
        held = held[:r.val_limit] if r.val_limit else held
        if not prompts:
            raise ValueError(f"every prompt of {r.prompts} is longer than {max_prompt} tokens (rollout."
                             f"max_prompt_tokens, or the model's context of {context}); raise it")
        rewards = None  # a method may label by a judge instead of rewards (online DPO)
        if cfg.reward.functions:
            rewards = RewardSet.from_specs(cfg.reward.functions, cfg.reward.weights, device=str(env.device),
                                           batch_size=cfg.reward.batch_size)
        ref = load_model(cfg.model.ref, device=env.device, dtype=torch.float32) if cfg.model.ref else None
        s = setup(policy, ref, tokenizer, rewards, cfg, env)
        if s.batches is not None:
            batches, evaluate_held = s.batches(prompts, held)
        else:
            batches = RolloutBatches(prompts, s.method, prompts_per_rollout=r.prompts_per_rollout,
                                     samples_per_prompt=s.samples_per_prompt, batch_size=cfg.train.batch_size,
                                     epochs=r.epochs, seed=cfg.train.seed, rank=env.dp_rank, world_size=env.dp_size)

            def evaluate_held(_: nn.Module) -> dict[str, Any]:
                return evaluate_policy(policy, tokenizer, held, rewards, max_new_tokens=r.max_new_tokens,
                                       engine_batch=r.engine_batch)
        per_rollout = batches.steps_per_rollout
        if per_rollout % cfg.train.grad_accum:
            raise ValueError(f"{per_rollout} minibatches per rollout do not split into optimizer steps of "
                             f"train.grad_accum={cfg.train.grad_accum}")
        if r.rollouts:
            cfg.train.steps = r.rollouts * per_rollout // cfg.train.grad_accum
        data_info = {"train_prompts": len(prompts), "held_out_prompts": len(held), "too_long": dropped + held_dropped,
                     "replies_per_rollout": batches.rollout_size,
                     "steps_per_rollout": per_rollout // cfg.train.grad_accum, "steps": cfg.train.steps,
                     "rollouts": math.ceil(cfg.train.steps * cfg.train.grad_accum / per_rollout)}
        if env.is_main:
            log(f"{kind}: {len(prompts):,} training prompts, {len(held):,} held out ({dropped + held_dropped} longer "
                f"than {max_prompt} tokens left out); {data_info['rollouts']} rollouts of "
                f"{batches.rollout_size} replies, {data_info['steps_per_rollout']} optimizer steps each "
                f"({cfg.train.steps} steps); " + (f"rewards: {', '.join(cfg.reward.functions)}" if rewards is not None
                                                  else "labeled by a judge"))
        evaluate = evaluate_held

        out_dir = Path(cfg.train.out_dir)
        summary_path = out_dir / SUMMARY_FILE
        previous = json.loads(summary_path.read_text()) if resume and summary_path.is_file() else {}
        before = previous.get("before")
        if before is None and held:
            with torch.no_grad():
                before = evaluate(policy)
        before = before or {}
        if env.is_main and before:
            log(f"held-out before: {brief(before)}")
        # the loop counts tokens_per_step from data.seq_len: a rollout row is at most this long
        seq_len = min(context, max_prompt + r.max_new_tokens)
        tcfg = TrainConfig(model=policy.cfg, data=DataConfig(tokenizer=str(cfg.model.path), seq_len=seq_len),
                           train=cfg.train, optim=cfg.optim, schedule=cfg.schedule, distributed=cfg.distributed)
        if env.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        run = train(tcfg, s.model, s.objective, batches, env=env, evaluate=evaluate if held else None,
                    tokenizer_files=tokenizer_files(cfg.model.path), resume=resume, overwrite=overwrite,
                    progress=progress, desc=kind, model_io=s.model_io,
                    metadata={"rl_config": cfg.to_dict(), "method": kind, "base_model": str(cfg.model.path)})
        after = run.eval
        if env.is_main:
            with atomic_file(summary_path, "w") as f:
                f.write(json.dumps({"method": kind, "before": before, "after": after, "data": data_info},
                                   indent=2) + "\n")
            if plot_keys:
                from ..train.metrics import plot_metrics

                plot_metrics(out_dir, out_dir / "align.png", list(plot_keys), title=kind)
            if after:
                log(f"held-out after: {brief(after)}")
        return RLResult(run, before, after, data_info)
    finally:
        distributed.shutdown(env)


def brief(metrics: dict[str, Any]) -> str:
    keys = ("eval_accuracy", "eval_reward", "eval_win_rate", "eval_response_length", "eval_ended")
    return ", ".join(f"{k[5:]} {metrics[k]:.4f}" for k in keys if k in metrics) or "no held-out prompts"


__all__ = ["KL_ESTIMATORS", "MethodSetup", "PolicyConfig", "PromptRecord", "RLResult", "RewardConfig",
           "RolloutBatches", "RolloutConfig", "RolloutMethod", "Samples", "clipped_surrogate", "evaluate_policy",
           "gather_response", "kl_estimate", "kl_k1", "kl_k3", "load_prompts", "masked_mean", "masked_whiten",
           "pad_rollout", "resolve_rl", "response_logps", "run_rl", "sample", "score_samples",
           "to_prompt", "trim"]
