"""Rewards for RL on language models: answer checkers, format checks, a few known functions for demos, any Python
function by name, and a reward model.

A reward function has the signature TRL's GRPOTrainer uses, so functions written for it work here unchanged:

    fn(prompts: list[list[dict]], completions: list[str], **columns) -> list[float]

`prompts` are the conversations that were answered (OpenAI-style messages ending with the user's turn),
`completions` the policy's replies as text (without the end-of-turn token), and `columns` the prompt records'
other fields as lists, one value per completion (`answer`, `task`, ... whatever the prompt file holds), plus
`ended`: whether each reply closed its turn (False when it ran out of tokens). A function takes what it needs
and ignores the rest through **columns.

Spec strings (`load_reward`, the `[reward] functions` list and `--reward`):

    number            1 if the reply's final number equals the record's `answer` (exact value; see final_number)
    synthetic         1 if lmlab's synthetic-corpus verifier accepts the reply (`data.synthetic.verify`, by the
                      record's `task`: arithmetic, lookups, copying, story questions, formats)
    format            1 if the reply states a final number in a recognized form (an `Answer:` line, "The answer
                      is N", "#### N", or a reply that is only a number)
    ended             1 if the reply ended its turn (the model stopped by itself)
    sentiment         happy minus sad words, per 10 words of reply (a demo reward for stories, after Ziegler
                      et al. 2019's positive-sentiment task)
    length=N          -|words - N| / N: replies of about N words (a demo reward with a known optimum)
    rm:DIR            a reward model trained by `lmlab reward` (align/reward.py), loaded on first use
    module:function   a function in an importable module, e.g. mypkg.rewards:brevity
    path/file.py:fn   a function in a Python file

Verifiable rewards (`number`, `synthetic`) are what RL with verifiable rewards trains on (Shao et al. 2024,
DeepSeekMath; Lambert et al. 2024, Tulu 3 "RLVR"): the reward is the checker's verdict, so it cannot be gamed
the way a learned reward model can, only satisfied. Their mean over samples is the policy's sampling accuracy,
which the RL runs log as `accuracy`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..evals.tasks.gsm8k import normalize_number

RewardFn = Callable[..., list[float]]

# --- final answers ------------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
_STATEMENTS = (re.compile(r"Answer:[ \t]*([^\n]*)"),  # lmlab's synthetic corpus: the last "Answer:" line
               re.compile(r"The answer is[ \t]*([^\n]*)", re.IGNORECASE),  # GSM8K chain of thought
               re.compile(r"####[ \t]*([^\n]*)"))  # GSM8K reference solutions


def _one_number(text: str) -> str | None:
    """The value of the only number in `text` ("$1,000.00." -> "1000"); None when there is none or several."""
    found = _NUMBER.findall(text)
    return normalize_number(found[0]) if len(found) == 1 else None


def final_number(text: str, flexible: bool = False) -> str | None:
    """The final numeric answer a reply states, as a canonical string ("1,234." -> "1234", "-5" -> "-5"), or None.

    Read from the last answer statement: an `Answer:` line (lmlab's corpus), "The answer is ..." or "#### ..."
    (GSM8K), whichever comes last in the text; the rest of that line must hold exactly one number ("Answer: 7
    apples" is 7, "Answer: 12 or 13" is no answer). A reply that is nothing but a number is that number (direct
    answers). With flexible=True a reply with no statement gives its last number anywhere, as lm-evaluation-
    harness's flexible GSM8K match does; the checker used as a reward is strict, so that listing numbers in the
    hope that the last one is right does not pay."""
    text = text.strip()
    last: tuple[int, str] | None = None
    for pattern in _STATEMENTS:
        for m in pattern.finditer(text):
            if last is None or m.start() > last[0]:
                last = (m.start(), m.group(1))
    if last is not None:
        return _one_number(last[1])
    if re.fullmatch(r"-?\$?\d[\d,]*(?:\.\d+)?\.?", text):
        return normalize_number(text)
    if flexible:
        found = _NUMBER.findall(text)
        return normalize_number(found[-1]) if found else None
    return None


def reference_number(answer: Any) -> str | None:
    """The number a record's `answer` holds: a number, a numeric string, or a worked solution / GSM8K reference
    whose final statement gives it (flexibly: its last number)."""
    if isinstance(answer, bool) or answer is None:
        return None
    if isinstance(answer, (int, float)):
        return normalize_number(repr(answer))
    return final_number(str(answer), flexible=True)


def _column(columns: dict[str, list], name: str, n: int, reward: str) -> list:
    values = columns.get(name)
    if values is None:
        raise ValueError(f"the {reward!r} reward needs a {name!r} field in every prompt record; the records have "
                         f"{sorted(k for k in columns if k != 'ended') or 'no other fields'}")
    if len(values) != n:
        raise ValueError(f"{len(values)} values of {name!r} for {n} completions")
    return values


def _last_user(prompt: Sequence[dict]) -> str:
    users = [m.get("content") or "" for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


# --- the built-in rewards -----------------------------------------------------------------------------------------
def number_reward(prompts: list[list[dict]], completions: list[str], **columns: list) -> list[float]:
    """1.0 when the reply's final number (strict `final_number`) equals the value of the record's `answer`."""
    answers = _column(columns, "answer", len(completions), "number")
    out = []
    for completion, answer in zip(completions, answers, strict=True):
        truth, given = reference_number(answer), final_number(completion)
        out.append(float(truth is not None and given == truth))
    return out


def synthetic_reward(prompts: list[list[dict]], completions: list[str], **columns: list) -> list[float]:
    """1.0 when `lmlab.data.synthetic.verify(task, question, reply)` accepts the reply: the truth is recomputed from
    the question (the last user message), for the corpus's tasks (add, sub, mul, kv, copy, story_qa, format)."""
    from ..data.synthetic import verify

    tasks = _column(columns, "task", len(completions), "synthetic")
    return [float(verify(task, _last_user(prompt), completion))
            for prompt, completion, task in zip(prompts, completions, tasks, strict=True)]


def format_reward(prompts: list[list[dict]], completions: list[str], **columns: list) -> list[float]:
    """1.0 when the reply states a final number in a form `final_number` reads (right or wrong)."""
    return [float(final_number(c) is not None) for c in completions]


def ended_reward(prompts: list[list[dict]], completions: list[str], **columns: list) -> list[float]:
    """1.0 when the reply closed its turn with the end-of-turn token instead of running out of tokens."""
    return [float(e) for e in _column(columns, "ended", len(completions), "ended")]


HAPPY_WORDS = frozenset("happy proud glad thankful joyful excited cheerful calm smile smiled laughed love loved "
                        "fun good great best wonderful kind".split())
SAD_WORDS = frozenset("sad upset worried unhappy grumpy gloomy cry cried broke broken lost angry scared afraid "
                      "bad".split())
_WORD = re.compile(r"[a-z']+")


def sentiment_reward(prompts: list[list[dict]], completions: list[str], **columns: list) -> list[float]:
    """(happy words - sad words) per 10 words of reply (HAPPY_WORDS / SAD_WORDS, which hold the synthetic stories'
    feelings): a known, cheap stand-in for the sentiment classifier of Ziegler et al. 2019. An empty reply is 0."""
    out = []
    for text in completions:
        words = _WORD.findall(text.lower())
        score = sum(w in HAPPY_WORDS for w in words) - sum(w in SAD_WORDS for w in words)
        out.append(10.0 * score / max(len(words), 10))
    return out


def length_reward(target: int) -> RewardFn:
    """-|words - target| / target: 0 for a reply of exactly `target` words, lower the further from it."""
    if target <= 0:
        raise ValueError(f"length=N needs a positive number of words, got {target}")

    def length(prompts: list[list[dict]], completions: list[str], **columns: list) -> list[float]:
        return [-abs(len(c.split()) - target) / target for c in completions]

    return length


BUILTIN: dict[str, RewardFn] = {"number": number_reward, "synthetic": synthetic_reward, "format": format_reward,
                                "ended": ended_reward, "sentiment": sentiment_reward}
VERIFIERS = ("number", "synthetic")  # rewards whose mean is an accuracy
PARAMETERIZED: dict[str, Callable[[str], RewardFn]] = {"length": lambda arg: length_reward(int(arg))}


# --- reward models and user functions -----------------------------------------------------------------------------
def reward_model_reward(path: str, device: str = "cpu", batch_size: int = 16) -> RewardFn:
    """A reward model (align/reward.py) as a reward function: each prompt with the reply appended as the assistant's
    turn is scored by `RewardModel.score`. Loaded on the first call, so naming one costs nothing until it is used."""
    loaded: list = []

    def reward_model(prompts: list[list[dict]], completions: list[str], **columns: list) -> list[float]:
        if not loaded:
            from .reward import load_reward_model

            loaded.extend(load_reward_model(path, device=device))
        model, tokenizer = loaded
        conversations = [[*prompt, {"role": "assistant", "content": completion}]
                         for prompt, completion in zip(prompts, completions, strict=True)]
        return [float(s) for s in model.score(tokenizer, conversations, batch_size=batch_size)]

    reward_model.__name__ = f"rm:{path}"
    return reward_model


def import_function(spec: str) -> RewardFn:
    """The function named by "module.path:function" or "path/to/file.py:function"."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise ValueError(f"reward {spec!r}: name a function as module:function or file.py:function")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise FileNotFoundError(f"reward {spec!r}: {path} does not exist")
        module_name = f"lmlab_reward_{path.stem}_{abs(hash(str(path.resolve())))}"
        module = sys.modules.get(module_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module
            loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ValueError(f"reward {spec!r}: cannot import module {target!r} ({e}); check the name and that it "
                             "is on PYTHONPATH, or give a file: path/to/file.py:function") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {target} has no function {name!r}")
    return fn


@dataclass
class Reward:
    name: str  # the spec it was loaded from: what the logs call it (reward_<name>)
    fn: RewardFn
    weight: float = 1.0

    @property
    def verifier(self) -> bool:
        return self.name in VERIFIERS


def load_reward(spec: str, weight: float = 1.0, device: str = "cpu", batch_size: int = 16) -> Reward:
    """A Reward from its spec string (the module docstring lists them)."""
    spec = spec.strip()
    if spec in BUILTIN:
        return Reward(spec, BUILTIN[spec], weight)
    name, eq, arg = spec.partition("=")
    if eq and name in PARAMETERIZED:
        try:
            return Reward(spec, PARAMETERIZED[name](arg), weight)
        except ValueError as e:
            raise ValueError(f"reward {spec!r}: {e}") from e
    if spec.startswith("rm:") or (Path(spec).is_dir() and ":" not in spec):
        path = spec[3:] if spec.startswith("rm:") else spec
        if not Path(path).is_dir():
            raise FileNotFoundError(f"reward model {path} is not a directory; train one with `lmlab reward`")
        return Reward(spec, reward_model_reward(path, device, batch_size), weight)
    if ":" in spec:
        return Reward(spec, import_function(spec), weight)
    raise ValueError(f"unknown reward {spec!r}; built-in: {', '.join([*BUILTIN, 'length=N'])}, or rm:DIR, "
                     "module:function, file.py:function")


class RewardSet:
    """Several rewards, weighted and summed: total_i = sum_k w_k r_k(i). Each one's values are kept for the logs."""

    def __init__(self, rewards: Sequence[Reward]):
        if not rewards:
            raise ValueError("no reward function given; name at least one (e.g. number, synthetic, format, rm:DIR, "
                             "module:function)")
        names = [r.name for r in rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"reward functions named twice: {names}")
        self.rewards = list(rewards)

    @classmethod
    def from_specs(cls, specs: Sequence[str], weights: Sequence[float] = (), device: str = "cpu",
                   batch_size: int = 16) -> RewardSet:
        if weights and len(weights) != len(specs):
            raise ValueError(f"{len(weights)} reward weights for {len(specs)} reward functions {list(specs)}; give "
                             "one weight per function (or none: all 1)")
        weights = list(weights) or [1.0] * len(specs)
        return cls([load_reward(s, w, device, batch_size) for s, w in zip(specs, weights, strict=True)])

    def score(self, prompts: list[list[dict]], completions: list[str],
              columns: dict[str, list]) -> tuple[list[float], dict[str, list[float]]]:
        """(total reward per completion, each reward's values by name)."""
        parts: dict[str, list[float]] = {}
        for r in self.rewards:
            values = r.fn(prompts, completions, **columns)
            values = list(values) if values is not None else []
            if len(values) != len(completions):
                raise ValueError(f"reward {r.name!r} returned {len(values)} values for {len(completions)} "
                                 "completions; it must return one number per completion")
            values = [float(v) if v is not None else float("nan") for v in values]
            if not all(math.isfinite(v) for v in values):
                raise ValueError(f"reward {r.name!r} returned a value that is not a finite number (None, nan or "
                                 "inf); return 0.0 where a completion cannot be scored")
            parts[r.name] = values
        totals = [sum(r.weight * parts[r.name][i] for r in self.rewards) for i in range(len(completions))]
        return totals, parts

    @property
    def verifier(self) -> str | None:
        """The name of the first verifiable checker among the rewards (its mean is the accuracy), if any."""
        return next((r.name for r in self.rewards if r.verifier), None)
