"""The evaluation harness: tasks and a model in, one results record out.

    results = evaluate(LM.from_dir("ckpt"), EvalConfig(tasks=["arc_easy", "gsm8k"], limit=200))
    write_results(results, "results.json"); print(markdown_table(results))

For every task the harness selects the documents (`--limit N`: the first N), builds each prompt (k-shot,
seeded, see `task.py`), asks the model, and scores:

- multiple choice: one batched log-likelihood request per (prompt, choice); acc, acc_norm, and the
  probability the model puts on its pick, for calibration (ECE);
- generation: n samples per document through the engine (greedy when temperature is 0). Every metric is the
  mean over samples (with n samples, the mean of pass is the unbiased pass@1); with n > 1 also `maj@n` (the
  majority answer of the n samples, Wang et al. 2023's self-consistency) and, for code, pass@k.

What a results record holds: the full configuration, per task the metrics with their standard errors, per
group (MMLU subject) the same, a HELM-style view (Liang et al. 2022: accuracy, calibration, robustness under
perturbations, efficiency, and contamination by the model's training data when given), and every sample: its
prompt, output or choice log-likelihoods, and scores.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..atomic import atomic_file
from .lm import LM
from .metrics import expected_calibration_error, majority_vote, mean_stderr, pass_at_k
from .perturb import PERTURBATIONS, perturber
from .task import GenerationTask, MultipleChoiceTask, Task
from .tasks import get_task, task_names

RESULTS_VERSION = 1


@dataclass
class EvalConfig:
    """What to evaluate and how. shots None: each task's default (MMLU 5, GSM8K 8, MBPP 3, others 0)."""

    tasks: list[str]
    limit: int | None = None
    shots: int | None = None
    seed: int = 1234
    samples: int = 1                      # generations per document
    temperature: float = 0.0
    top_p: float = 1.0
    cot: bool | None = None               # None: the task's default (chain of thought on for GSM8K)
    perturbations: list[str] = field(default_factory=list)
    contamination: list[str] = field(default_factory=list)  # training data paths for the 13-gram check
    corpus_dir: str | None = None         # the synthetic corpus the synthetic tasks read
    pass_ks: list[int] = field(default_factory=lambda: [1, 10, 100])

    def __post_init__(self) -> None:
        self.tasks = task_names(self.tasks)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit {self.limit}: give a positive number of documents (or none for all)")
        if self.shots is not None and self.shots < 0:
            raise ValueError(f"--shots {self.shots} must be >= 0")
        if self.samples < 1:
            raise ValueError(f"--samples {self.samples} must be >= 1")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(f"--samples {self.samples} with temperature 0 would repeat one greedy answer; "
                             "give --temperature > 0 (e.g. 0.8) to sample")
        for p in self.perturbations:
            if p not in PERTURBATIONS:
                raise ValueError(f"unknown perturbation {p!r}; choose from {', '.join(PERTURBATIONS)}")


def primary_metric(task: Task) -> str:
    if isinstance(task, MultipleChoiceTask):
        return "acc_norm" if task.name.startswith(("hellaswag", "arc")) else "acc"
    return "pass@1" if hasattr(task, "program") else "exact_match"


