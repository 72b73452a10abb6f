"""Scaling laws: how loss falls with parameters N and training tokens D, and what to train for a
compute budget C.

The parametric law of Hoffmann et al. 2022 ("Chinchilla", eq. 2):

    L(N, D) = E + A / N^alpha + B / D^beta

Fitting it (their approach 3, appendix D.2): minimize over (a, b, e, alpha, beta), with
A = exp(a), B = exp(b), E = exp(e),

    sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),   delta = 1e-3

by L-BFGS from a grid of initializations (a, b in {0, 5, ..., 25}, e in {-1, -.5, ..., 1}, alpha,
beta in {0, .5, ..., 2}), keeping the lowest objective. Besiroglu et al. 2024 ("Chinchilla
Scaling: A replication attempt") found that the published fit stopped before converging because
of the loss scale: with delta = 1e-3 the objective is tiny and absolute tolerances end the
optimizer early. Here L-BFGS runs in float64 on objective / delta (the same minimum, on the scale
of the residuals) and the objective is reported with the law. To keep that affordable, the 4,500
grid points are all scored in one batched evaluation and L-BFGS starts from the best `starts` of
them; starting from every point finds the same minimum (tests/train/test_scaling.py, docs/scaling.md).

Compute-optimal allocation under C = 6 N D (Kaplan et al. 2020; Hoffmann et al. eq. 4):

    G = (alpha A / (beta B))^(1 / (alpha + beta))
    N_opt(C) = G (C / 6)^(beta / (alpha + beta)),   D_opt(C) = G^-1 (C / 6)^(alpha / (alpha + beta))

and, without a fitted law, the Chinchilla rule of thumb D = 20 N, i.e. N = sqrt(C / 120).

What N and C mean here: N is the non-embedding parameter count (`count_params(cfg,
embeddings=False)`, Kaplan et al.'s choice) and C = 6 N D. Kaplan et al. showed that losses of
models of different depths collapse onto one curve in non-embedding N and not in total N; for the
tiny models of a CPU sweep the embedding table would otherwise be most of N. (Hoffmann et al.
counted all parameters; Pearce & Song 2024 attribute much of the gap between the two papers'
exponents to that choice at small scale, so compare exponents within one convention.) The exact training
FLOPs (`flops_per_token`: the output projection and attention included) are recorded beside each
run as `flops_counted`, to show how far 6ND is from them at this scale.

Why written by hand: no lmlab dependency fits this law (scipy is not one), and the point of the
module is to show the fit: a few dozen lines of torch in float64.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..atomic import atomic_file

if TYPE_CHECKING:
    from .loop import RunResult

TOKENS_PER_PARAM = 20.0  # Hoffmann et al. 2022: ~20 tokens per parameter at the compute optimum
# Hoffmann et al. 2022, appendix D.2: the grid of initializations for (a, b, e, alpha, beta)
HOFFMANN_GRID: dict[str, tuple[float, ...]] = {
    "a": (0, 5, 10, 15, 20, 25), "b": (0, 5, 10, 15, 20, 25), "e": (-1, -0.5, 0, 0.5, 1),
    "alpha": (0, 0.5, 1, 1.5, 2), "beta": (0, 0.5, 1, 1.5, 2),
}
LAW_FIELDS = ("E", "A", "B", "alpha", "beta")


@dataclass
class ScalingLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta, with N non-embedding parameters and D tokens."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float | None = None  # the Huber objective at the fit (None when not fitted)
    fitted_on: dict[str, Any] | None = None  # {"points", "params": [lo, hi], "tokens": [lo, hi]} of the fit

    def loss(self, N: float, D: float) -> float:
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    @property
    def has_optimum(self) -> bool:
        """Whether loss falls with both N and D, so that a compute-optimal split exists."""
        return min(self.A, self.B, self.alpha, self.beta) > 0

    def optimal(self, C: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimizing L(N, D) subject to 6 N D = C (Hoffmann et al. eq. 4)."""
        if not C > 0:
            raise ValueError(f"the compute budget must be positive, got {C}")
        if not self.has_optimum:
            raise ValueError(f"this law has no compute-optimal frontier: it needs A, B, alpha, beta > 0, got "
                             f"A={self.A:.4g}, B={self.B:.4g}, alpha={self.alpha:.4g}, beta={self.beta:.4g}")
        a, b = self.alpha, self.beta
        G = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        return G * (C / 6.0) ** (b / (a + b)), (C / 6.0) ** (a / (a + b)) / G

    def formula(self) -> str:
        return (f"L(N, D) = {self.E:.4g} + {self.A:.4g} / N^{self.alpha:.4f} + "
                f"{self.B:.4g} / D^{self.beta:.4f}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScalingLaw:
        if not isinstance(d, dict):
            raise ValueError(f"a scaling law is a JSON object with {', '.join(LAW_FIELDS)}; got {type(d).__name__}")
        missing = [k for k in LAW_FIELDS if k not in d]
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if missing or unknown:
            raise ValueError(f"a scaling law needs exactly {', '.join(LAW_FIELDS)} (and optionally objective, "
                             f"fitted_on); missing {missing}, unknown {unknown}")
        values = {}
        for k in (*LAW_FIELDS, "objective"):
            v = d.get(k)
            if k == "objective" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{k} must be a finite number, got {v!r}")
            values[k] = float(v)
        fitted_on = d.get("fitted_on")
        if fitted_on is not None and not (isinstance(fitted_on, dict) and all(
                _is_range(fitted_on.get(k)) for k in ("params", "tokens"))):
            raise ValueError(f"fitted_on must be {{'points': n, 'params': [lo, hi], 'tokens': [lo, hi]}}, "
                             f"got {fitted_on!r}")
        return cls(**values, fitted_on=fitted_on)

    def save(self, path: str | Path) -> None:
        with atomic_file(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, path: str | Path) -> ScalingLaw:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"scaling law {path} does not exist; `lmlab scaling sweep` writes law.json")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except ValueError as e:  # json.JSONDecodeError is a ValueError too
            raise ValueError(f"{path} is not a scaling law file: {e}") from e


