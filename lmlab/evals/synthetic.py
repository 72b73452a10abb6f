"""Held-out synthetic tasks, asked the way a *pretrained* model has seen them, scored exactly.

The synthetic pretraining text (lmlab/data/synthetic.py) holds arithmetic in two forms, each a
document of its own (documents are separated by the tokenizer's end-of-text token):

    worked:  "Add 2505 and 7.\\nWrite the numbers in columns ...\\nSo 2505 + 7 = 2512.\\nAnswer: 2512"
    direct:  drill lines "2505 + 7 = 2512", one equation per line

and lookups, copying and story questions as "<question>\\nAnswer: <answer>". A base model (no
instruction tuning yet) is prompted with the document separator, then the first line of a worked
solution, or "a op b =", or the question followed by "\\nAnswer:"; it continues greedily through
`lmlab.infer.generate`. The answer is read from the completion (the first `Answer:` line, the first
line of a drill, the rest of the `Answer:` line) and checked by the corpus's own verifier,
`synthetic.verify`, which recomputes the truth from the prompt. The problems come from the
corpus's eval split (eval/add.jsonl, ...), which by construction never appears in training text.

Comparing the worked and direct columns shows what writing the steps out buys a small model
(Nye et al. 2021, "Show your work: scratchpads for intermediate computation").

Written here rather than as an lm-evaluation-harness task because the tasks, their formats and
their verifier are lmlab's own; this module imports lmlab.data and lmlab.infer, never lmlab.train.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..data.synthetic import OPS, WORKED, arith_operands, verify

ARITH_TASKS = tuple(OPS)  # add, sub, mul
MODES = ("worked", "direct")
QA_TASKS = ("kv", "copy", "story_qa")  # asked as "<prompt>\nAnswer:" in pretraining documents
_INTEGER = re.compile(r"-?\d+")
_ANSWER_LINE = re.compile(r"Answer:[ \t]*([^\n]*)")


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


# --- prompts and scoring ---------------------------------------------------------------------------

def worked_prompt(task: str, a: int, b: int) -> str:
    """The first line of the corpus's worked solution of a op b, e.g. "Add 2505 and 7.\\n"."""
    return reference(task, "worked", a, b)[0]


def direct_prompt(task: str, a: int, b: int) -> str:
    """The corpus's drill form, e.g. "2505 + 7 =" (the corpus continues " 2512")."""
    return reference(task, "direct", a, b)[0]


def reference(task: str, mode: str, a: int, b: int) -> tuple[str, str]:
    """(prompt, completion) as the corpus writes them for a op b: what a perfect model continues."""
    if task not in OPS or mode not in MODES:
        raise ValueError(f"unknown task/mode {task!r}/{mode!r}; tasks: {ARITH_TASKS}, modes: {MODES}")
    text, result = WORKED[task](a, b)
    if mode == "direct":
        return f"{a} {OPS[task]} {b} =", f" {result}"
    first, rest = text.split("\n", 1)
    return first + "\n", rest


def extract_answer(mode: str, completion: str) -> str | None:
    """The model's answer in a completion, or None when it gave none in the expected place.

    worked: the text of the first `Answer:` line (later lines may already be a new problem);
    direct: the first line, as in a drill "a + b = c";
    qa: the rest of the line after "Answer:" (the prompt ends with it).
    The answer must be an integer for worked and direct, so "12 apples" or "1 2" score wrong."""
    if mode == "worked":
        m = _ANSWER_LINE.search(completion)
        text = m.group(1) if m else None
    elif mode in ("direct", "qa"):
        text = completion.split("\n", 1)[0]
    else:
        raise ValueError(f"unknown mode {mode!r}; choose worked, direct or qa")
    if text is None:
        return None
    text = text.strip()
    if mode != "qa":
        text = text.rstrip(".")
        return text if _INTEGER.fullmatch(text) else None
    return text or None


def score(task: str, mode: str, a: int, b: int, completion: str) -> bool:
    """Whether `completion` of the `mode` prompt for a op b gives the right result."""
    answer = extract_answer(mode, completion)
    return answer is not None and verify(task, direct_prompt(task, a, b), answer)


def load_problems(eval_dir: str | Path, task: str, limit: int | None = None) -> list[tuple[int, int]]:
    """Operands (a, b) of the held-out problems in eval_dir/<task>.jsonl, in file order."""
    return [arith_operands(task, item["prompt"]) for item in _read_items(eval_dir, task, limit)]


def _read_items(eval_dir: str | Path, task: str, limit: int | None) -> list[dict[str, Any]]:
    path = Path(eval_dir) / f"{task}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; write the synthetic corpus with `lmlab data synth`")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not JSON ({e}); regenerate the corpus with `lmlab data synth`") from e
        if task in OPS and arith_operands(task, item.get("prompt", "")) is None:
            raise ValueError(f"{path}:{n}: {item.get('prompt')!r} is not a {task} problem")
        items.append(item)
    return items[:limit] if limit is not None else items