def _aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean and standard error of every numeric metric over documents."""
    out: dict[str, float] = {}
    keys = [k for k, v in rows[0].items() if isinstance(v, float) and k != "confidence"] if rows else []
    for k in keys:
        mean, stderr = mean_stderr([r[k] for r in rows])
        out[k], out[f"{k}_stderr"] = mean, stderr
    return out


def _contexts(task: Task, docs: Sequence[dict], ids: Sequence[int], shots: int, seed: int,
              perturbation: str | None) -> list[str]:
    perturb = perturber(perturbation, seed) if perturbation else None
    return [task.fewshot_context(i, d, shots, seed, perturb) for i, d in zip(ids, docs, strict=True)]


def run_multiple_choice(lm: LM, task: MultipleChoiceTask, docs: Sequence[dict], contexts: Sequence[str]
                        ) -> list[dict[str, Any]]:
    """Per document: its metrics and the log-likelihood of each choice."""
    conts = [task.continuations(d) for d in docs]
    requests = [(ctx, c) for ctx, cs in zip(contexts, conts, strict=True) for c in cs]
    results = lm.loglikelihood(requests, desc=task.name)
    rows, at = [], 0
    for doc, cs in zip(docs, conts, strict=True):
        lls = [ll for ll, _ in results[at:at + len(cs)]]
        at += len(cs)
        rows.append({**task.score(doc, lls), "loglikelihoods": lls})
    return rows


def run_generation(lm: LM, task: GenerationTask, docs: Sequence[dict], contexts: Sequence[str], *, samples: int,
                   temperature: float, top_p: float, seed: int, pass_ks: Sequence[int]) -> list[dict[str, Any]]:
    """Per document: its metrics (means over samples, maj@n, pass@k) and every sample's output and score."""
    prefix = [lm.tokenizer.eos_ids[0]] if task.document_start and getattr(lm.tokenizer, "eos_ids", None) else []
    prompts: list[Any] = [prefix + lm.encode(c) if prefix else c for c in contexts]
    flat_prompts, flat_params, flat_docs = [], [], []
    for i, (doc, prompt) in enumerate(zip(docs, prompts, strict=True)):
        for j in range(samples):
            sample_seed = None if temperature == 0 else seed * 1_000_003 + i * samples + j
            flat_prompts.append(prompt)
            flat_params.append(task.sampling(doc, temperature, sample_seed, top_p))
            flat_docs.append(doc)
    completions = lm.generate(flat_prompts, flat_params)
    outputs = [c.text for c in completions]
    scores = task.score_many(flat_docs, outputs)
    rows = []
    for i in range(len(docs)):
        own = scores[i * samples:(i + 1) * samples]
        outs = outputs[i * samples:(i + 1) * samples]
        numeric = [k for k, v in own[0].items() if isinstance(v, float)]
        row: dict[str, Any] = {k: sum(s[k] for s in own) / samples for k in numeric}
        if "pass" in row:
            c = int(sum(s["pass"] for s in own))
            for k in pass_ks:
                if k <= samples:
                    row[f"pass@{k}"] = pass_at_k(samples, c, k)
            del row["pass"]
        answers = [s.get("answer") for s in own]
        if samples > 1 and "exact_match" in own[0]:
            vote = majority_vote(answers)
            agreeing = [s for s in own if vote is not None and s.get("answer") == vote]
            row[f"maj@{samples}"] = agreeing[0]["exact_match"] if agreeing else 0.0
        row["outputs"] = outs
        row["sample_scores"] = own
        row["generated_tokens"] = [len(c.token_ids) for c in completions[i * samples:(i + 1) * samples]]
        rows.append(row)
    return rows


def _run(lm: LM, task: Task, docs, ids, shots, config: EvalConfig, perturbation: str | None = None):
    contexts = _contexts(task, docs, ids, shots, config.seed, perturbation)
    if isinstance(task, MultipleChoiceTask):
        return contexts, run_multiple_choice(lm, task, docs, contexts)
    return contexts, run_generation(lm, task, docs, contexts, samples=config.samples,
                                    temperature=config.temperature, top_p=config.top_p, seed=config.seed,
                                    pass_ks=config.pass_ks)


def evaluate_task(lm: LM, name: str, config: EvalConfig, *, progress: bool = False) -> dict[str, Any]:
    """One task's results: metrics, groups, HELM view, samples."""
    task = get_task(name, cot=config.cot, corpus_dir=config.corpus_dir)
    all_docs = task.docs()
    docs = task.select(all_docs, config.limit)
    index = {id(d): i for i, d in enumerate(all_docs)}
    ids = [index[id(d)] for d in docs]
    shots = task.default_shots if config.shots is None else config.shots
    if task.max_shots is not None and shots > task.max_shots:
        # one --shots for several tasks: a task that cannot take that many (TruthfulQA is zero-shot after its
        # primer, MMLU has 5 dev questions per subject) takes its most, and says so
        tqdm.write(f"{name}: {shots}-shot asked, the task allows {task.max_shots}; using {task.max_shots}")
        shots = task.max_shots
    metric = primary_metric(task)

    tokens_before, start = lm.tokens_processed, time.perf_counter()
    contexts, rows = _run(lm, task, docs, ids, shots, config)
    seconds = time.perf_counter() - start
    tokens = lm.tokens_processed - tokens_before

    metrics = _aggregate(rows)
    groups: dict[str, dict[str, float]] = {}
    by_group: dict[str, list[dict]] = defaultdict(list)
    for doc, row in zip(docs, rows, strict=True):
        g = task.group(doc)
        if g is not None:
            by_group[g].append(row)
    for g, grows in sorted(by_group.items()):
        groups[g] = {**_aggregate(grows), "n": len(grows)}

    helm: dict[str, Any] = {"accuracy": metrics.get(metric), "metric": metric,
                            "tokens_per_second": tokens / seconds if seconds > 0 else None, "seconds": seconds}
    if isinstance(task, MultipleChoiceTask) and "confidence" in rows[0]:
        correct = [r["pred"] == r["gold"] for r in rows]
        helm["ece"] = expected_calibration_error([r["confidence"] for r in rows], correct)
    robustness = {}
    for p in config.perturbations:
        _, prow = _run(lm, task, docs, ids, shots, config, perturbation=p)
        robustness[p] = _aggregate(prow).get(metric)
    if robustness:
        helm["robustness"] = robustness
        helm["robustness_worst"] = min(robustness.values())

    samples = []
    for doc_id, doc, ctx, row in zip(ids, docs, contexts, rows, strict=True):
        sample = {"doc_id": doc_id, "prompt": ctx, "target": task.doc_to_target(doc), **row}
        if isinstance(task, MultipleChoiceTask):
            sample["choices"] = task.choices(doc)
        if task.group(doc) is not None:
            sample["group"] = task.group(doc)
        samples.append(sample)
    return {"task": name, "kind": task.kind, "n": len(docs), "shots": shots, "metric": metric, "metrics": metrics,
            "groups": groups, "helm": helm, "samples": samples, "_task": task, "_docs": docs}