def _is_range(x: Any) -> bool:
    return isinstance(x, list) and len(x) == 2 and all(isinstance(v, (int, float)) and v > 0 for v in x)


def chinchilla_rule(C: float, tokens_per_param: float = TOKENS_PER_PARAM) -> tuple[float, float]:
    """(N, D) with C = 6 N D and D = tokens_per_param x N: N = sqrt(C / (6 tokens_per_param))."""
    if not (C > 0 and tokens_per_param > 0):
        raise ValueError(f"compute and tokens per parameter must be positive, got C={C}, {tokens_per_param}")
    N = math.sqrt(C / (6.0 * tokens_per_param))
    return N, tokens_per_param * N


def plan(C: float, law: ScalingLaw | None = None, tokens_per_param: float | None = None) -> dict[str, Any]:
    """The compute-optimal N (non-embedding) and D for C FLOPs: from the law's closed form when
    given, else from the tokens-per-parameter rule (default 20); with a model shape of about N."""
    if law is not None and tokens_per_param is not None:
        raise ValueError("give either a fitted law or a tokens-per-parameter rule, not both: the law sets the ratio")
    if law is not None:
        N, D = law.optimal(C)
    else:
        N, D = chinchilla_rule(C, TOKENS_PER_PARAM if tokens_per_param is None else tokens_per_param)
    out: dict[str, Any] = {"flops": C, "params": N, "tokens": D, "tokens_per_param": D / N}
    if law is not None:
        out["loss"] = law.loss(N, D)
    out["shape"] = shape_for_params(N)
    return out


