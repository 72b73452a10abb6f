"""tiktoken rank files: read them into lmlab's `Tokenizer`, with the pattern and special tokens they need, and write
them back.

A `.tiktoken` file (OpenAI's encodings, and Llama 3's original `tokenizer.model`) lists a byte-level BPE as one
line per token: the token's bytes in base64, a space, its rank. The rank is the token id and also the merge
priority: tiktoken merges, inside each pre-token, the adjacent pair whose concatenation has the lowest rank. The
file holds neither the pre-tokenization regex nor the special tokens; those come from the code that uses it, so
`PRESETS` records them for the known encodings (from tiktoken's `openai_public` and Meta's Llama 3 tokenizer
code) and `load_tiktoken` also takes them explicitly.

The format is four lines of code to read, so it is read here rather than through `tiktoken.load`, which fetches
URLs and checks hashes; encoding itself runs in tiktoken, through `Tokenizer`.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import atomic_file
from .bpe import GPT4_PATTERN
from .tokenizer import Tokenizer

__all__ = ["PRESETS", "TiktokenPreset", "is_tiktoken_file", "load_tiktoken", "read_tiktoken_ranks", "save_tiktoken"]

_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+")

# GPT-2 / r50k / p50k, as tiktoken writes it (possessive quantifiers, same splits as GPT-2's original regex).
R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]"""
    r"""|\s+(?!\S)|\s"""
)
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
LLAMA3_PATTERN = GPT4_PATTERN  # Meta's Llama 3 tokenizer.py uses this exact regex


def _llama3_names(first: list[str], reserved_from: int) -> list[str]:
    """Llama 3's 256 special tokens: named ones, the rest <|reserved_special_token_i|> from `reserved_from`."""
    return first + [f"<|reserved_special_token_{i}|>" for i in range(reserved_from, reserved_from + 256 - len(first))]


# Llama 3 (Meta-Llama-3-8B): ids 128000.. in this order.
LLAMA3_SPECIALS = _llama3_names(
    ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
     "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
     "<|reserved_special_token_4|>", "<|eot_id|>"],
    5,
)
# Llama 3.1 / 3.2 / 3.3: three reserved slots became <|finetune_right_pad_id|>, <|eom_id|> and <|python_tag|>.
LLAMA3_1_SPECIALS = _llama3_names(
    ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
     "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
     "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"],
    3,
)


def _after_ranks(names: list[str]) -> Callable[[int], dict[str, int]]:
    """Special tokens numbered right after the mergeable ranks, as Meta's code numbers them."""
    return lambda n_ranks: {name: n_ranks + i for i, name in enumerate(names)}


def _fixed(ids: dict[str, int]) -> Callable[[int], dict[str, int]]:
    return lambda n_ranks: dict(ids)


@dataclass(frozen=True)
class TiktokenPreset:
    """What a rank file needs to become a tokenizer: the pre-tokenization regex, the special tokens (a function of
    the number of ranks in the file), and which of them are bos / eos / further end-of-generation tokens."""

    pattern: str
    special_tokens: Callable[[int], dict[str, int]]
    bos_token: str | None = None
    eos_token: str | None = None
    eos_tokens: list[str] = field(default_factory=list)
    add_bos: bool = False


