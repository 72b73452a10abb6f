"""Constitutional AI: a model improves its own answers under written principles, and an AI judge labels
preferences, so that harmlessness is learned from AI feedback instead of human labels.

The method is Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback" (arXiv:2212.08073). It has two
stages, and lmlab implements the data-making half of each; the training halves are lmlab's existing stages.

1. Supervised stage (SL-CAI), `critique_revise`: the model answers a prompt (red-team prompts, in the paper);
   then, for `rounds` rounds, a principle is sampled from the constitution, the model is asked the principle's
   critique request ("identify ways in which your last reply is harmful...") and writes a critique, then the
   revision request ("rewrite the reply to remove...") and writes a revision, which becomes the current answer.
   Each prompt with its final revision is a fine-tuning chat: `lmlab sft --data FILE` trains on it. Each round
   sees the prompt, the current answer and its own critique, not the earlier rounds (the paper appends every
   round to one growing context; small models' short contexts cannot hold that, and the answer being revised
   is what matters). Optional few-shot examples from the constitution are shown as earlier turns of the chat,
   as the paper did for its pretrained (not yet chat-tuned) models.
2. RL stage (RL-CAI, "RLAIF"), `rlaif`: for each prompt two responses are sampled from the policy (or read from
   the prompts file), a principle is sampled, and a judge model is shown the conversation, the principle's
   comparison question and the two responses as options (A) and (B). The paper reads the judge's preference
   from the normalized probabilities of the option letters; lmlab does the same (`method="logprobs"`: a local
   checkpoint scores the letters directly, an OpenAI-compatible endpoint must return `top_logprobs`), or lets
   the judge write a verdict and parses `[[A]]` / `[[B]]` (`method="generate"`, for endpoints without logprobs,
   the paper's chain-of-thought variant). An endpoint lists only its 20 most likely first tokens: a letter
   missing there gets the smallest listed probability (an upper bound, so the preference is understated), and
   with neither letter listed `method="auto"` falls back to a written verdict. Judges prefer a position, so
   every comparison is asked in both orders and the preference for response 1 is the average

       p = ( p_12(A) + p_21(B) ) / 2                      (`combine_orders`)

   where p_12(L) is the judge's probability of letter L when response 1 is shown as (A) and response 2 as (B),
   and p_21(L) the same with the two swapped. A judge that only ever says "A" gives p_12(A) = 1, p_21(B) = 0:
   p = 0.5, no preference. The pairs go out in the
   format lmlab's reward model and DPO read (`lmlab.align.preference.to_pair`): prompt, messages, chosen,
   rejected, plus `preference`, the probability that chosen is the better one.

Which pairs are kept: a pair whose preference is within `min_margin` of 0.5 is a tie and dropped (an exact tie
always is, e.g. the always-"A" judge). A pair whose two orders disagree on the winner ("inconsistent": position
bias outweighed the content) is dropped too by default, because lmlab's reward model and DPO train on the hard
chosen/rejected label, and for such a pair that label is mostly the judge's position bias. With
`keep_inconsistent=True` those pairs are kept with their soft label (close to 0.5), as the paper keeps soft
labels for its preference model; a trainer that reads `preference` can weight them. Every comparison, kept or
not, is written to a sidecar file (`<out>.comparisons.jsonl`) with both orders' probabilities, so the agreement
between orders can be measured and nothing is silently discarded.

Every model is a `lmlab.evals.lm.Generator`: a local checkpoint generating through the inference engine, or an
OpenAI-compatible endpoint (`lmlab serve`, a hosted model), for the policy and the judge separately. Principles
and sampling seeds are drawn per prompt from (seed, prompt id), so a run gives the same data whatever its batch
size or prompt order, and a rerun after a crash continues where it stopped: each batch is appended to the output
in one fsynced write (a line cut short by a crash is dropped), and the ids already written are skipped.

A judge must be able to do the job: a tiny model's letter probabilities carry almost no information about the
principle, which the agreement between orders shows. Point `--judge` at a capable model for real data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..atomic import atomic_file
from ..evals.judge import parse_verdict
from ..evals.lm import LM, EndpointError, Generator, OpenAIEndpoint
from ..infer.sampling import SamplingParams

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_CONSTITUTION = Path(__file__).resolve().parent / "constitutions" / "default.toml"
METHODS = ("auto", "logprobs", "generate")
LETTERS = ("A", "B")
_TIE = 1e-9  # preferences this close to 0.5 are ties whatever min_margin says (float rounding of p + (1 - p))


# --- the constitution ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Principle:
    """One principle in the three forms the method asks it in."""

    name: str
    critique: str  # asked after a reply: what is wrong with it under this principle
    revision: str  # asked after the critique: rewrite the reply to fix what the critique found
    comparison: str  # asked of a judge shown two replies: which one better satisfies this principle


@dataclass(frozen=True)
class Example:
    """A worked critique-and-revision round, shown before the real chat with few_shot > 0."""

    principle: str  # the name of the principle whose requests the example answers
    prompt: str
    response: str
    critique: str
    revision: str


@dataclass(frozen=True)
class Constitution:
    name: str
    principles: tuple[Principle, ...]
    examples: tuple[Example, ...] = ()

    def __post_init__(self) -> None:
        if not self.principles:
            raise ValueError(f"constitution {self.name!r} has no principles; add at least one [[principles]] entry "
                             "with name, critique, revision and comparison")
        names = [p.name for p in self.principles]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"constitution {self.name!r} names the principle(s) {twice} more than once; give each "
                             "principle its own name")
        for ex in self.examples:
            if ex.principle not in names:
                raise ValueError(f"an example of constitution {self.name!r} refers to the principle "
                                 f"{ex.principle!r}, which it does not define; use one of {names}")

    def principle(self, name: str) -> Principle:
        for p in self.principles:
            if p.name == name:
                return p
        names = [p.name for p in self.principles]
        raise KeyError(f"constitution {self.name!r} has no principle {name!r}; it has {names}")

    def sample(self, rng: random.Random) -> Principle:
        """A principle drawn uniformly, as the paper draws one per critique and per comparison."""
        return rng.choice(self.principles)

    @classmethod
    def from_dict(cls, data: dict, source: str = "constitution") -> Constitution:
        if not isinstance(data, dict):
            raise ValueError(f"{source} must hold a table with 'principles', got {type(data).__name__}")

        def entries(key: str, kind: type, fields: Sequence[str]) -> tuple:
            raw = data.get(key, [])
            if not isinstance(raw, list):
                raise ValueError(f"{source}: '{key}' must be a list of tables ([[{key}]] in TOML)")
            out = []
            for i, entry in enumerate(raw):
                if not isinstance(entry, dict):
                    raise ValueError(f"{source}: {key}[{i}] must be a table with fields {list(fields)}")
                bad = [f for f in fields if not isinstance(entry.get(f), str) or not entry[f].strip()]
                if bad:
                    raise ValueError(f"{source}: {key}[{i}] ({entry.get('name', entry.get('principle', '?'))!r}) "
                                     f"lacks the non-empty text field(s) {bad}; every entry needs {list(fields)}")
                unknown = sorted(set(entry) - set(fields))
                if unknown:
                    raise ValueError(f"{source}: {key}[{i}] has unknown field(s) {unknown}; allowed: {list(fields)}")
                out.append(kind(**{f: entry[f].strip() for f in fields}))
            return tuple(out)

        principles = entries("principles", Principle, ("name", "critique", "revision", "comparison"))
        examples = entries("examples", Example, ("principle", "prompt", "response", "critique", "revision"))
        return cls(str(data.get("name", source)), principles, examples)

    @classmethod
    def load(cls, path: str | Path | None = None) -> Constitution:
        """A constitution from a .toml or .json file (None: lmlab's default, lmlab/align/constitutions/default.toml)."""
        path = Path(path) if path is not None else DEFAULT_CONSTITUTION
        if not path.is_file():
            hint = "pass --constitution FILE" if path == DEFAULT_CONSTITUTION else "check the path"
            raise FileNotFoundError(f"constitution {path} does not exist; {hint} (lmlab's own, "
                                    "lmlab/align/constitutions/default.toml, shows the format)")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".json":
                data = json.loads(text)
            elif path.suffix == ".toml":
                data = tomllib.loads(text)
            else:
                raise ValueError(f"constitution {path} must be a .toml or .json file")
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"constitution {path} is not valid {path.suffix[1:].upper()}: {e}") from None
        return cls.from_dict(data, str(path))


