"""Tokenizers: lmlab's byte-level BPE (trainer, reference encoder, fast tiktoken-backed encoder) and
the tokenizers of other checkpoints (HF tokenizer.json, sentencepiece .model, tiktoken rank files),
and chat templates with loss masks.

    from lmlab.tokenizer import Tokenizer, load_tokenizer
    tok = Tokenizer.train(texts, vocab_size=8192)          # byte-level BPE, lmlab special tokens
    tok.save("tok")                                         # tokenizer.json + tokenizer_config.json
    tok = load_tokenizer("tok")                             # any tokenizer directory lmlab reads
    ids = tok.encode("hello", allowed_special="all"); tok.decode(ids)
"""

from __future__ import annotations

from pathlib import Path

from .bpe import (
    DEFAULT_SPECIAL_TOKENS,
    GPT2_PATTERN,
    GPT4_PATTERN,
    PATTERNS,
    encode_reference,
    ranks_from_merges,
    train_bpe,
    train_bpe_reference,
)
from .chat import LMLAB_CHAT_TEMPLATE, ChatTemplateError, render_chat, render_chat_text
from .loading import load_tokenizer
from .sentencepiece import SentencePieceTokenizer
from .tiktoken_file import load_tiktoken, save_tiktoken
from .tokenizer import MergeListEncoder, Tokenizer, merge_list_problem, merges_from_ranks

# Files a checkpoint directory may carry for its tokenizer; conversion copies whichever exist.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)


def tokenizer_files(directory: str | Path) -> list[Path]:
    """The tokenizer files present in a checkpoint directory."""
    directory = Path(directory)
    return [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]


__all__ = [
    "DEFAULT_SPECIAL_TOKENS",
    "LMLAB_CHAT_TEMPLATE",
    "ChatTemplateError",
    "SentencePieceTokenizer",
    "load_tiktoken",
    "render_chat",
    "render_chat_text",
    "save_tiktoken",
    "GPT2_PATTERN",
    "GPT4_PATTERN",
    "PATTERNS",
    "TOKENIZER_FILES",
    "MergeListEncoder",
    "Tokenizer",
    "encode_reference",
    "load_tokenizer",
    "merge_list_problem",
    "merges_from_ranks",
    "ranks_from_merges",
    "tokenizer_files",
    "train_bpe",
    "train_bpe_reference",
]
