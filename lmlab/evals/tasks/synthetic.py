"""lmlab's synthetic held-out tasks as harness tasks: arithmetic (add, sub, mul), key-value lookup, copying and
story questions, asked the way the synthetic pretraining text writes them (see lmlab/evals/synthetic.py) and
checked by the corpus's own verifier.

Arithmetic is asked with worked steps when `cot` (the default) and as a one-line drill "a + b =" otherwise.
Prompts start with end-of-text, as every pretraining document does. The problems are the corpus's eval split:
the registry's corpus by default, or the one in `corpus_dir` (the directory `lmlab data synth` wrote).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...data.sources import records
from ...data.synthetic import arith_operands, verify
from .. import synthetic as syn
from ..task import GenerationTask


@dataclass
class SyntheticTask(GenerationTask):
    task: str = "add"
    corpus_dir: str | None = None
    max_shots: int = 0
    document_start: bool = True

    @property
    def arithmetic(self) -> bool:
        return self.task in syn.ARITH_TASKS

    @property
    def mode(self) -> str:
        return ("worked" if self.cot else "direct") if self.arithmetic else "qa"

    def docs(self) -> list[dict]:
        if self.corpus_dir is None:
            items = list(records("synthetic", f"eval-{self.task}", progress=False))
        else:
            items = syn._read_items(Path(self.corpus_dir) / "eval", self.task, None)
        if self.arithmetic:
            return [{**item, "operands": arith_operands(self.task, item["prompt"])} for item in items]
        return items

    def _reference(self, doc: dict) -> tuple[str, str]:
        if self.arithmetic:
            return syn.reference(self.task, self.mode, *doc["operands"])
        return doc["prompt"] + "\nAnswer:", " " + doc["answer"]

    def doc_to_text(self, doc: dict) -> str:
        return self._reference(doc)[0]

    def doc_to_target(self, doc: dict) -> str:
        return self._reference(doc)[1]

    def doc_text_for_contamination(self, doc: dict) -> str:
        # the question only: the worked solutions share their wording across every problem by design, so their
        # 13-grams are in training whatever the numbers
        return doc["prompt"]

    def stops(self) -> tuple[str, ...]:  # a drill or a question is answered on its line
        return () if self.mode == "worked" else ("\n",)

    def budget(self, doc: dict) -> int:
        # never fewer tokens than the reference's bytes: a model that writes the corpus's solution is not cut
        return len(self.doc_to_target(doc).encode()) + 8

    def extract(self, output: str) -> str | None:
        return syn.extract_answer(self.mode, output)

    def reference(self, doc: dict) -> str:
        return syn.extract_answer(self.mode, self.doc_to_target(doc))

    def score(self, doc: dict, output: str) -> dict[str, Any]:
        answer = self.extract(output)
        question = syn.direct_prompt(self.task, *doc["operands"]) if self.arithmetic else doc["prompt"]
        return {"exact_match": float(answer is not None and verify(self.task, question, answer)), "answer": answer}
