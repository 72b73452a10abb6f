"""Arithmetic on the synthetic corpus's held-out problems, asked the way a pretrained model has
seen arithmetic: with worked steps and as a direct answer.

The synthetic pretraining text (lmlab/data/synthetic.py) holds arithmetic in two forms:

    worked:   "Add 2505 and 7.\\nWrite the numbers in columns ...\\nSo 2505 + 7 = 2512.\\nAnswer: 2512"
    direct:   drill lines "2505 + 7 = 2512"

A base model (no instruction tuning yet) is prompted with the first line of a worked solution, or
with "a op b =", greedily continues, and is scored by the corpus's own verifier on the last
`Answer:` (worked) or the first number (direct). The problems come from the corpus's eval split
(eval/add.jsonl, ...), which is disjoint from everything it trained on. Comparing the two columns
shows what writing the steps out buys a small model (Nye et al. 2021, "Show your work").
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.synthetic import OPS, WORKED, arith_operands, final_answer

ARITH_TASKS = tuple(OPS)  # add, sub, mul
MODES = ("worked", "direct")
_FIRST_NUMBER = re.compile(r"^\s*(-?\d+)")


def worked_prompt(task: str, a: int, b: int) -> str:
    """The first line of the corpus's worked solution of a op b, e.g. "Add 2505 and 7.\\n"."""
    text, _ = WORKED[task](a, b)
    return text.split("\n", 1)[0] + "\n"


def direct_prompt(task: str, a: int, b: int) -> str:
    """The corpus's drill form, e.g. "2505 + 7 =" (the model writes " 2512")."""
    return f"{a} {OPS[task]} {b} ="


def score(task: str, mode: str, a: int, b: int, completion: str) -> bool:
    """Whether a completion of the `mode` prompt for a op b gives the right result."""
    truth = {"add": a + b, "sub": a - b, "mul": a * b}[task]
    if mode == "worked":
        if "Answer:" not in completion:
            return False
        numbers = re.findall(r"-?\d+", final_answer(completion.split("\n\n", 1)[0]))
        return bool(numbers) and int(numbers[0]) == truth
    m = _FIRST_NUMBER.match(completion.split("\n", 1)[0])
    return m is not None and int(m.group(1)) == truth


def load_problems(eval_dir: str | Path, task: str, limit: int | None = None) -> list[tuple[int, int]]:
    """Operands (a, b) of the held-out problems in eval_dir/<task>.jsonl, in file order."""
    path = Path(eval_dir) / f"{task}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; write the synthetic corpus with `lmlab data synth`")
    problems = []
    for line in path.read_text().splitlines():
        operands = arith_operands(task, json.loads(line)["prompt"])
        if operands is not None:
            problems.append(operands)
    return problems[:limit] if limit is not None else problems


@dataclass
class ArithResult:
    accuracy: dict[str, dict[str, float]]  # mode -> task -> accuracy
    counts: dict[str, int]  # task -> problems asked
    examples: list[dict[str, Any]] = field(default_factory=list)  # a few (prompt, completion, correct)

    def mean(self, mode: str) -> float:
        values = list(self.accuracy[mode].values())
        return sum(values) / len(values) if values else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "mean": {m: self.mean(m) for m in self.accuracy},
                "counts": self.counts, "examples": self.examples}


def evaluate_arithmetic(model, tokenizer, eval_dir: str | Path, tasks: Sequence[str] = ARITH_TASKS,
                        limit: int | None = 200, batch_size: int = 64, max_new_tokens: int = 160,
                        n_examples: int = 2) -> ArithResult:
    """Greedy accuracy of `model` on up to `limit` held-out problems per task, worked and direct."""
    from ..infer.generate import generate
    from ..infer.sampling import SamplingParams

    accuracy: dict[str, dict[str, float]] = {mode: {} for mode in MODES}
    counts, examples = {}, []
    for task in tasks:
        problems = load_problems(eval_dir, task, limit)
        counts[task] = len(problems)
        for mode in MODES:
            make = worked_prompt if mode == "worked" else direct_prompt
            params = SamplingParams(max_new_tokens=max_new_tokens if mode == "worked" else 12, temperature=0.0,
                                    stop_token_ids=list(tokenizer.eos_ids),
                                    stop=["\n\n"] if mode == "worked" else ["\n"])
            prompts = [make(task, a, b) for a, b in problems]
            completions = []
            for i in range(0, len(prompts), batch_size):
                ids = [tokenizer.encode(p) for p in prompts[i:i + batch_size]]
                completions += [c.text for c in generate(model, ids, params, decode=tokenizer.decode)]
            right = [score(task, mode, a, b, c) for (a, b), c in zip(problems, completions, strict=True)]
            accuracy[mode][task] = sum(right) / len(right) if right else 0.0
            examples += [{"task": task, "mode": mode, "prompt": p, "completion": c, "correct": r}
                         for p, c, r in list(zip(prompts, completions, right, strict=True))[:n_examples]]
    return ArithResult(accuracy, counts, examples)