# --- prompts -------------------------------------------------------------------------------------------------

@dataclass
class PromptItem:
    """A chat to answer (it ends with a user turn), its stable id, and optionally responses to compare."""

    id: str
    messages: list[dict]
    responses: tuple[str, ...] = ()


def _chat(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ValueError(f"{where}: a chat must be a non-empty list of {{role, content}} messages with string values")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def to_prompt(record: dict, where: str = "record") -> tuple[list[dict], tuple[str, ...]]:
    """(the chat to answer, given responses) of one record: {"messages"} (a trailing assistant answer is dropped),
    {"prompt"} (a string, an HH-RLHF transcript, or a chat), {"instruction"[, "input"]}, {"goal"} (red-team goals)
    or {"question"}; {"chosen", "rejected"} pairs give their prompt. Responses to compare, for `rlaif` without a
    policy: {"responses": [a, b, ...]} or {"response_a", "response_b"}."""
    from ..tune.chat_data import prompt_of
    from .preference import parse_hh_prompt, to_pair

    if not isinstance(record, dict):
        raise ValueError(f"{where} is a JSON {type(record).__name__}, not an object")
    if "messages" in record:
        messages = prompt_of(_chat(record["messages"], where))
    elif "chosen" in record and "rejected" in record:
        messages = to_pair(record).prompt
    elif isinstance(record.get("prompt"), str):
        text = record["prompt"]
        messages = parse_hh_prompt("\n\n" + text.lstrip()) if text.lstrip().startswith("Human:") or \
            "\n\nHuman:" in text else [{"role": "user", "content": text}]
    elif isinstance(record.get("prompt"), list):
        messages = _chat(record["prompt"], where)
    elif isinstance(record.get("instruction"), str):
        extra = record.get("input") or record.get("context") or ""
        messages = [{"role": "user", "content": record["instruction"] + (f"\n\n{extra}" if extra else "")}]
    elif isinstance(record.get("goal"), str):
        messages = [{"role": "user", "content": record["goal"]}]
    elif isinstance(record.get("question"), str):
        messages = [{"role": "user", "content": record["question"]}]
    else:
        raise ValueError(f"{where} has no prompt: give 'messages', 'prompt', 'instruction', 'goal' or 'question' "
                         f"(it has {sorted(record)})")
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise ValueError(f"{where}: the prompt must end with a non-empty user turn (the turn to answer)")
    if "responses" in record:
        responses = record["responses"]
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise ValueError(f"{where}: 'responses' must be a list of strings")
    elif "response_a" in record or "response_b" in record:
        responses = [record.get("response_a"), record.get("response_b")]
        if not all(isinstance(r, str) for r in responses):
            raise ValueError(f"{where}: give both 'response_a' and 'response_b' as strings")
    else:
        responses = []
    return messages, tuple(responses)


def prompt_id(messages: Sequence[dict]) -> str:
    """A stable id of a chat (a hash of its content): what a rerun matches finished work by."""
    return hashlib.sha1(json.dumps(list(messages), sort_keys=True).encode()).hexdigest()[:16]


def _records(spec: str, subset: str | None) -> Iterable[dict]:
    """The records of a prompts spec, lazily for registry datasets (a --limit of 20 reads 20, not 160,000)."""
    path = Path(spec)
    if path.suffix in (".json", ".jsonl", ".txt") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {spec} does not exist")
        if path.suffix == ".txt":
            lines = path.read_text(encoding="utf-8").splitlines()
            return [{"prompt": line.strip()} for line in lines if line.strip() and not line.startswith("#")]
        from ..tune.chat_data import _read_file

        records = _read_file(path)
    elif spec == "redteam":
        from ..evals.redteam import BUILTIN_GOALS

        records = [{"goal": g.text[0].upper() + g.text[1:] + ".", "category": g.category} for g in BUILTIN_GOALS]
    else:
        from ..data import sources

        name, _, split = spec.partition(":")
        try:
            source = sources.get_source(name)
        except (KeyError, ValueError) as e:
            raise ValueError(f"prompts {spec!r} are neither a .jsonl/.json/.txt file, 'redteam' (the built-in "
                             f"red-team goals) nor a dataset name ({e})") from None
        records = sources.records(name, split or sources.default_split(source), progress=False)
    if subset is not None:
        records = (r for r in records if r.get("subset") == subset)
    return records


def load_prompts(spec: str, *, limit: int = 0, subset: str | None = None) -> list[PromptItem]:
    """The prompts of a file (.jsonl/.json records as `to_prompt` reads them; .txt: one prompt per line), of
    "redteam" (lmlab.evals.redteam.BUILTIN_GOALS) or of a registry dataset ("hh-rlhf:test" with
    subset="harmless-base" gives the red-team prompts the paper used). `limit` keeps the first N (0: all). Ids
    are the records' "id" fields, else a hash of the chat (repeated chats get -2, -3, ...)."""
    if limit < 0:
        raise ValueError(f"limit={limit} must be >= 0 (0: all prompts)")
    items: list[PromptItem] = []
    seen: Counter = Counter()
    for n, record in enumerate(_records(spec, subset)):
        if limit and len(items) >= limit:
            break
        messages, responses = to_prompt(record, f"{spec}, record {n + 1}")
        base = str(record["id"]) if record.get("id") is not None else prompt_id(messages)
        seen[base] += 1
        items.append(PromptItem(base if seen[base] == 1 else f"{base}-{seen[base]}", messages, responses))
    if not items:
        raise ValueError(f"prompts {spec}{f' (subset {subset!r})' if subset else ''} hold no prompts")
    return items


# --- shared machinery ----------------------------------------------------------------------------------------

def _seed(seed: int, item_id: str, what: str) -> int:
    """A sampling seed of its own for every (run seed, prompt, call): independent of batching and order."""
    return int(hashlib.sha256(f"{seed}:{item_id}:{what}".encode()).hexdigest()[:8], 16)


def _rng(seed: int, item_id: str, what: str) -> random.Random:
    return random.Random(f"{seed}:{item_id}:{what}")


def _generate(gen: Generator, chats: list[list[dict]], params: list[SamplingParams]) -> list[str | EndpointError]:
    """Texts in order; a request an endpoint refuses (context too long, a server error) becomes its error rather
    than failing the whole batch, so one bad prompt costs one prompt."""
    if not chats:
        return []
    try:
        completions = gen.generate(chats, params)
    except EndpointError as e:
        if len(chats) == 1:
            return [e]
        return [r for chat, p in zip(chats, params, strict=True) for r in _generate(gen, [chat], [p])]
    if len(completions) != len(chats):
        raise RuntimeError(f"{gen.name!r} returned {len(completions)} completions for {len(chats)} prompts")
    return [c.text or "" for c in completions]


class _JsonlState:
    """A jsonl file of records keyed by "id" that grows by one batch at a time, so a rerun skips the ids already
    there. Each batch is appended in one write and fsynced (rewriting the whole file per batch would cost
    O(n^2) for a large run); a last line cut short by a crash is dropped when the file is read back, and the
    file is then rewritten without it (atomically, as is a file started over or filtered by `keep`)."""

    def __init__(self, path: str | Path | None, overwrite: bool) -> None:
        self.path = Path(path) if path is not None else None
        self.records: list[dict] = []
        self._rewrite = True  # the next add writes the whole file (new, started over, or repaired)
        if self.path is None or not self.path.exists() or overwrite:
            return
        text = self.path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                if n == len(lines) and not text.endswith("\n"):
                    break  # the end of an append that a crash cut short: that batch is redone
                raise ValueError(f"{self.path}:{n} is not valid JSON ({e.msg}); it cannot be resumed from: "
                                 "pass --overwrite to start over") from None
            if not isinstance(record, dict) or "id" not in record:
                raise ValueError(f"{self.path}:{n} has no 'id', so it was not written by lmlab cai; pass "
                                 "--overwrite to replace the file, or choose another output path")
            self.records.append(record)
        else:
            self._rewrite = False

    @property
    def done(self) -> set[str]:
        return {str(r["id"]) for r in self.records}

    def keep(self, ids: set[str]) -> None:
        kept = [r for r in self.records if str(r["id"]) in ids]
        if len(kept) != len(self.records):
            self.records, self._rewrite = kept, True

    def add(self, records: list[dict]) -> None:
        self.records += records
        if self.path is None:
            return
        if self._rewrite:
            with atomic_file(self.path, "w") as f:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records))
            self._rewrite = False
        elif records:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
                f.flush()
                os.fsync(f.fileno())


