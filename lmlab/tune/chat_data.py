"""Conversations for fine-tuning: read them, render them with the chat template, pack them into batches.

Accepted data (`load_conversations(spec)`):
- a `.jsonl` / `.json` file whose records are chats `{"messages": [{"role", "content"}, ...]}`, instructions in
  the Alpaca form `{"instruction", "input", "output"}` or the Dolly form `{"instruction", "context",
  "response"}`, or prompt/completion pairs `{"prompt", "completion"}`;
- a dataset registry name, optionally with a split: `alpaca`, `alpaca:sample`, `synthetic:sft`, `dolly`
  (`lmlab data list` shows them).

Each conversation becomes token ids and a loss mask through the tokenizer's chat template
(`Tokenizer.render_chat`): the loss is on the assistant's tokens only, in every turn of a multi-turn chat.
Training predicts token t+1 from tokens <= t, so the target of position t is ids[t+1] where the mask of t+1 is
set, and -100 (ignored) elsewhere.

Packing (`packing=True`) puts several conversations into one row of `seq_len` tokens, so no compute is spent on
padding. Conversations must not see each other: each row carries `doc_ids` (1, 2, ... per conversation, 0 for
padding), the attention mask allows query t to read key s only when doc_ids[t] == doc_ids[s] (and s <= t, which
the model adds), and positions restart at 0 in each conversation. So a packed row computes exactly what the
conversations would compute alone (tests/tune/test_chat_data.py checks the logits). The last position of a
conversation has target -100: it must not learn to predict the next conversation's first token.

Batches are dicts of LongTensors `ids`, `targets`, `positions`, `doc_ids` (B, T); `model_inputs(batch)` turns one
into the keyword arguments of `Transformer.forward`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE = -100


# --- reading ----------------------------------------------------------------------------------
def to_messages(record: dict, system: str = "") -> list[dict]:
    """One record in any accepted form as a list of chat messages (a system prompt prepended when given and the
    record has none)."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise ValueError(f"'messages' must be a list of {{role, content}} dicts, got {type(messages).__name__}")
        messages = [dict(m) for m in messages]
    elif "instruction" in record and ("output" in record or "response" in record):
        extra = record.get("input") or record.get("context") or ""
        prompt = record["instruction"] + (f"\n\n{extra}" if extra else "")
        answer = record["output"] if "output" in record else record["response"]
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    elif "prompt" in record and "completion" in record:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["completion"]}]
    else:
        raise ValueError(f"a fine-tuning record needs 'messages', 'instruction' + 'output' (Alpaca), 'instruction' + "
                         f"'response' (Dolly) or 'prompt' + 'completion'; this one has {sorted(record)}")
    if system and not (messages and messages[0].get("role") == "system"):
        messages = [{"role": "system", "content": system}, *messages]
    if not any(m.get("role") == "assistant" for m in messages):
        raise ValueError("a conversation without an assistant message has nothing to learn from")
    return messages


