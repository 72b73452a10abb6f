"""SentencePiece BPE tokenizers (Llama 2, Mistral, Gemma, Phi-3), read and run without the sentencepiece package.

Sennrich et al. (2016) BPE as sentencepiece (Kudo & Richardson, 2018) runs it: text is a sequence of characters in
which every space is written "▁" (so that decoding is lossless and a word's leading space belongs to the word), and
a "dummy prefix" "▁" is put in front of the text so that "world" and "hello world" both contain "▁world". Encoding
splits the text into characters (user-defined pieces such as Gemma's <start_of_turn> stay whole), then repeatedly
merges the adjacent pair whose concatenation is the best-ranked piece, leftmost first on ties, until no pair
merges. A piece that is not in the vocabulary falls back to its UTF-8 bytes (pieces <0x00>..<0xFF>) when the model
has byte fallback, else to the unknown piece (consecutive unknown pieces fuse into one).

Two files describe such a tokenizer, and they rank merges and place the dummy prefix differently, so both are read:

- a sentencepiece `.model` file: a protobuf `ModelProto` {pieces {piece, score, type}, trainer_spec,
  normalizer_spec}. A pair merges when its concatenation is a piece; the higher the piece's score, the earlier.
  The dummy prefix goes in front of the whole text, even a text that starts with a space.
- a sentencepiece-style `tokenizer.json` (Hugging Face tokenizers): the same pieces, plus an explicit ranked list
  of merges, added tokens matched before anything else, and the "▁" rules spelled as a normalizer (Prepend +
  Replace: a prefix on every piece of text between added tokens) or a Metaspace pre-tokenizer (a prefix only at
  the very start of the input, and only when the text does not already start with a space).

`TextRules` holds those choices, so one encoder serves both and matches each reference exactly: the
`sentencepiece` package for `.model` files, the `tokenizers` library for `tokenizer.json`.

Why by hand: the sentencepiece package is a compiled extension that lmlab does not need at run time; the protobuf
format is small enough for a 40-line wire-format reader, and the merge loop is the point of the module. Only BPE
models with identity normalization are supported (Llama 2, Mistral, Gemma and Phi-3 use it); unigram models and
the NFKC normalizers (a precompiled character map) raise an error that says so.
"""

from __future__ import annotations

import heapq
import json
import re
import struct
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum
from pathlib import Path
from typing import Any

from ..atomic import atomic_directory, atomic_file

__all__ = [
    "AddedToken",
    "Piece",
    "PieceType",
    "SentencePieceError",
    "SentencePieceTokenizer",
    "TextRules",
    "is_sentencepiece_json",
    "read_model_proto",
    "write_model_proto",
]

SPACE = "\u2581"  # "▁", the visible space sentencepiece writes for " "
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
MODEL_FILE = "tokenizer.model"
JSON_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
_CACHE_LIMIT = 200_000  # per-chunk results kept; cleared when full, which keeps memory bounded


class SentencePieceError(ValueError):
    """A sentencepiece model (or a sentencepiece-style tokenizer.json) that cannot be read or is not supported."""