# --- generation ----------------------------------------------------------------------------------

def complete(model, tokenizer: TokenizerLike, prompts: Sequence[str], max_new_tokens: int | Sequence[int], *,
             prefix_ids: Sequence[int] = (), stop_token_ids: Sequence[int] = (), stop: Sequence[str] = (),
             batch_size: int = 64, progress: bool = False, desc: str = "generate") -> list[str]:
    """Greedy completions of `prompts`, each encoded after `prefix_ids` (e.g. the document
    separator the model was trained with, so that a prompt reads as the start of a document).

    max_new_tokens may be one number or one per prompt. Generation goes through the inference engine, which
    batches the prompts continuously (`batch_size` caps how many run at once); each prompt gets what it would
    get alone (greedy decoding does not depend on the batch)."""
    from ..infer.engine import EngineConfig
    from ..infer.sampling import SamplingParams
    from .lm import LM

    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts):
        raise ValueError(f"{len(budgets)} max_new_tokens for {len(prompts)} prompts")
    lm = LM(model, tokenizer, engine_config=EngineConfig(max_num_seqs=batch_size), progress=progress)
    params = [SamplingParams(max_new_tokens=b, temperature=0.0, stop_token_ids=list(stop_token_ids), stop=list(stop))
              for b in budgets]
    ids = [list(prefix_ids) + tokenizer.encode(p) for p in prompts]
    return [c.text for c in lm.generate(ids, params)]


# --- the evaluations -------------------------------------------------------------------------------

@dataclass
class TaskResult:
    """One task in one mode: how many problems, how many right, how many gave a readable answer."""

    task: str
    mode: str
    n: int
    correct: int
    answered: int  # completions with an answer in the expected place (right or wrong)
    examples: list[dict[str, Any]] = field(default_factory=list)  # the first few prompts and completions

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "mode": self.mode, "n": self.n, "correct": self.correct,
                "answered": self.answered, "accuracy": self.accuracy, "examples": self.examples}


def _result(task: str, mode: str, prompts: list[str], completions: list[str], right: list[bool],
            answered: list[bool], n_examples: int) -> TaskResult:
    examples = [{"prompt": p, "completion": c, "correct": r}
                for p, c, r in list(zip(prompts, completions, right, strict=True))[:n_examples]]
    return TaskResult(task, mode, len(prompts), sum(right), sum(answered), examples)


