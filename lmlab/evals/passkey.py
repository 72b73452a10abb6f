"""Passkey retrieval: can a model find one number hidden in a long, boring text?

The test of Mohtashami & Jaggi 2023 ("Landmark Attention: Random-Access Infinite Context Length for
Transformers", arXiv 2305.16300), the standard first check of context extension: filler sentences
repeated to the target length, with

    "The pass key is 71432. Remember it. 71432 is the pass key."

inserted at a chosen depth (0: right after the task description, 1: right before the question), and
"What is the pass key? The pass key is" at the end. The model continues greedily; the score is exact
match of the first run of digits it writes. Filler carries no information, so accuracy measures only
whether attention can reach the needle from the end of the context.

Prompts are built in token space, from separately encoded pieces (task description, filler
sentences, needle, question), so that every prompt has exactly the requested number of tokens and
the needle starts at a sentence boundary; with the same generator, `passkey_prompt` also writes the
training documents of a model that learns the task (benchmarks/passkey.py).

`passkey_sweep` evaluates a grid of lengths x depths (several seeded keys each, the same keys at every
length) through `lmlab.infer.generate`, optionally on a variant of the model with another context
configuration: a RoPE scaling ("linear", "ntk", "dynamic", "yarn", "llama3", with a factor, or
"auto": the positions the answer needs over the trained max_seq_len), a sliding window, or attention sinks (`streaming`,
StreamingLLM's cache). Lengths past the model's max_seq_len are evaluated, since extrapolation is
the point, except with learned position embeddings, which have no row for those positions.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from tqdm.auto import tqdm

from ..infer.generate import generate, streaming_option
from ..infer.sampling import SamplingParams
from ..model import ModelConfig, RopeScaling, Transformer, build_model

HEADER = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the important information there.")
FILLER = (" The grass is green.", " The sky is blue.", " The sun is yellow.", " Here we go.", " There and back again.")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
KEY_DIGITS = 5
_DIGITS = re.compile(r"\d+")


class TokenizerLike(Protocol):
    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


# --- prompts -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PasskeyPrompt:
    """One prompt: `ids` (exactly `length` tokens), the `key` it hides, the requested `depth` and the
    token index where the needle actually starts (the sentence boundary nearest to that depth)."""

    ids: list[int]
    key: str
    length: int
    depth: float
    needle_start: int


def random_key(rng: random.Random, digits: int = KEY_DIGITS) -> str:
    """A key of `digits` digits, without a leading zero."""
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def answer_text(key: str) -> str:
    """What a model that retrieved the key writes after the question (the training target)."""
    return f" {key}."


def _pieces(tokenizer: TokenizerLike, key: str) -> tuple[list[int], list[list[int]], list[int], list[int]]:
    header = tokenizer.encode(HEADER, add_special_tokens=True)  # a BOS where the tokenizer adds one
    sentences = [tokenizer.encode(s) for s in FILLER]
    return header, sentences, tokenizer.encode(NEEDLE.format(key=key)), tokenizer.encode(QUESTION)


def min_length(tokenizer: TokenizerLike, digits: int = KEY_DIGITS) -> int:
    """The shortest prompt: task description, needle and question with no filler."""
    header, _, needle, question = _pieces(tokenizer, "9" * digits)
    return len(header) + len(needle) + len(question)


def passkey_prompt(tokenizer: TokenizerLike, length: int, depth: float, key: str) -> PasskeyPrompt:
    """A prompt of exactly `length` tokens hiding `key` at `depth` (a fraction of the filler: 0 puts the
    needle right after the task description, 1 right before the question)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be a fraction in [0, 1] (0: the needle first, 1: last)")
    if not key.isdigit():
        raise ValueError(f"key={key!r} must be digits (the score reads the first number the model writes)")
    header, sentences, needle, question = _pieces(tokenizer, key)
    n_fill = length - len(header) - len(needle) - len(question)
    if n_fill < 0:
        raise ValueError(f"length={length} is too short for a passkey prompt with this tokenizer: the task "
                         f"description, needle and question alone take {length - n_fill} tokens")
    filler, boundaries = [], [0]
    while len(filler) < n_fill:  # the five sentences over and over, each sentence end a possible needle place
        filler += sentences[(len(boundaries) - 1) % len(sentences)]
        boundaries.append(len(filler))
    at = min((b for b in boundaries if b <= n_fill), key=lambda b: (abs(b - depth * n_fill), b))
    ids = header + filler[:at] + needle + filler[at:n_fill] + question
    return PasskeyPrompt(ids, key, length, depth, len(header) + at)