# --- fitting -------------------------------------------------------------------------------
def _objective(theta: torch.Tensor, logN: torch.Tensor, logD: torch.Tensor, logL: torch.Tensor,
               delta: float) -> torch.Tensor:
    """Hoffmann et al.'s approach-3 objective for each row of theta (S, 5) = (a, b, e, alpha, beta)
    -> (S,): sum_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i)."""
    a, b, e, alpha, beta = (x[:, None] for x in theta.unbind(-1))
    terms = torch.stack([a - alpha * logN, b - beta * logD, e.expand(-1, logN.numel())], dim=-1)
    predicted = torch.logsumexp(terms, dim=-1)
    return F.huber_loss(predicted, logL.expand_as(predicted), reduction="none", delta=delta).sum(-1)


def _lbfgs(start: torch.Tensor, logN: torch.Tensor, logD: torch.Tensor, logL: torch.Tensor, delta: float,
           max_iter: int) -> tuple[float, torch.Tensor]:
    """L-BFGS from one start -> (objective, theta). It minimizes objective / delta: the same
    minimum, on a scale (about |residual| per point) where its absolute tolerances mean something
    whether the residuals sit in Huber's quadratic zone or beyond it."""
    theta = start.clone()[None].requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=max_iter, max_eval=2 * max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        value = _objective(theta, logN, logD, logL, delta).sum() / delta
        value.backward()
        return value

    opt.step(closure)
    with torch.no_grad():
        return float(_objective(theta, logN, logD, logL, delta)), theta.detach()[0]


def fit(N: Sequence[float], D: Sequence[float], L: Sequence[float], delta: float = 1e-3,
        grid: dict[str, Sequence[float]] | None = None, starts: int = 16, max_iter: int = 500) -> ScalingLaw:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to observed losses (Chinchilla approach 3).

    grid: initial values of a = log A, b = log B, e = log E, alpha, beta (default HOFFMANN_GRID);
    L-BFGS runs from the `starts` grid points of lowest objective (all of them when starts >= the
    grid's size) and the lowest final objective wins."""
    N_, D_, L_ = (torch.as_tensor(x, dtype=torch.float64).flatten() for x in (N, D, L))
    logN, logD, logL = torch.log(N_), torch.log(D_), torch.log(L_)
    if not (logN.shape == logD.shape == logL.shape):
        raise ValueError(f"N, D and L must have the same length, got {logN.numel()}, {logD.numel()}, {logL.numel()}")
    if logN.numel() < len(LAW_FIELDS):
        raise ValueError(f"need at least {len(LAW_FIELDS)} (N, D, L) points to fit 5 parameters, got {logN.numel()}")
    if not all(torch.isfinite(x).all() for x in (logN, logD, logL)):
        raise ValueError("N, D and L must be positive and finite")
    if starts < 1 or delta <= 0:
        raise ValueError(f"starts must be at least 1 and delta positive, got starts={starts}, delta={delta}")
    grid = HOFFMANN_GRID if grid is None else grid
    if set(grid) != {"a", "b", "e", "alpha", "beta"} or not all(len(v) for v in grid.values()):
        raise ValueError("grid maps each of a, b, e, alpha, beta to a non-empty list of initial values")
    points = torch.tensor(list(itertools.product(*(grid[k] for k in ("a", "b", "e", "alpha", "beta")))),
                          dtype=torch.float64)
    with torch.no_grad():
        scores = _objective(points, logN, logD, logL, delta)
    best: tuple[float, torch.Tensor] | None = None
    for start in points[scores.argsort()[:starts]]:
        value, theta = _lbfgs(start, logN, logD, logL, delta, max_iter)
        if math.isfinite(value) and torch.isfinite(theta).all() and (best is None or value < best[0]):
            best = (value, theta)
    if best is None:
        raise ValueError("the fit diverged from every start; check that the losses are sensible (positive, finite)")
    a, b, e, alpha, beta = best[1].tolist()
    fitted_on = {"points": logN.numel(), "params": [float(N_.min()), float(N_.max())],
                 "tokens": [float(D_.min()), float(D_.max())]}
    return ScalingLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta, objective=best[0],
                      fitted_on=fitted_on)


