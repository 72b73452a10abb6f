"""Scaling laws: the fit recovers a known law, the closed-form optimum is the isoFLOP minimum,
the 20-tokens rule and the plan give hand-computed numbers, and the sweep works end to end."""

from __future__ import annotations

import json
import math
import random

import pytest

from lmlab.cli import main
from lmlab.model.config import ModelConfig
from lmlab.model.counting import count_params
from lmlab.model.transformer import build_model
from lmlab.train import scaling
from lmlab.train.scaling import (
    HOFFMANN_GRID,
    ScalingLaw,
    chinchilla_rule,
    fit,
    model_shape,
    plan,
    shape_for_params,
    summary_text,
    sweep,
)

CHINCHILLA = ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. 2022, eq. 10
FIELDS = ("E", "A", "B", "alpha", "beta")


def synthetic_points(law: ScalingLaw, noise: float, seed: int):
    """Losses of `law` on a 5 x 6 grid of N and D, times exp(noise x standard normal)."""
    rng = random.Random(seed)
    N, D, L = [], [], []
    for n in (1e6, 1e7, 1e8, 1e9, 1e10):
        for d in (1e7, 1e8, 1e9, 1e10, 1e11, 1e12):
            N.append(n)
            D.append(d)
            L.append(law.loss(n, d) * math.exp(rng.gauss(0.0, noise)))
    return N, D, L


# --- the fit --------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_a_known_law_within_5_percent(seed):
    got = fit(*synthetic_points(CHINCHILLA, noise=0.002, seed=seed))  # 0.2% multiplicative noise
    for name in FIELDS:
        assert getattr(got, name) == pytest.approx(getattr(CHINCHILLA, name), rel=0.05), name
    assert got.fitted_on == {"points": 30, "params": [pytest.approx(1e6), pytest.approx(1e10)],
                             "tokens": [pytest.approx(1e7), pytest.approx(1e12)]}


def test_fit_is_exact_without_noise_and_for_another_law():
    other = ScalingLaw(E=2.5, A=50.0, B=2000.0, alpha=0.5, beta=0.4)
    for law in (CHINCHILLA, other):
        got = fit(*synthetic_points(law, noise=0.0, seed=0))
        for name in FIELDS:
            assert getattr(got, name) == pytest.approx(getattr(law, name), rel=1e-4), name
        assert got.objective < 1e-12


def test_fit_minimizes_the_huber_objective_of_log_losses():
    """The fitted objective is Hoffmann et al.'s, computed here by hand, and no higher than the true
    law's on the same noisy data (the fit may only improve on it)."""
    N, D, L = synthetic_points(CHINCHILLA, noise=0.01, seed=3)

    def objective(law: ScalingLaw, delta: float = 1e-3) -> float:
        total = 0.0
        for n, d, loss in zip(N, D, L, strict=True):
            r = math.log(law.loss(n, d)) - math.log(loss)
            total += 0.5 * r * r if abs(r) <= delta else delta * (abs(r) - 0.5 * delta)
        return total

    got = fit(N, D, L)
    assert got.objective == pytest.approx(objective(got), rel=1e-9)
    assert got.objective <= objective(CHINCHILLA)


@pytest.mark.slow
def test_the_best_starts_find_the_minimum_of_the_whole_grid():
    """L-BFGS from every one of the 4,500 Hoffmann starts ends no lower than from the best 16."""
    points = synthetic_points(CHINCHILLA, noise=0.01, seed=0)
    every = fit(*points, starts=math.prod(len(v) for v in HOFFMANN_GRID.values()))
    assert fit(*points).objective == pytest.approx(every.objective, rel=1e-6)


def test_fit_refuses_bad_input():
    with pytest.raises(ValueError, match="at least 5"):
        fit([1e6] * 4, [1e9] * 4, [3.0] * 4)
    with pytest.raises(ValueError, match="same length"):
        fit([1e6] * 6, [1e9] * 5, [3.0] * 6)
    with pytest.raises(ValueError, match="positive and finite"):
        fit([1e6] * 5, [1e9] * 5, [3.0, 3.0, 0.0, 3.0, 3.0])
    with pytest.raises(ValueError, match="grid"):
        fit(*synthetic_points(CHINCHILLA, 0.0, 0), grid={"a": (0,)})


