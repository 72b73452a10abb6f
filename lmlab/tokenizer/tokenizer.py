"""lmlab's byte-level BPE tokenizer: merges served through tiktoken, read and written as tokenizer.json.

`Tokenizer` holds tiktoken's description of a byte-level BPE (token bytes -> rank, where the rank
is the id; a pre-tokenization regex; special tokens) and encodes with a `tiktoken.Encoding` built
for this instance alone, so encoding runs in Rust, in parallel for batches.

Rank semantics and merge-list semantics. tiktoken merges, inside a pre-token, the adjacent pair
whose *concatenated bytes* have the lowest rank, and returns a pre-token that is itself a token
in one piece. A merge-list tokenizer (GPT-2's encoder.py, HF `tokenizers`, `bpe.encode_reference`)
merges the adjacent pair with the lowest *merge* rank. The two agree when (1) the merges create
distinct tokens whose ids follow merge order, (2) every multi-byte token is created by a merge,
(3) every byte has a token, and (4) merge-list BPE turns each token's own bytes into that token.
Proof sketch: in a merge-list run, two adjacent tokens u, v were each built inside their own span,
so the span u+v evolved exactly as the standalone word u+v; if u+v = T is a token, by (4) that
run ends in T through T's merge, so (u, v) is T's merge pair (a different pair could never merge
into T by (1)). Hence every adjacent pair whose concatenation is a token is a merge, with the same
order under both rules, and both runs make the same choices. BPE training (`bpe.train_bpe`)
always yields (1)-(4): when T's merge was learnt, its span inside a training word had evolved as
the standalone word T, and ended as the merged pair. Files written by other tools need not: HF
ids out of merge order, several merges per token (tiktoken vocabularies converted to merges, such
as Llama 3's), unreachable tokens. `Tokenizer(..., merges=...)` checks (1)-(4) at construction and,
where they fail, encodes with an exact pure-Python merge-list encoder (with a per-word cache),
slower but with the same ids as HF; `uses_tiktoken` says which path is taken.

Written around tiktoken rather than HF `tokenizers` because tiktoken is a small core dependency
and fast; `tokenizers` stays an optional extra used to check parity.
"""

from __future__ import annotations

import json
import unicodedata
import warnings
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import regex
import tiktoken

from ..atomic import atomic_directory, atomic_file
from .bpe import DEFAULT_SPECIAL_TOKENS, GPT4_PATTERN, Merge, clean_surrogates, covering_pattern, resolve_pattern

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
NORMALIZATIONS = ("NFC", "NFD", "NFKC", "NFKD")
_LOAD_HINT = "use lmlab.tokenizer.load_tokenizer, which reads sentencepiece-style files"


