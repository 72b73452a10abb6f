"""Multiple-choice benchmarks scored by log-likelihood: MMLU, HellaSwag, ARC, TruthfulQA MC1/MC2.

Each prompt is the one lm-evaluation-harness uses for the task, so acc and acc_norm agree with it
(tests/evals/test_lm_eval_parity.py runs both on the same model and documents).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...data.sources import records
from ..task import MultipleChoiceTask

LETTERS = ("A", "B", "C", "D")


@dataclass
class MMLU(MultipleChoiceTask):
    """MMLU (Hendrycks et al. 2021), one subject or all 57. Zero- to 5-shot; the examples are the subject's dev
    questions in file order (lm-evaluation-harness's `first_n`), after "The following are multiple choice
    questions (with answers) about <subject>."; the model picks the letter."""

    subject: str | None = None
    default_shots: int = 5
    max_shots: int = 5

    def docs(self) -> list[dict]:
        return [d for d in records("mmlu", "test", progress=False) if self.subject in (None, d["subject"])]

    def fewshot_docs(self) -> list[dict]:
        return list(records("mmlu", "dev", progress=False))

    def examples(self, doc_id: int, doc: dict, shots: int, seed: int) -> list[dict]:
        if self._fewshot_cache is None:
            self._fewshot_cache = self.fewshot_docs()
        same = [d for d in self._fewshot_cache if d["subject"] == doc["subject"]]
        if shots > len(same):
            raise ValueError(f"MMLU {doc['subject']} has {len(same)} dev examples; got --shots {shots}")
        return same[:shots]

    def doc_description(self, doc: dict) -> str:
        subject = doc["subject"].replace("_", " ")
        return f"The following are multiple choice questions (with answers) about {subject}.\n\n"

    def doc_to_text(self, doc: dict) -> str:
        options = "".join(f"\n{letter}. {c}" for letter, c in zip(LETTERS, doc["choices"], strict=True))
        return f"{doc['question'].strip()}{options}\nAnswer:"

    def choices(self, doc: dict) -> list[str]:
        return list(LETTERS)

    def gold(self, doc: dict) -> int:
        return doc["answer"]

    def group(self, doc: dict) -> str:
        return doc["subject"]

    def select(self, docs: list[dict], limit: int | None) -> list[dict]:
        """`--limit N` takes the first N questions of every subject (as lm-evaluation-harness limits each
        subject's subtask)."""
        if limit is None:
            return docs
        seen: dict[str, int] = {}
        out = []
        for d in docs:
            seen[d["subject"]] = seen.get(d["subject"], 0) + 1
            if seen[d["subject"]] <= limit:
                out.append(d)
        return out


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's cleaning of HellaSwag text: WikiHow's bracketed tags out, double spaces once."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


@dataclass
class HellaSwag(MultipleChoiceTask):
    """HellaSwag (Zellers et al. 2019) validation: which ending continues "<activity>: <context>"."""

    def docs(self) -> list[dict]:
        return list(records("hellaswag", "validation", progress=False))

    def fewshot_docs(self) -> list[dict]:
        return self.docs()  # no train split in the registry: examples come from the others

    def doc_to_text(self, doc: dict) -> str:
        return hellaswag_preprocess(doc["context"])

    def choices(self, doc: dict) -> list[str]:
        return [hellaswag_preprocess(e) for e in doc["endings"]]

    def gold(self, doc: dict) -> int:
        return doc["label"]


@dataclass
class ARC(MultipleChoiceTask):
    """AI2 Reasoning Challenge (Clark et al. 2018), Easy or Challenge test split: "Question: ...\\nAnswer:"
    continued by each choice's text."""

    subset: str = "easy"

    def docs(self) -> list[dict]:
        return list(records("arc", self.subset, progress=False))

    def fewshot_docs(self) -> list[dict]:
        return self.docs()

    def doc_to_text(self, doc: dict) -> str:
        return f"Question: {doc['question']}\nAnswer:"

    def choices(self, doc: dict) -> list[str]:
        return list(doc["choices"])

    def gold(self, doc: dict) -> int:
        return doc["answer"]


# The six question-answer pairs the TruthfulQA benchmark shows before every question (its "QA prompt", Lin et
# al. 2022): they set the format and show that "I have no comment." is an acceptable answer.
TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


@dataclass
class TruthfulQA(MultipleChoiceTask):
    """TruthfulQA (Lin et al. 2022) multiple choice, zero-shot after the benchmark's QA primer.

    mc1: one true answer among the choices; acc. mc2: several true and false answers; the score is the
    normalized probability mass on the true ones, sum_{true} p_i / sum_{all} p_i with p_i = exp(ll_i).
    version: "v1" (2021, 817 questions, what most published numbers use) or "validation" (2025, 790)."""

    variant: str = "mc1"
    version: str = "v1"
    max_shots: int = 0

    def docs(self) -> list[dict]:
        return list(records("truthfulqa", self.version, progress=False))

    def doc_to_text(self, doc: dict) -> str:
        return f"{TRUTHFULQA_PRIMER}\n\nQ: {doc['question']}\nA:"

    def _targets(self, doc: dict) -> dict:
        return doc[f"{self.variant}_targets"]

    def choices(self, doc: dict) -> list[str]:
        return list(self._targets(doc)["choices"])

    def gold(self, doc: dict) -> int:
        return self._targets(doc)["labels"].index(1)

    def score(self, doc: dict, lls: Sequence[float]) -> dict[str, Any]:
        out = super().score(doc, lls)
        if self.variant == "mc2":
            labels = self._targets(doc)["labels"]
            top = max(lls)
            probs = [math.exp(ll - top) for ll in lls]  # the shift cancels in the ratio
            out = {"acc": sum(p for p, t in zip(probs, labels, strict=True) if t) / sum(probs),
                   "gold_prob": out["gold_prob"], "confidence": out["confidence"], "pred": out["pred"], "gold": 0}
        return out