# --- the compute optimum ----------------------------------------------------------------------
def _isoflop_minimum(law: ScalingLaw, C: float) -> float:
    """argmin over N of law.loss(N, C / 6N), by golden-section search on log N (the loss along an
    isoFLOP curve is convex in log N: a sum of two exponentials in it)."""
    lo, hi = math.log(1.0), math.log(C)
    g = (math.sqrt(5) - 1) / 2
    f = lambda x: law.loss(math.exp(x), C / (6 * math.exp(x)))  # noqa: E731
    while hi - lo > 1e-12:
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        lo, hi = (lo, b) if f(a) < f(b) else (a, hi)
    return math.exp((lo + hi) / 2)


@pytest.mark.parametrize("C", [1e12, 1e18, 1e21, 5.76e23])
def test_closed_form_optimum_is_the_isoflop_minimum(C):
    other = ScalingLaw(E=2.5, A=50.0, B=2000.0, alpha=0.5, beta=0.4)
    for law in (CHINCHILLA, other):
        n_opt, d_opt = law.optimal(C)
        assert 6 * n_opt * d_opt == pytest.approx(C, rel=1e-12)
        assert n_opt == pytest.approx(_isoflop_minimum(law, C), rel=1e-5)


def test_optimum_grows_with_the_exponents_of_eq_4():
    """N_opt ~ C^(beta / (alpha + beta)): 100x the compute, 100^(0.28 / 0.62) = 8.0x the parameters."""
    n1, d1 = CHINCHILLA.optimal(1e20)
    n2, d2 = CHINCHILLA.optimal(1e22)
    assert n2 / n1 == pytest.approx(100 ** (0.28 / 0.62))
    assert d2 / d1 == pytest.approx(100 ** (0.34 / 0.62))


def test_a_law_without_a_frontier_says_so():
    flat = ScalingLaw(E=2.0, A=10.0, B=10.0, alpha=-0.1, beta=0.3)
    assert not flat.has_optimum
    with pytest.raises(ValueError, match="no compute-optimal frontier"):
        flat.optimal(1e20)
    with pytest.raises(ValueError, match="positive"):
        CHINCHILLA.optimal(0.0)


def test_rule_of_twenty_tokens_per_parameter():
    n, d = chinchilla_rule(1.2e21)  # C = 6 x 20 x N^2: N = sqrt(1e19)
    assert n == pytest.approx(math.sqrt(1e19)) and d == pytest.approx(20 * math.sqrt(1e19))
    assert chinchilla_rule(6 * 10 * 1e8**2, tokens_per_param=10) == pytest.approx((1e8, 1e9))
    result = plan(1e21)
    assert result["tokens_per_param"] == pytest.approx(20) and 6 * result["params"] * result["tokens"] == \
        pytest.approx(1e21)
    assert "loss" not in result
    with pytest.raises(ValueError, match="positive"):
        plan(0)
    with pytest.raises(ValueError, match="not both"):
        plan(1e21, CHINCHILLA, tokens_per_param=20)


def test_plan_with_a_law_is_its_optimum_and_predicted_loss():
    result = plan(1e21, CHINCHILLA)
    n, d = CHINCHILLA.optimal(1e21)
    assert (result["params"], result["tokens"]) == pytest.approx((n, d))
    assert result["loss"] == pytest.approx(CHINCHILLA.E + CHINCHILLA.A / n**0.34 + CHINCHILLA.B / d**0.28)