def _byte_alphabet() -> tuple[str, ...]:
    """GPT-2's reversible map from byte values to printable characters (index = byte): printable
    Latin-1 bytes stand for themselves, the other 68 are shifted to U+0100 onwards, so that a
    vocabulary of byte strings can be stored as JSON text without control characters or spaces."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, shifted = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return tuple(chars)


BYTE_TO_CHAR: tuple[str, ...] = _byte_alphabet()
CHAR_TO_BYTE = MappingProxyType({c: b for b, c in enumerate(BYTE_TO_CHAR)})


def bytes_to_chars(token: bytes) -> str:
    """Token bytes in the GPT-2 byte-level alphabet (as stored in tokenizer.json)."""
    return "".join(BYTE_TO_CHAR[b] for b in token)


def chars_to_bytes(text: str) -> bytes | None:
    """Inverse of `bytes_to_chars`; None when `text` holds a character outside the alphabet."""
    try:
        return bytes(CHAR_TO_BYTE[c] for c in text)
    except KeyError:
        return None


# --- merge-list semantics -----------------------------------------------------------------------

def merge_list_problem(merges: Sequence[Merge], ranks: dict[bytes, int]) -> str | None:
    """Why tiktoken's rank rule could give other ids than merge-list BPE with `merges`, or None
    when conditions (1)-(4) of the module docstring hold and both give the same ids on any text."""
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        return f"{len(missing)} byte values have no token (first: {missing[0]})"
    created: dict[bytes, int] = {}
    last = -1
    for i, (a, b) in enumerate(merges):
        t = a + b
        if a not in ranks or b not in ranks or t not in ranks:
            return f"merge {i} ({a!r}, {b!r}) uses or creates a token outside the vocabulary"
        if t in created:
            return f"merges {created[t]} and {i} both create {t!r}"
        if not ranks[a] < ranks[t] > ranks[b] or ranks[t] <= last:
            return f"merge {i} creates {t!r} with id {ranks[t]}, out of merge order"
        created[t] = i
        last = ranks[t]
    by_pair = {(ranks[a], ranks[b]): ranks[a + b] for a, b in merges}
    byte_ids = [ranks[bytes([b])] for b in range(256)]
    for token, rank in ranks.items():
        if len(token) > 1 and token not in created:
            return f"token {token!r} (id {rank}) is created by no merge"
        if len(token) > 1 and _merge_ids([byte_ids[b] for b in token], by_pair) != [rank]:
            return f"merge-list BPE does not turn the bytes of token {token!r} (id {rank}) into that token"
    return None


def _merge_ids(parts: list[int], by_pair: dict[tuple[int, int], int]) -> list[int]:
    """Merge-list BPE over ids when merge order = id order: merge the adjacent pair whose
    merged id is lowest, leftmost on ties."""
    while len(parts) > 1:
        best, at = None, 0
        for i in range(len(parts) - 1):
            new = by_pair.get((parts[i], parts[i + 1]))
            if new is not None and (best is None or new < best):
                best, at = new, i
        if best is None:
            break
        parts[at : at + 2] = [best]
    return parts


class MergeListEncoder:
    """Exact merge-list BPE, as HF `tokenizers`' BPE model runs it: in a pre-token, merge the pair
    with the lowest merge index (leftmost on ties) until none applies. With `ignore_merges` a
    pre-token that is a token is returned whole first (HF's flag, for tiktoken-trained vocabularies).
    A byte without a token is dropped, or becomes `unk_id`, as in HF. Results are cached per
    pre-token (up to `cache_size` entries), since words repeat."""

    def __init__(self, merges: Sequence[Merge], ranks: dict[bytes, int], *, ignore_merges: bool = False,
                 unk_id: int | None = None, cache_size: int = 100_000):
        # a pair listed twice keeps its last index, as HF's map does
        self.pairs = {(ranks[a], ranks[b]): (i, ranks[a + b]) for i, (a, b) in enumerate(merges)}
        self.byte_ids = [ranks.get(bytes([b])) for b in range(256)]
        self.ranks = ranks
        self.ignore_merges = ignore_merges
        self.unk_id = unk_id
        self.cache_size = cache_size
        self.cache: dict[bytes, list[int]] = {}

    def encode_piece(self, piece: bytes) -> list[int]:
        ids = self.cache.get(piece)
        if ids is None:
            ids = self._encode(piece)
            if len(self.cache) >= self.cache_size:
                self.cache.clear()
            self.cache[piece] = ids
        return ids

    def _encode(self, piece: bytes) -> list[int]:
        if self.ignore_merges and piece in self.ranks:
            return [self.ranks[piece]]
        parts = [self.byte_ids[b] if self.byte_ids[b] is not None else self.unk_id for b in piece]
        parts = [p for p in parts if p is not None]
        pairs = self.pairs
        while len(parts) > 1:
            best, at = None, 0
            for i in range(len(parts) - 1):
                found = pairs.get((parts[i], parts[i + 1]))
                if found is not None and (best is None or found[0] < best[0]):
                    best, at = found, i
            if best is None:
                break
            parts[at : at + 2] = [best[1]]
        return parts


def _rank_split(token: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """tiktoken's rank rule applied to `token`'s bytes using only tokens ranked below it: the
    parts the token is merged from (two, for a token some merge creates)."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, at = None, 0
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < limit and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts


def merges_from_ranks(ranks: dict[bytes, int]) -> tuple[list[Merge], bool]:
    """A merge list for tiktoken ranks (what HF's tiktoken converter does): each token's merge is
    the last step of the rank rule on its own bytes. A token that rule cannot build from two parts
    gets every split into two tokens instead. Returns (merges, exact): exact when the list passes
    `merge_list_problem`, i.e. merge-list BPE gives tiktoken's ids on any text."""
    merges: list[Merge] = []
    for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = _rank_split(token, ranks)
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
        else:
            splits = [(token[:k], token[k:]) for k in range(1, len(token))]
            splits = [(a, b) for a, b in splits if a in ranks and b in ranks]
            merges.extend(sorted(splits, key=lambda ab: (ranks[ab[0]], ranks[ab[1]])))
    return merges, merge_list_problem(merges, ranks) is None


# --- the tokenizer ----------------------------------------------------------------------------

class Tokenizer:
    """A byte-level BPE tokenizer (see the module docstring).

    mergeable_ranks: token bytes -> id, for every token but the special ones (tiktoken's format).
    pattern: the pre-tokenization regex ("gpt2", "gpt4" or a regex).
    special_tokens: name -> id; their text in an input becomes their id only where allowed.
    bos_token / eos_token / pad_token: names of special tokens; eos_tokens: further names that
    end generation (e.g. Llama 3's <|eot_id|>). add_bos / add_eos: what `add_special_tokens=True`
    adds (HF's post-processor). normalization: a Unicode normal form applied before splitting
    (Qwen2 uses NFC). chat_template: a Jinja template (HF style), or None for lmlab's own.
    merges: the merge list, when the ids must follow merge-list semantics (files from HF and the
    trainer); see `uses_tiktoken`. ignore_merges: HF's flag (a pre-token that is a token is taken
    whole; only matters on the merge-list path). added_tokens: non-special added tokens
    (name -> id), recognized in text always, as HF does, and kept by skip_special_tokens.
    unk_token: HF's unknown token, used on the merge-list path only for bytes without a token.
    """

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        pattern: str,
        special_tokens: dict[str, int] | None = None,
        *,
        name: str = "",
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        eos_tokens: list[str] | None = None,
        chat_template: str | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        normalization: str | None = None,
        merges: Sequence[Merge] | None = None,
        ignore_merges: bool = False,
        added_tokens: dict[str, int] | None = None,
        unk_token: str | None = None,
    ):
        self.name = name
        self.pattern = resolve_pattern(pattern)
        self.mergeable_ranks = dict(mergeable_ranks)
        self.special_tokens = dict(special_tokens or {})
        self.added_tokens = dict(added_tokens or {})
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.eos_tokens = list(eos_tokens or [])
        self.chat_template = chat_template
        self.add_bos, self.add_eos = add_bos, add_eos
        self.normalization = normalization
        self.merges = None if merges is None else [(bytes(a), bytes(b)) for a, b in merges]
        self.ignore_merges = ignore_merges
        self.unk_token = unk_token
        self._validate()
        problem = None
        if self.merges is not None:
            problem = merge_list_problem(self.merges, self.mergeable_ranks)
        elif any(bytes([b]) not in self.mergeable_ranks for b in range(256)):
            missing = next(b for b in range(256) if bytes([b]) not in self.mergeable_ranks)
            raise ValueError(
                f"mergeable_ranks has no token for byte {missing}: tiktoken needs every single byte "
                "to have a rank (pass merges= to use the merge-list encoder instead)"
            )
        self.merge_list_problem = problem
        self._build(use_tiktoken=problem is None)

    def _validate(self) -> None:
        if not self.mergeable_ranks:
            raise ValueError("mergeable_ranks is empty; a byte-level BPE needs at least the 256 byte tokens")
        ids: dict[int, str] = {}
        for token, rank in self.mergeable_ranks.items():
            if not isinstance(token, bytes) or not token or not isinstance(rank, int) or rank < 0:
                raise ValueError(f"mergeable_ranks maps non-empty bytes to ids >= 0; got {token!r}: {rank!r}")
            if rank in ids:
                raise ValueError(f"id {rank} is given to two tokens in mergeable_ranks ({ids[rank]} and {token!r})")
            ids[rank] = repr(token)
        for kind, table in (("special token", self.special_tokens), ("added token", self.added_tokens)):
            for text, i in table.items():
                if not isinstance(text, str) or not text or not isinstance(i, int) or i < 0:
                    raise ValueError(f"a {kind} maps a non-empty name to an id >= 0; got {text!r}: {i!r}")
                if i in ids:
                    raise ValueError(f"{kind} {text!r} has id {i}, already used by {ids[i]}; give it a free id")
                ids[i] = repr(text)
        for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = getattr(self, role)
            if value is not None and value not in self.special_tokens and value not in self.added_tokens:
                raise ValueError(f"{role} {value!r} is not a special token; add it to special_tokens")
        for value in self.eos_tokens:
            if value not in self.special_tokens and value not in self.added_tokens:
                raise ValueError(f"eos_tokens entry {value!r} is not a special token; add it to special_tokens")
        if self.add_bos and self.bos_token is None:
            raise ValueError("add_bos=True needs a bos_token")
        if self.add_eos and self.eos_token is None:
            raise ValueError("add_eos=True needs an eos_token")
        if self.normalization is not None and self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS} or None, got {self.normalization!r}")

    def _build(self, use_tiktoken: bool) -> None:
        """Derived state: ids, the encoder (tiktoken or merge-list), the id -> bytes table."""
        self.uses_tiktoken = use_tiktoken
        named = {**self.special_tokens, **self.added_tokens}
        self.bos_id = named.get(self.bos_token) if self.bos_token else None
        self.eos_id = named.get(self.eos_token) if self.eos_token else None
        self.pad_id = named.get(self.pad_token) if self.pad_token else None
        eos = ([self.eos_id] if self.eos_id is not None else []) + [named[t] for t in self.eos_tokens]
        self.eos_ids = list(dict.fromkeys(eos))
        self.vocab_size = max([*self.mergeable_ranks.values(), *named.values()]) + 1
        self._prefix = [self.bos_id] if self.add_bos else []
        self._suffix = [self.eos_id] if self.add_eos else []
        self._named = named
        self._named_bytes = {i: t.encode("utf-8") for t, i in named.items()}
        self._special_ids = frozenset(self.special_tokens.values())
        self._splitters: dict[frozenset[str], regex.Pattern | None] = {}
        self._split = regex.compile(covering_pattern(self.pattern))
        if use_tiktoken:
            self._enc: tiktoken.Encoding | None = tiktoken.Encoding(
                self.name or "lmlab", pat_str=covering_pattern(self.pattern),
                mergeable_ranks=self.mergeable_ranks, special_tokens=named,
            )
            self._slow = None
            self._decoder: dict[int, bytes] | None = None
        else:
            self._enc = None
            unk = named.get(self.unk_token) if self.unk_token else None
            self._slow = MergeListEncoder(self.merges or [], self.mergeable_ranks,
                                          ignore_merges=self.ignore_merges, unk_id=unk)
            self._decoder = {i: t for t, i in self.mergeable_ranks.items()}
            self._decoder.update(self._named_bytes)

    # --- pickling: data workers receive tokenizers in other processes ---

    _STATE = ("name", "pattern", "mergeable_ranks", "special_tokens", "added_tokens", "bos_token",
              "eos_token", "pad_token", "eos_tokens", "chat_template", "add_bos", "add_eos",
              "normalization", "merges", "ignore_merges", "unk_token", "merge_list_problem")

    def __getstate__(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self._STATE}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._build(use_tiktoken=state["merge_list_problem"] is None)  # the check is not redone

    def __repr__(self) -> str:
        path = "tiktoken" if self.uses_tiktoken else "merge-list"
        return (f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"special_tokens={len(self.special_tokens)}, encoder={path})")

    # --- encoding ---

    def _allowed(self, allowed_special: Literal["all"] | Collection[str]) -> frozenset[str]:
        if allowed_special == "all":
            return frozenset(self.special_tokens)
        if isinstance(allowed_special, str):
            raise ValueError(f"allowed_special is 'all' or a collection of special token names, "
                             f"not the string {allowed_special!r}")
        allowed = frozenset(allowed_special)
        unknown = sorted(allowed - self.special_tokens.keys())
        if unknown:
            raise ValueError(f"allowed_special names unknown special tokens {unknown}; "
                             f"known: {sorted(self.special_tokens)}")
        return allowed

    def _splitter(self, allowed: frozenset[str]) -> regex.Pattern | None:
        """Regex finding the allowed special tokens and the added tokens; longest first, so that
        of two overlapping names the longer wins, as in HF."""
        if allowed not in self._splitters:
            names = sorted({*allowed, *self.added_tokens}, key=lambda t: (-len(t), t))
            self._splitters[allowed] = regex.compile("|".join(map(regex.escape, names))) if names else None
        return self._splitters[allowed]

    def _segments(self, text: str, allowed: frozenset[str]) -> list[str | int]:
        """`text` cut at recognized special/added tokens: plain text pieces and token ids."""
        splitter = self._splitter(allowed)
        if splitter is None:
            return [text] if text else []
        named = self._named
        out: list[str | int] = []
        start = 0
        for m in splitter.finditer(text):
            if m.start() > start:
                out.append(text[start : m.start()])
            out.append(named[m.group()])
            start = m.end()
        if start < len(text):
            out.append(text[start:])
        return out

    def _normalize(self, text: str) -> str:
        return unicodedata.normalize(self.normalization, text) if self.normalization else text

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of `text` as plain text: no special token is recognized (added tokens aside)."""
        if self.added_tokens:
            return self.encode(text)
        return self._encode_plain(text)

    def _encode_plain(self, text: str) -> list[int]:
        text = self._normalize(text)
        if self._enc is not None:
            return self._enc.encode_ordinary(text)
        out: list[int] = []
        for piece in self._split.findall(clean_surrogates(text)):
            out.extend(self._slow.encode_piece(piece.encode("utf-8")))
        return out

    def encode(self, text: str, *, add_special_tokens: bool = False,
               allowed_special: Literal["all"] | Collection[str] = ()) -> list[int]:
        """Token ids of `text`.

        allowed_special: the special tokens whose text in `text` becomes their id ("all" = every
        one); any other special-token text is encoded as ordinary text, never an error (corpora
        contain such strings). add_special_tokens: add bos/eos as the tokenizer's post-processor
        says (HF's `tokenizer(text)`), e.g. <|begin_of_text|> for Llama 3."""
        allowed = self._allowed(allowed_special)
        if not allowed and not self.added_tokens:
            ids = self._encode_plain(text)
        else:
            ids = []
            for seg in self._segments(text, allowed):
                if isinstance(seg, int):
                    ids.append(seg)
                else:
                    ids.extend(self._encode_plain(seg))
        if add_special_tokens:
            ids = self._prefix + ids + self._suffix
        return ids

    def encode_batch(self, texts: list[str], *, add_special_tokens: bool = False,
                     allowed_special: Literal["all"] | Collection[str] = (), num_threads: int = 8) -> list[list[int]]:
        """`encode` of each text, the tiktoken path in parallel threads (tiktoken releases the GIL)."""
        if isinstance(texts, str):
            raise ValueError("encode_batch takes a list of texts; use encode for one text")
        allowed = self._allowed(allowed_special)
        if self._enc is None:
            return [self.encode(t, add_special_tokens=add_special_tokens, allowed_special=allowed) for t in texts]
        if self._splitter(allowed) is None and not self.normalization and not add_special_tokens:
            return self._enc.encode_ordinary_batch(texts, num_threads=num_threads)
        segments = [self._segments(t, allowed) for t in texts]
        plain = [self._normalize(s) for segs in segments for s in segs if isinstance(s, str)]
        encoded = iter(self._enc.encode_ordinary_batch(plain, num_threads=num_threads))
        out = []
        for segs in segments:
            ids: list[int] = list(self._prefix) if add_special_tokens else []
            for s in segs:
                if isinstance(s, int):
                    ids.append(s)
                else:
                    ids.extend(next(encoded))
            if add_special_tokens:
                ids.extend(self._suffix)
            out.append(ids)
        return out

    # --- decoding ---

    def decode_bytes(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> bytes:
        """The bytes of the tokens `ids`, joined (specials as their UTF-8 text unless skipped)."""
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        if self._enc is not None:
            try:
                return self._enc.decode_bytes(ids)
            except (KeyError, OverflowError, ValueError):
                pass  # fall through to name the bad id
        else:
            try:
                return b"".join(self._decoder[i] for i in ids)
            except KeyError:
                pass
        bad = next(i for i in ids if self._token_bytes(i) is None)
        raise ValueError(f"token id {bad} is not in the vocabulary (ids run from 0 to {self.vocab_size - 1})")

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False, errors: str = "replace") -> str:
        """Text of `ids`. Bytes that are not valid UTF-8 (a token sequence cut inside a character)
        become U+FFFD with errors="replace" (as in HF), or raise with errors="strict"."""
        return self.decode_bytes(ids, skip_special_tokens=skip_special_tokens).decode("utf-8", errors)

    def _token_bytes(self, id: int) -> bytes | None:
        if id in self._named_bytes:
            return self._named_bytes[id]
        if self._enc is not None:
            try:
                return self._enc.decode_single_token_bytes(id)
            except (KeyError, OverflowError, ValueError):
                return None
        return self._decoder.get(id)

    def token_bytes(self, id: int) -> bytes:
        """Raw bytes of one token (a special token: its UTF-8 text)."""
        found = self._token_bytes(int(id))
        if found is None:
            raise ValueError(f"token id {id} is not in the vocabulary (ids run from 0 to {self.vocab_size - 1})")
        return found

    def token_to_id(self, token: str) -> int | None:
        """Id of a special/added token name, or of a regular token written in the byte-level
        alphabet (as HF's `token_to_id`); None when there is no such token."""
        for table in (self.special_tokens, self.added_tokens):
            if token in table:
                return table[token]
        raw = chars_to_bytes(token)
        return None if raw is None else self.mergeable_ranks.get(raw)

    def id_to_token(self, id: int) -> str:
        """Name of a special/added token, or a regular token in the byte-level alphabet."""
        id = int(id)
        if id in self._named_bytes:
            return self._named_bytes[id].decode("utf-8")
        return bytes_to_chars(self.token_bytes(id))

    def render_chat(self, messages, *, add_generation_prompt: bool = False, tools=None) -> tuple[list[int], list[int]]:
        """(ids, loss mask) of a conversation, rendered with the chat template (see chat.py)."""
        from .chat import render_chat

        return render_chat(self, messages, add_generation_prompt=add_generation_prompt, tools=tools)

    # --- training ---

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        *,
        pattern: str = GPT4_PATTERN,
        special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
        min_frequency: int = 2,
        name: str = "lmlab-bpe",
        progress: bool = True,
    ) -> Tokenizer:
        """Train a byte-level BPE (`bpe.train_bpe`) to `vocab_size` tokens in all: 256 bytes,
        the merges, then `special_tokens` appended after the merges in the order given. The
        lmlab defaults name <|bos|>, <|eos|> and <|pad|> as bos, eos and pad when present."""
        from .bpe import ranks_from_merges, train_bpe

        specials = list(dict.fromkeys(special_tokens))
        if len(specials) != len(special_tokens):
            raise ValueError(f"special_tokens lists a token twice: {list(special_tokens)}")
        if vocab_size < 256 + len(specials):
            raise ValueError(
                f"vocab_size {vocab_size} leaves no room: 256 byte tokens + {len(specials)} special tokens "
                f"need at least {256 + len(specials)}"
            )
        merges = train_bpe(texts, vocab_size - len(specials), pattern, min_frequency=min_frequency, progress=progress)
        ranks = ranks_from_merges(merges)
        special_ids = {t: len(ranks) + i for i, t in enumerate(specials)}

        def role(token: str) -> str | None:
            return token if token in special_ids else None

        return cls(ranks, pattern, special_ids, name=name, bos_token=role("<|bos|>"), eos_token=role("<|eos|>"),
                   pad_token=role("<|pad|>"), merges=merges)

    # --- tokenizer.json I/O ---

    def to_hf_json(self) -> dict[str, Any]:
        """The HF `tokenizer.json` (byte-level BPE) describing this tokenizer."""
        merges, ignore_merges = self.merges, self.ignore_merges
        if merges is None:  # built from tiktoken ranks alone: derive merges as HF's converter does
            merges, exact = merges_from_ranks(self.mergeable_ranks)
            ignore_merges = True  # tiktoken takes a pre-token that is a token whole
            if not exact:
                warnings.warn(
                    f"tokenizer {self.name!r}: no merge list reproduces tiktoken's rank rule for these ranks; "
                    "HF tokenizers reading this file may encode some rare strings differently", stacklevel=3,
                )
        added = [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": t in self.special_tokens}
            for t, i in sorted({**self.special_tokens, **self.added_tokens}.items(), key=lambda kv: kv[1])
        ]
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": {"type": self.normalization} if self.normalization else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ]},
            "post_processor": self._hf_post_processor(),
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {
                "type": "BPE", "dropout": None, "unk_token": self.unk_token, "continuing_subword_prefix": None,
                "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                "ignore_merges": ignore_merges,
                "vocab": {bytes_to_chars(t): i for t, i in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])},
                "merges": [[bytes_to_chars(a), bytes_to_chars(b)] for a, b in merges],
            },
        }

    def _hf_post_processor(self) -> dict[str, Any] | None:
        if not (self.add_bos or self.add_eos):
            return None
        pre = [self.bos_token] if self.add_bos else []
        post = [self.eos_token] if self.add_eos else []

        def piece(kind: str, value: str, type_id: int) -> dict[str, Any]:
            return {kind: {"id": value, "type_id": type_id}}

        single = [piece("SpecialToken", t, 0) for t in pre] + [piece("Sequence", "A", 0)]
        single += [piece("SpecialToken", t, 0) for t in post]
        pair = single + [piece("SpecialToken", t, 1) for t in pre] + [piece("Sequence", "B", 1)]
        pair += [piece("SpecialToken", t, 1) for t in post]
        names = {**self.special_tokens, **self.added_tokens}
        return {"type": "TemplateProcessing", "single": single, "pair": pair,
                "special_tokens": {t: {"id": t, "ids": [names[t]], "tokens": [t]} for t in {*pre, *post}}}

    def to_hf_config(self) -> dict[str, Any]:
        """The `tokenizer_config.json` that lets transformers' AutoTokenizer load the directory."""
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            # what the post-processor in tokenizer.json does, spelled out for readers that rebuild it from these
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "clean_up_tokenization_spaces": False,
        }
        if self.unk_token:
            config["unk_token"] = self.unk_token
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        elif self._has_lmlab_chat_tokens():
            # lmlab's own format, spelled as jinja so that transformers' apply_chat_template renders
            # it too; lmlab recognizes the exact string on loading and renders it natively
            from .chat import LMLAB_CHAT_TEMPLATE

            config["chat_template"] = LMLAB_CHAT_TEMPLATE
        extra = [t for t in self.eos_tokens if t != self.eos_token]
        if extra:
            config["lmlab_eos_tokens"] = extra
        return config

    def _has_lmlab_chat_tokens(self) -> bool:
        from .chat import BOS, END, ROLE_TOKENS

        return all(t in self.special_tokens for t in (BOS, END, *ROLE_TOKENS.values()))

    def write_files(self, directory: str | Path) -> list[Path]:
        """Write tokenizer.json and tokenizer_config.json into an existing directory, each file
        atomically (for callers that write a checkpoint in their own transaction)."""
        directory = Path(directory)
        paths = []
        for name, content in ((TOKENIZER_FILE, self.to_hf_json()), (TOKENIZER_CONFIG_FILE, self.to_hf_config())):
            with atomic_file(directory / name, "w") as f:
                json.dump(content, f, ensure_ascii=False, indent=2)
            paths.append(directory / name)
        return paths

    def save(self, directory: str | Path, overwrite: bool = False) -> None:
        """Write `directory` (tokenizer.json + tokenizer_config.json) atomically; an existing
        non-empty directory is refused unless overwrite=True."""
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            self.write_files(tmp)

    @classmethod
    def from_hf_json(cls, directory_or_file: str | Path) -> Tokenizer:
        """Read a byte-level BPE `tokenizer.json` (GPT-2, Llama 3, Qwen2 style) and, beside it,
        tokenizer_config.json (bos/eos/pad names, chat template) and generation_config.json
        (eos ids that end generation, first). Components lmlab cannot reproduce exactly raise a
        ValueError naming them; ids follow HF's merge-list semantics (see the module docstring)."""
        path = Path(directory_or_file)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found: expected a tokenizer.json file or a directory holding one")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON ({e}); re-save or re-download it") from None
        config = _read_json(file.parent / TOKENIZER_CONFIG_FILE)
        generation = _read_json(file.parent / GENERATION_CONFIG_FILE)
        name = file.parent.name if path.is_dir() or file.name == TOKENIZER_FILE else file.stem
        return cls(**_parse_hf_json(data, config, generation, file), name=name)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or remove it") from None
    return data if isinstance(data, dict) else {}