class PieceType(IntEnum):
    """`ModelProto.SentencePiece.Type`, as numbered in sentencepiece_model.proto."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


@dataclass(frozen=True)
class Piece:
    """One vocabulary entry: its text (spaces written "▁"), its score (higher merges earlier) and its type."""

    text: str
    score: float = 0.0
    type: PieceType = PieceType.NORMAL


@dataclass(frozen=True)
class AddedToken:
    """A token matched in the raw text before BPE runs.

    special: gated by `allowed_special` and dropped by `decode(skip_special_tokens=True)` (control tokens such as
      <s>); a non-special added token is always matched (Gemma's <start_of_turn>, HF "added tokens").
    lstrip / rstrip: the match also swallows the whitespace on its left / right (Phi-3's chat tokens).
    inline: matched inside the normalized text instead of split off before normalization, as sentencepiece does
      with user-defined pieces (and HF with "normalized" added tokens); it then never gets a dummy prefix of its
      own, but may follow one. Inline tokens take no lstrip / rstrip.
    """

    content: str
    id: int
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    inline: bool = False


@dataclass(frozen=True)
class TextRules:
    """How a piece of text (between added tokens) becomes the symbol string that BPE runs on, and back.

    dummy_prefix: which text segments get a leading "▁": "none", "first" (only a segment at the very start of the
      input) or "every" (every segment between added tokens).
    prefix_on_space: also when the segment already starts with a space (sentencepiece and HF's Prepend normalizer
      do; HF's Metaspace pre-tokenizer does not).
    remove_extra_whitespaces: drop leading and trailing spaces and collapse runs of spaces (sentencepiece option).
    escape_whitespaces: write " " as "▁" (always on in practice).
    split_on_space: BPE runs on each "▁"-started word separately (HF Metaspace with split=true).
    decode_bytes: decoding turns <0xAB> pieces into bytes (HF: a ByteFallback decoder; sentencepiece: always).
    strip_decoded_prefix: decoding drops one leading space (the dummy prefix).
    """

    dummy_prefix: str = "first"
    prefix_on_space: bool = True
    remove_extra_whitespaces: bool = False
    escape_whitespaces: bool = True
    split_on_space: bool = False
    decode_bytes: bool = True
    strip_decoded_prefix: bool = True

    def __post_init__(self):
        if self.dummy_prefix not in ("none", "first", "every"):
            raise ValueError(f"dummy_prefix must be 'none', 'first' or 'every', got {self.dummy_prefix!r}")

    @property
    def space(self) -> str:
        return SPACE if self.escape_whitespaces else " "


# --- protobuf wire format -------------------------------------------------------------------
# A message is a sequence of (key, value); key = field_number << 3 | wire_type. Wire types: 0 varint, 1 fixed 64
# bits, 2 length-delimited (strings, bytes, sub-messages), 5 fixed 32 bits (float). Fields absent from the file
# take the .proto default, so the readers below start from those defaults.
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise SentencePieceError("truncated protobuf varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise SentencePieceError("protobuf varint longer than 10 bytes")


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, raw value) for each field of a serialized message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise SentencePieceError("protobuf field number 0 is invalid")
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise SentencePieceError(f"protobuf wire type {wire} (field {number}) is not used by sentencepiece")
        if pos > len(buf):
            raise SentencePieceError(f"truncated protobuf field {number}")
        yield number, wire, value


def _int32(v: int) -> int:  # negative int32 values are written as 10-byte two's complement varints
    return v - (1 << 64) if v >= 1 << 63 else v


def _text(v: bytes, what: str) -> str:
    try:
        return v.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SentencePieceError(f"{what} is not valid UTF-8 ({e})") from e


def _expect(wire: int, expected: int, what: str) -> None:
    if wire != expected:
        raise SentencePieceError(f"{what} has protobuf wire type {wire}, expected {expected}")


# field numbers of sentencepiece_model.proto, with the defaults it declares
_TRAINER_INTS = {3: ("model_type", 1), 40: ("unk_id", 0), 41: ("bos_id", 1), 42: ("eos_id", 2), 43: ("pad_id", -1)}
_TRAINER_BOOLS = {24: ("treat_whitespace_as_suffix", False), 35: ("byte_fallback", False)}
_TRAINER_STRINGS = {45: ("unk_piece", "<unk>"), 46: ("bos_piece", "<s>"), 47: ("eos_piece", "</s>"),
                    48: ("pad_piece", "<pad>")}
_NORMALIZER_BOOLS = {3: ("add_dummy_prefix", True), 4: ("remove_extra_whitespaces", True),
                     5: ("escape_whitespaces", True)}
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


@dataclass
class ModelProto:
    """The parts of a sentencepiece `ModelProto` that encoding needs (other fields are skipped on reading)."""

    pieces: list[Piece]
    trainer: dict[str, Any] = field(default_factory=dict)
    normalizer: dict[str, Any] = field(default_factory=dict)
    denormalizer: dict[str, Any] | None = None


def _read_piece(buf: bytes) -> Piece:
    text, score, kind = "", 0.0, PieceType.NORMAL
    for number, wire, value in _fields(buf):
        if number == 1:
            _expect(wire, 2, "piece text")
            text = _text(value, "a piece")
        elif number == 2:
            _expect(wire, 5, "piece score")
            (score,) = struct.unpack("<f", value)
        elif number == 3:
            _expect(wire, 0, "piece type")
            try:
                kind = PieceType(value)
            except ValueError:
                raise SentencePieceError(f"piece {text!r} has unknown type {value}") from None
    return Piece(text, score, kind)


def _read_spec(buf: bytes, ints: dict, bools: dict, strings: dict, what: str) -> dict[str, Any]:
    spec = {name: default for name, default in (*ints.values(), *bools.values(), *strings.values())}
    for number, wire, value in _fields(buf):
        if number in ints:
            _expect(wire, 0, f"{what}.{ints[number][0]}")
            spec[ints[number][0]] = _int32(value)
        elif number in bools:
            _expect(wire, 0, f"{what}.{bools[number][0]}")
            spec[bools[number][0]] = bool(value)
        elif number in strings:
            _expect(wire, 2, f"{what}.{strings[number][0]}")
            spec[strings[number][0]] = _text(value, f"{what}.{strings[number][0]}")
    return spec


def _read_normalizer(buf: bytes) -> dict[str, Any]:
    spec = _read_spec(buf, {}, _NORMALIZER_BOOLS, {1: ("name", "")}, "normalizer_spec")
    spec["precompiled_charsmap"] = b""
    spec["normalization_rule_tsv"] = ""
    for number, wire, value in _fields(buf):
        if number == 2:
            _expect(wire, 2, "normalizer_spec.precompiled_charsmap")
            spec["precompiled_charsmap"] = bytes(value)
        elif number == 6:
            _expect(wire, 2, "normalizer_spec.normalization_rule_tsv")
            spec["normalization_rule_tsv"] = _text(value, "normalization_rule_tsv")
    return spec


def read_model_proto(data: bytes) -> ModelProto:
    """Parse a serialized sentencepiece `ModelProto` (the content of a `.model` file)."""
    pieces: list[Piece] = []
    trainer = _read_spec(b"", _TRAINER_INTS, _TRAINER_BOOLS, _TRAINER_STRINGS, "trainer_spec")
    normalizer = _read_normalizer(b"")
    denormalizer = None
    for number, wire, value in _fields(data):
        if number == 1:
            _expect(wire, 2, "pieces")
            pieces.append(_read_piece(value))
        elif number == 2:
            _expect(wire, 2, "trainer_spec")
            trainer = _read_spec(value, _TRAINER_INTS, _TRAINER_BOOLS, _TRAINER_STRINGS, "trainer_spec")
        elif number == 3:
            _expect(wire, 2, "normalizer_spec")
            normalizer = _read_normalizer(value)
        elif number == 5:
            _expect(wire, 2, "denormalizer_spec")
            denormalizer = _read_normalizer(value)
    if not pieces:
        raise SentencePieceError("no pieces: this is not a sentencepiece model (or it is empty)")
    return ModelProto(pieces, trainer, normalizer, denormalizer)


def _key(number: int, wire: int) -> bytes:
    return _encode_varint(number << 3 | wire)


def _encode_varint(v: int) -> bytes:
    if v < 0:
        v += 1 << 64
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _encode_varint(len(payload)) + payload


def write_model_proto(proto: ModelProto) -> bytes:
    """Serialize `proto` (pieces, the trainer and normalizer fields lmlab reads) as a `.model` file."""
    out = bytearray()
    for p in proto.pieces:
        body = _len_field(1, p.text.encode("utf-8")) + _key(2, 5) + struct.pack("<f", p.score)
        body += _key(3, 0) + _encode_varint(int(p.type))
        out += _len_field(1, body)

    def spec(values: dict[str, Any], ints: dict, bools: dict, strings: dict) -> bytes:
        body = b""
        for number, (name, _) in sorted({**ints, **bools, **strings}.items()):
            if name not in values:
                continue
            v = values[name]
            if isinstance(v, str):
                body += _len_field(number, v.encode("utf-8"))
            else:
                body += _key(number, 0) + _encode_varint(int(v))
        return body

    out += _len_field(2, spec(proto.trainer, _TRAINER_INTS, _TRAINER_BOOLS, _TRAINER_STRINGS))
    normalizer = spec(proto.normalizer, {}, _NORMALIZER_BOOLS, {1: ("name", "")})
    out += _len_field(3, normalizer)
    return bytes(out)


# --- the tokenizer --------------------------------------------------------------------------
class SentencePieceTokenizer:
    """A sentencepiece BPE tokenizer with lmlab's tokenizer interface (encode, decode, special tokens, chat).

    Build it with `from_model_file` (a `.model` file), `from_hf_json` (a sentencepiece-style tokenizer.json), or
    directly: `pieces` is the vocabulary in id order; `merges` (ranked pairs) selects HF tokenizers' merge order,
    None selects sentencepiece's score order. `added_tokens` are matched before BPE (see `AddedToken`).
    """

    def __init__(
        self,
        pieces: Sequence[Piece],
        *,
        merges: Sequence[tuple[str, str]] | None = None,
        added_tokens: Iterable[AddedToken] = (),
        rules: TextRules = TextRules(),
        byte_fallback: bool = True,
        fuse_unk: bool = True,
        ignore_merges: bool = False,
        name: str = "",
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        eos_tokens: Sequence[str] | None = None,
        chat_template: str | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
    ):
        self.pieces = list(pieces)
        self.merges = None if merges is None else [tuple(m) for m in merges]
        self.rules = rules
        self.byte_fallback = byte_fallback
        self.fuse_unk = fuse_unk
        self.ignore_merges = ignore_merges
        self.name = name
        self.chat_template = chat_template
        self.add_bos, self.add_eos = add_bos, add_eos
        self._index_pieces()
        self.added_tokens = self._check_added(list(added_tokens))
        self.special_tokens = {t.content: t.id for t in self.added_tokens if t.special}
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.eos_tokens = list(eos_tokens) if eos_tokens is not None else None
        self._setup_matching()
        for tok in (bos_token, eos_token, pad_token, *(self.eos_tokens or ())):
            if tok is not None and self.token_to_id(tok) is None:
                raise SentencePieceError(f"special token {tok!r} is not in the vocabulary")
        for flag, role in ((add_bos, "bos_token"), (add_eos, "eos_token")):
            if flag and getattr(self, role) is None:
                raise SentencePieceError(f"add_{role[:3]}=True needs a {role}")

    # -- construction helpers
    def _index_pieces(self) -> None:
        self.vocab: dict[str, int] = {}
        for i, p in enumerate(self.pieces):
            if not p.text:
                raise SentencePieceError(f"piece {i} is empty")
            if p.text in self.vocab:
                raise SentencePieceError(f"piece {p.text!r} is defined twice (ids {self.vocab[p.text]} and {i})")
            self.vocab[p.text] = i
        unk = [i for i, p in enumerate(self.pieces) if p.type == PieceType.UNKNOWN]
        if len(unk) > 1:
            raise SentencePieceError(f"several unknown pieces (ids {unk}); a model has one")
        self.unk_id = unk[0] if unk else None
        self._byte_id: dict[int, int] = {}  # byte value -> id of its <0xAB> piece
        self._id_byte: dict[int, int] = {}
        for i, p in enumerate(self.pieces):
            m = _BYTE_PIECE.fullmatch(p.text)
            if m and (p.type == PieceType.BYTE or self.merges is not None):
                self._byte_id[int(m.group(1), 16)] = i
                self._id_byte[i] = int(m.group(1), 16)
        if self.byte_fallback and self.merges is None and len(self._byte_id) != 256:
            raise SentencePieceError(
                f"byte fallback is on but only {len(self._byte_id)} of the 256 byte pieces <0x00>..<0xFF> exist"
            )
        if not self.byte_fallback and self.unk_id is None:
            raise SentencePieceError("the model has neither byte fallback nor an unknown piece")
        if self.merges is None:  # sentencepiece: a pair merges when the concatenation is one of these pieces
            mergeable = (PieceType.NORMAL, PieceType.USER_DEFINED, PieceType.UNUSED)
            self._merge_score = {p.text: p.score for p in self.pieces if p.type in mergeable}
            self._unused = {p.text for p in self.pieces if p.type == PieceType.UNUSED}
            merge_targets: Iterable[str] = self._merge_score
        else:
            self._ranks: dict[tuple[str, str], int] = {}
            for rank, (a, b) in enumerate(self.merges):
                if a + b not in self.vocab:
                    raise SentencePieceError(f"merge {a!r} + {b!r} makes {a + b!r}, which is not in the vocabulary")
                self._ranks.setdefault((a, b), rank)
            self._unused = set()
            merge_targets = self.vocab
        # Chunking the text at word starts (a "▁" after another character) gives the same result as one BPE over
        # the whole text when no piece crosses such a point (no piece has "▁" after another character), and lets
        # each word's result be cached. Vocabularies with such pieces run BPE over whole text segments.
        space = self.rules.space
        self._word_split = None
        if not any(re.search(f"[^{space}]{space}", t) for t in merge_targets):
            self._word_split = re.compile(f"(?<=[^{space}])(?={space})")

    def _check_added(self, added: list[AddedToken]) -> list[AddedToken]:
        for t in added:
            if t.id < 0:
                raise SentencePieceError(f"added token {t.content!r} has invalid id {t.id}")
            if t.id < len(self.pieces) and self.pieces[t.id].text != t.content:
                raise SentencePieceError(
                    f"added token {t.content!r} has id {t.id}, which is the piece {self.pieces[t.id].text!r}"
                )
            if t.inline and (t.lstrip or t.rstrip):
                raise SentencePieceError(f"inline added token {t.content!r} cannot strip whitespace")
        for attr in ("id", "content"):
            values = [getattr(t, attr) for t in added]
            if len(set(values)) != len(values):
                raise SentencePieceError(f"two added tokens share a{'n' if attr == 'id' else ''} {attr}")
        return sorted(added, key=lambda t: t.id)

    def _setup_matching(self) -> None:
        self._added_by_id = {t.id: t for t in self.added_tokens}
        self._added_by_text = {t.content: t for t in self.added_tokens}
        self.vocab_size = max([len(self.pieces), *(t.id + 1 for t in self.added_tokens)])
        if any(re.search(f"[^{self.rules.space}]{self.rules.space}", self._inline_text(t))
               for t in self.added_tokens if t.inline):
            self._word_split = None  # see _index_pieces
        self._split_cache: dict[frozenset[str], _Matchers] = {}
        self._cache: dict[tuple[str, frozenset[str]], tuple[tuple[int, int, int], ...]] = {}

    def _inline_text(self, token: AddedToken) -> str:
        """How an inline token appears in the normalized text. sentencepiece looks for user-defined pieces as
        they are written (so one holding a space never matches); HF normalizes a "normalized" added token like
        the input, Prepend normalizer included (so at the start of a segment it takes the dummy prefix along)."""
        if self.merges is None:
            return token.content
        r = self.rules
        prefix = r.space if r.dummy_prefix == "every" and r.prefix_on_space else ""
        return prefix + token.content.replace(" ", r.space)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = {}
        state["_split_cache"] = {}
        return state

    # -- constructors
    @classmethod
    def from_model_proto(cls, proto: ModelProto, **kwargs) -> SentencePieceTokenizer:
        """A tokenizer that encodes exactly as sentencepiece does with this model."""
        trainer, norm = proto.trainer, proto.normalizer
        model_type = trainer["model_type"]
        if model_type != 2:
            kind = MODEL_TYPES.get(model_type, f"type {model_type}")
            raise SentencePieceError(
                f"this is a sentencepiece {kind} model; lmlab reads BPE models only (Llama 2, Mistral, Gemma, "
                "Phi-3). Load it with the sentencepiece package, or use its tokenizer.json if the checkpoint has one"
            )
        for spec, what in ((norm, "normalizer"), (proto.denormalizer, "denormalizer")):
            if spec and (spec["precompiled_charsmap"] or spec["normalization_rule_tsv"]):
                raise SentencePieceError(
                    f"the model's {what} is {spec['name'] or 'custom'!r} (a character map); lmlab supports the "
                    "identity normalization that Llama 2, Mistral and Gemma use"
                )
        if trainer["treat_whitespace_as_suffix"]:
            raise SentencePieceError("treat_whitespace_as_suffix models (a '▁' after each word) are not supported")
        rules = TextRules(
            dummy_prefix="first" if norm["add_dummy_prefix"] else "none",
            prefix_on_space=True,
            remove_extra_whitespaces=norm["remove_extra_whitespaces"],
            escape_whitespaces=norm["escape_whitespaces"],
            strip_decoded_prefix=norm["add_dummy_prefix"] or norm["remove_extra_whitespaces"],
        )
        added = []
        for i, p in enumerate(proto.pieces):
            if p.type in (PieceType.CONTROL, PieceType.UNKNOWN):
                added.append(AddedToken(p.text, i, special=True))
            elif p.type == PieceType.USER_DEFINED:
                added.append(AddedToken(p.text, i, special=False, inline=True))
        names = {p.text: p.type for p in proto.pieces}

        def named(key: str, id_key: str) -> str | None:
            piece = trainer[key]
            return piece if trainer[id_key] >= 0 and piece in names else None

        defaults = dict(
            bos_token=named("bos_piece", "bos_id"),
            eos_token=named("eos_piece", "eos_id"),
            pad_token=named("pad_piece", "pad_id"),
        )
        defaults["add_bos"] = defaults["bos_token"] is not None  # sentencepiece models are trained with a bos
        return cls(
            proto.pieces, added_tokens=added, rules=rules, byte_fallback=trainer["byte_fallback"],
            fuse_unk=True, **{**defaults, **kwargs},
        )

    @classmethod
    def from_model_file(cls, path: str | Path, **kwargs) -> SentencePieceTokenizer:
        """Read a sentencepiece `.model` file (protobuf)."""
        path = Path(path)
        try:
            proto = read_model_proto(path.read_bytes())
        except SentencePieceError as e:
            raise SentencePieceError(f"{path} is not a readable sentencepiece model: {e}") from None
        kwargs.setdefault("name", path.parent.name)
        return cls.from_model_proto(proto, **kwargs)

    @classmethod
    def from_hf_json(cls, source: str | Path | dict, **kwargs) -> SentencePieceTokenizer:
        """Read a sentencepiece-style tokenizer.json (BPE with "▁" and byte fallback), as Llama 2, Mistral, Gemma
        and Phi-3 checkpoints ship it. `source` is the file or its parsed JSON."""
        where = "tokenizer.json" if isinstance(source, dict) else str(source)
        data = source if isinstance(source, dict) else json.loads(Path(source).read_text(encoding="utf-8"))
        if not isinstance(source, dict):
            kwargs.setdefault("name", Path(source).parent.name)
        return _from_hf_dict(cls, data, where, kwargs)

    # -- the interface shared by lmlab tokenizers
    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return None if self.pad_token is None else self.token_to_id(self.pad_token)

    @property
    def unk_token(self) -> str | None:
        return None if self.unk_id is None else self.pieces[self.unk_id].text

    @property
    def eos_ids(self) -> list[int]:
        """Ids that end generation: eos_token, then `eos_tokens` (e.g. an end-of-turn token)."""
        names = [*([self.eos_token] if self.eos_token else []), *(self.eos_tokens or ())]
        return list(dict.fromkeys(self.token_to_id(t) for t in names))

    def token_to_id(self, token: str) -> int | None:
        added = self._added_by_text.get(token)
        return added.id if added is not None else self.vocab.get(token)

    def id_to_token(self, id: int) -> str:
        """The piece or added token of `id`, as HF writes it (an inline added token: as it appears in the
        normalized text)."""
        self._check_id(id)
        added = self._added_by_id.get(id)
        if added is None:
            return self.pieces[id].text
        return self._inline_text(added) if added.inline else added.content

    def token_bytes(self, id: int) -> bytes:
        """The raw bytes of one token: a byte piece's byte, else its text with "▁" read as a space."""
        self._check_id(id)
        added = self._added_by_id.get(id)
        if added is not None and added.special and not added.inline:
            return added.content.encode("utf-8")
        if self.rules.decode_bytes and id in self._id_byte:
            return bytes([self._id_byte[id]])
        return self.id_to_token(id).replace(SPACE, " ").encode("utf-8")

    def _check_id(self, id: int) -> None:
        if not 0 <= id < self.vocab_size or (id >= len(self.pieces) and id not in self._added_by_id):
            raise ValueError(f"token id {id} is outside the vocabulary (size {self.vocab_size})")

    def encode(
        self,
        text: str,
        *,
        add_special_tokens: bool = False,
        allowed_special: str | Collection[str] = (),
    ) -> list[int]:
        """Token ids of `text`. Special-token text (<s>, ...) becomes its id only when named in `allowed_special`
        ("all" for every one), as ordinary text otherwise; non-special added tokens always match.
        add_special_tokens=True adds bos / eos as the tokenizer's add_bos / add_eos say."""
        ids = [t for t, _, _ in self._encode(text, allowed_special)]
        if add_special_tokens:
            ids = self._with_bos_eos(ids)
        return ids

    def encode_batch(self, texts: Sequence[str], **kwargs) -> list[list[int]]:
        return [self.encode(t, **kwargs) for t in texts]

    def encode_with_offsets(
        self, text: str, *, allowed_special: str | Collection[str] = ()
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids and, for each token, the (start, end) character span of `text` it came from. A dummy-prefix
        "▁" alone spans nothing (start == end); byte-fallback tokens all span their character."""
        triples = self._encode(text, allowed_special)
        return [t for t, _, _ in triples], [(a, b) for _, a, b in triples]

    def _with_bos_eos(self, ids: list[int]) -> list[int]:
        return [*([self.bos_id] if self.add_bos else []), *ids, *([self.eos_id] if self.add_eos else [])]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False, errors: str = "replace") -> str:
        """Text of `ids`: "▁" read as a space, runs of byte pieces decoded as UTF-8 (`errors` as in
        bytes.decode), special tokens shown unless skipped, and the dummy prefix's space dropped: from the whole
        text for tokenizer.json (HF's Strip decoder), as sentencepiece does for .model files (from the first piece
        that shows anything; with remove_extra_whitespaces, from each leading piece)."""
        out: list[str] = []
        pending = bytearray()
        at_start = self.rules.strip_decoded_prefix and self.merges is None  # sentencepiece's rule
        for id in ids:
            id = int(id)
            self._check_id(id)
            if self.rules.decode_bytes and id in self._id_byte:
                pending.append(self._id_byte[id])
                continue
            if pending:
                out.append(pending.decode("utf-8", errors))
                pending.clear()
            added = self._added_by_id.get(id)
            if added is not None and added.special and not added.inline:  # HF never skips inline ones
                if not skip_special_tokens:
                    out.append(added.content)
                    at_start = False
                continue
            piece = self.id_to_token(id)
            if at_start and piece.startswith(SPACE):
                piece = piece[1:]
                at_start = self.rules.remove_extra_whitespaces and not piece
            at_start = at_start and not piece
            out.append(piece.replace(SPACE, " "))
        if pending:
            out.append(pending.decode("utf-8", errors))
        text = "".join(out)
        if self.rules.strip_decoded_prefix and self.merges is not None and text.startswith(" "):
            text = text[1:]
        return text

    def write_files(self, directory: str | Path) -> list[Path]:
        """Write the tokenizer files into an existing directory, each atomically: `tokenizer.model` for a
        score-ranked (sentencepiece) tokenizer, `tokenizer.json` for a merge-ranked one, and
        `tokenizer_config.json` (special tokens, add_bos / add_eos, chat template). For callers that write a
        checkpoint in their own transaction; `loading.load_tokenizer(directory)` reads them back."""
        directory = Path(directory)
        main_file = MODEL_FILE if self.merges is None else JSON_FILE
        payload = self._model_bytes() if self.merges is None else self._hf_json().encode("utf-8")
        with atomic_file(directory / main_file, "wb") as f:
            f.write(payload)
        with atomic_file(directory / CONFIG_FILE, "w") as f:
            json.dump(self._hf_config(), f, indent=2, ensure_ascii=False)
        return [directory / main_file, directory / CONFIG_FILE]

    def save(self, directory: str | Path, overwrite: bool = False) -> None:
        """Write `directory` (see `write_files`) atomically; an existing non-empty directory is refused unless
        overwrite=True."""
        with atomic_directory(directory, overwrite=overwrite) as tmp:
            self.write_files(tmp)

    def render_chat(
        self, messages: Sequence[dict], *, add_generation_prompt: bool = False, tools: Sequence[dict] | None = None
    ) -> tuple[list[int], list[int]]:
        """(ids, loss_mask) of a conversation; see `lmlab.tokenizer.chat.render_chat`."""
        from .chat import render_chat

        return render_chat(self, messages, add_generation_prompt=add_generation_prompt, tools=tools)

    def __repr__(self) -> str:
        kind = "sentencepiece" if self.merges is None else "tokenizer.json"
        return f"SentencePieceTokenizer({self.name!r}, vocab_size={self.vocab_size}, {kind})"

    # -- encoding
    def _matchers(self, allowed_special: str | Collection[str]) -> _Matchers:
        """The added tokens to match for this `allowed_special`: those split off the raw text (a regex with one
        group per token), and those matched inline in the normalized text."""
        if allowed_special == "all":
            allowed = frozenset(self.special_tokens)
        else:
            if isinstance(allowed_special, str):
                raise TypeError(f"allowed_special must be 'all' or a collection of names, not {allowed_special!r}")
            allowed = frozenset(allowed_special)
            unknown = allowed - set(self.special_tokens)
            if unknown:
                raise ValueError(f"allowed_special names tokens that are not special tokens: {sorted(unknown)}")
        if allowed not in self._split_cache:
            active = [t for t in self.added_tokens if not t.special or t.content in allowed]
            split = sorted((t for t in active if not t.inline), key=lambda t: len(t.content), reverse=True)
            parts = [("\\s*" if t.lstrip else "") + re.escape(t.content) + ("\\s*" if t.rstrip else "") for t in split]
            inline = {self._inline_text(t): t.id for t in active if t.inline}
            self._split_cache[allowed] = _Matchers(
                allowed,
                re.compile("|".join(f"({p})" for p in parts)) if parts else None,  # longest first: leftmost-longest
                split,
                re.compile("|".join(map(re.escape, sorted(inline, key=len, reverse=True)))) if inline else None,
                inline,
            )
        return self._split_cache[allowed]

    def _encode(self, text: str, allowed_special: str | Collection[str]) -> list[tuple[int, int, int]]:
        """(id, start, end) triples, start/end being character offsets in `text`."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        m = self._matchers(allowed_special)
        out: list[tuple[int, int, int]] = []
        pos = 0
        if m.split_re is not None:
            for found in m.split_re.finditer(text):
                out += self._encode_segment(text[pos : found.start()], pos, m)
                token = m.split_tokens[found.lastindex - 1]
                # the token spans its own text; whitespace that lstrip / rstrip swallowed belongs to no token
                start = text.index(token.content, found.start())
                out.append((token.id, start, start + len(token.content)))
                pos = found.end()
        out += self._encode_segment(text[pos:], pos, m)
        return out

    def _normalize(self, segment: str, at_start: bool) -> tuple[str, list[int], list[int]]:
        """The symbol string of one text segment, with each symbol's character span in the segment."""
        r, space = self.rules, self.rules.space
        chars: list[str] = []
        starts: list[int] = []
        i, n = 0, len(segment)
        if r.remove_extra_whitespaces:
            while i < n and segment[i] == " ":
                i += 1
        if i == n:
            return "", [], []
        want_prefix = r.dummy_prefix == "every" or (r.dummy_prefix == "first" and at_start)
        if want_prefix and (r.prefix_on_space or segment[i] not in (" ", space)):
            chars.append(space)
            starts.append(-1)  # the prefix comes from no character: it spans nothing
        prev_space = False
        for j in range(i, n):
            c = segment[j]
            if r.remove_extra_whitespaces and c == " " and prev_space:
                continue
            prev_space = c == " "
            chars.append(space if c == " " and r.escape_whitespaces else c)
            starts.append(j)
        if r.remove_extra_whitespaces:
            while chars and chars[-1] == space and starts[-1] >= 0:
                chars.pop()
                starts.pop()
        first_char = next((s for s in starts if s >= 0), i)
        spans_start = [first_char if s < 0 else s for s in starts]
        spans_end = [first_char if s < 0 else s + 1 for s in starts]
        return "".join(chars), spans_start, spans_end

    def _encode_segment(self, segment: str, offset: int, m: _Matchers) -> list[tuple[int, int, int]]:
        if not segment:
            return []
        norm, starts, ends = self._normalize(segment, at_start=offset == 0)
        if not norm:
            return []
        if self.rules.split_on_space:
            space = re.escape(self.rules.space)
            chunks = [m.span() for m in re.finditer(f"{space}[^{space}]*|[^{space}]+", norm)]
        elif self._word_split is not None:
            cuts = [0, *(m.start() for m in self._word_split.finditer(norm)), len(norm)]
            chunks = list(zip(cuts[:-1], cuts[1:], strict=True))
        else:
            chunks = [(0, len(norm))]
        out: list[tuple[int, int, int]] = []
        for a, b in chunks:
            for id, s, e in self._encode_chunk(norm[a:b], m):
                out.append((id, offset + starts[a + s], offset + ends[a + e - 1]))
        if self.fuse_unk and self.unk_id is not None:
            out = _fuse_unknown(out, self.unk_id)
        return out

    def _encode_chunk(self, chunk: str, m: _Matchers) -> tuple[tuple[int, int, int], ...]:
        """(id, start, end) of one chunk, positions in the chunk; cached."""
        cached = self._cache.get((chunk, m.allowed))
        if cached is not None:
            return cached
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        out: list[tuple[int, int, int]] = []
        for piece, start, frozen in self._bpe(chunk, m):
            id = m.inline_ids[piece] if frozen else self._piece_id(piece)
            if id is not None:
                out.append((id, start, start + len(piece)))
            elif self.byte_fallback and self._all_bytes(piece):
                # every byte of an unknown piece becomes a byte token spanning the piece's characters
                out += [(self._byte_id[b], start, start + len(piece)) for b in piece.encode("utf-8")]
            elif self.unk_id is not None:
                out.append((self.unk_id, start, start + len(piece)))
            else:
                raise ValueError(
                    f"{piece!r} is not in the vocabulary and the tokenizer has neither byte fallback nor an "
                    "unknown token to stand for it"
                )
        result = tuple(out)
        self._cache[(chunk, m.allowed)] = result
        return result

    def _all_bytes(self, piece: str) -> bool:
        return all(b in self._byte_id for b in piece.encode("utf-8"))

    def _piece_id(self, piece: str) -> int | None:
        id = self.vocab.get(piece)
        if id is None or id == self.unk_id:
            return None
        return id

    @staticmethod
    def _initial_symbols(chunk: str, inline_re: re.Pattern | None) -> tuple[list[str], list[bool]]:
        """Characters, with inline added tokens (user-defined pieces) as single frozen symbols."""
        if inline_re is None:
            return list(chunk), [False] * len(chunk)
        symbols: list[str] = []
        frozen: list[bool] = []
        pos = 0
        for m in inline_re.finditer(chunk):
            symbols += chunk[pos : m.start()]
            frozen += [False] * (m.start() - pos)
            symbols.append(m.group())
            frozen.append(True)
            pos = m.end()
        symbols += chunk[pos:]
        frozen += [False] * (len(chunk) - pos)
        return symbols, frozen

    def _priority(self, a: str, b: str) -> float | None:
        """Lower merges first; None: the pair does not merge."""
        if self.merges is None:
            score = self._merge_score.get(a + b)
            return None if score is None else -score
        return self._ranks.get((a, b))

    def _bpe(self, chunk: str, m: _Matchers) -> list[tuple[str, int, bool]]:
        """Merge the chunk's symbols, best-ranked adjacent pair first (leftmost on ties); (piece, start, frozen)."""
        if self.ignore_merges and chunk in self.vocab and m.inline_re is None:
            return [(chunk, 0, False)]
        symbols, frozen = self._initial_symbols(chunk, m.inline_re)
        n = len(symbols)
        starts = []
        pos = 0
        for s in symbols:
            starts.append(pos)
            pos += len(s)
        nxt = [*range(1, n), -1]
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, str, str]] = []
        rev_merge: dict[str, tuple[str, str]] = {}

        def push(i: int) -> None:
            if i < 0 or nxt[i] < 0 or frozen[i] or frozen[nxt[i]]:
                return
            a, b = symbols[i], symbols[nxt[i]]
            p = self._priority(a, b)
            if p is not None:
                heapq.heappush(heap, (p, i, a, b))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, a, b = heapq.heappop(heap)
            j = nxt[i]
            if j < 0 or symbols[i] != a or symbols[j] != b:  # stale: a neighbour was merged meanwhile
                continue
            symbols[i] = a + b
            if a + b in self._unused:  # sentencepiece splits unused pieces back into what made them
                rev_merge[a + b] = (a, b)
            symbols[j] = ""
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prv[nxt[j]] = i
            push(prv[i])
            push(i)
        out: list[tuple[str, int, bool]] = []
        i = 0
        while i >= 0 and n:
            if frozen[i]:
                out.append((symbols[i], starts[i], True))
            else:
                self._resegment(symbols[i], starts[i], rev_merge, out)
            i = nxt[i]
        return out

    def _resegment(self, piece: str, start: int, rev_merge: dict, out: list) -> None:
        if piece in rev_merge:
            left, right = rev_merge[piece]
            self._resegment(left, start, rev_merge, out)
            self._resegment(right, start + len(left), rev_merge, out)
        else:
            out.append((piece, start, False))

    # -- writing back
    def _model_bytes(self) -> bytes:
        types = {t.id: t for t in self.added_tokens}
        r = self.rules
        if r.dummy_prefix == "every" or not r.prefix_on_space or r.split_on_space or not r.decode_bytes:
            raise SentencePieceError("these text rules have no sentencepiece .model equivalent")
        if any(t.id >= len(self.pieces) or t.lstrip or t.rstrip for t in self.added_tokens):
            raise SentencePieceError("added tokens outside the pieces (or with lstrip/rstrip) cannot go in a .model")
        pieces = []
        for i, p in enumerate(self.pieces):
            t = types.get(i)
            kind = p.type
            if t is not None and kind not in (PieceType.UNKNOWN, PieceType.CONTROL, PieceType.USER_DEFINED):
                kind = PieceType.CONTROL if t.special else PieceType.USER_DEFINED
            pieces.append(replace(p, type=kind))
        trainer: dict[str, Any] = {"model_type": 2, "byte_fallback": self.byte_fallback,
                                   "unk_id": -1 if self.unk_id is None else self.unk_id}
        for role, tok in (("bos", self.bos_token), ("eos", self.eos_token), ("pad", self.pad_token)):
            trainer[f"{role}_id"] = -1 if tok is None else self.token_to_id(tok)
            if tok is not None:
                trainer[f"{role}_piece"] = tok
        if self.unk_id is not None:
            trainer["unk_piece"] = self.pieces[self.unk_id].text
        normalizer = {"name": "identity", "add_dummy_prefix": r.dummy_prefix == "first",
                      "remove_extra_whitespaces": r.remove_extra_whitespaces,
                      "escape_whitespaces": r.escape_whitespaces}
        return write_model_proto(ModelProto(pieces, trainer, normalizer))

    def _hf_text_components(self) -> tuple[dict | None, dict | None]:
        """The (normalizer, pre-tokenizer) of tokenizer.json that apply these text rules."""
        r = self.rules
        if r.remove_extra_whitespaces or not r.escape_whitespaces:
            raise SentencePieceError("remove_extra_whitespaces / unescaped spaces have no tokenizer.json equivalent")
        replace_space = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
        if r.prefix_on_space and not r.split_on_space and r.dummy_prefix != "first":
            steps = [{"type": "Prepend", "prepend": SPACE}] if r.dummy_prefix == "every" else []
            return {"type": "Sequence", "normalizers": [*steps, replace_space]}, None
        if r.prefix_on_space and r.dummy_prefix != "none":
            raise SentencePieceError(
                "sentencepiece's dummy prefix on the first segment only (a .model rule) has no tokenizer.json "
                "equivalent; save() writes such tokenizers as tokenizer.model"
            )
        if any(t.inline for t in self.added_tokens):
            raise SentencePieceError("inline added tokens need a normalizer-based tokenizer.json")
        scheme = {"none": "never", "first": "first", "every": "always"}[r.dummy_prefix]
        return None, {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": scheme, "split": r.split_on_space}

    def _hf_post_processor(self) -> dict | None:
        """A TemplateProcessing post-processor adding bos / eos (what transformers 5 follows, not the config)."""
        if not (self.add_bos or self.add_eos):
            return None
        before = [self.bos_token] if self.add_bos else []
        after = [self.eos_token] if self.add_eos else []

        def template(seq: str, type_id: int) -> list[dict]:
            special = [{"SpecialToken": {"id": t, "type_id": type_id}} for t in before]
            return special + [{"Sequence": {"id": seq, "type_id": type_id}}] + [
                {"SpecialToken": {"id": t, "type_id": type_id}} for t in after]

        tokens = {t: {"id": t, "ids": [self.token_to_id(t)], "tokens": [t]} for t in (*before, *after)}
        return {"type": "TemplateProcessing", "single": template("A", 0), "pair": template("A", 0) + template("B", 1),
                "special_tokens": tokens}

    def _hf_json(self) -> str:
        r = self.rules
        normalizer, pre_tokenizer = self._hf_text_components()
        decoders: list[dict] = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "}]
        if r.decode_bytes:
            decoders.append({"type": "ByteFallback"})
        decoders.append({"type": "Fuse"})
        if r.strip_decoded_prefix:
            decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
        added = [
            {"id": t.id, "content": t.content, "single_word": False, "lstrip": t.lstrip, "rstrip": t.rstrip,
             "normalized": t.inline, "special": t.special}
            for t in self.added_tokens
        ]
        data = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": self._hf_post_processor(),
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {
                "type": "BPE", "dropout": None, "unk_token": self.unk_token, "continuing_subword_prefix": None,
                "end_of_word_suffix": None, "fuse_unk": self.fuse_unk, "byte_fallback": self.byte_fallback,
                "ignore_merges": self.ignore_merges, "vocab": {p.text: i for i, p in enumerate(self.pieces)},
                "merges": [[a, b] for a, b in self.merges],
            },
        }
        return json.dumps(data, ensure_ascii=False, indent=1) + "\n"

    def _hf_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast" if self.merges is not None else "LlamaTokenizer",
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "added_tokens_decoder": {
                str(t.id): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip, "normalized": t.inline,
                            "single_word": False, "special": t.special}
                for t in self.added_tokens
            },
            "clean_up_tokenization_spaces": False,
        }
        if self.eos_tokens is not None:
            config["lmlab_eos_tokens"] = list(self.eos_tokens)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return config