def _with_shots(messages: list[dict], shots: list[dict]) -> list[dict]:
    """Few-shot turns go after a system prompt (which must stay first) and before the conversation."""
    if messages and messages[0]["role"] == "system":
        return [messages[0], *shots, *messages[1:]]
    return [*shots, *messages]


# --- supervised stage: critique and revise -------------------------------------------------------------------

@dataclass
class CritiqueConfig:
    rounds: int = 1  # critique-and-revision rounds per prompt (the paper runs up to 4; the first changes the most)
    few_shot: int = 0  # worked examples from the constitution shown first (0: none; a chat model needs none)
    max_new_tokens: int = 256  # budget of each answer, critique and revision
    temperature: float = 0.7  # sampling temperature of every generation (0: greedy)
    top_p: float = 1.0  # nucleus sampling of every generation
    seed: int = 0  # seeds the principle drawn per round and every generation, per prompt
    batch_size: int = 32  # prompts generated together; each batch is appended to the output when done

    def __post_init__(self) -> None:
        for name, low in (("rounds", 1), ("few_shot", 0), ("max_new_tokens", 1), ("batch_size", 1)):
            if getattr(self, name) < low:
                raise ValueError(f"CritiqueConfig.{name}={getattr(self, name)} must be >= {low}")
        if self.temperature < 0:
            raise ValueError(f"CritiqueConfig.temperature={self.temperature} must be >= 0 (0: greedy)")