# --- model shapes -----------------------------------------------------------------------------
@pytest.mark.parametrize("width", [16, 32, 48, 96, 128, 192, 640])
def test_model_shape_follows_one_dial_and_counts_what_the_model_holds(width):
    shape = model_shape(width)
    assert shape["n_layers"] == max(2, width // 64)
    assert shape["d_model"] % shape["n_heads"] == 0 and shape["d_ff"] % 8 == 0
    assert shape["d_ff"] >= 8 * width / 3 > shape["d_ff"] - 8
    if width >= 128:
        assert shape["d_model"] // shape["n_heads"] == 64
    if width <= 96:  # build it: the non-embedding count is the model's parameters minus the table
        cfg = ModelConfig(vocab_size=50, tie_embeddings=True, max_seq_len=16, **shape)
        model = build_model(cfg)
        total = sum(p.numel() for p in model.parameters())
        assert scaling.non_embedding_params(shape) == total - 50 * width == count_params(cfg, embeddings=False)


def test_model_shape_by_hand():
    assert model_shape(32) == {"d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 88}  # 8/3 x 32 = 85.3 -> 88
    assert model_shape(128) == {"d_model": 128, "n_layers": 2, "n_heads": 2, "d_ff": 344}
    assert model_shape(192) == {"d_model": 192, "n_layers": 3, "n_heads": 3, "d_ff": 512}
    assert model_shape(640) == {"d_model": 640, "n_layers": 10, "n_heads": 10, "d_ff": 1712}
    # 2 layers x (4 x 32^2 attention + 3 x 32 x 88 MLP + 2 x 32 norms) + 32 final norm
    assert scaling.non_embedding_params(model_shape(32)) == 2 * (4 * 32 * 32 + 3 * 32 * 88 + 64) + 32


def test_model_shape_refuses_widths_it_cannot_split():
    for bad in (7, 33, 160):
        with pytest.raises(ValueError, match="width"):
            model_shape(bad)


@pytest.mark.parametrize("N", [3e4, 1e6, 1e8, 2.9e9, 7e10])
def test_shape_for_params_is_the_closest_shape_of_the_dial(N):
    shape = shape_for_params(N)
    assert shape["params"] == scaling.non_embedding_params({k: v for k, v in shape.items() if k != "params"})
    # no other width of the dial (multiples of 64 from 128; or of 16 below) comes closer in ratio
    widths = list(range(16, 128, 16)) + list(range(128, 20000, 64))
    best = min(widths, key=lambda w: abs(math.log(scaling.non_embedding_params(model_shape(w)) / N)))
    assert shape["d_model"] == best
    # the dial moves in whole layers and 64-wide steps: coarse while small (width 128 -> 192 is 395k -> 1.33M
    # parameters), within a few percent from a billion up
    assert 1 / 1.5 < shape["params"] / N < 1.5
    if N >= 1e9:
        assert shape["params"] / N == pytest.approx(1, rel=0.03)


# --- law files and the plan command -----------------------------------------------------------
def test_law_json_round_trip(tmp_path):
    law = fit(*synthetic_points(CHINCHILLA, noise=0.0, seed=0), starts=2)
    law.save(tmp_path / "law.json")
    assert ScalingLaw.load(tmp_path / "law.json") == law
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    CHINCHILLA.save(tmp_path / "plain.json")
    assert ScalingLaw.load(tmp_path / "plain.json") == CHINCHILLA


@pytest.mark.parametrize("content, match", [
    ('{"E": 1}', "missing"),
    ('{"E": 1, "A": 1, "B": 1, "alpha": 0.3, "beta": 0.3, "gamma": 1}', "unknown"),
    ('{"E": 1, "A": "many", "B": 1, "alpha": 0.3, "beta": 0.3}', "A must be a finite number"),
    ('{"E": 1, "A": NaN, "B": 1, "alpha": 0.3, "beta": 0.3}', "A must be a finite number"),
    ("[1, 2]", "JSON object"),
    ('{"E": 1, "A": 1, "B": 1, "alpha": 0.3, "beta": 0.3, "fitted_on": {"params": [1]}}', "fitted_on must be"),
    ("{oops", "not a scaling law file"),
])
def test_a_bad_law_file_is_named_with_the_reason(tmp_path, content, match):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        ScalingLaw.load(tmp_path / "bad.json")
    assert "bad.json" in str(info.value)
    with pytest.raises(FileNotFoundError, match="scaling sweep"):
        ScalingLaw.load(tmp_path / "absent.json")


def test_plan_cli(tmp_path, capsys):
    CHINCHILLA.save(tmp_path / "law.json")
    assert main(["scaling", "plan", "--flops", "1e21", "--law", str(tmp_path / "law.json"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    n, d = CHINCHILLA.optimal(1e21)
    assert out["params"] == pytest.approx(n) and out["tokens"] == pytest.approx(d)
    assert out["loss"] == pytest.approx(CHINCHILLA.loss(n, d))
    assert out["shape"] == shape_for_params(n)

    assert main(["scaling", "plan", "--flops", "6e20"]) == 0
    text = capsys.readouterr().out
    assert "parameters   2.236e+09" in text  # N = sqrt(6e20 / (6 x 20))
    assert "tokens       4.472e+10" in text and "20.0 per parameter" in text
    shape = shape_for_params(math.sqrt(6e20 / 120))
    assert f"d_model {shape['d_model']}, n_layers {shape['n_layers']}" in text

    assert main(["scaling", "plan", "--flops", "6e20", "--tokens-per-param", "5"]) == 0
    assert "parameters   4.472e+09" in capsys.readouterr().out  # sqrt(6e20 / 30)

    assert main(["scaling", "plan", "--flops", "1e21", "--law", str(tmp_path / "law.json"),
                 "--tokens-per-param", "20"]) == 1
    assert "exclude each other" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"E": 1}')
    assert main(["scaling", "plan", "--flops", "1e21", "--law", str(tmp_path / "bad.json")]) == 1
    assert "bad.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["scaling", "plan", "--flops", "-5"])
    assert "compute must be positive" in capsys.readouterr().err


def test_plan_cli_warns_when_it_extrapolates_the_fit(tmp_path, capsys):
    law = ScalingLaw(**{k: getattr(CHINCHILLA, k) for k in FIELDS},
                     fitted_on={"points": 20, "params": [2.5e4, 4e5], "tokens": [2.5e4, 2e5]})
    law.save(tmp_path / "law.json")
    assert main(["scaling", "plan", "--flops", "1e21", "--law", str(tmp_path / "law.json")]) == 0
    assert "extrapolates" in capsys.readouterr().err
    assert main(["scaling", "plan", "--flops", "1e11", "--law", str(tmp_path / "law.json")]) == 0
    assert "extrapolates" not in capsys.readouterr().err  # N_opt(1e11) ~ 6e4, inside the fitted range


# --- the sweep ------------------------------------------------------------------------------
TINY_RECIPE = {"model": {"max_seq_len": 32}, "data": {"seq_len": 32},
               "train": {"batch_size": 4, "lr": 1e-2, "eval_every": 0, "eval_batches": 2, "save_every": 0,
                         "keep_last": 1, "sample_tokens": 0, "threads": 1},
               "schedule": {"warmup_steps": 1}}
GRID = {"widths": (16, 32), "steps": (2, 3, 4)}


@pytest.fixture
def tiny_sweep_data(tiny_data, monkeypatch):
    """The session's tiny corpus instead of the synthetic 'small' one the sweep would make."""
    calls = []

    def prepare(root, data, vocab_size, progress):
        calls.append(data)
        return tiny_data["shards"], tiny_data["tokenizer"]

    monkeypatch.setattr(scaling, "_prepare_data", prepare)
    return calls


def _records(out):
    return [json.loads(x) for x in (out / "sweep.jsonl").read_text().splitlines()]


def test_sweep_cli_interrupted_resumed_then_rerun_without_training(tmp_path, tiny_sweep_data, monkeypatch, capsys):
    """recipes/scaling-sweep.toml, shrunk by --set, on the tiny corpus. Ctrl-C during the third run
    (the loop checkpoints and returns interrupted) stops the sweep without a record for that run;
    the same command resumes that run from its checkpoint and finishes the grid; a third call trains
    nothing and writes the same fit."""
    from lmlab.train import pretrain as pretrain_module

    out = tmp_path / "sweep"
    shrink = ["model.max_seq_len=32", "data.seq_len=32", "train.batch_size=4", "train.lr=1e-2", "train.threads=1",
              "train.eval_batches=2", "schedule.warmup_steps=1"]
    args = ["scaling", "sweep", "--out", str(out), "--widths", "16,32", "--steps", "2,3,4", "--no-progress",
            *(x for item in shrink for x in ("--set", item))]
    real, calls = pretrain_module.pretrain, []

    def pretrain(cfg, *, resume=False, overwrite=False, progress=True):
        calls.append((cfg.model.d_model, cfg.train.steps, resume))
        result = real(cfg, resume=resume, overwrite=overwrite, progress=progress)
        if len(calls) == 3:  # as if the signal came at the last step: a checkpoint, no record
            result.interrupted = True
        return result

    monkeypatch.setattr(pretrain_module, "pretrain", pretrain)
    assert main(args) == 130
    assert "resumes the sweep" in capsys.readouterr().err
    assert [(p["width"], p["steps"]) for p in _records(out)] == [(16, 2), (16, 3)]
    assert not (out / "law.json").exists()

    assert main(args) == 0
    printed = capsys.readouterr().out
    assert calls[3] == (16, 4, True)  # resumed, with nothing left to train
    assert [resume for *_, resume in calls[4:]] == [False, False, False]
    for name in ("sweep.jsonl", "sweep.json", "law.json", "summary.txt", "isoflop.png", "fit.png"):
        assert (out / name).stat().st_size > 0, name
    for name in ("isoflop.png", "fit.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = _records(out)
    assert [(p["width"], p["steps"]) for p in points] == [(16, 2), (16, 3), (16, 4), (32, 2), (32, 3), (32, 4)]
    for p in points:
        assert p["tokens"] == p["steps"] * 4 * 32  # steps x batch x seq_len
        assert p["flops"] == pytest.approx(6 * p["params"] * p["tokens"])
        assert p["flops_counted"] > p["flops"]  # the output projection and attention come on top of 6ND
        assert p["params"] == scaling.non_embedding_params(model_shape(p["width"]))
        assert math.isfinite(p["loss"]) and 0 < p["loss"] < 10
    metrics = [json.loads(x) for x in (out / "runs/w16_s4/metrics.jsonl").read_text().splitlines()]
    assert points[2]["loss"] == [m["val_loss"] for m in metrics if m.get("kind") == "eval"][-1]
    law = ScalingLaw.load(out / "law.json")
    assert law.fitted_on["points"] == 6
    assert "fit (Chinchilla approach 3, 6 runs" in printed
    assert (out / "summary.txt").read_text() in printed  # what is printed is what is kept

    monkeypatch.setattr(pretrain_module, "pretrain", _must_not_train)
    assert main(args) == 0
    assert _records(out) == points
    assert ScalingLaw.load(out / "law.json") == law
    assert tiny_sweep_data == ["synthetic"] * 3


def _must_not_train(*args, **kwargs):
    raise AssertionError("a finished run was trained again")


def test_a_sweep_directory_keeps_one_recipe(tmp_path, tiny_sweep_data):
    meta = scaling._check_sweep_dir(tmp_path, TINY_RECIPE, "synthetic", 512, overwrite=False)
    (tmp_path / "sweep.json").write_text(json.dumps(meta))
    (tmp_path / "sweep.jsonl").write_text('{"width": 16}\n')
    (tmp_path / "runs" / "w16_s2").mkdir(parents=True)
    scaling._check_sweep_dir(tmp_path, TINY_RECIPE, "synthetic", 512, overwrite=False)  # the same: kept
    assert (tmp_path / "sweep.jsonl").exists()
    other = json.loads(json.dumps(TINY_RECIPE))
    other["train"]["lr"] = 3e-3
    for recipe, data, vocab in ((other, "synthetic", 512), (TINY_RECIPE, "tinyshakespeare", 512),
                                (TINY_RECIPE, "synthetic", 1024)):
        with pytest.raises(ValueError, match="another base recipe or data set.*--overwrite"):
            sweep(tmp_path, recipe, data=data, vocab_size=vocab, progress=False, **GRID)
    assert scaling._check_sweep_dir(tmp_path, other, "synthetic", 512, overwrite=True)["recipe"] == other
    assert not (tmp_path / "sweep.jsonl").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("change, grid, match", [
    ({"model": {"d_model": 64}}, GRID, "sweep sets model.d_model"),
    ({"train": {"steps": 9}}, GRID, "sweep sets train.steps"),
    ({}, {"widths": (16,), "steps": (2, 3, 4, 5, 6)}, "at least 2 widths"),
    ({}, {"widths": (16, 32), "steps": (2, 3)}, "at least 5 runs"),
    ({}, {"widths": (16, 33), "steps": (2, 3, 4)}, "width"),
    ({}, {"widths": (16, 32), "steps": (0, 3, 4)}, "at least 1 step"),
])
def test_sweep_refuses_grids_it_cannot_fit(tmp_path, tiny_sweep_data, change, grid, match):
    recipe = json.loads(json.dumps(TINY_RECIPE))
    for section, values in change.items():
        recipe[section].update(values)
    with pytest.raises(ValueError, match=match):
        sweep(tmp_path, recipe, progress=False, **grid)
    assert not (tmp_path / "runs").exists()


def test_prepare_data_from_the_registry(tmp_path, shared_data, monkeypatch):
    """--data tinyshakespeare: the registry's train split, a BPE of the asked size, shards with a
    validation split; made once and reused."""
    monkeypatch.setenv("LMLAB_DATA", str(shared_data))
    shards, tok = scaling._prepare_data(tmp_path / "d", "tinyshakespeare", 300, progress=False)
    meta = json.loads((shards / "meta.json").read_text())
    assert meta["vocab_size"] == 300 and meta["splits"]["val"]["tokens"] > 8192
    assert meta["splits"]["train"]["tokens"] > 10 * meta["splits"]["val"]["tokens"]
    stamp = (shards / "meta.json").stat().st_mtime_ns
    assert scaling._prepare_data(tmp_path / "d", "tinyshakespeare", 300, progress=False) == (shards, tok)
    assert (shards / "meta.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["shards", "tokenizer"]  # no leftovers


def test_prepare_data_names_an_unknown_corpus(tmp_path):
    with pytest.raises(ValueError, match="tinyshakespeare"):
        scaling._prepare_data(tmp_path, "tinyshakespear", 300, progress=False)


def test_fit_warnings_flag_a_law_that_misses_the_runs():
    points = [{"params": n, "tokens": d, "loss": CHINCHILLA.loss(n, d)} for n in (1e6, 1e8) for d in (1e8, 1e10)]
    assert scaling.fit_warnings(CHINCHILLA, points) == []
    points[0]["loss"] /= 1.1
    (warning,) = scaling.fit_warnings(CHINCHILLA, points)
    assert "up to 10%" in warning
    floorless = ScalingLaw(E=1e-9, A=CHINCHILLA.A, B=CHINCHILLA.B, alpha=0.34, beta=0.28)
    assert any("no loss floor" in w for w in scaling.fit_warnings(floorless, points))
    steep = ScalingLaw(E=1.69, A=1e60, B=CHINCHILLA.B, alpha=14.2, beta=0.28)
    assert any("alpha = 14.2" in w for w in scaling.fit_warnings(steep, points))


def test_summary_without_a_frontier_says_why(tmp_path):
    points = [{"width": 16, "n_layers": 2, "params": 1000 * w, "steps": s, "tokens": 100 * s, "flops": 6e5 * w * s,
               "loss": 3.0} for w in (1, 2) for s in (1, 2, 3)]
    law = ScalingLaw(E=3.0, A=1.0, B=1.0, alpha=-0.5, beta=0.5, objective=0.0)
    text = summary_text(scaling.SweepResult(tmp_path, points, law, scaling.frontier(law, points)))
    assert "no compute-optimal frontier" in text
    scaling.plot_isoflops(points, law, tmp_path / "iso.png")  # draws without the optimum stars
    assert (tmp_path / "iso.png").stat().st_size > 0