def score(completion: str, key: str) -> bool:
    """Exact match: the first run of digits in the completion is the key."""
    found = _DIGITS.search(completion)
    return found is not None and found.group() == key


# --- context configuration ------------------------------------------------------------------------------

def parse_rope_scaling(spec: str) -> tuple[str, float | None]:
    """"KIND:FACTOR" or "KIND:auto" (the factor is then chosen per length) -> (kind, factor or None)."""
    from ..model.config import ROPE_SCALINGS

    kind, sep, factor = spec.partition(":")
    if not sep or kind not in ROPE_SCALINGS:
        raise ValueError(f"rope scaling {spec!r}: write KIND:FACTOR or KIND:auto with KIND one of {ROPE_SCALINGS}, "
                         "e.g. ntk:4 or yarn:auto")
    if factor == "auto":
        return kind, None
    try:
        value = float(factor)
    except ValueError:
        raise ValueError(f"rope scaling {spec!r}: the factor {factor!r} is not a number (or 'auto')") from None
    if value < 1.0:
        raise ValueError(f"rope scaling {spec!r}: the factor must be >= 1 to extend the context")
    return kind, value


def with_context(model: Transformer, *, rope_scaling: RopeScaling | None = None,
                 sliding_window: int | None = None) -> Transformer:
    """The same weights under another context configuration (context extension without retraining):
    a RoPE scaling and/or a sliding window (every "full" attention layer then slides)."""
    changes: dict[str, Any] = {}
    if rope_scaling is not None:
        changes["rope_scaling"] = rope_scaling
    if sliding_window is not None:
        changes["sliding_window"] = sliding_window
        if model.cfg.layer_types is not None:
            changes["layer_types"] = ["sliding" if k == "full" else k for k in model.cfg.layer_types]
    if not changes:
        return model
    cfg: ModelConfig = model.cfg.replace(**changes)
    p = next(model.parameters())
    variant = build_model(cfg, device=p.device, dtype=p.dtype, init=False)
    variant.load_state_dict(model.state_dict())
    return variant.eval()


def _scaling_for(cfg: ModelConfig, kind: str, factor: float | None, positions: int) -> RopeScaling:
    """RopeScaling of `kind` for a run that needs `positions` positions; factor None: positions / max_seq_len."""
    if cfg.position != "rope":
        raise ValueError(f"a RoPE scaling needs a RoPE model; this one has position={cfg.position!r}")
    if factor is None:
        factor = max(1.0, positions / cfg.max_seq_len)
    return RopeScaling(kind, factor, original_max_seq_len=cfg.max_seq_len)


# --- the sweep --------------------------------------------------------------------------------------------

@dataclass
class PasskeyResults:
    """Accuracy per (length, depth), the settings, and every prompt's outcome."""

    lengths: list[int]
    depths: list[float]
    settings: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)

    def accuracy(self, length: int, depth: float | None = None) -> float:
        """Share of keys retrieved at `length` (and `depth`; None: over all depths)."""
        hits = [s["correct"] for s in self.samples if s["length"] == length and (depth is None or s["depth"] == depth)]
        return sum(hits) / len(hits) if hits else float("nan")

    def table(self) -> str:
        """Accuracy (%) per length (rows) and depth (columns), with the mean over depths."""
        head = ["length", *(f"depth {d:g}" for d in self.depths), "mean"]
        rows = [[str(n), *(f"{100 * self.accuracy(n, d):.0f}" for d in self.depths), f"{100 * self.accuracy(n):.0f}"]
                for n in self.lengths]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [head, *rows]]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": "passkey", "settings": self.settings, "lengths": self.lengths, "depths": self.depths,
            "accuracy": {str(n): {str(d): self.accuracy(n, d) for d in self.depths} for n in self.lengths},
            "mean": {str(n): self.accuracy(n) for n in self.lengths},
            "samples": self.samples,
        }