_LABEL = re.compile(r"^\s*(?:revision|revised (?:reply|response|answer)|rewritten (?:reply|response|answer)|"
                    r"new (?:reply|response|answer))\s*:\s*", re.IGNORECASE)


def clean_revision(text: str) -> str:
    """A revision without a leading label ("Revision:", "Rewritten reply:") that models often write first."""
    return _LABEL.sub("", text.strip(), count=1).strip()


@dataclass
class CritiqueResult:
    """Every record of the output (resumed ones included), how many this call made, and the prompts that failed."""

    records: list[dict]
    n_new: int
    n_resumed: int
    errors: dict[str, str] = field(default_factory=dict)  # prompt id -> why its generation failed

    def summary(self) -> dict[str, Any]:
        records = self.records
        changed = [r for r in records if r["messages"][-1]["content"].strip() != r["initial"].strip()]
        principles = Counter(p for r in records for p in r["principles"])

        def mean(xs: list[int]) -> float | None:
            return sum(xs) / len(xs) if xs else None

        return {"n_records": len(records), "n_new": self.n_new, "n_resumed": self.n_resumed,
                "n_failed": len(self.errors), "changed_rate": len(changed) / len(records) if records else None,
                "mean_chars_initial": mean([len(r["initial"]) for r in records]),
                "mean_chars_final": mean([len(r["messages"][-1]["content"]) for r in records]),
                "principles": dict(principles.most_common())}


def _shots(constitution: Constitution, n: int) -> list[dict]:
    """The first n examples of the constitution as chat turns: prompt, answer, critique request, critique,
    revision request, revision."""
    if n > len(constitution.examples):
        raise ValueError(f"few_shot={n}, but constitution {constitution.name!r} has {len(constitution.examples)} "
                         "example(s); lower --few-shot or add [[examples]] to the constitution")
    turns: list[dict] = []
    for ex in constitution.examples[:n]:
        p = constitution.principle(ex.principle)
        turns += [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": ex.response},
                  {"role": "user", "content": p.critique}, {"role": "assistant", "content": ex.critique},
                  {"role": "user", "content": p.revision}, {"role": "assistant", "content": ex.revision}]
    return turns


def _critique_batch(model: Generator, batch: list[PromptItem], constitution: Constitution, shots: list[dict],
                    config: CritiqueConfig, errors: dict[str, str]) -> list[dict]:
    """One batch through the answer and every round; a prompt whose generation fails is left out (and in errors)."""
    principles = {it.id: [constitution.sample(_rng(config.seed, it.id, "critique")) for _ in range(config.rounds)]
                  for it in batch}
    live: dict[str, dict] = {}

    def run(items: list[PromptItem], chats: list[list[dict]], what: str) -> list[tuple[PromptItem, str]]:
        params = [SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                 top_p=config.top_p, seed=_seed(config.seed, it.id, what)) for it in items]
        ok = []
        for it, text in zip(items, _generate(model, chats, params), strict=True):
            if isinstance(text, EndpointError):
                errors[it.id] = f"{what}: {text}"
                live.pop(it.id, None)
            else:
                ok.append((it, text.strip()))
        return ok

    for it, text in run(batch, [it.messages for it in batch], "initial"):
        live[it.id] = {"current": text, "initial": text, "critiques": [], "revisions": []}
    for r in range(config.rounds):
        items = [it for it in batch if it.id in live]
        asked = {it.id: _with_shots(it.messages, shots) + [
            {"role": "assistant", "content": live[it.id]["current"]},
            {"role": "user", "content": principles[it.id][r].critique}] for it in items}
        critiques = dict((it.id, text) for it, text in run(items, [asked[it.id] for it in items], f"critique{r}"))
        items = [it for it in items if it.id in critiques]
        chats = [asked[it.id] + [{"role": "assistant", "content": critiques[it.id]},
                                 {"role": "user", "content": principles[it.id][r].revision}] for it in items]
        for it, text in run(items, chats, f"revision{r}"):
            state, revision = live[it.id], clean_revision(text)
            state["critiques"].append(critiques[it.id])
            state["revisions"].append(revision)
            if revision:  # an empty revision keeps the answer it was meant to improve
                state["current"] = revision
    return [{"id": it.id, "messages": it.messages + [{"role": "assistant", "content": live[it.id]["current"]}],
             "initial": live[it.id]["initial"], "critiques": live[it.id]["critiques"],
             "revisions": live[it.id]["revisions"], "principles": [p.name for p in principles[it.id]],
             "model": model.name} for it in batch if it.id in live]


