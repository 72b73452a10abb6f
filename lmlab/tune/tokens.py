"""Trainable token rows: an adapter that learns new embedding (and output) rows for a few chosen tokens.

A base model pretrained on plain text has never seen its chat template's special tokens (`<|user|>`,
`<|assistant|>`, `<|end|>`, Llama 3's `<|eot_id|>`, ...): their embedding rows are still at their random start,
and with tied embeddings (or an untied head) the output row of the end-of-turn token has only ever been pushed
down. Full fine-tuning moves those rows directly; an adapter on the projections alone cannot, and a LoRA model
then keeps failing to end its turn (docs/finetuning.md measures it). So, as PEFT's `trainable_token_indices` does,
the adapter may also learn a delta for the rows of a few tokens:

    E' = E + scatter(ids, D)        D: (len(ids), d_model), starting at zero

applied to the embedding matrix wherever the model reads it (input lookup, tied output head, the fused loss),
and to the untied head's matrix too when the model has one. It is a `torch.nn.utils.parametrize`
parametrization of those weights, so the model's code is unchanged; the frozen rows stay as they were and only
D trains: len(ids) x d_model parameters per matrix.

`AdapterConfig.trainable_tokens` names the tokens ("chat": every special token the chat template writes); the
fine-tuning stage resolves them to ids with the tokenizer into `AdapterConfig.token_ids`, which is what an
adapter's config stores and what `apply_adapter` reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .adapters import AdapterLayer, adapter_layers


class TokenRows(AdapterLayer):
    """The parametrization of one embedding/head matrix: W -> W + the active adapters' row deltas."""

    label = "trainable-token"
    routable = False  # one matrix serves every row of the batch

    def __init__(self, vocab_size: int, dim: int):
        super().__init__(None)
        self.vocab_size, self.dim = vocab_size, dim
        self.token_delta = nn.ParameterDict()
        self.ids: dict[str, torch.Tensor] = {}  # adapter name -> the rows it changes (kept in its config)

    @property
    def adapters(self) -> list[str]:
        return list(self.token_delta)

    def add(self, name: str, ids: Sequence[int], like: torch.Tensor) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"trainable token ids {bad} are outside the vocabulary [0, {self.vocab_size})")
        self.ids[name] = torch.tensor(sorted(set(ids)), dtype=torch.long, device=like.device)
        self.token_delta[name] = nn.Parameter(torch.zeros(len(self.ids[name]), self.dim, device=like.device,
                                                          dtype=torch.promote_types(like.dtype, torch.float32)))

    def remove_adapter(self, name: str) -> None:
        del self.token_delta[name]
        del self.ids[name]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        for name in self.active:
            if name not in self.merged:
                ids = self.ids[name].to(weight.device)
                weight = weight.index_add(0, ids, self.token_delta[name].to(weight.dtype))
        return weight

    def merge(self, names: Sequence[str]) -> None:
        self.merged = tuple(names)  # `fold_tokens` writes them into the matrix when the model is unloaded

    def unmerge(self) -> None:
        self.merged = ()

    @classmethod
    def remove_from_model(cls, model: nn.Module, name: str) -> None:
        """The last adapter of a matrix takes the parametrization with it: the plain weight comes back."""
        for owner, layer in _owners(model):
            if layer.adapters == [name]:
                parametrize.remove_parametrizations(owner, "weight", leave_parametrized=False)


def _matrices(model: nn.Module) -> list[nn.Module]:
    """The modules whose `weight` holds token rows: the embedding, and the output head when it is untied."""
    mods = [model.embed]
    if getattr(model, "lm_head", None) is not None:
        mods.append(model.lm_head)
    return mods


def _owners(model: nn.Module) -> list[tuple[nn.Module, TokenRows]]:
    out = []
    for owner in _matrices(model):
        if parametrize.is_parametrized(owner, "weight"):
            out += [(owner, p) for p in owner.parametrizations.weight if isinstance(p, TokenRows)]
    return out


def add_token_rows(model: nn.Module, ids: Sequence[int], name: str) -> None:
    """Give the adapter `name` a zero-initialized delta for the rows `ids` of the embedding (and untied head)."""
    if not ids:
        return
    if not hasattr(model, "embed"):
        raise ValueError("trainable tokens need an lmlab Transformer (with `embed`)")
    for owner in _matrices(model):
        found = [p for o, p in _owners(model) if o is owner]
        if found:
            layer = found[0]
        else:
            weight = owner.weight
            layer = TokenRows(weight.shape[0], weight.shape[1])
            parametrize.register_parametrization(owner, "weight", layer)
        layer.add(name, ids, owner.parametrizations.weight.original)
        layer.active = (name,)  # a new adapter runs alone, as every method's does


def fold_tokens(model: nn.Module) -> None:
    """Write the active deltas into the matrices and remove the parametrizations (for merge_and_unload)."""
    for owner, _ in _owners(model):
        parametrize.remove_parametrizations(owner, "weight", leave_parametrized=True)


def resolve_tokens(tokenizer: Any, names: Sequence[str]) -> list[int]:
    """Token ids of `names`: each a special token of the tokenizer, a string that encodes to exactly one token,
    or "chat": every special token the tokenizer's chat template writes (found by rendering a short chat and
    keeping the ids that decoding without special tokens drops)."""
    ids: set[int] = set()
    for name in names:
        if name == "chat":
            chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                    {"role": "assistant", "content": "A"}]
            rendered, _ = tokenizer.render_chat(chat)
            ids |= {i for i in rendered if tokenizer.decode([i], skip_special_tokens=True) == ""}
            continue
        special = getattr(tokenizer, "special_tokens", {}) or {}
        if name in special:
            ids.add(special[name])
            continue
        encoded = tokenizer.encode(name)
        if len(encoded) != 1:
            raise ValueError(f"trainable token {name!r} is not one token of this tokenizer (it encodes to "
                             f"{len(encoded)}); name special tokens, single tokens, or 'chat'")
        ids.add(encoded[0])
    return sorted(ids)


__all__ = ["TokenRows", "add_token_rows", "adapter_layers", "fold_tokens", "resolve_tokens"]
