"""Preference data: pairs of responses to one prompt, one preferred, read from any source, tokenized with the chat
template, batched, and scored by a model as whole-response log-probabilities.

Accepted records (`to_pair`), from a `.jsonl` / `.json` file or a registry dataset (`hh-rlhf`, `synthetic:preference`):
- `{"prompt", "chosen", "rejected"}` with strings (the prompt a user turn) or chats: the prompt as a list of
  messages, the responses as a string or as a list holding the assistant message (TRL's conversational form);
- `{"messages", "chosen", "rejected"}`: the prompt as a chat, the responses as strings (the synthetic pairs, the
  pairs `lmlab cai rlaif` writes);
- Anthropic HH-RLHF transcripts (`"\\n\\nHuman: ...\\n\\nAssistant: ..."`): the shared prefix is parsed into turns,
  the rest of each transcript is the response;
- optionally `"margin"` (a number: how much better the chosen one is, for the reward model's margin loss).
Unpaired data for KTO (`to_unpaired`): `{"prompt", "completion", "label"}` (label true = desirable); paired
data becomes unpaired as two examples, the chosen desirable and the rejected undesirable.

Tokenizing (`tokenize_pairs`): the prompt is rendered with the generation prompt of the chat template, and each
response is what the full conversation adds to it (its tokens up to and including the end-of-turn token, so a
model also learns where to stop). Log-probabilities are over response tokens only. A pair longer than
`seq_len` keeps the end of the prompt and the start of each response, and at least half of `seq_len` stays
for the responses.

Batches (`collate`) put the chosen rows first and the rejected rows after them, right-padded: one forward pass
scores both, and since attention is causal the padding after a row's end changes nothing before it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..tune.chat_data import IGNORE, _read_file

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


# --- reading --------------------------------------------------------------------------------------
@dataclass
class Pair:
    """A prompt (as a chat), a preferred and a dispreferred reply, and optionally how much better the first is."""

    prompt: list[dict]
    chosen: str
    rejected: str
    margin: float | None = None


def parse_hh_prompt(text: str) -> list[dict]:
    """An HH-RLHF transcript prefix ("\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:") as chat messages;
    the trailing empty assistant header is the turn to be answered and is dropped."""
    messages: list[dict] = []
    rest = text
    while rest:
        h, a = rest.find(HUMAN), rest.find(ASSISTANT)
        starts = [(i, tag) for i, tag in ((h, HUMAN), (a, ASSISTANT)) if i >= 0]
        if not starts:
            break
        i, tag = min(starts)
        rest = rest[i + len(tag):]
        nxt = [j for j in (rest.find(HUMAN), rest.find(ASSISTANT)) if j >= 0]
        content, rest = (rest[:min(nxt)], rest[min(nxt):]) if nxt else (rest, "")
        messages.append({"role": "user" if tag == HUMAN else "assistant", "content": content.strip()})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    if not messages or messages[-1]["role"] != "user":
        raise ValueError(f"an HH-RLHF prompt must end with a Human turn followed by 'Assistant:'; got {text[-80:]!r}")
    return messages


def _prompt_messages(prompt: Any) -> list[dict]:
    if isinstance(prompt, str):
        if prompt.lstrip().startswith("Human:") or HUMAN in prompt:
            return parse_hh_prompt(prompt if prompt.startswith("\n\n") else "\n\n" + prompt.lstrip())
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) and "role" in m for m in prompt):
        return [dict(m) for m in prompt]
    raise ValueError(f"a prompt must be a string or a list of {{role, content}} messages, got {type(prompt).__name__}")


def _response_text(response: Any, field_name: str) -> str:
    if isinstance(response, str):
        return response.strip()
    if isinstance(response, list) and len(response) == 1 and isinstance(response[0], dict) \
            and response[0].get("role") == "assistant":
        return str(response[0].get("content", "")).strip()
    raise ValueError(f"'{field_name}' must be a string or a list holding one assistant message, got {response!r:.80}")


def to_pair(record: dict) -> Pair:
    """One record in any accepted form (see the module docstring) as a `Pair`."""
    if "chosen" not in record or "rejected" not in record:
        raise ValueError(f"a preference record needs 'chosen' and 'rejected' (and a 'prompt' or 'messages'); this one "
                         f"has {sorted(record)}")
    chosen, rejected = record["chosen"], record["rejected"]
    if "messages" in record:
        prompt = _prompt_messages(record["messages"])
    elif record.get("prompt"):
        prompt = _prompt_messages(record["prompt"])
        if isinstance(record["prompt"], str) and isinstance(chosen, str) and chosen.startswith(record["prompt"]):
            chosen, rejected = chosen[len(record["prompt"]):], rejected[len(record["prompt"]):]  # HH transcripts
    else:
        raise ValueError("a preference record needs its prompt: a 'prompt' (string or chat) or 'messages' (chat)")
    if prompt[-1].get("role") != "user":
        raise ValueError("a preference prompt must end with a user turn (the turn both responses answer)")
    margin = record.get("margin")
    pair = Pair(prompt, _response_text(chosen, "chosen"), _response_text(rejected, "rejected"),
                None if margin is None else float(margin))
    if not pair.chosen or not pair.rejected:
        raise ValueError("a preference pair has an empty response")
    return pair


@dataclass
class Unpaired:
    """KTO's data: one reply to a prompt, marked desirable or not."""

    prompt: list[dict]
    completion: str
    desirable: bool