def critique_revise(model: Generator, prompts: Sequence[PromptItem], constitution: Constitution,
                    config: CritiqueConfig | None = None, *, out: str | Path | None = None, overwrite: bool = False,
                    progress: bool = True) -> CritiqueResult:
    """The supervised CAI data: per prompt an answer, then `config.rounds` rounds of critique and revision under
    sampled principles (see the module docstring). With `out`, records are appended to that jsonl file
    batch by batch; a rerun skips the prompts already there (overwrite=True starts over).

    A record: {"id", "messages": the prompt chat + the final revision as the assistant turn (what `lmlab sft`
    trains on), "initial": the first answer, "critiques", "revisions", "principles": one per round, "model"}."""
    config = config or CritiqueConfig()
    shots = _shots(constitution, config.few_shot)
    state = _JsonlState(out, overwrite)
    done = state.done
    todo = [it for it in prompts if it.id not in done]
    errors: dict[str, str] = {}
    n_new = 0
    with tqdm(total=len(todo), desc="critique-revise", unit="prompt", disable=not progress) as bar:
        for start in range(0, len(todo), config.batch_size):
            batch = todo[start:start + config.batch_size]
            records = _critique_batch(model, batch, constitution, shots, config, errors)
            state.add(records)
            n_new += len(records)
            bar.update(len(batch))
    return CritiqueResult(state.records, n_new, len(prompts) - len(todo), errors)


# --- RL stage: AI preference labels (RLAIF) ------------------------------------------------------------------

COMPARISON_TEMPLATE = """\
Consider the following conversation between a user and an AI assistant:

{conversation}

{question}

Options:
(A) {response_a}

(B) {response_b}

{instruction}"""

LETTER_INSTRUCTION = "Answer with the letter of the better response only: A or B."
VERDICT_INSTRUCTION = ("Explain your reasoning in two or three sentences, then give your final answer on the last "
                       'line in exactly this format: "[[A]]" or "[[B]]".')


def render_conversation(messages: Sequence[dict]) -> str:
    names = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
    return "\n\n".join(f"{names.get(m['role'], m['role'].title())}: {m['content']}" for m in messages)


def comparison_prompt(messages: Sequence[dict], response_a: str, response_b: str, principle: Principle, *,
                      method: str = "logprobs") -> list[dict]:
    """The chat that asks the judge which of two responses better satisfies `principle`, shown as (A) and (B):
    the paper's multiple-choice format, answered with a letter ("logprobs") or a written verdict ("generate")."""
    instruction = VERDICT_INSTRUCTION if method == "generate" else LETTER_INSTRUCTION
    text = COMPARISON_TEMPLATE.format(conversation=render_conversation(messages), question=principle.comparison,
                                      response_a=response_a, response_b=response_b, instruction=instruction)
    return [{"role": "user", "content": text}]


def option_probability(logp_a: float, logp_b: float) -> float:
    """The judge's probability of option A among the two options, from the log-probabilities of the letters:

        P(A) = exp(l_A) / (exp(l_A) + exp(l_B)) = 1 / (1 + exp(l_B - l_A))

    (the paper normalizes the option probabilities this way; the mass on every other token is ignored)."""
    d = logp_b - logp_a
    if d > 0:
        e = math.exp(-d)
        return e / (1.0 + e)
    return 1.0 / (1.0 + math.exp(d))


def verdict_probability(verdict: str | None) -> float | None:
    """A written verdict as a probability of A: "A" 1, "B" 0, "tie" 0.5, unparseable None."""
    return {"A": 1.0, "B": 0.0, "tie": 0.5}.get(verdict) if verdict is not None else None


def combine_orders(p_ab: float | None, p_ba: float | None) -> float | None:
    """P(response 1 is better) from both orders, position bias cancelled:

        p = ( p_AB(A) + (1 - p_BA(A)) ) / 2

    p_ab: the judge's P(A) with response 1 shown as (A); p_ba: its P(A) with response 2 shown as (A), so
    1 - p_ba is its P(B), the probability it gives response 1 there. None when either order is missing."""
    if p_ab is None or p_ba is None:
        return None
    return (p_ab + (1.0 - p_ba)) / 2.0


def orders_consistent(p_ab: float, p_ba: float) -> bool:
    """Whether both orders prefer the same response, strictly (a 0.5 in either order is not a preference)."""
    return (p_ab - 0.5) * ((1.0 - p_ba) - 0.5) > 0


def _letter(token: str, letters: Sequence[str]) -> str | None:
    t = token.strip().strip("()[]*.:").strip()
    return t if t in letters else None


