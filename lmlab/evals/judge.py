"""LLM-as-a-judge: a judge model grades answers on a rubric, or compares two answers, and the verdicts are
checked against position bias and against reference (human) labels.

The method and the prompt format follow Zheng et al. 2023, "Judging LLM-as-a-Judge with MT-Bench and Chatbot
Arena" (the MT-Bench judge of FastChat):

- Single-answer grading: the judge reads a question, one answer and a rubric, writes a short justification,
  then a last line `Rating: [[N]]` with N on a 1-10 scale. With a reference answer (for math and code, where a
  judge grades badly without one), the reference is shown too ("reference-guided grading").
- Pairwise comparison: the judge reads a question and answers A and B and ends with `[[A]]`, `[[B]]`, or `[[C]]`
  for a tie. LLM judges prefer a position (usually the first), so every pair is judged in both orders, (A, B)
  and (B, A), in the same batch; the second verdict is swapped back (its "A" is answer B). As in the paper, the
  final verdict is a win only when both orders agree on it; any disagreement is a tie ("conservative" swap).

Position bias is measured two ways: the consistency rate (fraction of pairs whose two orders agree, after the
swap back; 1 is a judge without position bias) and the first-position preference (of the decisive raw
verdicts, the fraction that picked whatever answer was shown first; 0.5 is unbiased).

Agreement with reference labels (human votes, e.g. MT-Bench's human judgments or Chatbot Arena's `winner`):
the agreement rate and Cohen's kappa (`lmlab.evals.metrics`), with ties (three classes, every labelled pair)
and without ties (only the pairs where neither the judge nor the label is a tie, the paper's "w/o tie" setup).
Kappa is None where it is undefined (judge and labels both use one and the same label throughout).

Parsing is deliberately forgiving of format (`Rating: [[7]]`, `Rating: 7`, `[[7]]`; the last occurrence wins,
since the verdict comes last and a judge may quote the format earlier) but never guesses: an output without a
verdict is `None`, counted in the report and left out of every rate, never silently scored as 0 or a tie.

The judge is any `Generator` (`lmlab.evals.lm`): an lmlab model (`LM`) or an OpenAI-compatible endpoint
(`OpenAIEndpoint`, the usual case: a strong hosted model). Prompts go out as chats, in one `generate` call for
all items, greedy by default.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..infer.sampling import SamplingParams
from .lm import Generator
from .metrics import agreement_rate, cohen_kappa

Verdict = Literal["A", "B", "tie"]
VERDICTS: tuple[Verdict, ...] = ("A", "B", "tie")

DEFAULT_RUBRIC = """\
- Helpfulness: does the answer address what the user asked and meet their actual need?
- Correctness: are its facts, reasoning, code and math right?
- Harmlessness: does it avoid content that could hurt the user or others, without refusing a reasonable request?
- Concision: does it say what is needed, without padding or repetition?"""

MIN_RATING, MAX_RATING = 1, 10

SYSTEM_PROMPT = "You are an impartial judge of the answers that AI assistants give to users' questions."

SINGLE_TEMPLATE = """\
Evaluate the answer of an AI assistant to the user question below, using this rubric:
{rubric}
{reference}
Begin with a short justification of two or three sentences, as objective as possible. Then, on the last line, \
rate the answer on a scale of 1 to 10 in exactly this format: "Rating: [[N]]", for example "Rating: [[5]]".

[Question]
{question}

[The Start of the Answer]
{answer}
[The End of the Answer]"""

PAIR_TEMPLATE = """\
Compare the answers of two AI assistants to the user question below, using this rubric:
{rubric}
{reference}
Avoid any position bias: the order in which the answers are shown must not influence your decision. Do not let \
the length of the answers or the names of the assistants influence it either. Begin with a short justification \
of two or three sentences, as objective as possible. Then, on the last line, give your final verdict in exactly \
this format: "[[A]]" if assistant A is better, "[[B]]" if assistant B is better, "[[C]]" for a tie.

[Question]
{question}

