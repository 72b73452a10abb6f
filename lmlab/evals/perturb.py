"""Perturbations of a prompt for robustness: does accuracy survive typos and a change of casing?

As HELM does (Liang et al. 2022, "robustness"), only the question is perturbed, never the answer choices or
the few-shot examples, and each perturbation is seeded per document, so a rerun perturbs identically. A short
final cue line ("Answer:", "A:") is kept as it is: it is the format, not the question.

- `typos`: each word of 3+ letters gets, with probability `rate`, one keyboard-neighbour substitution, a
  swap of two adjacent letters, or a dropped letter.
- `lowercase` / `uppercase`: the question's casing changed.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Callable

_NEIGHBOURS = {
    "a": "qwsz", "b": "vghn", "c": "xdfv", "d": "serfcx", "e": "wsdr", "f": "drtgvc", "g": "ftyhbv", "h": "gyujnb",
    "i": "ujko", "j": "huikmn", "k": "jiolm", "l": "kop", "m": "njk", "n": "bhjm", "o": "iklp", "p": "ol",
    "q": "wa", "r": "edft", "s": "awedxz", "t": "rfgy", "u": "yhji", "v": "cfgb", "w": "qase", "x": "zsdc",
    "y": "tghu", "z": "asx",
}
_WORD = re.compile(r"[A-Za-z]{3,}")
CUE_CHARS = 12  # a last line at most this long that ends in ":" is the answer cue


def _typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(len(word))
    kind = rng.choice(("neighbour", "swap", "drop"))
    if kind == "neighbour" and word[i].lower() in _NEIGHBOURS:
        c = rng.choice(_NEIGHBOURS[word[i].lower()])
        return word[:i] + (c.upper() if word[i].isupper() else c) + word[i + 1:]
    if kind == "swap" and i < len(word) - 1:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    return word[:i] + word[i + 1:]


def typos(text: str, rng: random.Random, rate: float = 0.1) -> str:
    return _WORD.sub(lambda m: _typo(m.group(0), rng) if rng.random() < rate else m.group(0), text)


PERTURBATIONS: dict[str, Callable[[str, random.Random], str]] = {
    "typos": typos,
    "lowercase": lambda text, rng: text.lower(),
    "uppercase": lambda text, rng: text.upper(),
}


def perturber(name: str, seed: int = 0) -> Callable[[int, str], str]:
    """f(doc_id, text) -> the perturbed text, keeping a short final cue line such as "Answer:" unchanged."""
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; choose from {', '.join(PERTURBATIONS)}")
    fn = PERTURBATIONS[name]

    def apply(doc_id: int, text: str) -> str:
        rng = random.Random(zlib.crc32(f"{name}:{seed}:{doc_id}".encode()))
        head, sep, cue = text.rpartition("\n")
        if sep and len(cue) <= CUE_CHARS and cue.rstrip().endswith(":"):
            return fn(head, rng) + sep + cue
        return fn(text, rng)

    return apply