def letter_logprobs(top: Sequence[dict], letters: Sequence[str] = LETTERS) -> dict[str, float] | None:
    """log P(letter) per option from an endpoint's top_logprobs of the first answer token ([{"token", "logprob"}]).
    Tokens that spell the same letter (" A", "A", "(A") are summed (log-sum-exp). A letter missing from the list
    gets the smallest listed log-probability, an upper bound on its own, so the preference is understated rather
    than invented; neither letter listed: None."""
    found: dict[str, list[float]] = {}
    for entry in top:
        letter = _letter(str(entry.get("token", "")), letters)
        lp = entry.get("logprob")
        if letter in letters and isinstance(lp, (int, float)) and math.isfinite(lp):
            found.setdefault(letter, []).append(float(lp))
    if not found:
        return None
    floor = min(float(e["logprob"]) for e in top if isinstance(e.get("logprob"), (int, float))
                and math.isfinite(e["logprob"]))
    out = {}
    for letter in letters:
        lps = found.get(letter)
        if lps:
            m = max(lps)
            out[letter] = m + math.log(sum(math.exp(x - m) for x in lps))
        else:
            out[letter] = floor
    return out


def _lm_option_logprobs(judge: LM, chats: Sequence[list[dict]], letters: Sequence[str]) -> list[dict[str, float]]:
    """log p(letter as the first token of the judge's answer), scored by a forward pass over the rendered chat."""
    conts = {}
    for letter in letters:
        ids = judge.tokenizer.encode(letter, add_special_tokens=False)
        if not ids:
            raise ValueError(f"the judge's tokenizer encodes the option letter {letter!r} to nothing")
        conts[letter] = ids
    contexts = [judge.prompt_ids(chat) for chat in chats]
    lls = judge.loglikelihood_tokens([(ctx, conts[letter]) for ctx in contexts for letter in letters],
                                     desc="judge")
    k = len(letters)
    return [{letter: lls[i * k + j][0] for j, letter in enumerate(letters)} for i in range(len(contexts))]


