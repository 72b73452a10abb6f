"""Scaling laws: how loss falls with parameters N and training tokens D, and what to train for a
compute budget C.

The parametric law of Hoffmann et al. 2022 ("Chinchilla", eq. 2):

    L(N, D) = E + A / N^alpha + B / D^beta

Fitting it (their approach 3, appendix D.2): minimize over (a, b, e, alpha, beta), with
A = exp(a), B = exp(b), E = exp(e),

    sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),   delta = 1e-3

with L-BFGS from a grid of starting points, keeping the best. (Besiroglu et al. 2024 showed the
published fit was under-converged; lmlab runs L-BFGS to tight tolerances in float64 and reports
the objective.) Here every grid point's objective is evaluated at once and L-BFGS starts from
the best few, which finds the same minimum as starting from all of them at a fraction of the cost.

Compute-optimal allocation under C = 6 N D (Kaplan et al. 2020; Hoffmann et al. eq. 4):

    G = (alpha A / (beta B))^(1 / (alpha + beta))
    N_opt(C) = G (C / 6)^(beta / (alpha + beta)),   D_opt(C) = G^-1 (C / 6)^(alpha / (alpha + beta))

and, without a fitted law, the Chinchilla rule of thumb D = 20 N, i.e. N = sqrt(C / 120).

N is the non-embedding parameter count and C = 6 N D, as in Kaplan et al.: embedding lookups cost
no matmul FLOPs, and with tiny models the embedding table would otherwise dominate N.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_file

TOKENS_PER_PARAM = 20.0  # Hoffmann et al. 2022: ~20 tokens per parameter at the compute optimum


@dataclass
class ScalingLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float | None = None  # the Huber objective at the fit (None when not fitted)

    def loss(self, N: float, D: float) -> float:
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    def optimal(self, C: float) -> tuple[float, float]:
        """(N_opt, D_opt) minimizing L(N, D) subject to 6 N D = C."""
        a, b = self.alpha, self.beta
        G = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        return G * (C / 6.0) ** (b / (a + b)), (C / 6.0) ** (a / (a + b)) / G

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScalingLaw:
        missing = {"E", "A", "B", "alpha", "beta"} - set(d)
        if missing:
            raise ValueError(f"a scaling law needs E, A, B, alpha and beta; missing {sorted(missing)}")
        return cls(**{k: float(v) if v is not None else None for k, v in d.items() if k in cls.__dataclass_fields__})

    def save(self, path: str | Path) -> None:
        with atomic_file(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str | Path) -> ScalingLaw:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"scaling law {path} does not exist; `lmlab scaling sweep` writes law.json")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path} is not a scaling law file: {e}") from e


def chinchilla_rule(C: float, tokens_per_param: float = TOKENS_PER_PARAM) -> tuple[float, float]:
    """(N, D) with C = 6 N D and D = tokens_per_param x N."""
    if C <= 0 or tokens_per_param <= 0:
        raise ValueError(f"compute and tokens per parameter must be positive, got C={C}, {tokens_per_param}")
    N = math.sqrt(C / (6.0 * tokens_per_param))
    return N, tokens_per_param * N


def plan(C: float, law: ScalingLaw | None = None, tokens_per_param: float = TOKENS_PER_PARAM) -> dict[str, float]:
    """The compute-optimal N and D for C FLOPs: from the law when given, else the 20-tokens rule."""
    if C <= 0:
        raise ValueError(f"the compute budget must be positive, got {C}")
    N, D = law.optimal(C) if law is not None else chinchilla_rule(C, tokens_per_param)
    out = {"flops": C, "params": N, "tokens": D, "tokens_per_param": D / N}
    if law is not None:
        out["loss"] = law.loss(N, D)
    return out


# --- fitting -------------------------------------------------------------------------------
def _huber(r: torch.Tensor, delta: float) -> torch.Tensor:
    a = r.abs()
    return torch.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def _objective(theta: torch.Tensor, logN: torch.Tensor, logD: torch.Tensor, logL: torch.Tensor,
               delta: float) -> torch.Tensor:
    """theta (S, 5) = (a, b, e, alpha, beta) per start -> objective (S,)."""
    a, b, e, alpha, beta = theta.unbind(-1)
    terms = torch.stack([a[:, None] - alpha[:, None] * logN, b[:, None] - beta[:, None] * logD,
                         e[:, None].expand(-1, logN.numel())], dim=-1)
    return _huber(torch.logsumexp(terms, dim=-1) - logL, delta).sum(-1)


GRID = {"a": (0, 5, 10, 15, 20, 25), "b": (0, 5, 10, 15, 20, 25), "e": (-1, -0.5, 0, 0.5, 1),
        "alpha": (0, 0.5, 1, 1.5, 2), "beta": (0, 0.5, 1, 1.5, 2)}  # Hoffmann et al. appendix D.2


def fit(N, D, L, delta: float = 1e-3, starts: int = 8) -> ScalingLaw:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to observed losses (Chinchilla approach 3)."""
    logN, logD, logL = (torch.log(torch.as_tensor(x, dtype=torch.float64)) for x in (N, D, L))
    if not (logN.shape == logD.shape == logL.shape) or logN.numel() < 5:
        raise ValueError(f"need at least 5 (N, D, L) points of equal length to fit 5 parameters, got {logN.numel()}")
    if not all(torch.isfinite(x).all() for x in (logN, logD, logL)):
        raise ValueError("N, D and L must be positive and finite")
    grid = torch.tensor(list(itertools.product(*GRID.values())), dtype=torch.float64)
    with torch.no_grad():
        scores = _objective(grid, logN, logD, logL, delta)
    best: tuple[float, torch.Tensor] | None = None
    for start in grid[scores.argsort()[:starts]]:
        theta = start.clone()[None].requires_grad_(True)
        opt = torch.optim.LBFGS([theta], lr=1, max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-13,
                                history_size=50, line_search_fn="strong_wolfe")
        opt.step(functools.partial(_closure, opt, theta, logN, logD, logL, delta))
        with torch.no_grad():
            value = float(_objective(theta, logN, logD, logL, delta))
        if math.isfinite(value) and (best is None or value < best[0]):
            best = (value, theta.detach()[0])
    assert best is not None
    a, b, e, alpha, beta = best[1].tolist()
    return ScalingLaw(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta, objective=best[0])


