"""The Task: documents in, metric out.

A task knows its documents, how a document becomes a prompt, and how an answer is scored; the harness
(`harness.py`) knows how to ask the model. Two kinds cover the benchmarks:

- `MultipleChoiceTask`: the prompt is scored with each choice as its continuation. `acc` takes the choice of
  highest log-likelihood; `acc_norm` divides each log-likelihood by the choice's length in characters first
  (lm-evaluation-harness's definition, so a long choice is not penalized for its extra tokens).
- `GenerationTask`: the model continues the prompt until a stop string; the task extracts the answer from the
  output and scores it (exact match on a number, unit tests of a program, ...).

Prompts are built the way lm-evaluation-harness builds them, so its numbers and ours can be compared:

    description + shot_1 + "\\n\\n" + ... + shot_k + "\\n\\n" + doc_to_text(doc)
    shot_i = doc_to_text(example_i) + target_delimiter + doc_to_target(example_i)

The k examples come from the task's few-shot split. Their choice is seeded per document (not from a stream
shared across documents), so a document gets the same examples whatever `--limit` or order it is run with; when
the few-shot split is the evaluation split, the document itself is never among its examples.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..infer.sampling import SamplingParams


@dataclass
class Task:
    """Base of all tasks. Subclasses set the class attributes and implement `docs` and `doc_to_text`."""

    name: str = ""
    description: str = ""           # written once before the examples (MMLU names its subject)
    default_shots: int = 0
    max_shots: int | None = None    # None: as many as the few-shot split has
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    document_start: bool = False    # start the prompt with end-of-text, as pretraining documents start
    _fewshot_cache: list[dict] | None = field(default=None, repr=False)

    kind = "base"

    # --- what a task defines --------------------------------------------------------------------
    def docs(self) -> list[dict]:
        """The evaluation documents, in a fixed order."""
        raise NotImplementedError

    def fewshot_docs(self) -> list[dict]:
        """The documents few-shot examples are drawn from (a train or dev split)."""
        return []

    def select(self, docs: list[dict], limit: int | None) -> list[dict]:
        """The documents `--limit N` evaluates: the first N."""
        return docs if limit is None else docs[:limit]

    def group(self, doc: dict) -> str | None:
        """A subgroup to report separately (MMLU's subject), or None."""
        return None

    def doc_to_text(self, doc: dict) -> str:
        raise NotImplementedError

    def doc_to_target(self, doc: dict) -> str:
        """The answer as written after a few-shot example."""
        raise NotImplementedError

    def doc_description(self, doc: dict) -> str:
        return self.description

    def doc_text_for_contamination(self, doc: dict) -> str:
        """The text whose 13-grams are looked up in training data: the question and its answer."""
        return self.doc_to_text(doc) + " " + self.doc_to_target(doc)

    # --- prompts --------------------------------------------------------------------------------
    def examples(self, doc_id: int, doc: dict, shots: int, seed: int) -> list[dict]:
        """`shots` examples for document `doc_id`, the same for the same (task, document, seed)."""
        if shots == 0:
            return []
        if self._fewshot_cache is None:
            self._fewshot_cache = self.fewshot_docs()
        pool = self._fewshot_cache
        limit = self.max_shots if self.max_shots is not None else len(pool)
        if shots > limit:
            raise ValueError(f"task {self.name} has {limit} few-shot examples available; got --shots {shots}")
        rng = random.Random(zlib.crc32(f"{self.name}:{doc_id}:{seed}".encode()))
        chosen = rng.sample(range(len(pool)), min(len(pool), shots + 1))
        picked = [pool[i] for i in chosen if pool[i] is not doc and pool[i] != doc]
        return picked[:shots]

    def fewshot_context(self, doc_id: int, doc: dict, shots: int, seed: int,
                        perturb: Callable[[int, str], str] | None = None) -> str:
        """The prompt of a document; `perturb(doc_id, text)` changes its own text (not the examples')."""
        shots_text = "".join(
            self.doc_to_text(ex) + self.target_delimiter + self.doc_to_target(ex) + self.fewshot_delimiter
            for ex in self.examples(doc_id, doc, shots, seed)
        )
        text = self.doc_to_text(doc)
        return self.doc_description(doc) + shots_text + (perturb(doc_id, text) if perturb else text)


@dataclass
class MultipleChoiceTask(Task):
    kind = "multiple_choice"

    def choices(self, doc: dict) -> list[str]:
        raise NotImplementedError

    def gold(self, doc: dict) -> int:
        raise NotImplementedError

    def doc_to_target(self, doc: dict) -> str:
        return self.choices(doc)[self.gold(doc)]

    def continuations(self, doc: dict) -> list[str]:
        return [self.target_delimiter + c for c in self.choices(doc)]

    def score(self, doc: dict, lls: Sequence[float]) -> dict[str, Any]:
        """acc, acc_norm (per-character log-likelihood) and the calibration inputs for one document."""
        choices, gold = self.choices(doc), self.gold(doc)
        pred = max(range(len(lls)), key=lambda i: lls[i])
        norm = [ll / len(c) for ll, c in zip(lls, choices, strict=True)]
        pred_norm = max(range(len(norm)), key=lambda i: norm[i])
        top = max(lls)
        probs = [math.exp(ll - top) for ll in lls]
        total = sum(probs)
        return {"acc": float(pred == gold), "acc_norm": float(pred_norm == gold), "pred": pred, "gold": gold,
                "confidence": probs[pred] / total, "gold_prob": probs[gold] / total}


@dataclass
class GenerationTask(Task):
    kind = "generate"
    stop: tuple[str, ...] = ("\n\n",)
    max_new_tokens: int = 256
    cot: bool = True                 # show worked reasoning in the examples and ask for it

    def stops(self) -> tuple[str, ...]:
        return self.stop

    def budget(self, doc: dict) -> int:
        """The most tokens the model may write for this document."""
        return self.max_new_tokens

    def sampling(self, doc: dict, temperature: float = 0.0, seed: int | None = None,
                 top_p: float = 1.0) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.budget(doc), temperature=temperature, top_p=top_p,
                              stop=list(self.stops()), seed=seed)

    def extract(self, output: str) -> str | None:
        """The answer in an output, or None when there is none where it should be."""
        return output.strip() or None

    def score(self, doc: dict, output: str) -> dict[str, Any]:
        answer = self.extract(output)
        return {"exact_match": float(answer is not None and answer == self.reference(doc)), "answer": answer}

    def reference(self, doc: dict) -> str:
        return self.doc_to_target(doc)

    def score_many(self, docs: Sequence[dict], outputs: Sequence[str]) -> list[dict[str, Any]]:
        """Score a batch at once (code tasks run their programs in parallel); default: one by one."""
        return [self.score(d, o) for d, o in zip(docs, outputs, strict=True)]