def _endpoint_option_logprobs(judge: OpenAIEndpoint, chats: Sequence[list[dict]], letters: Sequence[str]
                              ) -> list[dict[str, float] | EndpointError | None]:
    """The letters' log-probabilities from the chat API's top_logprobs of a one-token answer; None where the
    endpoint returns no logprobs (or neither letter among its top 20)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(chat: list[dict]) -> dict[str, float] | EndpointError | None:
        body = {"model": judge.name, "messages": chat, "max_tokens": 1, "temperature": 0.0, "logprobs": True,
                "top_logprobs": 20}
        try:
            data = judge._post("/chat/completions", body)  # OpenAIEndpoint.generate does not ask for logprobs
        except EndpointError as e:
            return e
        content = ((data.get("choices") or [{}])[0].get("logprobs") or {}).get("content") or []
        if not content:
            return None
        first = content[0]
        top = list(first.get("top_logprobs") or []) + [{"token": first.get("token"), "logprob": first.get("logprob")}]
        return letter_logprobs(top, letters)

    with ThreadPoolExecutor(max(1, min(judge.workers, len(chats)))) as pool:
        return list(pool.map(one, chats))


def option_logprobs(judge: Generator, chats: Sequence[list[dict]], letters: Sequence[str] = LETTERS
                    ) -> list[dict[str, float] | EndpointError | None] | None:
    """Per chat, log P(letter) of each option as the judge's first answer token; None when this kind of judge
    cannot give log-probabilities at all. A judge object may provide its own `option_logprobs(chats, letters)`."""
    own = getattr(judge, "option_logprobs", None)
    if callable(own):
        return list(own(chats, letters))
    if isinstance(judge, LM):
        return list(_lm_option_logprobs(judge, chats, letters))
    if isinstance(judge, OpenAIEndpoint):
        return _endpoint_option_logprobs(judge, chats, letters)
    return None


@dataclass
class RLAIFConfig:
    method: str = "auto"  # "logprobs": option-letter probabilities (the paper); "generate": a written verdict,
    # parsed; "auto": logprobs where the judge gives them, else generate
    temperature: float = 1.0  # policy sampling temperature of the two responses (> 0, or they are identical)
    top_p: float = 1.0  # nucleus sampling of the policy's responses
    max_new_tokens: int = 256  # budget of each policy response
    judge_max_new_tokens: int = 256  # budget of a written verdict (method "generate")
    min_margin: float = 0.0  # pairs with |preference - 0.5| <= min_margin are ties and dropped
    keep_inconsistent: bool = False  # keep pairs whose two orders prefer different responses (soft label ~0.5)
    seed: int = 0  # seeds the principle per comparison and the policy's sampling, per prompt
    batch_size: int = 32  # prompts handled together; each batch is appended to the outputs when done

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"RLAIFConfig.method={self.method!r} is unknown; use one of {METHODS}")
        if not 0 <= self.min_margin < 0.5:
            raise ValueError(f"RLAIFConfig.min_margin={self.min_margin} must be in [0, 0.5)")
        for name in ("max_new_tokens", "judge_max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"RLAIFConfig.{name}={getattr(self, name)} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"RLAIFConfig.temperature={self.temperature} must be >= 0")


def comparisons_path(out: str | Path) -> Path:
    """Where `rlaif` writes every comparison, kept or dropped, beside the pairs file."""
    out = Path(out)
    return out.with_name(out.stem + ".comparisons.jsonl")


@dataclass
class RLAIFResult:
    """The preference pairs and every comparison behind them (resumed ones included)."""

    pairs: list[dict]
    comparisons: list[dict]
    n_new: int
    n_resumed: int
    errors: dict[str, str] = field(default_factory=dict)  # prompt id -> why it failed (retried on a rerun)

    def summary(self) -> dict[str, Any]:
        status = Counter(c["status"] for c in self.comparisons)
        judged = [c for c in self.comparisons if c["p_ab"] is not None and c["p_ba"] is not None]
        decisive = [c for c in judged if c["p_ab"] != 0.5 and c["p_ba"] != 0.5]
        first = [p > 0.5 for c in judged for p in (c["p_ab"], c["p_ba"]) if p != 0.5]
        methods = Counter(c["method"] for c in judged)
        prefs = [p["preference"] for p in self.pairs]
        return {
            "n_prompts": len(self.comparisons), "n_new": self.n_new, "n_resumed": self.n_resumed,
            "n_failed": len(self.errors), "n_judged": len(judged), "n_pairs": len(self.pairs),
            "status": dict(status.most_common()),
            # both orders picked the same response, of the comparisons where each order picked one
            "agreement_between_orders": (sum(orders_consistent(c["p_ab"], c["p_ba"]) for c in decisive)
                                         / len(decisive) if decisive else None),
            # of the single-order choices, how often the response shown first won (0.5: no position bias)
            "first_position_rate": sum(first) / len(first) if first else None,
            # the judge's mean probability for whatever was shown first (0.5: no position bias in its probabilities)
            "mean_p_first": (sum(c["p_ab"] + c["p_ba"] for c in judged) / (2 * len(judged)) if judged else None),
            "mean_preference": sum(prefs) / len(prefs) if prefs else None,
            "methods": dict(methods),
            "principles": dict(Counter(p["principle"] for p in self.pairs).most_common()),
        }


def _responses(policy: Generator | None, batch: list[PromptItem], config: RLAIFConfig, errors: dict[str, str]
               ) -> dict[str, tuple[str, str, str]]:
    """(response 1, response 2, where they came from) per prompt: the prompt's own, or two samples of the policy
    with seeds of their own."""
    out = {it.id: (it.responses[0].strip(), it.responses[1].strip(), "given") for it in batch
           if len(it.responses) >= 2}
    sample = [it for it in batch if it.id not in out]
    if not sample:
        return out
    if policy is None:
        raise ValueError(f"prompt {sample[0].id} has fewer than two responses and no policy was given to sample them: "
                         "pass a policy (--model) or give every record 'responses': [a, b]")
    params = [SamplingParams(max_new_tokens=config.max_new_tokens, temperature=config.temperature, top_p=config.top_p,
                             seed=_seed(config.seed, it.id, f"response{k}")) for it in sample for k in (0, 1)]
    texts = _generate(policy, [it.messages for it in sample for _ in (0, 1)], params)
    for i, it in enumerate(sample):
        a, b = texts[2 * i], texts[2 * i + 1]
        if isinstance(a, EndpointError) or isinstance(b, EndpointError):
            errors[it.id] = f"policy: {a if isinstance(a, EndpointError) else b}"
        else:
            out[it.id] = (a.strip(), b.strip(), policy.name)
    return out


def _both_orders(items: list[PromptItem], responses: dict[str, tuple[str, str, str]],
                 principle: dict[str, Principle], method: str) -> list[list[dict]]:
    """Per item two judge chats: (response 1, response 2) shown as (A, B), then swapped."""
    chats = []
    for it in items:
        r1, r2, _ = responses[it.id]
        chats.append(comparison_prompt(it.messages, r1, r2, principle[it.id], method=method))
        chats.append(comparison_prompt(it.messages, r2, r1, principle[it.id], method=method))
    return chats


def _judge(judge: Generator, items: list[PromptItem], responses: dict[str, tuple[str, str, str]],
           principle: dict[str, Principle], config: RLAIFConfig, errors: dict[str, str]) -> dict[str, dict]:
    """Per judged item {"p_ab", "p_ba", "method"[, "judge_outputs"]}: letter probabilities where the method allows
    and the judge gives them, else (method auto or generate) written verdicts. An item the judge gave nothing
    usable for is absent; an endpoint's refusal goes to errors."""
    verdicts: dict[str, dict] = {}
    if items and config.method in ("auto", "logprobs"):
        scores = option_logprobs(judge, _both_orders(items, responses, principle, "logprobs"))
        if scores is None and config.method == "logprobs":
            raise ValueError(f"the judge {judge.name!r} cannot give log-probabilities; use --judge-method generate "
                             "or auto")
        for i, it in enumerate(items if scores is not None else []):
            ab, ba = scores[2 * i], scores[2 * i + 1]
            failed = next((s for s in (ab, ba) if isinstance(s, EndpointError)), None)
            if failed is not None and config.method == "logprobs":
                errors[it.id] = f"judge: {failed}"
            elif failed is None and ab is not None and ba is not None:
                verdicts[it.id] = {"p_ab": option_probability(ab["A"], ab["B"]),
                                   "p_ba": option_probability(ba["A"], ba["B"]), "method": "logprobs"}
    rest = [it for it in items if it.id not in verdicts and it.id not in errors]
    if rest and config.method in ("auto", "generate"):
        params = SamplingParams(max_new_tokens=config.judge_max_new_tokens, temperature=0.0)
        texts = _generate(judge, _both_orders(rest, responses, principle, "generate"), [params] * (2 * len(rest)))
        for i, it in enumerate(rest):
            ab, ba = texts[2 * i], texts[2 * i + 1]
            if isinstance(ab, EndpointError) or isinstance(ba, EndpointError):
                errors[it.id] = f"judge: {ab if isinstance(ab, EndpointError) else ba}"
                continue
            verdicts[it.id] = {"p_ab": verdict_probability(parse_verdict(ab)),
                               "p_ba": verdict_probability(parse_verdict(ba)), "method": "generate",
                               "judge_outputs": {"ab": ab, "ba": ba}}
    return verdicts