def _closure(opt, theta, logN, logD, logL, delta) -> torch.Tensor:
    opt.zero_grad()
    value = _objective(theta, logN, logD, logL, delta).sum()
    value.backward()
    return value


# --- plots -----------------------------------------------------------------------------------
def plot_isoflops(points: list[dict], law: ScalingLaw, out: str | Path) -> Path:
    """Loss against N along iso-FLOP curves of the law, with the observed runs colored by their
    compute and each curve's optimum marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Cs = sorted(p["flops"] for p in points)
    levels = [math.exp(x) for x in torch.linspace(math.log(Cs[0]), math.log(Cs[-1]), 5).tolist()]
    Ns = [p["params"] for p in points]
    lo, hi = min(Ns) / 4, max(Ns) * 4
    grid = [lo * (hi / lo) ** (i / 199) for i in range(200)]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    cmap = plt.get_cmap("viridis")
    for i, C in enumerate(levels):
        color = cmap(i / max(1, len(levels) - 1))
        ax.plot(grid, [law.loss(n, C / (6 * n)) for n in grid], color=color, lw=1.2, label=f"C = {C:.1e}")
        n_opt, d_opt = law.optimal(C)
        ax.plot([n_opt], [law.loss(n_opt, d_opt)], "*", color=color, ms=10)
    logC = [math.log(c) for c in Cs]
    span = (max(logC) - min(logC)) or 1.0
    ax.scatter(Ns, [p["loss"] for p in points], c=[cmap((math.log(p["flops"]) - min(logC)) / span) for p in points],
               edgecolors="k", zorder=3, label="runs")
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("validation loss")
    ax.set_title("isoFLOP curves of the fitted law (stars: compute-optimal N)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(out, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return Path(out)


def plot_fit(points: list[dict], law: ScalingLaw, out: str | Path) -> Path:
    """Loss against tokens for each model size: observed points and the fitted curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    sizes = sorted({p["params"] for p in points})
    cmap = plt.get_cmap("plasma")
    for i, n in enumerate(sizes):
        mine = sorted((p for p in points if p["params"] == n), key=lambda p: p["tokens"])
        color = cmap(i / max(1, len(sizes)))
        ax.scatter([p["tokens"] for p in mine], [p["loss"] for p in mine], color=color, edgecolors="k", zorder=3)
        ds = [mine[0]["tokens"] * (mine[-1]["tokens"] * 2 / mine[0]["tokens"]) ** (j / 99) for j in range(100)]
        ax.plot(ds, [law.loss(n, d) for d in ds], color=color, lw=1.2, label=f"N = {n:,.0f}")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens D")
    ax.set_ylabel("validation loss")
    ax.set_title(f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3g} + {law.B:.3g}/D^{law.beta:.3g}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(out, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return Path(out)


# --- the sweep --------------------------------------------------------------------------------
def model_shape(width: int) -> dict[str, int]:
    """One dial: width sets depth (width / 32, at least 2), heads (width / 16) and the MLP (gated,
    8/3 x width rounded to 8)."""
    return {"d_model": width, "n_layers": max(2, width // 32), "n_heads": max(1, width // 16),
            "d_ff": 8 * round(8 * width / 3 / 8)}


def _prepare_data(out: Path, data: str, progress: bool) -> tuple[Path, Path]:
    from ..data.shards import write_shards
    from ..tokenizer import Tokenizer, load_tokenizer

    tok_dir, shards = out / "data" / "tokenizer", out / "data" / "shards"
    if (shards / "meta.json").is_file():
        return shards, tok_dir
    if data == "synthetic":
        from ..data.synthetic import SynthConfig, generate

        generate(out / "data" / "synth", SynthConfig.from_size("small"), overwrite=True, progress=progress)
        lines = (out / "data" / "synth" / "pretrain" / "train.jsonl").read_text().splitlines()
        docs = [json.loads(x)["text"] for x in lines]
    else:
        from ..data.sources import texts

        docs = list(texts(data, "train", download=False, progress=progress))
    if not tok_dir.is_dir():
        Tokenizer.train(docs, vocab_size=512, progress=progress).save(tok_dir)
    write_shards(docs, load_tokenizer(tok_dir), shards, val_fraction=0.05 if data == "synthetic" else 0.0,
                 progress=progress, overwrite=True)
    return shards, tok_dir


def sweep(out: str | Path, recipe: dict, widths=(32, 48, 64, 96), steps=(50, 100, 200, 400), data: str = "synthetic",
          progress: bool = True) -> dict[str, Any]:
    """Train every (width, steps) pair from `recipe` (a recipe dict), append (N, D, C, loss) to
    out/sweep.jsonl (finished runs are skipped on a rerun), fit the law, write law.json,
    isoflop.png and fit.png, and return the summary."""
    from ..model.config import ModelConfig
    from ..model.counting import count_params
    from .config import resolve
    from .pretrain import pretrain

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards, tok_dir = _prepare_data(out, data, progress)
    log = out / "sweep.jsonl"
    done = {(r["width"], r["steps"]) for r in map(json.loads, log.read_text().splitlines())} if log.exists() else set()
    for width, n_steps in itertools.product(widths, steps):
        if (width, n_steps) in done:
            continue
        r = json.loads(json.dumps(recipe))
        r.setdefault("model", {}).update(model_shape(width))
        r.setdefault("data", {}).update({"path": str(shards), "tokenizer": str(tok_dir)})
        r.setdefault("train", {}).update({"steps": n_steps, "out_dir": str(out / "runs" / f"w{width}_s{n_steps}"),
                                          "eval_every": 0, "save_every": 0, "keep_last": 1, "sample_tokens": 0})
        cfg = resolve(r)
        if progress:
            print(f"width {width}, {n_steps} steps ...", flush=True)
        result = pretrain(cfg, overwrite=True, progress=progress)
        N = count_params(ModelConfig.from_dict(cfg.model.to_dict()), embeddings=False)
        record = {"width": width, "steps": n_steps, "params": N, "tokens": result.tokens,
                  "flops": 6.0 * N * result.tokens, "loss": result.eval["val_loss"]}
        with open(log, "a") as f:
            f.write(json.dumps(record) + "\n")
    points = [json.loads(x) for x in log.read_text().splitlines()]
    law = fit([p["params"] for p in points], [p["tokens"] for p in points], [p["loss"] for p in points])
    law.save(out / "law.json")
    plot_isoflops(points, law, out / "isoflop.png")
    plot_fit(points, law, out / "fit.png")
    Cs = sorted(p["flops"] for p in points)
    frontier = [plan(c, law) for c in (Cs[0], math.sqrt(Cs[0] * Cs[-1]), Cs[-1], Cs[-1] * 10, Cs[-1] * 100)]
    return {"points": points, "law": law.to_dict(), "frontier": frontier}
