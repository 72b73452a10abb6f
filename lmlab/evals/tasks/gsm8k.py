"""GSM8K (Cobbe et al. 2021): grade-school math word problems, scored by exact match on the final number.

Prompts are k-shot chain of thought (Wei et al. 2022) with examples drawn from GSM8K's own train split:

    Question: <question>
    Answer: <the reference solution's steps> The answer is <number>.

The reference solutions carry calculator annotations ("<<48/2=24>>") and end in "#### <number>"; the
examples drop the annotations and end in "The answer is N." instead, the form the model is asked to write.
Without chain of thought (`cot=False`) the examples show only "The answer is N."

Answers are read two ways, as lm-evaluation-harness reports them: `strict` takes the number after "The answer
is" (or after "####"); `flexible` takes the last number in the output. Numbers compare by value after dropping
"$", "," and a trailing ".", so "1,000", "$1000" and "1000.00" are the same answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from ...data.sources import records
from ..task import GenerationTask

_CALCULATOR = re.compile(r"<<[^>]*>>")
_STRICT = re.compile(r"(?:The answer is|####)\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")
_NUMBER = re.compile(r"-?\$?[0-9][0-9,]*(?:\.[0-9]+)?")


def normalize_number(text: str | None) -> str | None:
    """A number's canonical text: "$1,000.00" -> "1000"; None when `text` is not a number."""
    if text is None:
        return None
    text = text.replace("$", "").replace(",", "").strip().rstrip(".")
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    value = value.normalize()
    return format(value, "f") if value != 0 else "0"


def extract_strict(text: str) -> str | None:
    """The number after the first "The answer is" / "####"."""
    m = _STRICT.search(text)
    return normalize_number(m.group(1)) if m else None


def extract_flexible(text: str) -> str | None:
    """The last number anywhere in the text."""
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def reasoning(solution: str) -> str:
    """A reference solution as chain of thought: the steps, annotations removed, on one line each."""
    steps = solution.rsplit("####", 1)[0]
    return " ".join(line.strip() for line in _CALCULATOR.sub("", steps).splitlines() if line.strip())


@dataclass
class GSM8K(GenerationTask):
    default_shots: int = 8
    stop: tuple[str, ...] = ("\n\n", "Question:")
    max_new_tokens: int = 256

    def docs(self) -> list[dict]:
        return list(records("gsm8k", "test", progress=False))

    def fewshot_docs(self) -> list[dict]:
        return list(records("gsm8k", "train", progress=False))

    def doc_to_text(self, doc: dict) -> str:
        return f"Question: {doc['question']}\nAnswer:"

    def doc_to_target(self, doc: dict) -> str:
        answer = f"The answer is {doc['final_answer']}."
        return f"{reasoning(doc['answer'])} {answer}" if self.cot else answer

    def reference(self, doc: dict) -> str:
        return normalize_number(doc["final_answer"])

    def score(self, doc: dict, output: str) -> dict[str, Any]:
        strict, flexible, gold = extract_strict(output), extract_flexible(output), self.reference(doc)
        return {"exact_match": float(strict == gold), "exact_match_flexible": float(flexible == gold),
                "answer": strict if strict is not None else flexible}

    def extract(self, output: str) -> str | None:
        strict = extract_strict(output)
        return strict if strict is not None else extract_flexible(output)