def _contamination(results: dict[str, dict], train: Sequence[str], progress: bool) -> None:
    """Mark every sample whose 13-grams overlap the training data, and score the clean remainder."""
    from ..data.contamination import ContaminationIndex, scan_training

    sets = {name: [r["_task"].doc_text_for_contamination(d) for d in r["_docs"]] for name, r in results.items()}
    index = ContaminationIndex(sets)
    scan_training(index, list(train), progress=progress)
    for report in index.reports(0):
        r = results[report.name]
        flagged = set(report.contaminated_items)
        for i, sample in enumerate(r["samples"]):
            sample["contaminated"] = i in flagged
        clean = [s for s in r["samples"] if not s["contaminated"]]
        metric = r["metric"]
        # None when no document is long enough to hold a 13-gram: nothing could be checked
        r["helm"]["contamination_percent"] = report.percent if report.checked else None
        r["helm"]["accuracy_clean"] = (sum(s[metric] for s in clean) / len(clean)) if clean else None


def evaluate(lm: LM, config: EvalConfig, *, model_path: str | None = None, progress: bool = True
             ) -> dict[str, Any]:
    """Run every task of `config` on `lm`; the results record (see the module docstring)."""
    started = time.time()
    results: dict[str, dict] = {}
    for name in tqdm(config.tasks, desc="tasks", unit="task", disable=not progress or len(config.tasks) < 2):
        results[name] = evaluate_task(lm, name, config, progress=progress)
    if config.contamination:
        _contamination(results, config.contamination, progress)
    record: dict[str, Any] = {
        "version": RESULTS_VERSION,
        "model": {"name": lm.name, "path": model_path, "parameters": sum(p.numel() for p in lm.model.parameters()),
                  "max_length": lm.max_length},
        "config": asdict(config),
        "environment": {"python": platform.python_version(), "started": started,
                        "seconds": time.time() - started},
        "results": {n: {"n": r["n"], "shots": r["shots"], "metric": r["metric"], **r["metrics"]}
                    for n, r in results.items()},
        "groups": {n: r["groups"] for n, r in results.items() if r["groups"]},
        "helm": {n: r["helm"] for n, r in results.items()},
        "samples": {n: r["samples"] for n, r in results.items()},
    }
    if any(hasattr(r["_task"], "program") for r in results.values()):
        from .sandbox import isolation_layers

        record["sandbox"] = isolation_layers()
    return record


def write_results(record: dict[str, Any], path: str | Path) -> Path:
    """Write the results record as JSON, atomically (a crash leaves the old file or none, never half)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as f:
        json.dump(record, f, indent=1, default=_json_default)
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"cannot write {type(value).__name__} to the results JSON")


def _fmt(value: float | None, pct: bool = True) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if pct else f"{value:.3g}"


def markdown_table(record: dict[str, Any]) -> str:
    """One row per task and metric, lm-evaluation-harness style: value and standard error in percent."""
    lines = ["| task | shots | n | metric | value | ± stderr |", "|---|---:|---:|---|---:|---:|"]
    for name, r in record["results"].items():
        for key, value in r.items():
            if key in ("n", "shots", "metric") or key.endswith("_stderr") or not isinstance(value, float):
                continue
            lines.append(f"| {name} | {r['shots']} | {r['n']} | {key} | {_fmt(value)} | "
                         f"{_fmt(r.get(key + '_stderr'))} |")
    return "\n".join(lines)


def helm_table(record: dict[str, Any]) -> str:
    """The multi-metric view: accuracy, calibration, robustness, efficiency, contamination, per task."""
    lines = ["| task | metric | accuracy | ECE | worst perturbed | tokens/s | contaminated % | clean accuracy |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, h in record["helm"].items():
        cont = h.get("contamination_percent")
        lines.append(f"| {name} | {h['metric']} | {_fmt(h['accuracy'])} | {_fmt(h.get('ece'))} | "
                     f"{_fmt(h.get('robustness_worst'))} | {_fmt(h.get('tokens_per_second'), pct=False)} | "
                     f"{'-' if cont is None else f'{cont:.1f}'} | {_fmt(h.get('accuracy_clean'))} |")
    return "\n".join(lines)