def prompt_of(messages: Sequence[dict]) -> list[dict]:
    """Everything before the last assistant turn (the whole conversation when it has none): what a model is asked
    to answer in place of the data's answer (held-out samples, a teacher's generations)."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=len(messages))
    prompt = [dict(m) for m in messages[:last]]
    if not prompt:
        raise ValueError("a conversation that starts with the assistant's answer has no prompt to answer")
    return prompt


def _read_file(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}: one list inside
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise ValueError(f"{path}: a JSON file must hold a list of records (or one list inside an object)")
            data = lists[0]
        if not isinstance(data, list):
            raise ValueError(f"{path}: a JSON file must hold a list of records")
        return data
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
    return records


def load_conversations(spec: str, *, system: str = "", limit: int = 0, progress: bool = False) -> list[list[dict]]:
    """The conversations of a file or a registry dataset ("name" or "name:split"), `limit` of them at most."""
    path = Path(spec)
    if path.suffix in (".json", ".jsonl") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"fine-tuning data {spec} does not exist")
        records: Iterable[dict] = _read_file(path)
    else:
        from ..data import sources

        name, _, split = spec.partition(":")
        try:
            source = sources.get_source(name)
        except (KeyError, ValueError) as e:
            raise ValueError(f"fine-tuning data {spec!r} is neither a .jsonl/.json file nor a dataset name "
                             f"({e})") from e
        split = split or default_split(source)
        records = sources.records(name, split, progress=progress)
    out = []
    for i, record in enumerate(records):
        if limit and len(out) >= limit:
            break
        try:
            out.append(to_messages(record, system))
        except ValueError as e:
            raise ValueError(f"{spec}, record {i}: {e}") from None
    if not out:
        raise ValueError(f"fine-tuning data {spec} holds no conversations")
    return out


def default_split(source: Any) -> str:
    """The split fine-tuning reads from a registry dataset when none is named: "sft", else "train", else the
    first."""
    return next((s for s in ("sft", "train") if s in source.splits), next(iter(source.splits)))


def validation_spec(spec: str) -> str | None:
    """The held-out counterpart of a registry dataset's fine-tuning split ("synthetic" -> "synthetic:sft-validation")
    when the dataset has one; None for files and datasets without one."""
    path = Path(spec)
    if path.suffix in (".json", ".jsonl") or path.is_file():
        return None
    from ..data import sources

    name, _, split = spec.partition(":")
    try:
        source = sources.get_source(name)
    except (KeyError, ValueError):
        return None
    split = split or default_split(source)
    for candidate in (f"{split}-validation", "validation" if split == "train" else ""):
        if candidate in source.splits:
            return f"{name}:{candidate}"
    return None


# --- tokenizing -------------------------------------------------------------------------------
@dataclass
class Example:
    """One rendered conversation: `ids` (n) and `targets` (n; already shifted, IGNORE where no loss)."""

    ids: list[int]
    targets: list[int]

    @property
    def n_targets(self) -> int:
        return sum(t != IGNORE for t in self.targets)


@dataclass
class Rendered:
    examples: list[Example]
    truncated: int  # conversations cut to seq_len tokens
    dropped: int  # conversations left without any assistant token after the cut


def render(tokenizer: Any, conversations: Sequence[list[dict]], seq_len: int) -> Rendered:
    """Render each conversation with the chat template, shift the mask into targets, and cut it to `seq_len`
    tokens (the first ones: the prompt and the start of the answer). A conversation whose cut leaves no assistant
    token is dropped, since it would contribute nothing but padding."""
    examples, truncated, dropped = [], 0, 0
    for messages in conversations:
        ids, mask = tokenizer.render_chat(messages)
        if len(ids) > seq_len:
            truncated += 1
        ids = ids[: seq_len + 1]
        targets = [ids[t + 1] if mask[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
        ids, targets = ids[:seq_len], targets[:seq_len]
        example = Example(ids, targets)
        if example.n_targets == 0:
            dropped += 1
            continue
        examples.append(example)
    return Rendered(examples, truncated, dropped)


def split_validation(conversations: list, fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, validation): a seeded random `fraction` of the conversations held out (at least one when the
    fraction is positive and there are two or more)."""
    if fraction <= 0:
        return conversations, []
    n_val = max(1, round(fraction * len(conversations))) if len(conversations) > 1 else 0
    order = list(range(len(conversations)))
    random.Random(f"lmlab-sft-split:{seed}").shuffle(order)
    held = set(order[:n_val])
    return ([c for i, c in enumerate(conversations) if i not in held],
            [c for i, c in enumerate(conversations) if i in held])


# --- packing ----------------------------------------------------------------------------------
def pack(lengths: Sequence[int], seq_len: int, open_rows: int = 64) -> list[list[int]]:
    """Group example indices into rows of at most `seq_len` tokens, in the given order, by first fit: each example
    goes into the first open row it fits in, else opens a new one. At most `open_rows` rows stay open (the oldest
    is closed when one more opens), so packing 50k conversations stays linear. First fit over a shuffled order
    fills rows to within a few percent while keeping the mixture of each row random."""
    rows: list[list[int]] = []
    free: list[int] = []
    open_: list[int] = []  # indices of rows that may still take an example
    for i, n in enumerate(lengths):
        if n > seq_len:
            raise ValueError(f"example {i} has {n} tokens, more than seq_len={seq_len}; render() cuts them")
        for r in open_:
            if n <= free[r]:
                rows[r].append(i)
                free[r] -= n
                if free[r] == 0:
                    open_.remove(r)
                break
        else:
            rows.append([i])
            free.append(seq_len - n)
            if free[-1]:
                open_.append(len(rows) - 1)
                if len(open_) > open_rows:
                    open_.pop(0)
    return rows