def evaluate_arithmetic(model, tokenizer: TokenizerLike, eval_dir: str | Path, *,
                        tasks: Sequence[str] = ARITH_TASKS, modes: Sequence[str] = MODES, limit: int | None = 200,
                        prefix_ids: Sequence[int] = (), stop_token_ids: Sequence[int] = (), batch_size: int = 64,
                        n_examples: int = 3, progress: bool = False) -> list[TaskResult]:
    """Greedy accuracy on up to `limit` held-out problems per task, in each mode.

    Each prompt may generate 1.5 times the tokens of the corpus's own solution, plus 8, so a
    model that writes the steps as the corpus does is never cut short. A direct answer ends at
    the end of its line."""
    problems = {task: load_problems(eval_dir, task, limit) for task in tasks}
    jobs = [(task, mode, a, b) for task in tasks for mode in modes for a, b in problems[task]]
    refs = [reference(task, mode, a, b) for task, mode, a, b in jobs]
    prompts = [p for p, _ in refs]
    budgets = [len(tokenizer.encode(c)) * 3 // 2 + 8 for _, c in refs]
    # One pass over every prompt (batched by budget); a direct answer is its first line, so a
    # newline may end it, while a worked one runs to the end of the document.
    completions = complete(model, tokenizer, prompts, budgets, prefix_ids=prefix_ids, stop_token_ids=stop_token_ids,
                           batch_size=batch_size, progress=progress, desc="arithmetic")
    results = []
    for task in tasks:
        for mode in modes:
            rows = [i for i, job in enumerate(jobs) if job[:2] == (task, mode)]
            right = [score(task, mode, jobs[i][2], jobs[i][3], completions[i]) for i in rows]
            answered = [extract_answer(mode, completions[i]) is not None for i in rows]
            results.append(_result(task, mode, [prompts[i] for i in rows], [completions[i] for i in rows], right,
                                   answered, n_examples))
    return results


def evaluate_qa(model, tokenizer: TokenizerLike, eval_dir: str | Path, *, tasks: Sequence[str] = QA_TASKS,
                limit: int | None = 200, max_prompt_tokens: int | None = None, prefix_ids: Sequence[int] = (),
                stop_token_ids: Sequence[int] = (), batch_size: int = 64, n_examples: int = 3,
                progress: bool = False) -> list[TaskResult]:
    """Greedy accuracy on held-out lookups, copying and story questions, prompted as the corpus
    writes them in pretraining ("<prompt>\\nAnswer:") and scored by `verify` on the rest of the
    line. Problems whose prompt is longer than max_prompt_tokens (the model's context, say) are
    left out before the first `limit` are taken."""
    asked: list[tuple[str, dict[str, Any], str]] = []  # (task, item, prompt)
    for task in tasks:
        items = [(task, item, item["prompt"] + "\nAnswer:") for item in _read_items(eval_dir, task, None)]
        if max_prompt_tokens is not None:
            items = [x for x in items if len(prefix_ids) + len(tokenizer.encode(x[2])) <= max_prompt_tokens]
        asked += items[:limit]
    budgets = [len(tokenizer.encode(" " + item["answer"])) * 3 // 2 + 4 for _, item, _ in asked]
    completions = complete(model, tokenizer, [p for _, _, p in asked], budgets, prefix_ids=prefix_ids,
                           stop_token_ids=stop_token_ids, stop=["\n"], batch_size=batch_size, progress=progress,
                           desc="questions")
    answers = [extract_answer("qa", c) for c in completions]
    results = []
    for task in tasks:
        rows = [i for i, (t, _, _) in enumerate(asked) if t == task]
        right = [answers[i] is not None and verify(task, asked[i][1]["prompt"], answers[i]) for i in rows]
        results.append(_result(task, "qa", [asked[i][2] for i in rows], [completions[i] for i in rows], right,
                               [answers[i] is not None for i in rows], n_examples))
    return results


def accuracy_table(results: Sequence[TaskResult]) -> dict[str, dict[str, float]]:
    """mode -> task -> accuracy."""
    table: dict[str, dict[str, float]] = {}
    for r in results:
        table.setdefault(r.mode, {})[r.task] = r.accuracy
    return table


def mean_accuracy(results: Sequence[TaskResult], mode: str) -> float:
    """The unweighted mean over tasks of one mode's accuracies (0 when there are none)."""
    values = [r.accuracy for r in results if r.mode == mode]
    return sum(values) / len(values) if values else 0.0


# --- after fine-tuning: the same tasks as a chat ---------------------------------------------------

CHAT_TASKS = ("add", "sub", "mul", "kv", "copy", "story_qa", "format")


def evaluate_chat(model, tokenizer, eval_dir: str | Path, *, tasks: Sequence[str] = CHAT_TASKS,
                  limit: int | None = 200, max_new_tokens: int = 192, batch_size: int = 64, n_examples: int = 3,
                  progress: bool = False) -> list[TaskResult]:
    """Greedy accuracy on the held-out problems asked as a chat: the problem is the user's message, rendered with
    the tokenizer's chat template and the assistant's header; the reply runs to the end of the turn and is
    scored by `verify` (a worked reply counts by its `Answer:` line). This is the format supervised fine-tuning
    teaches (the corpus's sft split asks the same kinds of problems); a base model that never saw the template
    scores near zero here, which is the point of measuring before and after. `answered` counts the replies that
    ended with the template's end-of-turn token (not an end of document), i.e. kept to the chat format. A
    problem whose prompt leaves no room to answer in the model's context is left out before the first `limit`
    are taken. Mode "chat"."""
    from ..infer.engine import EngineConfig
    from ..infer.sampling import SamplingParams
    from ..tokenizer.chat import end_of_turn_ids, turn_end_id
    from .lm import LM

    context = model.cfg.max_seq_len
    asked: list[tuple[str, dict[str, Any], list[int]]] = []
    for task in tasks:
        items = []
        for item in _read_items(eval_dir, task, None):
            ids = tokenizer.render_chat([{"role": "user", "content": item["prompt"]}], add_generation_prompt=True)[0]
            if len(ids) < context:
                items.append((task, item, ids))
        asked += items[:limit]
    stop_ids, turn_end = end_of_turn_ids(tokenizer), turn_end_id(tokenizer)
    lm = LM(model, tokenizer, engine_config=EngineConfig(max_num_seqs=batch_size), progress=progress)
    params = [SamplingParams(max_new_tokens=min(max_new_tokens, context - len(ids)), temperature=0.0,
                             stop_token_ids=stop_ids) for _, _, ids in asked]
    completions = lm.generate([ids for _, _, ids in asked], params)
    replies = [c.text.strip() for c in completions]
    ended = [c.stop_reason == turn_end for c in completions]
    results = []
    for task in tasks:
        rows = [i for i, (t, _, _) in enumerate(asked) if t == task]
        right = [verify(task, asked[i][1]["prompt"], replies[i]) for i in rows]
        results.append(_result(task, "chat", [asked[i][1]["prompt"] for i in rows], [replies[i] for i in rows],
                               right, [ended[i] for i in rows], n_examples))
    return results