# --- tokenizer.json parsing -------------------------------------------------------------------

def _unsupported(file: Path, component: str, detail: Any, hint: str = "") -> ValueError:
    hint = hint or "lmlab reads byte-level BPE files (GPT-2, Llama 3, Qwen2 style)"
    return ValueError(f"{file}: unsupported {component} {json.dumps(detail)[:200]}; {hint}")


def _is_sentencepiece_style(data: dict[str, Any]) -> bool:
    text = json.dumps({k: data.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")})
    model = data.get("model") or {}
    return bool(model.get("byte_fallback")) or model.get("type") == "Unigram" or any(
        key in text for key in ("Metaspace", "ByteFallback", "\\u2581", "\u2581"))


def _parse_pre_tokenizer(pre: Any, file: Path) -> str:
    """The split regex of a ByteLevel pre-tokenizer (GPT-2's regex) or of Split + ByteLevel."""
    from .bpe import GPT2_PATTERN

    def byte_level(p: dict[str, Any], use_regex: bool) -> None:
        if p.get("add_prefix_space"):
            raise _unsupported(file, "pre_tokenizer", p, "ByteLevel(add_prefix_space=True) is not supported")
        if bool(p.get("use_regex", True)) != use_regex:
            raise _unsupported(file, "pre_tokenizer", p)

    if not isinstance(pre, dict):
        raise _unsupported(file, "pre_tokenizer", pre)
    if pre.get("type") == "ByteLevel":
        byte_level(pre, use_regex=True)
        return GPT2_PATTERN
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        if len(steps) == 1 and steps[0].get("type") == "ByteLevel":
            return _parse_pre_tokenizer(steps[0], file)
        if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel":
            split = steps[0]
            if split.get("behavior") != "Isolated" or split.get("invert"):
                raise _unsupported(file, "Split pre-tokenizer", split, "only behavior 'Isolated', invert false")
            pattern = split.get("pattern") or {}
            byte_level(steps[1], use_regex=False)
            if "Regex" in pattern:
                return pattern["Regex"]
            if "String" in pattern:
                return regex.escape(pattern["String"])
            raise _unsupported(file, "Split pattern", pattern)
    raise _unsupported(file, "pre_tokenizer", pre)


def _parse_normalizer(norm: Any, file: Path) -> str | None:
    if norm is None:
        return None
    if norm.get("type") == "Sequence":
        forms = [_parse_normalizer(n, file) for n in norm.get("normalizers") or []]
        forms = [f for f in forms if f]
        if len(forms) > 1:
            raise _unsupported(file, "normalizer", norm, "at most one Unicode normal form is supported")
        return forms[0] if forms else None
    if norm.get("type") in NORMALIZATIONS:
        return norm["type"]
    raise _unsupported(file, "normalizer", norm)


def _parse_post_processor(post: Any, named: dict[str, int], file: Path) -> tuple[str | None, str | None]:
    """(token added before, token added after) by a TemplateProcessing post-processor."""
    if post is None or post.get("type") == "ByteLevel":  # ByteLevel only trims offsets
        return None, None
    if post.get("type") == "Sequence":
        found = [_parse_post_processor(p, named, file) for p in post.get("processors") or []]
        found = [f for f in found if f != (None, None)]
        if len(found) > 1:
            raise _unsupported(file, "post_processor", post, "only one TemplateProcessing is supported")
        return found[0] if found else (None, None)
    if post.get("type") != "TemplateProcessing":
        raise _unsupported(file, "post_processor", post)
    single = post.get("single") or []
    kinds = [next(iter(p)) for p in single]
    if kinds.count("Sequence") != 1:
        raise _unsupported(file, "TemplateProcessing", single)
    at = kinds.index("Sequence")
    before = [p["SpecialToken"]["id"] for p in single[:at]]
    after = [p["SpecialToken"]["id"] for p in single[at + 1 :]]
    if len(before) > 1 or len(after) > 1:
        raise _unsupported(file, "TemplateProcessing", single, "at most one token before and one after $A")
    for token in before + after:
        spec = (post.get("special_tokens") or {}).get(token, {})
        if token not in named or spec.get("ids", [named.get(token)]) != [named.get(token)]:
            raise _unsupported(file, "TemplateProcessing token", token, "it must be an added token with one id")
    return (before[0] if before else None), (after[0] if after else None)


def _token_name(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _parse_hf_json(data: dict[str, Any], config: dict[str, Any], generation: dict[str, Any], file: Path) -> dict:
    """Constructor arguments of `Tokenizer` for a byte-level BPE tokenizer.json."""
    model = data.get("model") or {}
    if _is_sentencepiece_style(data):
        raise ValueError(f"{file} is a sentencepiece-style tokenizer (Metaspace / byte fallback); {_LOAD_HINT}")
    if model.get("type") != "BPE":
        raise _unsupported(file, "model type", model.get("type"), "lmlab reads byte-level BPE models here")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise _unsupported(file, f"BPE option {key}", model[key])
    if model.get("dropout"):
        raise _unsupported(file, "BPE dropout", model["dropout"], "dropout is for training; remove it to encode")
    decoder = data.get("decoder")
    if not (isinstance(decoder, dict) and decoder.get("type") == "ByteLevel"):
        raise _unsupported(file, "decoder", decoder, "a byte-level BPE file has a ByteLevel decoder")

    special: dict[str, int] = {}
    added: dict[str, int] = {}
    for tok in data.get("added_tokens") or []:
        for flag in ("lstrip", "rstrip", "single_word"):
            if tok.get(flag):
                raise _unsupported(file, f"added token option {flag}", tok)
        (special if tok.get("special") else added)[tok["content"]] = tok["id"]
    named = {**special, **added}
    named_ids = {i: t for t, i in named.items()}

    ranks: dict[bytes, int] = {}
    vocab = model.get("vocab") or {}
    for text, i in vocab.items():
        if i in named_ids:  # an added token also listed in the vocabulary (GPT-2's <|endoftext|>)
            if named_ids[i] != text:
                raise _unsupported(file, "vocabulary entry", {text: i}, f"id {i} is also added token {named_ids[i]!r}")
            continue
        raw = chars_to_bytes(text)
        if raw is None:
            raise _unsupported(file, "vocabulary entry", text, "it is not in the byte-level alphabet")
        ranks[raw] = i
    merges = []
    for m in model.get("merges") or []:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        pa, pb = chars_to_bytes(a), chars_to_bytes(b)
        if pa is None or pb is None or pa not in ranks or pb not in ranks or pa + pb not in ranks:
            raise _unsupported(file, "merge", m, "both parts and their concatenation must be in the vocabulary")
        merges.append((pa, pb))

    bos_pre, eos_post = _parse_post_processor(data.get("post_processor"), named, file)
    bos = _token_name(config.get("bos_token"))
    eos = _token_name(config.get("eos_token"))
    if bos_pre is not None and bos not in (None, bos_pre):
        raise _unsupported(file, "post_processor", bos_pre, f"it adds {bos_pre!r} but bos_token is {bos!r}")
    if eos_post is not None and eos not in (None, eos_post):
        raise _unsupported(file, "post_processor", eos_post, f"it adds {eos_post!r} but eos_token is {eos!r}")
    bos, eos = bos or bos_pre, eos or eos_post
    pad = _token_name(config.get("pad_token"))
    unk = model.get("unk_token")

    eos_tokens = []
    gen_eos = generation.get("eos_token_id")
    for i in [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or []):
        if i in named_ids:
            eos_tokens.append(named_ids[i])
        else:
            warnings.warn(f"{file.parent / GENERATION_CONFIG_FILE}: eos_token_id {i} is not an added token; "
                          "it is not used to stop generation", stacklevel=4)
    eos_tokens += [t for t in config.get("lmlab_eos_tokens") or [] if t in named]

    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)

    def known(token: str | None) -> str | None:
        if token is not None and token not in named:
            warnings.warn(f"{file}: tokenizer_config.json names {token!r}, which is not an added token of "
                          "tokenizer.json; it is ignored", stacklevel=4)
            return None
        return token

    return dict(
        mergeable_ranks=ranks,
        pattern=_parse_pre_tokenizer(data.get("pre_tokenizer"), file),
        special_tokens=special,
        added_tokens=added,
        bos_token=known(bos),
        eos_token=known(eos),
        pad_token=known(pad),
        unk_token=unk if unk in named else None,  # only used where a byte has no token
        eos_tokens=eos_tokens,
        chat_template=template,
        add_bos=bos_pre is not None,
        add_eos=eos_post is not None,
        normalization=_parse_normalizer(data.get("normalizer"), file),
        merges=merges,
        ignore_merges=bool(model.get("ignore_merges")),
    )