def to_unpaired(record: dict) -> list[Unpaired]:
    """`{"prompt", "completion", "label"}` as one example; a preference pair as two (chosen desirable, rejected
    undesirable)."""
    if "completion" in record and "label" in record:
        if not isinstance(record["label"], bool):
            raise ValueError(f"'label' must be true (desirable) or false (undesirable), got {record['label']!r}")
        prompt = _prompt_messages(record.get("messages") or record.get("prompt") or "")
        return [Unpaired(prompt, _response_text(record["completion"], "completion"), record["label"])]
    pair = to_pair(record)
    return [Unpaired(pair.prompt, pair.chosen, True), Unpaired(pair.prompt, pair.rejected, False)]


def _records(spec: str, progress: bool = False) -> Iterable[dict]:
    path = Path(spec)
    if path.suffix in (".json", ".jsonl") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"preference data {spec} does not exist")
        return _read_file(path)
    from ..data import sources

    name, _, split = spec.partition(":")
    try:
        source = sources.get_source(name)
    except (KeyError, ValueError) as e:
        raise ValueError(f"preference data {spec!r} is neither a .jsonl/.json file nor a dataset name ({e})") from e
    split = split or default_split(source)
    if split not in source.splits:
        raise ValueError(f"dataset {name} has no split {split!r}; it has {sorted(source.splits)}")
    return sources.records(name, split, progress=progress)


def default_split(source: Any) -> str:
    """The split preference training reads from a registry dataset when none is named."""
    return next((s for s in ("preference", "train") if s in source.splits), next(iter(source.splits)))


def validation_spec(spec: str) -> str | None:
    """The held-out counterpart of a registry dataset's preference split (synthetic -> synthetic:preference-validation,
    hh-rlhf -> hh-rlhf:test); None for files."""
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
    for candidate in (f"{split}-validation", "validation", "test"):
        if candidate in source.splits and candidate != split:
            return f"{name}:{candidate}"
    return None


def _load(spec: str, convert, limit: int, progress: bool) -> list:
    """A user's file must be well formed: a bad record is an error naming it. A published dataset is taken as
    published: its few unusable records (HH-RLHF has pairs with an empty response) are skipped with a warning."""
    import warnings

    is_file = Path(spec).suffix in (".json", ".jsonl") or Path(spec).is_file()
    out, skipped = [], 0
    for i, record in enumerate(_records(spec, progress)):
        if limit and len(out) >= limit:
            break
        try:
            out += convert(record)
        except ValueError as e:
            if is_file:
                raise ValueError(f"{spec}, record {i}: {e}") from None
            skipped += 1
    if skipped:
        warnings.warn(f"{spec}: skipped {skipped} records that hold no usable pair (e.g. an empty response)",
                      stacklevel=3)
    if not out:
        raise ValueError(f"preference data {spec} holds no usable examples")
    return out[:limit] if limit else out


def load_pairs(spec: str, *, limit: int = 0, progress: bool = False) -> list[Pair]:
    """The preference pairs of a file or a registry dataset ("name" or "name:split"), `limit` of them at most."""
    return _load(spec, lambda r: [to_pair(r)], limit, progress)


def load_unpaired(spec: str, *, limit: int = 0, progress: bool = False) -> list[Unpaired]:
    """KTO's examples of a file or dataset (`to_unpaired`), `limit` of them at most."""
    return _load(spec, to_unpaired, limit, progress)


def split_held_out(items: list, fraction: float, seed: int = 0) -> tuple[list, list]:
    """(train, held out): a seeded random `fraction` held out (at least one when positive and there are two)."""
    if fraction <= 0 or len(items) < 2:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n = min(len(items) - 1, max(1, round(fraction * len(items))))
    held = set(order[:n])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