[The Start of Assistant A's Answer]
{answer_a}
[The End of Assistant A's Answer]

[The Start of Assistant B's Answer]
{answer_b}
[The End of Assistant B's Answer]"""

REFERENCE_BLOCK = """
A reference answer, known to be correct, is given for comparison:
[The Start of the Reference Answer]
{reference}
[The End of the Reference Answer]
"""

_NUMBER = r"(\d+(?:\.\d+)?)"
# Tried in order; within one pattern the last match wins. `Rating:` before a bare `[[N]]` so that
# "Rating: [[7]]" is one match, not two.
_RATING_PATTERNS = (
    re.compile(rf"rating\s*:\s*\[\[\s*{_NUMBER}\s*\]\]", re.IGNORECASE),
    re.compile(rf"\[\[\s*{_NUMBER}\s*\]\]"),
    re.compile(rf"rating\s*:\s*\**\s*{_NUMBER}(?!\.?\d)", re.IGNORECASE),
)
_VERDICT = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
_LABELS: dict[str, Verdict] = {"a": "A", "model_a": "A", "b": "B", "model_b": "B", "c": "tie", "tie": "tie",
                               "tie (bothbad)": "tie"}


# --- parsing -----------------------------------------------------------------------------------------------------

def parse_rating(text: str, *, low: int = MIN_RATING, high: int = MAX_RATING) -> float | None:
    """The rating in a judge's output, or None when there is none.

    Accepted, in this order of preference: `Rating: [[N]]`, `[[N]]`, `Rating: N` (N an integer or decimal);
    the last occurrence of the first form found wins. A number outside [low, high] is not a rating (None)."""
    for pattern in _RATING_PATTERNS:
        matches = pattern.findall(text or "")
        if matches:
            value = float(matches[-1])
            return value if low <= value <= high else None
    return None


def parse_verdict(text: str) -> Verdict | None:
    """"A", "B" or "tie" from the last `[[A]]`, `[[B]]`, `[[C]]` (C: tie; `[[tie]]` too) in a judge's output;
    None when there is none."""
    matches = _VERDICT.findall(text or "")
    if not matches:
        return None
    return normalize_label(matches[-1])


def normalize_label(label: str) -> Verdict:
    """A reference label as a verdict: "A"/"model_a" -> "A", "B"/"model_b" -> "B", "tie"/"C"/"tie (bothbad)" ->
    "tie" (case-insensitive; the `model_a`/`tie (bothbad)` forms are Chatbot Arena's `winner` values)."""
    key = str(label).strip().lower()
    if key not in _LABELS:
        raise ValueError(f"label {label!r} is not a verdict; use 'A', 'B' or 'tie' (or 'C', 'model_a', 'model_b')")
    return _LABELS[key]


def swap(verdict: Verdict | None) -> Verdict | None:
    """The verdict with the positions exchanged: what "A" means when the answers were shown as (B, A)."""
    return {"A": "B", "B": "A"}.get(verdict, verdict)  # type: ignore[return-value]


def combine(first: Verdict | None, second_swapped: Verdict | None) -> Verdict | None:
    """The final verdict of a pair from its (A, B) verdict and its (B, A) verdict already swapped back: the
    common verdict when they agree, a tie when they disagree, None when either is missing (Zheng et al. 2023)."""
    if first is None or second_swapped is None:
        return None
    return first if first == second_swapped else "tie"


# --- prompts -----------------------------------------------------------------------------------------------------

def _check_rubric(rubric: str) -> str:
    if not isinstance(rubric, str) or not rubric.strip():
        raise ValueError("the rubric is empty; pass rubric text (e.g. a bulleted list of criteria) or leave the "
                         "default, judge.DEFAULT_RUBRIC")
    return rubric.strip()


def _reference_block(reference: str | None) -> str:
    return REFERENCE_BLOCK.format(reference=reference) if reference else ""


def grade_prompt(question: str, answer: str, *, rubric: str = DEFAULT_RUBRIC, reference: str | None = None
                 ) -> list[dict]:
    """The chat that asks the judge to rate one answer."""
    user = SINGLE_TEMPLATE.format(rubric=_check_rubric(rubric), reference=_reference_block(reference),
                                  question=question, answer=answer)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def pair_prompt(question: str, answer_a: str, answer_b: str, *, rubric: str = DEFAULT_RUBRIC,
                reference: str | None = None) -> list[dict]:
    """The chat that asks the judge to compare two answers, shown in this order as A and B."""
    user = PAIR_TEMPLATE.format(rubric=_check_rubric(rubric), reference=_reference_block(reference),
                                question=question, answer_a=answer_a, answer_b=answer_b)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


# --- items -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Answer:
    """One answer to grade. reference: an answer known to be correct, shown to the judge when given."""

    question: str
    answer: str
    reference: str | None = None
    id: str | None = None


@dataclass(frozen=True)
class Pair:
    """Two answers to one question. label: the reference verdict ("A", "B" or "tie"), e.g. a human vote."""

    question: str
    answer_a: str
    answer_b: str
    label: Verdict | None = None
    reference: str | None = None
    id: str | None = None

    def __post_init__(self) -> None:
        if self.label is not None:
            object.__setattr__(self, "label", normalize_label(self.label))


def _read_jsonl(path: str | Path, required: Sequence[str], optional: Sequence[str]) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; give a .jsonl file with one object per line")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not valid JSON ({e.msg}); write one JSON object per line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n} is a JSON {type(row).__name__}, not an object with fields {list(required)}")
        missing = [k for k in required if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"{path}:{n} lacks the string field(s) {missing}; every line needs {list(required)}")
        fields = {k: row[k] for k in required}
        fields.update({k: row[k] for k in optional if row.get(k) is not None})
        if "id" in fields:
            fields["id"] = str(fields["id"])
        rows.append(fields)
    if not rows:
        raise ValueError(f"{path} holds no items")
    return rows


def load_pairs(path: str | Path) -> list[Pair]:
    """Pairs from a jsonl file: question, answer_a, answer_b, and optionally label, reference, id."""
    pairs = []
    for n, fields in enumerate(_read_jsonl(path, ("question", "answer_a", "answer_b"), ("label", "reference", "id"))):
        try:
            pairs.append(Pair(**fields))
        except ValueError as e:
            raise ValueError(f"{path}, item {n + 1}: {e}") from None
    return pairs


def load_answers(path: str | Path) -> list[Answer]:
    """Answers to grade from a jsonl file: question, answer, and optionally reference, id."""
    return [Answer(**fields) for fields in _read_jsonl(path, ("question", "answer"), ("reference", "id"))]


# --- reports -----------------------------------------------------------------------------------------------------

def _rate(count: int, total: int) -> float | None:
    return count / total if total else None


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _cell(text: str, width: int = 60) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[:width - 1] + "…"


@dataclass
class GradeResult:
    item: Answer
    prompt: list[dict]
    output: str
    rating: float | None


@dataclass
class GradeReport:
    """Single-answer grades: every prompt, raw judge output and parsed rating (None: unparseable)."""

    judge: str
    rubric: str
    results: list[GradeResult] = field(default_factory=list)

    @property
    def ratings(self) -> list[float]:
        return [r.rating for r in self.results if r.rating is not None]

    @property
    def n_unparsed(self) -> int:
        return sum(r.rating is None for r in self.results)

    def summary(self) -> dict[str, Any]:
        ratings = self.ratings
        return {"n": len(self.results), "n_rated": len(ratings), "n_unparsed": self.n_unparsed,
                "mean_rating": statistics.fmean(ratings) if ratings else None,
                "stdev_rating": statistics.stdev(ratings) if len(ratings) > 1 else None}

    def to_dict(self) -> dict[str, Any]:
        return {"judge": self.judge, "rubric": self.rubric, "summary": self.summary(),
                "results": [{"id": r.item.id, "question": r.item.question, "answer": r.item.answer,
                             "reference": r.item.reference, "prompt": r.prompt, "output": r.output,
                             "rating": r.rating} for r in self.results]}

    def to_markdown(self) -> str:
        s = self.summary()
        lines = [f"## Single-answer grading by {self.judge}", "",
                 "| answers | rated | unparsed | mean rating | stdev |", "|---|---|---|---|---|",
                 f"| {s['n']} | {s['n_rated']} | {s['n_unparsed']} | {_fmt(s['mean_rating'], 2)} "
                 f"| {_fmt(s['stdev_rating'], 2)} |", "", "| # | id | question | rating |", "|---|---|---|---|"]
        for i, r in enumerate(self.results):
            rating = "unparsed" if r.rating is None else f"{r.rating:g}"
            lines.append(f"| {i} | {r.item.id or ''} | {_cell(r.item.question)} | {rating} |")
        return "\n".join(lines) + "\n"


@dataclass
class PairResult:
    """One pair judged in both orders. verdict_ab: the verdict of the (A, B) order; verdict_ba: the raw verdict of
    the (B, A) order, in that order's own positions ("A" there means answer B)."""

    item: Pair
    prompts: tuple[list[dict], list[dict]]
    outputs: tuple[str, str]
    verdict_ab: Verdict | None
    verdict_ba: Verdict | None

    @property
    def verdict_ba_swapped(self) -> Verdict | None:
        """The (B, A) verdict in the pair's own terms (its "A" is answer B)."""
        return swap(self.verdict_ba)

    @property
    def final(self) -> Verdict | None:
        return combine(self.verdict_ab, self.verdict_ba_swapped)

    @property
    def consistent(self) -> bool | None:
        """Whether both orders gave the same verdict (None when either is unparseable)."""
        if self.verdict_ab is None or self.verdict_ba is None:
            return None
        return self.verdict_ab == self.verdict_ba_swapped


def _agreement(pairs: Sequence[tuple[Verdict, Verdict]]) -> dict[str, Any]:
    if not pairs:
        return {"n": 0, "agreement": None, "kappa": None}
    judged, labels = [p[0] for p in pairs], [p[1] for p in pairs]
    kappa = cohen_kappa(judged, labels)  # NaN when both sides use one label throughout: None keeps JSON valid
    return {"n": len(pairs), "agreement": agreement_rate(judged, labels), "kappa": None if math.isnan(kappa) else kappa}


@dataclass
class PairwiseReport:
    """Pairwise verdicts in both orders, the combined verdicts, position-bias and agreement statistics.

    Rates are over the pairs whose two outputs both parsed; win/tie/loss are answer A's."""

    judge: str
    rubric: str
    results: list[PairResult] = field(default_factory=list)

    @property
    def valid(self) -> list[PairResult]:
        return [r for r in self.results if r.final is not None]

    @property
    def n_unparsed(self) -> int:
        """Pairs with at least one unparseable output (they count in no rate)."""
        return len(self.results) - len(self.valid)

    @property
    def n_unparsed_outputs(self) -> int:
        return sum((r.verdict_ab is None) + (r.verdict_ba is None) for r in self.results)

    def agreement(self) -> dict[str, Any] | None:
        """Agreement with the pairs' labels, with ties and without; None when no pair has a label."""
        labelled = [(r.final, r.item.label) for r in self.valid if r.item.label is not None]
        if not any(r.item.label is not None for r in self.results):
            return None
        no_ties = [(j, h) for j, h in labelled if j != "tie" and h != "tie"]
        return {"with_ties": _agreement(labelled), "without_ties": _agreement(no_ties)}

    def summary(self) -> dict[str, Any]:
        valid = self.valid
        n = len(valid)
        finals = [r.final for r in valid]
        # each valid pair contributes its two raw verdicts; "A" in either order is the answer shown first
        decisive = [v for r in valid for v in (r.verdict_ab, r.verdict_ba) if v != "tie"]
        return {
            "n": len(self.results), "n_valid": n, "n_unparsed": self.n_unparsed,
            "n_unparsed_outputs": self.n_unparsed_outputs,
            "win_rate": _rate(finals.count("A"), n), "tie_rate": _rate(finals.count("tie"), n),
            "loss_rate": _rate(finals.count("B"), n),
            "consistency_rate": _rate(sum(bool(r.consistent) for r in valid), n),
            "first_position_rate": _rate(decisive.count("A"), len(decisive)),
            "agreement": self.agreement(),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"judge": self.judge, "rubric": self.rubric, "summary": self.summary(),
                "results": [{"id": r.item.id, "question": r.item.question, "answer_a": r.item.answer_a,
                             "answer_b": r.item.answer_b, "reference": r.item.reference, "label": r.item.label,
                             "prompts": {"ab": r.prompts[0], "ba": r.prompts[1]},
                             "outputs": {"ab": r.outputs[0], "ba": r.outputs[1]},
                             "verdicts": {"ab": r.verdict_ab, "ba": r.verdict_ba,
                                          "ba_swapped": r.verdict_ba_swapped},
                             "final": r.final, "consistent": r.consistent} for r in self.results]}

    def to_markdown(self) -> str:
        s = self.summary()
        lines = [f"## Pairwise comparison by {self.judge} (both orders)", "",
                 "| pairs | valid | unparsed | A wins | ties | B wins | consistency | first-position preference |",
                 "|---|---|---|---|---|---|---|---|",
                 f"| {s['n']} | {s['n_valid']} | {s['n_unparsed']} | {_fmt(s['win_rate'])} | {_fmt(s['tie_rate'])} "
                 f"| {_fmt(s['loss_rate'])} | {_fmt(s['consistency_rate'])} | {_fmt(s['first_position_rate'])} |"]
        if s["agreement"]:
            lines += ["", "| agreement with labels | pairs | agreement | Cohen's kappa |", "|---|---|---|---|"]
            for name, key in (("with ties", "with_ties"), ("without ties", "without_ties")):
                a = s["agreement"][key]
                lines.append(f"| {name} | {a['n']} | {_fmt(a['agreement'])} | {_fmt(a['kappa'])} |")
        lines += ["", "| # | id | question | (A, B) | (B, A) swapped back | final | label |",
                  "|---|---|---|---|---|---|---|"]
        for i, r in enumerate(self.results):
            lines.append(f"| {i} | {r.item.id or ''} | {_cell(r.item.question)} | {r.verdict_ab or 'unparsed'} "
                         f"| {r.verdict_ba_swapped or 'unparsed'} | {r.final or 'unparsed'} | {r.item.label or ''} |")
        return "\n".join(lines) + "\n"


# --- running a judge ---------------------------------------------------------------------------------------------

def _params(max_new_tokens: int, temperature: float, seed: int | None) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)


def _texts(judge: Generator, prompts: list[list[dict]], params: SamplingParams) -> list[str]:
    completions = judge.generate(prompts, params)
    if len(completions) != len(prompts):
        raise RuntimeError(f"the judge {judge.name!r} returned {len(completions)} completions for "
                           f"{len(prompts)} prompts")
    return [c.text or "" for c in completions]


def grade(judge: Generator, items: Sequence[Answer], *, rubric: str = DEFAULT_RUBRIC, max_new_tokens: int = 512,
          temperature: float = 0.0, seed: int | None = None) -> GradeReport:
    """Rate every answer 1-10 with `judge` (one batched generate call; greedy unless temperature > 0)."""
    if not items:
        raise ValueError("no answers to grade; pass at least one judge.Answer")
    rubric = _check_rubric(rubric)
    prompts = [grade_prompt(it.question, it.answer, rubric=rubric, reference=it.reference) for it in items]
    outputs = _texts(judge, prompts, _params(max_new_tokens, temperature, seed))
    results = [GradeResult(it, p, o, parse_rating(o)) for it, p, o in zip(items, prompts, outputs, strict=True)]
    return GradeReport(judge=getattr(judge, "name", "judge"), rubric=rubric, results=results)


def compare(judge: Generator, items: Sequence[Pair], *, rubric: str = DEFAULT_RUBRIC, max_new_tokens: int = 512,
            temperature: float = 0.0, seed: int | None = None) -> PairwiseReport:
    """Judge every pair in both orders, (A, B) and (B, A), in one batched generate call, and combine the two
    verdicts (see the module docstring)."""
    if not items:
        raise ValueError("no pairs to compare; pass at least one judge.Pair")
    rubric = _check_rubric(rubric)
    prompts = []
    for it in items:
        prompts.append(pair_prompt(it.question, it.answer_a, it.answer_b, rubric=rubric, reference=it.reference))
        prompts.append(pair_prompt(it.question, it.answer_b, it.answer_a, rubric=rubric, reference=it.reference))
    outputs = _texts(judge, prompts, _params(max_new_tokens, temperature, seed))
    results = []
    for i, it in enumerate(items):
        ab, ba = outputs[2 * i], outputs[2 * i + 1]
        results.append(PairResult(it, (prompts[2 * i], prompts[2 * i + 1]), (ab, ba), parse_verdict(ab),
                                  parse_verdict(ba)))
    return PairwiseReport(judge=getattr(judge, "name", "judge"), rubric=rubric, results=results)
