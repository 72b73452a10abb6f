"""Code generation: HumanEval (Chen et al. 2021) and MBPP (Austin et al. 2021), scored by running unit tests.

Every program runs in `lmlab.evals.sandbox` (own process and process group, time, memory and process limits,
no network, a throwaway directory). pass@1 of one greedy sample is the fraction of problems solved; with n
samples per problem (`--samples n --temperature T`) pass@k is the unbiased estimator of Chen et al.,
1 - C(n-c, k) / C(n, k) averaged over problems (`metrics.pass_at_k`).

HumanEval: the prompt is the function's signature and docstring; the model writes the body, cut at the first
line that starts a new top-level statement (the paper's stop sequences). MBPP: lm-evaluation-harness's prompt
("You are an expert Python programmer, and here is your task: ... Your code should pass these tests: ...
[BEGIN]"), 3-shot from the benchmark's own prompt split (task ids 2-4, as its paper does), ended by "[DONE]".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...data.sources import records
from ..task import GenerationTask


@dataclass
class CodeTask(GenerationTask):
    timeout: float = 10.0
    workers: int = 2

    def program(self, doc: dict, output: str) -> str:
        raise NotImplementedError

    def score_many(self, docs: Sequence[dict], outputs: Sequence[str]) -> list[dict[str, Any]]:
        from ..sandbox import SandboxLimits, run_programs

        programs = [self.program(d, o) for d, o in zip(docs, outputs, strict=True)]
        results = run_programs(programs, SandboxLimits(timeout=self.timeout), workers=self.workers)
        return [{"pass": float(r.passed), "status": r.status} for r in results]

    def score(self, doc: dict, output: str) -> dict[str, Any]:
        return self.score_many([doc], [output])[0]

    def extract(self, output: str) -> str | None:
        return output


@dataclass
class HumanEval(CodeTask):
    stop: tuple[str, ...] = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    max_new_tokens: int = 512
    max_shots: int = 0
    target_delimiter: str = ""

    def docs(self) -> list[dict]:
        return list(records("humaneval", "test", progress=False))

    def doc_to_text(self, doc: dict) -> str:
        return doc["prompt"]

    def doc_to_target(self, doc: dict) -> str:
        return doc["canonical_solution"]

    def program(self, doc: dict, output: str) -> str:
        from ..sandbox import humaneval_program

        return humaneval_program(doc, output)


@dataclass
class MBPP(CodeTask):
    stop: tuple[str, ...] = ("[DONE]",)
    max_new_tokens: int = 512
    default_shots: int = 3
    max_shots: int = 3
    target_delimiter: str = ""

    def docs(self) -> list[dict]:
        return list(records("mbpp", "test", progress=False))

    def fewshot_docs(self) -> list[dict]:
        return [d for d in records("mbpp", "prompt", progress=False) if d["task_id"] in (2, 3, 4)]

    def examples(self, doc_id: int, doc: dict, shots: int, seed: int) -> list[dict]:
        if self._fewshot_cache is None:
            self._fewshot_cache = self.fewshot_docs()
        if shots > len(self._fewshot_cache):
            raise ValueError(f"mbpp has {len(self._fewshot_cache)} few-shot examples; got --shots {shots}")
        return self._fewshot_cache[:shots]

    def doc_to_text(self, doc: dict) -> str:
        tests = "\n".join(doc["test_list"][:3])
        return (f"You are an expert Python programmer, and here is your task: {doc['text']} "
                f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")

    def doc_to_target(self, doc: dict) -> str:
        return f"{doc['code']}\n[DONE]"

    def program(self, doc: dict, output: str) -> str:
        from ..sandbox import mbpp_program

        return mbpp_program(doc, output)