def collate(examples: Sequence[Sequence[Example]], length: int | None = None) -> dict[str, torch.Tensor]:
    """Rows of examples (each row one or several packed conversations) -> a padded batch dict. Rows are padded at
    the end to `length` (default: the longest row)."""
    width = length or max(sum(len(e.ids) for e in row) for row in examples)
    B = len(examples)
    ids = torch.zeros(B, width, dtype=torch.long)
    targets = torch.full((B, width), IGNORE, dtype=torch.long)
    positions = torch.zeros(B, width, dtype=torch.long)
    doc_ids = torch.zeros(B, width, dtype=torch.long)
    for b, row in enumerate(examples):
        at = 0
        for d, e in enumerate(row, 1):
            n = len(e.ids)
            if at + n > width:
                raise ValueError(f"row {b} holds {at + n} tokens, more than the batch width {width}")
            ids[b, at:at + n] = torch.tensor(e.ids)
            targets[b, at:at + n] = torch.tensor(e.targets)
            positions[b, at:at + n] = torch.arange(n)
            doc_ids[b, at:at + n] = d
            at += n
    return {"ids": ids, "targets": targets, "positions": positions, "doc_ids": doc_ids}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """Keyword arguments of `Transformer.forward` for a batch: ids, positions, and a (B, 1, T, T) mask that keeps
    each packed conversation to itself (None when every row is one unpadded conversation: the fast causal path)."""
    doc = batch["doc_ids"]
    single = bool((doc == 1).all())
    mask = None if single else (doc[:, :, None] == doc[:, None, :])[:, None]
    return {"ids": batch["ids"], "positions": None if single else batch["positions"], "attention_mask": mask}


class ChatBatches:
    """An endless, resumable iterator of training batches over rendered examples, for the training loop.

    Each epoch visits the examples in a fresh seeded order; with packing they are grouped into rows by `pack`
    (rows then shuffled), without it each row is one conversation padded to the longest in its batch. Under data
    parallelism process r takes rows r, r + world, ...; every process sees the same number of batches per epoch.
    The position (epoch, batch in epoch) is the whole state, so resuming is exact."""

    def __init__(self, examples: Sequence[Example], seq_len: int, batch_size: int, *, packing: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"):
        if not examples:
            raise ValueError("no training examples: the data is empty, or every conversation was cut to nothing")
        self.examples, self.seq_len, self.batch_size = list(examples), seq_len, batch_size
        self.packing, self.seed, self.rank, self.world_size = packing, seed, rank, world_size
        self.device = torch.device(device)
        self.epoch, self.batch_in_epoch = 0, 0
        self._rows: tuple[int, list[list[int]]] | None = None
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(self.rows(0))} training rows cannot fill one batch of {batch_size} on each of "
                             f"{world_size} process(es); lower train.batch_size or add data")

    def rows(self, epoch: int) -> list[list[int]]:
        """The example indices of each row of `epoch`, in the order they are served (all processes)."""
        if self._rows is None or self._rows[0] != epoch:
            rng = random.Random(f"lmlab-sft:{self.seed}:{epoch}")
            order = list(range(len(self.examples)))
            rng.shuffle(order)
            if self.packing:
                packed = pack([len(self.examples[i].ids) for i in order], self.seq_len)
                rows = [[order[j] for j in row] for row in packed]
                rng.shuffle(rows)
            else:
                rows = [[i] for i in order]
            self._rows = (epoch, rows)
        return self._rows[1]

    @property
    def batches_per_epoch(self) -> int:
        return len(self.rows(0)) // (self.batch_size * self.world_size)

    def __iter__(self) -> ChatBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.batch_in_epoch >= len(self.rows(self.epoch)) // (self.batch_size * self.world_size):
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        rows = self.rows(self.epoch)
        start = self.batch_in_epoch * self.batch_size * self.world_size
        mine = rows[start + self.rank: start + self.batch_size * self.world_size: self.world_size]
        self.batch_in_epoch += 1
        batch = collate([[self.examples[i] for i in row] for row in mine], self.seq_len if self.packing else None)
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "examples": len(self.examples),
                "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("examples", len(self.examples)) != len(self.examples):
            raise ValueError(f"cannot resume: the run trained on {state['examples']} examples and the data now has "
                             f"{len(self.examples)}; resume with the same data and data.seq_len")
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])


def eval_batches(examples: Sequence[Example], seq_len: int, batch_size: int, *, packing: bool = True,
                 rank: int = 0, world_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """The validation examples in a fixed order, as batches (this process's share of them)."""
    rows = pack([len(e.ids) for e in examples], seq_len) if packing else [[i] for i in range(len(examples))]
    rows = rows[rank::world_size]
    return [collate([[examples[i] for i in row] for row in rows[s:s + batch_size]], seq_len if packing else None)
            for s in range(0, len(rows), batch_size)]