@dataclass(frozen=True)
class _Matchers:
    """Added-token matching for one set of allowed special tokens (see `SentencePieceTokenizer._matchers`)."""

    allowed: frozenset[str]
    split_re: re.Pattern | None
    split_tokens: list[AddedToken]
    inline_re: re.Pattern | None
    inline_ids: dict[str, int]


def _fuse_unknown(triples: list[tuple[int, int, int]], unk: int) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for t in triples:
        if out and t[0] == unk and out[-1][0] == unk:
            out[-1] = (unk, out[-1][1], t[2])
        else:
            out.append(t)
    return out


# --- sentencepiece-style tokenizer.json -----------------------------------------------------
def is_sentencepiece_json(data: dict) -> bool:
    """True for a tokenizer.json whose model is BPE over "▁"-escaped text (not byte-level)."""
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        return False
    blob = json.dumps({k: data.get(k) for k in ("normalizer", "pre_tokenizer", "decoder")})
    if "ByteLevel" in blob:
        return False
    return bool(model.get("byte_fallback")) or SPACE in blob or "Metaspace" in blob


def _parts(component: dict | None) -> list[dict]:
    """A normalizer / pre-tokenizer / decoder as a flat list of steps (Sequence unrolled)."""
    if not component:
        return []
    kind = component.get("type")
    if kind == "Sequence":
        key = next(k for k in ("normalizers", "pretokenizers", "decoders") if k in component)
        return [p for c in component[key] for p in _parts(c)]
    return [component]


