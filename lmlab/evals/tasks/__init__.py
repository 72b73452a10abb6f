"""The benchmark registry: `get_task("arc_easy")` -> a Task. One module per kind of benchmark."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from ..synthetic import ARITH_TASKS, QA_TASKS
from ..task import GenerationTask, MultipleChoiceTask, Task
from .code import MBPP, HumanEval
from .gsm8k import GSM8K
from .multiple_choice import ARC, MMLU, HellaSwag, TruthfulQA
from .synthetic import SyntheticTask

TASKS: dict[str, Callable[..., Task]] = {
    "mmlu": MMLU,
    "hellaswag": HellaSwag,
    "arc_easy": partial(ARC, subset="easy"),
    "arc_challenge": partial(ARC, subset="challenge"),
    "truthfulqa_mc1": partial(TruthfulQA, variant="mc1"),
    "truthfulqa_mc2": partial(TruthfulQA, variant="mc2"),
    "gsm8k": GSM8K,
    "humaneval": HumanEval,
    "mbpp": MBPP,
    **{f"synthetic_{t}": partial(SyntheticTask, task=t) for t in (*ARITH_TASKS, *QA_TASKS)},
}
# names that stand for several tasks
GROUPS: dict[str, tuple[str, ...]] = {
    "arc": ("arc_easy", "arc_challenge"),
    "truthfulqa_mc": ("truthfulqa_mc1", "truthfulqa_mc2"),
    "synthetic": tuple(n for n in TASKS if n.startswith("synthetic_")),
}


def task_names(spec: str | list[str]) -> list[str]:
    """"mmlu,arc" -> ["mmlu", "arc_easy", "arc_challenge"]: groups expanded, duplicates dropped, order kept."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    out: list[str] = []
    for name in names:
        if name not in TASKS and name not in GROUPS:
            known = ", ".join([*TASKS, *GROUPS])
            raise ValueError(f"unknown task {name!r}; known tasks and groups: {known}")
        for n in GROUPS.get(name, (name,)):
            if n not in out:
                out.append(n)
    if not out:
        raise ValueError("no task given; name one or more, e.g. --tasks arc_easy,hellaswag")
    return out


def get_task(name: str, **options) -> Task:
    """The task `name`, with options (cot, corpus_dir, ...) set where the task has them."""
    task = TASKS[task_names([name])[0]](**{})
    for key, value in options.items():
        if value is not None and hasattr(task, key):
            setattr(task, key, value)
    task.name = name
    return task


__all__ = ["GROUPS", "TASKS", "GenerationTask", "MultipleChoiceTask", "Task", "get_task", "task_names"]
