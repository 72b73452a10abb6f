"""Test-time compute: how accuracy grows with the number of samples per question.

From one run with n samples per document (`lmlab eval --samples n --temperature T`), three curves over
k = 1, 2, 4, ..., n:

- self-consistency, maj@k (Wang et al. 2023): the most common extracted answer among k samples is the answer;
- best-of-k with a verifier (Cobbe et al. 2021): the sample the verifier scores highest is the answer. A
  verifier is any `score(prompts, outputs) -> list[float]`: `LikelihoodVerifier` ranks by a model's mean
  per-token log-probability of the output (the same or a stronger model), a reward model ranks by its reward;
- pass@k (Chen et al. 2021): some sample among k is right, the ceiling any selection can reach (an oracle
  verifier).

maj@k and best-of-k are averaged over up to `subsets` random k-subsets of the n samples (all of them when there
are fewer), so the curve does not depend on the order the samples came in; pass@k uses the unbiased estimator.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .metrics import majority_vote, pass_at_k

Verifier = Callable[[Sequence[str], Sequence[str]], list[float]]


class LikelihoodVerifier:
    """Scores an output by its mean per-token log-probability given the prompt under `lm` (an evals.lm.LM)."""

    def __init__(self, lm) -> None:
        self.lm = lm

    def __call__(self, prompts: Sequence[str], outputs: Sequence[str]) -> list[float]:
        pairs = [self.lm.encode_pair(p, o) if o else None for p, o in zip(prompts, outputs, strict=True)]
        scored = self.lm.loglikelihood_tokens([p for p in pairs if p is not None and p[1]])
        out, it = [], iter(scored)
        for p in pairs:
            if p is None or not p[1]:
                out.append(-math.inf)  # an empty output is never the best one
            else:
                ll, _ = next(it)
                out.append(ll / len(p[1]))
        return out


def _ks(n: int) -> list[int]:
    ks = [1]
    while ks[-1] * 2 <= n:
        ks.append(ks[-1] * 2)
    return ks if ks[-1] == n else [*ks, n]


def _subsets(n: int, k: int, count: int, rng: random.Random) -> list[list[int]]:
    if math.comb(n, k) <= count:
        from itertools import combinations

        return [list(c) for c in combinations(range(n), k)]
    return [rng.sample(range(n), k) for _ in range(count)]


def _correct(score: dict[str, Any]) -> float:
    return score.get("exact_match", score.get("pass", 0.0))


def task_curves(rows: Sequence[dict[str, Any]], *, verifier_scores: Sequence[Sequence[float]] | None = None,
                subsets: int = 32, seed: int = 0) -> dict[str, list[tuple[int, float]]]:
    """Curves for one task's documents: {"maj": [(k, acc)], "best_of": [...], "pass": [...]}.

    rows: the harness's per-document samples (with `sample_scores`); verifier_scores: per document, one score
    per sample."""
    n = len(rows[0]["sample_scores"])
    if any(len(r["sample_scores"]) != n for r in rows):
        raise ValueError("every document needs the same number of samples")
    rng = random.Random(seed)
    curves: dict[str, list[tuple[int, float]]] = {"maj": [], "pass": []}
    if verifier_scores is not None:
        curves["best_of"] = []
    for k in _ks(n):
        maj = best = passed = 0.0
        for d, row in enumerate(rows):
            scores = row["sample_scores"]
            right = [_correct(s) for s in scores]
            passed += pass_at_k(n, int(sum(r > 0 for r in right)), k)
            picks = _subsets(n, k, subsets, rng)
            m = b = 0.0
            for subset in picks:
                vote = majority_vote([scores[i].get("answer") for i in subset])
                m += next((right[i] for i in subset if vote is not None and scores[i].get("answer") == vote), 0.0)
                if verifier_scores is not None:
                    b += right[max(subset, key=lambda i: verifier_scores[d][i])]
            maj += m / len(picks)
            best += b / len(picks)
        curves["maj"].append((k, maj / len(rows)))
        curves["pass"].append((k, passed / len(rows)))
        if verifier_scores is not None:
            curves["best_of"].append((k, best / len(rows)))
    return curves


def scaling_curves(record: dict[str, Any], verifier: Verifier | None = None) -> dict[str, dict[str, list]]:
    """Curves for every generation task of a results record that has more than one sample per document."""
    out = {}
    for task, rows in record.get("samples", {}).items():
        if not rows or len(rows[0].get("sample_scores", [])) < 2:
            continue
        scores = None
        if verifier is not None:
            prompts = [r["prompt"] for r in rows for _ in r["outputs"]]
            flat = verifier(prompts, [o for r in rows for o in r["outputs"]])
            n = len(rows[0]["outputs"])
            scores = [flat[i * n:(i + 1) * n] for i in range(len(rows))]
        out[task] = task_curves(rows, verifier_scores=scores)
    return out


LABELS = {"maj": "self-consistency (maj@k)", "best_of": "best-of-k (verifier)", "pass": "pass@k (oracle)"}


def plot_scaling(curves: dict[str, dict[str, list]], path: str | Path) -> Path:
    """Accuracy against samples per question (log2 axis), one panel per task; written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_file

    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.6), squeeze=False)
    for ax, (task, task_curves_) in zip(axes[0], curves.items(), strict=True):
        for name, points in task_curves_.items():
            ks, accs = zip(*points, strict=True)
            ax.plot(ks, [100 * a for a in accs], marker="o", label=LABELS.get(name, name))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("samples per question (k)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return path