# --- tokenizing ------------------------------------------------------------------------------------
def prompt_and_response(tokenizer: Any, prompt: list[dict], response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids): the rendered prompt with the assistant header, and what rendering the reply adds
    (its tokens and end-of-turn). Templates that render a prompt differently once a reply follows it (rare) are
    split where the two renderings first differ."""
    head, _ = tokenizer.render_chat(prompt, add_generation_prompt=True)
    full, _ = tokenizer.render_chat([*prompt, {"role": "assistant", "content": response}])
    cut = len(head)
    if full[:cut] != head:
        cut = next((i for i, (a, b) in enumerate(zip(head, full, strict=False)) if a != b), min(len(head), len(full)))
    if cut >= len(full):
        raise ValueError("the chat template rendered the reply as nothing; check the tokenizer's chat template")
    return full[:cut], full[cut:]


@dataclass
class PairExample:
    """A tokenized pair; `ref_chosen` / `ref_rejected` are the reference model's log-probabilities once cached."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0
    ref_chosen: float | None = None
    ref_rejected: float | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class Tokenized:
    examples: list[PairExample]
    truncated: int  # pairs cut to seq_len
    dropped: int  # pairs left without response tokens, or identical responses


def fit(prompt: list[int], responses: Sequence[list[int]], seq_len: int) -> tuple[list[int], list[list[int]], bool]:
    """Cut a prompt and its responses so that prompt + each response fits in seq_len: the responses keep at most
    seq_len - len(prompt) tokens but never less than half of seq_len (the prompt loses its start instead)."""
    longest = max(len(r) for r in responses)
    if len(prompt) + longest <= seq_len:
        return prompt, list(responses), False
    room = max(seq_len // 2, seq_len - len(prompt))
    responses = [r[:room] for r in responses]
    keep = seq_len - max(len(r) for r in responses)
    return prompt[len(prompt) - keep:] if keep > 0 else [], responses, True


def tokenize_pairs(tokenizer: Any, pairs: Sequence[Pair], seq_len: int) -> Tokenized:
    examples, truncated, dropped = [], 0, 0
    for pair in pairs:
        prompt, chosen = prompt_and_response(tokenizer, pair.prompt, pair.chosen)
        _, rejected = prompt_and_response(tokenizer, pair.prompt, pair.rejected)
        prompt, (chosen, rejected), cut = fit(prompt, (chosen, rejected), seq_len)
        truncated += cut
        if not prompt or not chosen or not rejected or chosen == rejected:
            dropped += 1  # nothing to prefer (identical after the cut), or no prompt token to predict from
            continue
        examples.append(PairExample(prompt, chosen, rejected, pair.margin or 0.0))
    return Tokenized(examples, truncated, dropped)


def tokenize_unpaired(tokenizer: Any, items: Sequence[Unpaired], seq_len: int) -> Tokenized:
    """KTO's examples as PairExamples with the reply in `chosen`, `rejected` empty, and extra["desirable"]."""
    examples, truncated, dropped = [], 0, 0
    for item in items:
        prompt, response = prompt_and_response(tokenizer, item.prompt, item.completion)
        prompt, (response,), cut = fit(prompt, (response,), seq_len)
        truncated += cut
        if not prompt or not response:
            dropped += 1
            continue
        examples.append(PairExample(prompt, response, [], extra={"desirable": item.desirable}))
    # KTO's reference point is estimated on mismatched pairs: each prompt with the next example's reply. The
    # pairing is fixed here, not per batch, so the reference model's log-probs of them can be cached too.
    for i, e in enumerate(examples):
        e.extra["mismatched"] = fit(e.prompt, (examples[(i + 1) % len(examples)].chosen,), seq_len)[1][0]
    return Tokenized(examples, truncated, dropped)


# --- batches ------------------------------------------------------------------------------------------
def rows(prompts: Sequence[list[int]], responses: Sequence[list[int]], device: torch.device | str = "cpu",
         pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded rows prompt + response: `ids` (N, T), `targets` (N, T, the next token where it is a response
    token, else IGNORE), `lengths` (N,) the real tokens of each row."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, responses, strict=True)]
    T = max(pad_to or 0, max(len(s) for s in seqs))
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    targets = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        ids[i, :len(s)] = torch.tensor(s)
        if len(s) > len(p):
            targets[i, len(p) - 1:len(s) - 1] = torch.tensor(s[len(p):])
    lengths = torch.tensor([len(s) for s in seqs])
    return {"ids": ids.to(device), "targets": targets.to(device), "lengths": lengths.to(device)}


def collate(examples: Sequence[PairExample], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A pair batch: rows [chosen_1..chosen_B, rejected_1..rejected_B], plus `margin` (B,) and, when cached,
    `ref_chosen` / `ref_rejected` (B,). For unpaired examples (empty `rejected`): the B reply rows, `desirable`
    (B,) and B mismatched rows (prompt i with another example's reply, `tokenize_unpaired`) for KTO's KL
    estimate, whose reference log-probs are `ref_rejected`."""
    prompts = [e.prompt for e in examples]
    unpaired = not examples[0].rejected
    if unpaired:
        batch = rows(prompts + prompts, [e.chosen for e in examples] + [e.extra["mismatched"] for e in examples],
                     device)
        batch["desirable"] = torch.tensor([bool(e.extra.get("desirable")) for e in examples], device=device)
    else:
        batch = rows(prompts + prompts, [e.chosen for e in examples] + [e.rejected for e in examples], device)
    batch["margin"] = torch.tensor([e.margin for e in examples], dtype=torch.float32, device=device)
    if all(e.ref_chosen is not None for e in examples):
        batch["ref_chosen"] = torch.tensor([e.ref_chosen for e in examples], dtype=torch.float64, device=device)
        batch["ref_rejected"] = torch.tensor([e.ref_rejected for e in examples], dtype=torch.float64, device=device)
    return batch


class PairBatches:
    """An endless, resumable iterator of pair batches: a seeded shuffle per epoch, each data-parallel process
    taking its own share, and its position in `state_dict` so a resumed run continues exactly."""

    def __init__(self, examples: Sequence[PairExample], batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu"):
        if not examples:
            raise ValueError("no preference pairs to train on")
        self.examples, self.batch_size, self.seed = list(examples), batch_size, seed
        self.rank, self.world_size, self.device = rank, world_size, device
        self.epoch, self.position = 0, 0

    def order(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order[self.rank::self.world_size]

    @property
    def batches_per_epoch(self) -> int:
        return max(1, len(self.order(0)) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        order = self.order(self.epoch)
        if self.position + self.batch_size > len(order) and self.position > 0:
            self.epoch, self.position = self.epoch + 1, 0
            order = self.order(self.epoch)
        picked = order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return collate([self.examples[i] for i in picked], self.device)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "n": len(self.examples)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("n", len(self.examples)) != len(self.examples):
            raise ValueError(f"cannot resume: the run trained on {state['n']} pairs and this data has "
                             f"{len(self.examples)}; resume with the same data and settings")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def eval_batches(examples: Sequence[PairExample], batch_size: int, device: torch.device | str = "cpu"):
    """The held-out examples in order, in batches (every one of them, the last batch possibly smaller)."""
    for s in range(0, len(examples), batch_size):
        yield collate(examples[s:s + batch_size], device)


# --- scoring --------------------------------------------------------------------------------------------
def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log pi(response token), number of response tokens) per row, in float32 (float64 models: float64):

        log pi(y | x) = sum_{t in response} log softmax(z_t)[y_t]

    computed as the negative cross-entropy per token (no (N, T, V) log-softmax tensor is kept)."""
    logits = model(batch["ids"]).logits
    targets = batch["targets"]
    dtype = torch.promote_types(logits.dtype, torch.float32)
    token = -F.cross_entropy(logits.to(dtype).flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                             reduction="none").view_as(targets)
    n = (targets != IGNORE).sum(-1)
    return token.sum(-1), n


@torch.no_grad()
def reference_logps(model: nn.Module, examples: Sequence[PairExample], batch_size: int = 8,
                    progress: bool = True, desc: str = "reference log-probs") -> None:
    """Fill every example's `ref_chosen` / `ref_rejected` with the (frozen) reference model's summed log-probs: one
    pass over the data before training, so the reference never runs again (and need not stay in memory)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for s in tqdm(range(0, len(examples), batch_size), desc=desc, disable=not progress, unit="batch"):
        chunk = examples[s:s + batch_size]
        logps, _ = sequence_logps(model, collate(chunk, device))
        logps = logps.double().cpu().tolist()
        for i, e in enumerate(chunk):
            e.ref_chosen, e.ref_rejected = logps[i], logps[len(chunk) + i]
    model.train(was_training)


def fingerprint(examples: Sequence[PairExample], model_path: str) -> str:
    """A hash of the tokenized data and the reference checkpoint: a cached reference is reused only for both."""
    import hashlib

    h = hashlib.sha256(str(Path(model_path).resolve()).encode())
    for e in examples:
        h.update(json.dumps([e.prompt, e.chosen, e.rejected]).encode())
    return h.hexdigest()


__all__ = ["Pair", "PairBatches", "PairExample", "Tokenized", "Unpaired", "collate", "eval_batches", "fingerprint",
           "fit", "load_pairs", "load_unpaired", "parse_hh_prompt", "prompt_and_response", "reference_logps", "rows",
           "sequence_logps", "split_held_out", "to_pair", "to_unpaired", "tokenize_pairs", "tokenize_unpaired",
           "validation_spec"]