def passkey_sweep(model: Transformer, tokenizer: TokenizerLike, lengths: Sequence[int],
                  depths: Sequence[float] = DEPTHS, n_keys: int = 5, *, seed: int = 0,
                  rope_scaling: str | RopeScaling | None = None, sliding_window: int | None = None,
                  streaming: Sequence[int] | None = None, batch_size: int = 8, max_new_tokens: int = 12,
                  progress: bool = True) -> PasskeyResults:
    """Passkey accuracy for every length x depth, n_keys prompts each, greedy decoding.

    rope_scaling: a RopeScaling, or "KIND:FACTOR" / "KIND:auto" (auto: at each length, factor =
      (length + KEY_DIGITS + 2) / max_seq_len, at least 1: the positions up to the end of the answer
      " NNNNN." with a token per digit); original_max_seq_len is the model's max_seq_len.
    sliding_window: attend to the last N tokens only.
    streaming: (n_sink, window[, chunk]) to generate with attention sinks (`lmlab.infer.generate.generate`).
    The keys come from `seed`, the same n_keys per depth at every length, so lengths differ only in
    the filler. The model's own config is never changed (variants share its weights' values).
    """
    lengths, depths = [int(n) for n in lengths], [float(d) for d in depths]
    if not lengths or not depths or n_keys < 1:
        raise ValueError(f"nothing to evaluate: lengths={lengths}, depths={depths}, n_keys={n_keys}")
    cfg = model.cfg
    shortest = min_length(tokenizer)
    if min(lengths) < shortest:
        raise ValueError(f"length {min(lengths)} is below the shortest passkey prompt for this tokenizer "
                         f"({shortest} tokens); use lengths >= {shortest}")
    if streaming is not None:
        n_sink, window, chunk = streaming_option(streaming)
        bound = n_sink + window - 1 + chunk
    else:
        bound = max(lengths) + max_new_tokens - 1
    if cfg.position == "learned" and bound > cfg.max_seq_len:
        raise ValueError(
            f"this model has learned position embeddings for max_seq_len={cfg.max_seq_len} positions and cannot "
            f"be evaluated where it needs {bound}: it has no embedding past its trained length. Use lengths <= "
            f"{cfg.max_seq_len - max_new_tokens + 1}, or attention sinks (streaming) whose cache fits"
        )
    scaling = parse_rope_scaling(rope_scaling) if isinstance(rope_scaling, str) else rope_scaling
    rng = random.Random(seed)
    keys = [[random_key(rng) for _ in range(n_keys)] for _ in depths]
    settings = {"seed": seed, "n_keys": n_keys, "max_new_tokens": max_new_tokens, "max_seq_len": cfg.max_seq_len,
                "position": cfg.position, "rope_scaling": None, "sliding_window": sliding_window,
                "streaming": list(streaming) if streaming is not None else None}
    results = PasskeyResults(lengths, depths, settings)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                            stop_token_ids=list(getattr(tokenizer, "eos_ids", None) or []))
    total = len(lengths) * len(depths) * n_keys
    with tqdm(total=total, desc="passkey", unit="prompt", disable=not progress) as bar:
        for length in lengths:
            rs = scaling
            if isinstance(scaling, tuple):
                rs = _scaling_for(cfg, scaling[0], scaling[1], length + KEY_DIGITS + 2)
            variant = with_context(model, rope_scaling=rs, sliding_window=sliding_window)
            if rs is not None:
                settings["rope_scaling"] = settings["rope_scaling"] or {}
                settings["rope_scaling"][str(length)] = asdict(rs)
            prompts = [passkey_prompt(tokenizer, length, d, k) for d, ks in zip(depths, keys, strict=True) for k in ks]
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start:start + batch_size]
                outs = generate(variant, [p.ids for p in batch], params, decode=tokenizer.decode, streaming=streaming)
                for p, out in zip(batch, outs, strict=True):
                    results.samples.append({"length": length, "depth": p.depth, "key": p.key,
                                            "needle_start": p.needle_start, "completion": out.text,
                                            "correct": score(out.text, p.key)})
                bar.update(len(batch))
                bar.set_postfix(length=length, acc=f"{results.accuracy(length):.2f}", refresh=False)
    return results