PRESETS: dict[str, TiktokenPreset] = {
    "llama3": TiktokenPreset(LLAMA3_PATTERN, _after_ranks(LLAMA3_SPECIALS), "<|begin_of_text|>", "<|end_of_text|>",
                             ["<|eot_id|>"], add_bos=True),
    "llama3.1": TiktokenPreset(LLAMA3_PATTERN, _after_ranks(LLAMA3_1_SPECIALS), "<|begin_of_text|>",
                               "<|end_of_text|>", ["<|eom_id|>", "<|eot_id|>"], add_bos=True),
    "cl100k_base": TiktokenPreset(
        CL100K_PATTERN,
        _fixed({"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}),
        eos_token="<|endoftext|>",
    ),
    "o200k_base": TiktokenPreset(O200K_PATTERN, _fixed({"<|endoftext|>": 199999, "<|endofprompt|>": 200018}),
                                 eos_token="<|endoftext|>"),
    "r50k_base": TiktokenPreset(R50K_PATTERN, _fixed({"<|endoftext|>": 50256}), eos_token="<|endoftext|>"),
    "p50k_base": TiktokenPreset(R50K_PATTERN, _fixed({"<|endoftext|>": 50256}), eos_token="<|endoftext|>"),
}
PRESETS["gpt2"] = PRESETS["r50k_base"]


def is_tiktoken_file(path: str | Path) -> bool:
    """True when the file's first line looks like `<base64> <rank>` (a tiktoken rank file)."""
    with open(path, "rb") as f:
        head = f.read(256)
    first = head.split(b"\n", 1)[0].rstrip(b"\r")
    return bool(_LINE.fullmatch(first))


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """token bytes -> rank, from a tiktoken rank file. Malformed lines, repeated tokens and repeated ranks raise a
    ValueError that names the line."""
    path = Path(path)
    ranks: dict[bytes, int] = {}
    seen: dict[int, int] = {}
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit():
                raise ValueError(f"{path}:{number}: expected '<base64 token> <rank>', got {line[:60]!r}")
            try:
                token = base64.b64decode(parts[0], validate=True)
            except binascii.Error:
                raise ValueError(f"{path}:{number}: {parts[0][:40]!r} is not base64") from None
            rank = int(parts[1])
            if token in ranks:
                raise ValueError(f"{path}:{number}: token {token!r} is listed twice (ranks {ranks[token]} and {rank})")
            if rank in seen:
                raise ValueError(f"{path}:{number}: rank {rank} is given twice (also on line {seen[rank]})")
            ranks[token] = rank
            seen[rank] = number
    if not ranks:
        raise ValueError(f"{path} holds no ranks; it is not a tiktoken file")
    return ranks


def save_tiktoken(source: Tokenizer | dict[bytes, int], path: str | Path, *, overwrite: bool = False) -> None:
    """Write the mergeable ranks of a tokenizer (or a ranks dict) as a tiktoken rank file, in rank order,
    atomically. Special tokens are not part of the format: load the file back with a preset or explicit ones."""
    ranks = source.mergeable_ranks if isinstance(source, Tokenizer) else source
    lines = [base64.b64encode(token) + b" " + str(rank).encode() + b"\n"
             for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    with atomic_file(path, "wb", overwrite=overwrite) as f:
        f.writelines(lines)


def load_tiktoken(
    path: str | Path,
    preset: str | None = None,
    *,
    pattern: str | None = None,
    special_tokens: dict[str, int] | None = None,
    **tokenizer_kwargs,
) -> Tokenizer:
    """A `Tokenizer` from a tiktoken rank file.

    preset: a key of `PRESETS` ("llama3", "llama3.1", "cl100k_base", "o200k_base", "r50k_base" / "gpt2",
      "p50k_base") giving the pattern, special tokens and bos / eos.
    pattern / special_tokens: given explicitly, or to override the preset's (pattern may be "gpt2" or "gpt4").
    tokenizer_kwargs: further `Tokenizer` arguments (name, bos_token, eos_token, chat_template, add_bos, ...).
    """
    if preset is None and pattern is None:
        raise ValueError(
            f"a tiktoken file holds no pre-tokenization pattern: pass preset= (one of {sorted(PRESETS)}) or pattern="
        )
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown tiktoken preset {preset!r}; known: {sorted(PRESETS)}")
    ranks = read_tiktoken_ranks(path)
    kwargs: dict = {"name": Path(path).stem}
    if preset is not None:
        p = PRESETS[preset]
        kwargs.update(bos_token=p.bos_token, eos_token=p.eos_token, eos_tokens=list(p.eos_tokens), add_bos=p.add_bos)
        specials = p.special_tokens(len(ranks))
        pattern = pattern if pattern is not None else p.pattern
    else:
        specials = {}
    if special_tokens is not None:
        specials = dict(special_tokens)
    kwargs.update(tokenizer_kwargs)
    try:
        return Tokenizer(ranks, pattern, specials, **kwargs)
    except ValueError as e:
        raise ValueError(f"{path}: {e}" + (f" (preset {preset!r})" if preset else "")) from None
