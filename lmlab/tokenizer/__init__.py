"""Tokenizers that travel with checkpoints.

For now this loads the Hugging Face `tokenizer.json` that sits in a checkpoint directory, through
the `tokenizers` library (the `hf` extra), so converted HF checkpoints work end to end. lmlab's
own BPE trainer and encoder, sentencepiece and tiktoken files, and chat templates come with the
tokenizer issue and will sit behind the same small interface: encode, decode, eos_ids.
"""

from __future__ import annotations

import json
from pathlib import Path

# Files a checkpoint directory may carry for its tokenizer; conversion copies whichever exist.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
)


def tokenizer_files(directory: str | Path) -> list[Path]:
    """The tokenizer files present in a checkpoint directory."""
    directory = Path(directory)
    return [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]


class HFTokenizer:
    """A `tokenizer.json` (byte-level BPE, sentencepiece-style, ...) with its special tokens."""

    def __init__(self, directory: str | Path):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise ImportError(
                "reading tokenizer.json needs the `tokenizers` package: pip install 'lmlab[hf]'"
            ) from e
        directory = Path(directory)
        self._tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        self.eos_ids = self._eos_ids(directory)

    def _eos_ids(self, directory: Path) -> list[int]:
        """End-of-sequence ids: generation_config.json first (it may list several, as Llama 3
        does), then the eos_token named in tokenizer_config.json."""
        ids: list[int] = []
        gen = directory / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids = [eos] if isinstance(eos, int) else list(eos or [])
        cfg = directory / "tokenizer_config.json"
        if not ids and cfg.is_file():
            eos = json.loads(cfg.read_text()).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str) and self._tok.token_to_id(eos) is not None:
                ids = [self._tok.token_to_id(eos)]
        return ids

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


def load_tokenizer(directory: str | Path) -> HFTokenizer | None:
    """The tokenizer stored in a checkpoint directory, or None when it has none."""
    if (Path(directory) / "tokenizer.json").is_file():
        return HFTokenizer(directory)
    return None