def _is_space_replace(step: dict, src: str, dst: str) -> bool:
    return step.get("type") == "Replace" and step.get("pattern") == {"String": src} and step.get("content") == dst


def _from_hf_dict(cls, data: dict, where: str, kwargs: dict) -> SentencePieceTokenizer:
    def fail(what: str) -> SentencePieceError:
        return SentencePieceError(
            f"{where}: {what}; lmlab reads sentencepiece-style tokenizer.json files as Llama 2, Mistral, Gemma and "
            "Phi-3 ship them (BPE, '▁' for spaces, byte fallback)"
        )

    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise fail(f"the model is {model.get('type')!r}, not BPE")
    if model.get("dropout") not in (None, 0, 0.0):
        raise fail("BPE dropout is set")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise fail("continuing_subword_prefix / end_of_word_suffix are set")
    vocab = model.get("vocab") or {}
    by_id = {i: t for t, i in vocab.items()}
    if sorted(by_id) != list(range(len(vocab))):
        raise fail("the vocabulary ids are not 0..n-1")
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]

    # Text rules, from the normalizer and pre-tokenizer.
    prepend = replace_space = False
    for step in _parts(data.get("normalizer")):
        if step.get("type") == "Prepend" and step.get("prepend") == SPACE:
            prepend = True
        elif _is_space_replace(step, " ", SPACE):
            replace_space = True
        else:
            raise fail(f"normalizer {step.get('type')!r} {step} is not supported")
    metaspace = None
    for step in _parts(data.get("pre_tokenizer")):
        if step.get("type") == "Metaspace":
            metaspace = step
        elif step.get("type") == "Split" and step.get("pattern") == {"String": " "} and replace_space:
            continue  # splits on " " after every " " became "▁": a no-op (transformers' Gemma conversion)
        else:
            raise fail(f"pre-tokenizer {step.get('type')!r} is not supported")
    if metaspace is not None:
        if metaspace.get("replacement", SPACE) != SPACE:
            raise fail("Metaspace replacement is not '▁'")
        scheme = metaspace.get("prepend_scheme")
        if scheme is None:  # files written before prepend_scheme existed
            scheme = "always" if metaspace.get("add_prefix_space", True) else "never"
        prefix = {"never": "none", "first": "first", "always": "every"}[scheme]
        rules_kw = dict(dummy_prefix=prefix, prefix_on_space=False, split_on_space=bool(metaspace.get("split", True)))
    elif replace_space:
        rules_kw = dict(dummy_prefix="every" if prepend else "none", prefix_on_space=True)
    else:
        raise fail("it neither replaces spaces with '▁' (normalizer) nor has a Metaspace pre-tokenizer")

    # Decoding rules.
    decode_bytes = False
    strip = 0
    for step in _parts(data.get("decoder")):
        kind = step.get("type")
        if kind == "ByteFallback":
            decode_bytes = True
        elif kind == "Strip" and step.get("content") == " " and not step.get("stop"):
            strip = step.get("start", 0)
        elif kind == "Metaspace":
            ms = step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never")
            strip = int(ms != "never")
        elif kind == "Fuse" or _is_space_replace(step, SPACE, " "):
            continue
        else:
            raise fail(f"decoder {kind!r} is not supported")
    if strip > 1:
        raise fail("a Strip decoder that removes more than one leading space")
    rules = TextRules(decode_bytes=decode_bytes, strip_decoded_prefix=bool(strip), **rules_kw)

    # Added tokens: matched in the raw text, except normalized ones under a Prepend normalizer, which HF matches
    # in the normalized text (after the prefix), as sentencepiece does with user-defined pieces.
    added = []
    for t in data.get("added_tokens") or []:
        if t.get("single_word"):
            raise fail(f"added token {t['content']!r} is single_word")
        inline = bool(t.get("normalized")) and metaspace is None
        added.append(AddedToken(t["content"], int(t["id"]), special=bool(t.get("special")),
                                lstrip=bool(t.get("lstrip")), rstrip=bool(t.get("rstrip")), inline=inline))

    unk_token = model.get("unk_token")
    pieces = []
    for i in range(len(vocab)):
        text = by_id[i]
        kind = PieceType.UNKNOWN if text == unk_token else PieceType.NORMAL
        if _BYTE_PIECE.fullmatch(text):
            kind = PieceType.BYTE
        pieces.append(Piece(text, 0.0, kind))
    if unk_token is not None and unk_token not in vocab:
        raise fail(f"unk_token {unk_token!r} is not in the vocabulary")
    post = _bos_eos_from_post_processor(data.get("post_processor"))
    return cls(
        pieces, merges=merges, added_tokens=added, rules=rules, byte_fallback=bool(model.get("byte_fallback")),
        fuse_unk=bool(model.get("fuse_unk")), ignore_merges=bool(model.get("ignore_merges")), **{**post, **kwargs},
    )


def _bos_eos_from_post_processor(post: dict | None) -> dict[str, Any]:
    """bos / eos added around a single sequence by a TemplateProcessing post-processor (Llama 2: "<s> $A")."""
    if not post or post.get("type") != "TemplateProcessing":
        return {}
    single = post.get("single") or []
    names = [s["SpecialToken"]["id"] if "SpecialToken" in s else None for s in single]
    out: dict[str, Any] = {"add_bos": False, "add_eos": False}
    if names and names[0] is not None:
        out.update(add_bos=True, bos_token=names[0])
    if len(names) > 1 and names[-1] is not None:
        out.update(add_eos=True, eos_token=names[-1])
    return out