def _decide(c: dict, config: RLAIFConfig) -> None:
    """Set a judged comparison's preference and status (tie, inconsistent, unparsed or kept)."""
    p1 = combine_orders(c["p_ab"], c["p_ba"])
    c["preference"] = p1
    if p1 is None:
        c["status"] = "unparsed"
    elif abs(p1 - 0.5) <= max(config.min_margin, _TIE):
        c["status"] = "tie"
    elif not config.keep_inconsistent and not orders_consistent(c["p_ab"], c["p_ba"]):
        c["status"] = "inconsistent"
    else:
        c["status"] = "kept"


def _pair(it: PromptItem, c: dict, judge: str, policy: str) -> dict:
    """A kept comparison as a preference pair in the format lmlab.align.preference reads."""
    r1, r2 = c["responses"]
    p1, p_ab, p_ba = c["preference"], c["p_ab"], c["p_ba"]
    first = p1 > 0.5
    return {"id": it.id, "prompt": it.messages[-1]["content"], "messages": it.messages,
            "chosen": r1 if first else r2, "rejected": r2 if first else r1,
            "preference": p1 if first else 1.0 - p1, "principle": c["principle"],
            "consistent": orders_consistent(p_ab, p_ba),
            # P(chosen is better) in the order that showed it as (A), and in the one that showed it as (B)
            "orders": {"chosen_first": p_ab if first else p_ba, "chosen_second": 1.0 - p_ba if first else 1.0 - p_ab},
            "method": c["method"], "judge": judge, "policy": policy}


def rlaif(judge: Generator, prompts: Sequence[PromptItem], constitution: Constitution,
          config: RLAIFConfig | None = None, *, policy: Generator | None = None, out: str | Path | None = None,
          overwrite: bool = False, progress: bool = True) -> RLAIFResult:
    """AI preference labels (see the module docstring): per prompt two responses (sampled from `policy`, or the
    prompt's own `responses`), one sampled principle, the judge asked in both orders. With `out`, the kept pairs
    go to that jsonl file and every comparison to `comparisons_path(out)`, both appended batch by batch;
    a rerun skips the prompts already compared (overwrite=True starts over).

    A pair: {"id", "prompt": the last user message, "messages": the prompt chat, "chosen", "rejected",
    "preference": P(chosen is better), "principle", "consistent": whether both orders agreed, "orders":
    {"chosen_first", "chosen_second"}: P(chosen better) when it was shown as (A) and as (B), "method", "judge",
    "policy"}. A comparison's status: kept, tie, inconsistent (dropped unless keep_inconsistent), unparsed (no
    verdict could be read), identical or empty (nothing to compare; the judge is not asked)."""
    config = config or RLAIFConfig()
    if policy is None:
        missing = next((it.id for it in prompts if len(it.responses) < 2), None)
        if missing is not None:
            raise ValueError(f"prompt {missing} has fewer than two responses and no policy was given to sample "
                             "them: pass a policy (--model) or give every record 'responses': [a, b]")
    state = _JsonlState(comparisons_path(out) if out is not None else None, overwrite)
    pairs = _JsonlState(out, overwrite)
    if pairs.records and state.path is not None and not state.path.exists():
        raise FileExistsError(f"{out} exists but {state.path}, the record of its comparisons, does not, so it "
                              "cannot be resumed; pass --overwrite to replace it, or choose another output path")
    pairs.keep(state.done)  # pairs of a batch whose comparisons were not written (a crash in between) are redone
    lost = {c["id"] for c in state.records if c["status"] == "kept"} - pairs.done
    state.keep(state.done - lost)  # a kept comparison whose pair is gone (the pairs file was edited) is redone
    done = state.done
    todo = [it for it in prompts if it.id not in done]
    errors: dict[str, str] = {}
    n_new = 0
    with tqdm(total=len(todo), desc="rlaif", unit="prompt", disable=not progress) as bar:
        for start in range(0, len(todo), config.batch_size):
            batch = todo[start:start + config.batch_size]
            responses = _responses(policy, batch, config, errors)
            items = [it for it in batch if it.id in responses]
            principle = {it.id: constitution.sample(_rng(config.seed, it.id, "rlaif")) for it in items}
            comparisons = {}
            for it in items:
                r1, r2, _ = responses[it.id]
                status = "empty" if not r1 or not r2 else "identical" if r1 == r2 else "pending"
                comparisons[it.id] = {"id": it.id, "principle": principle[it.id].name, "responses": [r1, r2],
                                      "p_ab": None, "p_ba": None, "preference": None, "method": None,
                                      "status": status}
            pending = [it for it in items if comparisons[it.id]["status"] == "pending"]
            verdicts = _judge(judge, pending, responses, principle, config, errors)
            new_pairs = []
            for it in pending:
                c = comparisons[it.id]
                if it.id in errors:
                    del comparisons[it.id]  # not recorded as done: a rerun tries it again
                elif it.id not in verdicts:  # method logprobs, and the judge gave none for this comparison
                    c["status"] = "unparsed"
                else:
                    c.update(verdicts[it.id])
                    _decide(c, config)
                    if c["status"] == "kept":
                        new_pairs.append(_pair(it, c, judge.name, responses[it.id][2]))
            # the pairs first, then the comparisons that mark the batch done: a crash in between redoes the batch
            pairs.add(new_pairs)
            state.add([comparisons[it.id] for it in items if it.id in comparisons])
            n_new += sum(it.id in comparisons for it in items)
            bar.update(len(batch))
    return RLAIFResult(pairs.records, state.records, n_new, len(prompts) - len(todo), errors)