# --- model shapes: one dial ------------------------------------------------------------------
ASPECT = 64  # d_model per layer (nanochat's depth dial: d_model = 64 x depth); Kaplan et al. 2020
#              found loss nearly flat in the aspect ratio over a wide range, so one ratio serves all sizes
HEAD_DIM = 64


def model_shape(d_model: int) -> dict[str, int]:
    """The shape that width d_model sets: n_layers = d_model // 64 (at least 2), 64-dimensional heads
    (two heads below width 128), and a gated MLP of 8/3 x d_model rounded up to a multiple of 8,
    which keeps the 12 d_model^2 parameters per layer of a 4x MLP (Shazeer 2020)."""
    if d_model < 8 or d_model % 2:
        raise ValueError(f"model width must be an even number of at least 8, got {d_model}")
    if d_model >= 2 * HEAD_DIM and d_model % HEAD_DIM:
        raise ValueError(f"widths from {2 * HEAD_DIM} up must be multiples of {HEAD_DIM} ({HEAD_DIM}-dim heads), "
                         f"got {d_model}")
    n_heads = d_model // HEAD_DIM if d_model >= 2 * HEAD_DIM else 2
    return {"d_model": d_model, "n_layers": max(2, d_model // ASPECT), "n_heads": n_heads,
            "d_ff": 8 * math.ceil(8 * d_model / 3 / 8)}


def non_embedding_params(shape: dict[str, int]) -> int:
    """N of `model_shape`'s shape (tied embeddings, so the output projection is not counted)."""
    from ..model.config import ModelConfig
    from ..model.counting import count_params

    return count_params(ModelConfig(vocab_size=1, tie_embeddings=True, **shape), embeddings=False)


def shape_for_params(N: float) -> dict[str, int]:
    """The `model_shape` whose non-embedding parameter count is closest to N (in ratio)."""
    if not N > 0:
        raise ValueError(f"the parameter count must be positive, got {N}")
    # 12 d^3 / 64 = N for the 64-aspect dial; search the widths around that
    guess = max(2 * HEAD_DIM, (N * ASPECT / 12) ** (1 / 3))
    widths = [w for w in range(16, 2 * HEAD_DIM, 16)] if guess <= 2 * HEAD_DIM else []
    centre = round(guess / HEAD_DIM)
    widths += [HEAD_DIM * k for k in range(max(2, centre - 3), centre + 4)]
    best = min((model_shape(w) for w in widths), key=lambda s: abs(math.log(non_embedding_params(s) / N)))
    return {**best, "params": non_embedding_params(best)}


# --- plots -----------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _savefig(fig, out: str | Path) -> Path:
    with atomic_file(out, "wb") as f:
        fig.savefig(f, format="png")
    return Path(out)


def _geomspace(lo: float, hi: float, n: int) -> list[float]:
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


def plot_isoflops(points: list[dict], law: ScalingLaw, out: str | Path, levels: int = 5) -> Path:
    """Loss against N along iso-FLOP curves of the fitted law (C = 6ND held fixed, D = C / 6N),
    the observed runs colored by their own compute on the same scale, each curve's optimum
    marked with a star and the compute-optimal frontier through the stars."""
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    Cs = [p["flops"] for p in points]
    Ns = [p["params"] for p in points]
    norm, cmap = LogNorm(min(Cs), max(Cs) if max(Cs) > min(Cs) else min(Cs) * 10), plt.get_cmap("viridis")
    n_grid = _geomspace(min(Ns) / 4, max(Ns) * 4, 200)
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    frontier = []
    for C in _geomspace(norm.vmin, norm.vmax, levels):
        ax.plot(n_grid, [law.loss(n, C / (6 * n)) for n in n_grid], color=cmap(norm(C)), lw=1.2)
        if law.has_optimum:
            n_opt, d_opt = law.optimal(C)
            frontier.append((n_opt, law.loss(n_opt, d_opt)))
            ax.plot([n_opt], [frontier[-1][1]], "*", color=cmap(norm(C)), ms=12, mec="k", mew=0.5, zorder=4)
    if frontier:
        ax.plot(*zip(*frontier, strict=True), "k--", lw=0.8, label="compute-optimal N (fit)")
    ax.scatter(Ns, [p["loss"] for p in points], c=Cs, cmap=cmap, norm=norm, edgecolors="k", zorder=3,
               label="runs (colored by their C)")
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="compute C = 6ND (FLOPs)")
    losses = [p["loss"] for p in points]  # the curves shoot up far from their optimum: frame the runs
    ax.set_ylim(min(losses) * 0.8, max(losses) * 1.25)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("validation loss")
    ax.set_title("isoFLOP curves of the fitted law (lines) and the runs (dots)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = _savefig(fig, out)
    plt.close(fig)
    return path


def plot_fit(points: list[dict], law: ScalingLaw, out: str | Path) -> Path:
    """Left: loss against tokens for each model size, runs and fitted curves. Right: predicted
    against observed loss, with the line of perfect agreement."""
    plt = _pyplot()
    from matplotlib.ticker import NullFormatter

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120)
    sizes = sorted({p["params"] for p in points})
    cmap = plt.get_cmap("plasma")
    tokens = [p["tokens"] for p in points]
    d_grid = _geomspace(min(tokens) / 2, max(tokens) * 2, 100)
    for i, n in enumerate(sizes):
        mine = [p for p in points if p["params"] == n]
        color = cmap(i / max(1, len(sizes)))
        ax.scatter([p["tokens"] for p in mine], [p["loss"] for p in mine], color=color, edgecolors="k", zorder=3)
        ax.plot(d_grid, [law.loss(n, d) for d in d_grid], color=color, lw=1.2, label=f"N = {n:,}")
        bx.scatter([p["loss"] for p in mine], [law.loss(n, p["tokens"]) for p in mine], color=color, edgecolors="k")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # labels on every minor tick overlap
    ax.set_xlabel("training tokens D")
    ax.set_ylabel("validation loss")
    ax.set_title(law.formula(), fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    observed = [p["loss"] for p in points]
    lo, hi = min(observed), max(observed)
    bx.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    bx.set_xlabel("observed validation loss")
    bx.set_ylabel("predicted by the fit")
    bx.set_title("fit against observation", fontsize=10)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    path = _savefig(fig, out)
    plt.close(fig)
    return path


# --- the sweep --------------------------------------------------------------------------------
DEFAULT_WIDTHS = (32, 48, 64, 96, 128)  # N from 25k to 395k non-embedding parameters
DEFAULT_STEPS = (50, 100, 200, 400)
QUICK_WIDTHS = (32, 48, 64)
QUICK_STEPS = (25, 50, 100)
SWEEP_KEYS = {"model": ("d_model", "n_layers", "n_heads", "d_ff"), "train": ("steps", "out_dir"),
              "data": ("path", "tokenizer")}  # what the sweep sets in every run; the recipe must not
VAL_FRACTION = 0.05


@dataclass
class SweepResult:
    out: Path
    points: list[dict[str, Any]] = field(default_factory=list)  # one record per finished run of the grid
    law: ScalingLaw | None = None
    frontier: list[dict[str, Any]] = field(default_factory=list)  # plan(C, law) at round budgets
    interrupted: bool = False  # a run was stopped by SIGINT/SIGTERM; rerunning the sweep resumes it


def _prepare_data(root: Path, data: str, vocab_size: int, progress: bool) -> tuple[Path, Path]:
    """Token shards and tokenizer for `data` under root (made once, reused after): `synthetic`
    generates the built-in corpus, any other name is read from the dataset registry."""
    from ..data.shards import write_shards
    from ..tokenizer import Tokenizer

    tok_dir, shards = root / "tokenizer", root / "shards"
    if (shards / "meta.json").is_file() and tok_dir.is_dir():
        return shards, tok_dir
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        if data == "synthetic":
            from ..data.synthetic import SynthConfig, generate

            generate(Path(tmp) / "synth", SynthConfig.from_size("small"), progress=progress)
            lines = (Path(tmp) / "synth" / "pretrain" / "train.jsonl").read_text().splitlines()
            docs = [json.loads(x)["text"] for x in lines]
        else:
            from ..data.sources import texts

            docs = list(texts(data, "train", progress=progress))
        tokenizer = Tokenizer.train(docs, vocab_size=vocab_size, progress=progress)
        tokenizer.save(tok_dir, overwrite=True)
        write_shards(docs, tokenizer, shards, val_fraction=VAL_FRACTION, progress=progress, overwrite=True)
    return shards, tok_dir


def _fingerprint(recipe: dict, data: str, vocab_size: int) -> str:
    text = json.dumps({"recipe": recipe, "data": data, "vocab_size": vocab_size}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_sweep_dir(out: Path, recipe: dict, data: str, vocab_size: int, overwrite: bool) -> dict[str, Any]:
    """A sweep directory holds runs of one base recipe and data set: a rerun with the same ones
    adds to it, different ones are refused (unless overwrite, which deletes the old runs). Returns
    what sweep.json should hold, written once the data is ready."""
    meta = out / "sweep.json"
    this = {"fingerprint": _fingerprint(recipe, data, vocab_size), "data": data, "vocab_size": vocab_size,
            "recipe": recipe}
    if meta.is_file() and not overwrite:
        old = json.loads(meta.read_text())
        if old.get("fingerprint") != this["fingerprint"]:
            raise ValueError(f"{out} holds a sweep of another base recipe or data set (data={old.get('data')!r}, "
                             f"vocab_size={old.get('vocab_size')}; see {meta}); its runs would not be comparable. "
                             "Choose another --out, or pass --overwrite to delete its runs and start over")
        return this
    if not meta.is_file() and (out / "sweep.jsonl").is_file() and not overwrite:
        raise ValueError(f"{out} holds sweep.jsonl but no sweep.json to say which recipe made its runs; choose "
                         "another --out, or pass --overwrite to delete its runs and start over")
    if overwrite:
        for name in ("runs", "sweep.jsonl", "law.json", "isoflop.png", "fit.png", "summary.txt"):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    return this


def _read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _final_val_loss(result: RunResult, run_dir: Path, steps: int) -> float:
    """The validation loss at the last step: from the run, or, when a resumed run had nothing left
    to train, from the evaluation its metrics.jsonl recorded at that step."""
    from .metrics import read_metrics

    if "val_loss" in result.eval:
        return float(result.eval["val_loss"])
    evals = [r for r in read_metrics(run_dir) if r.get("kind") == "eval" and r.get("step") == steps]
    if not evals:
        raise RuntimeError(f"{run_dir} finished without a final evaluation; delete it and rerun the sweep")
    return float(evals[-1]["val_loss"])


def _run(recipe: dict, width: int, steps: int, shards: Path, tok_dir: Path, run_dir: Path,
         progress: bool) -> dict[str, Any] | None:
    """Train one point of the grid (resuming an interrupted run of it); its record, or None when
    interrupted."""
    from ..model.counting import count_params, flops_per_token
    from .checkpoint import latest_checkpoint
    from .config import resolve
    from .pretrain import pretrain

    r = json.loads(json.dumps(recipe))  # a deep copy
    r.setdefault("model", {}).update(model_shape(width))
    r.setdefault("data", {}).update({"path": str(shards), "tokenizer": str(tok_dir)})
    r.setdefault("train", {}).update({"steps": steps, "out_dir": str(run_dir)})
    cfg = resolve(r)
    resume = latest_checkpoint(run_dir) is not None
    started = time.perf_counter()
    result = pretrain(cfg, resume=resume, overwrite=not resume, progress=progress)
    if result.interrupted:
        return None
    N = count_params(cfg.model, embeddings=False)
    return {"width": width, "n_layers": cfg.model.n_layers, "steps": steps, "params": N, "tokens": result.tokens,
            "flops": 6.0 * N * result.tokens,
            "flops_counted": float(flops_per_token(cfg.model, cfg.data.seq_len)) * result.tokens,
            "loss": _final_val_loss(result, run_dir, steps), "seconds": round(time.perf_counter() - started, 1)}


def _check_grid(recipe: dict, widths: Sequence[int], steps: Sequence[int]) -> None:
    for section, keys in SWEEP_KEYS.items():
        taken = [f"{section}.{k}" for k in keys if k in (recipe.get(section) or {})]
        if taken:
            raise ValueError(f"the sweep sets {', '.join(taken)} for every run; remove them from the base recipe")
    for w in widths:
        model_shape(w)  # raises for a width the dial cannot shape
    if any(s < 1 for s in steps):
        raise ValueError(f"training lengths must be at least 1 step, got {list(steps)}")
    if len(set(widths)) < 2 or len(set(steps)) < 2 or len(set(widths)) * len(set(steps)) < len(LAW_FIELDS):
        raise ValueError(f"the law has 5 parameters and separates N from D: give at least 2 widths and 2 training "
                         f"lengths, and at least 5 runs in all (got {len(set(widths))} x {len(set(steps))})")


def frontier(law: ScalingLaw, points: list[dict]) -> list[dict[str, Any]]:
    """plan(C, law) at each power of ten from the sweep's smallest budget to 100x its largest."""
    if not law.has_optimum:
        return []
    lo, hi = (math.log10(f(p["flops"] for p in points)) for f in (min, max))
    return [plan(10.0**k, law) for k in range(math.floor(lo), math.ceil(hi) + 3)]


def sweep(out: str | Path, recipe: dict, widths: Sequence[int] = DEFAULT_WIDTHS,
          steps: Sequence[int] = DEFAULT_STEPS, data: str = "synthetic", vocab_size: int = 512,
          overwrite: bool = False, progress: bool = True) -> SweepResult:
    """Train every (width, steps) pair of the grid from the base recipe `recipe` (a recipe dict:
    the sweep sets the model shape, train.steps and the data), record (N, D, C, final validation
    loss) of each in out/sweep.jsonl, fit the law to the grid's runs, and write law.json,
    isoflop.png, fit.png and summary.txt.

    Reruns: finished runs are read back from sweep.jsonl, not retrained; an interrupted run
    (Ctrl-C leaves a checkpoint) is resumed. out/data/ caches the corpus, tokenizer and shards."""
    out = Path(out)
    widths, steps = sorted(set(widths)), sorted(set(steps))
    _check_grid(recipe, widths, steps)
    out.mkdir(parents=True, exist_ok=True)
    meta = _check_sweep_dir(out, recipe, data, vocab_size, overwrite)
    shards, tok_dir = _prepare_data(out / "data" / f"{data}-{vocab_size}", data, vocab_size, progress)
    with atomic_file(out / "sweep.json", "w") as f:
        json.dump(meta, f, indent=2)
    log = out / "sweep.jsonl"
    records = _read_records(log)
    done = {(r["width"], r["steps"]) for r in records}
    grid = list(itertools.product(widths, steps))
    from tqdm.auto import tqdm

    with tqdm(total=len(grid), desc="sweep", unit="run", disable=not progress) as bar:
        for width, n_steps in grid:
            if (width, n_steps) not in done:
                bar.set_postfix(width=width, steps=n_steps)
                record = _run(recipe, width, n_steps, shards, tok_dir, out / "runs" / f"w{width}_s{n_steps}",
                              progress)
                if record is None:
                    return SweepResult(out, [r for r in records if (r["width"], r["steps"]) in grid],
                                       interrupted=True)
                records.append(record)
                with atomic_file(log, "w") as f:  # the whole log, so a kill never leaves half a line
                    f.writelines(json.dumps(r) + "\n" for r in records)
            bar.update(1)
    points = sorted((r for r in records if (r["width"], r["steps"]) in grid), key=lambda r: (r["width"], r["steps"]))
    law = fit([p["params"] for p in points], [p["tokens"] for p in points], [p["loss"] for p in points])
    result = SweepResult(out, points, law, frontier(law, points))
    law.save(out / "law.json")
    plot_isoflops(points, law, out / "isoflop.png")
    plot_fit(points, law, out / "fit.png")
    with atomic_file(out / "summary.txt", "w") as f:
        f.write(summary_text(result))
    return result


def fit_warnings(law: ScalingLaw, points: list[dict]) -> list[str]:
    """What a reader of the fit should not miss: runs the law misses by more than 5%, and a loss
    floor E fitted at zero (no floor visible in the runs: they are still far above it)."""
    out = []
    worst = max(abs(law.loss(p["params"], p["tokens"]) / p["loss"] - 1) for p in points)
    if worst > 0.05:
        out.append(f"the law misses some runs by up to {100 * worst:.0f}%: they do not follow L = E + A/N^alpha + "
                   "B/D^beta well (runs too short to leave the early, fast-falling part of training, or too noisy); "
                   "train longer (--steps) before trusting the frontier")
    if law.E < 1e-3 * min(p["loss"] for p in points):
        out.append(f"E = {law.E:.2g}: the fit sees no loss floor, so losses and optima far beyond the runs are "
                   "unreliable")
    for name in ("alpha", "beta"):
        value = getattr(law, name)
        if not 0.01 <= value <= 2:  # language models show about 0.1 to 0.7 (Kaplan et al.; Hoffmann et al.)
            out.append(f"{name} = {value:.3g} is far from what language models show (0.1 to 0.7): the runs do not "
                       "pin it down; widen the grid or train longer")
    return out


def summary_text(result: SweepResult) -> str:
    """The runs, the fit and the compute-optimal frontier, as printed by `lmlab scaling sweep`."""
    law = result.law
    lines = [f"{'width':>5} {'layers':>6} {'N':>9} {'steps':>6} {'D':>9} {'C=6ND':>9} {'loss':>7} {'fit':>7} "
             f"{'resid':>7}"]
    for p in result.points:
        pred = law.loss(p["params"], p["tokens"]) if law else float("nan")
        lines.append(f"{p['width']:5d} {p['n_layers']:6d} {p['params']:9,d} {p['steps']:6d} {p['tokens']:9.3g} "
                     f"{p['flops']:9.3g} {p['loss']:7.4f} {pred:7.4f} {100 * (pred / p['loss'] - 1):+6.2f}%")
    if law is None:
        return "\n".join(lines) + "\n"
    lines += ["", f"fit (Chinchilla approach 3, {len(result.points)} runs, Huber objective {law.objective:.3g}):",
              f"  {law.formula()}"]
    lines += [f"  warning: {w}" for w in fit_warnings(law, result.points)]
    if not result.frontier:
        lines.append("  no compute-optimal frontier: the fit needs A, B, alpha, beta > 0 (too few or too noisy "
                     "runs; widen the grid)")
        return "\n".join(lines) + "\n"
    a, b = law.alpha, law.beta
    lines += [f"  compute-optimal scaling: N_opt ~ C^{b / (a + b):.3f}, D_opt ~ C^{a / (a + b):.3f}", "",
              f"{'C (FLOPs)':>10} {'N_opt':>10} {'D_opt':>10} {'D/N':>8} {'loss':>7}"]
    for row in result.frontier:
        lines.append(f"{row['flops']:10.0e} {row['params']:10.3g} {row['tokens']:10.3g} "
                     f"{row['tokens_per_param']:8.1f} {row['loss']:7.4f}")
    return "\n".join(lines) + "\n"
