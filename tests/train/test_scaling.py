"""Scaling laws: the fit recovers a known law, the closed-form optimum is the isoFLOP minimum,
the plan and the sweep work end to end."""

from __future__ import annotations

import json
import math
import random

import pytest

from lmlab.cli import main
from lmlab.train.scaling import ScalingLaw, chinchilla_rule, fit, plan, sweep

CHINCHILLA = ScalingLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. 2022, eq. 10


def synthetic_points(law: ScalingLaw, noise: float, seed: int):
    rng = random.Random(seed)
    N, D, L = [], [], []
    for n in (1e6, 1e7, 1e8, 1e9, 1e10):
        for d in (1e7, 1e8, 1e9, 1e10, 1e11, 1e12):
            N.append(n)
            D.append(d)
            L.append(law.loss(n, d) * math.exp(rng.gauss(0.0, noise)))
    return N, D, L


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_recovers_a_known_law_within_5_percent(seed):
    got = fit(*synthetic_points(CHINCHILLA, noise=0.002, seed=seed))  # 0.2% multiplicative noise
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(got, name) == pytest.approx(getattr(CHINCHILLA, name), rel=0.05), name


def test_fit_is_exact_without_noise_and_for_another_law():
    other = ScalingLaw(E=2.5, A=50.0, B=2000.0, alpha=0.5, beta=0.4)
    got = fit(*synthetic_points(other, noise=0.0, seed=0))
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(got, name) == pytest.approx(getattr(other, name), rel=1e-3), name


def test_closed_form_optimum_minimizes_loss_along_the_isoflop_curve():
    for C in (1e18, 1e21, 5.76e23):
        n_opt, d_opt = CHINCHILLA.optimal(C)
        assert 6 * n_opt * d_opt == pytest.approx(C)
        grid = [n_opt * 10 ** (k / 100) for k in range(-100, 101)]
        best = min(grid, key=lambda n: CHINCHILLA.loss(n, C / (6 * n)))
        assert best == pytest.approx(n_opt, rel=0.024)  # the grid's spacing
    # Chinchilla's own budget (5.76e23 FLOPs) gives tens of billions of parameters by this law
    assert 2e10 < CHINCHILLA.optimal(5.76e23)[0] < 6e10


def test_rule_of_twenty_tokens_per_parameter():
    n, d = chinchilla_rule(6 * 20 * 1e8**2)
    assert n == pytest.approx(1e8) and d == pytest.approx(2e9)
    assert plan(1e21)["tokens_per_param"] == pytest.approx(20)
    with pytest.raises(ValueError, match="positive"):
        plan(0)


def test_law_json_round_trip_and_plan_cli(tmp_path, capsys):
    CHINCHILLA.save(tmp_path / "law.json")
    assert ScalingLaw.load(tmp_path / "law.json") == CHINCHILLA
    assert main(["scaling", "plan", "--flops", "1e21", "--law", str(tmp_path / "law.json"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    n, d = CHINCHILLA.optimal(1e21)
    assert out["params"] == pytest.approx(n) and out["tokens"] == pytest.approx(d)
    assert out["loss"] == pytest.approx(CHINCHILLA.loss(n, d))
    assert main(["scaling", "plan", "--flops", "6e20"]) == 0
    assert "parameters   2.236e+09" in capsys.readouterr().out  # N = sqrt(6e20 / (6 x 20))
    (tmp_path / "bad.json").write_text('{"E": 1}')
    assert main(["scaling", "plan", "--flops", "1e21", "--law", str(tmp_path / "bad.json")]) == 1


def test_sweep_end_to_end_and_rerun_skips_finished_runs(tmp_path, tiny_data, monkeypatch):
    import lmlab.train.scaling as scaling

    # use the session's tiny corpus instead of generating the small one
    monkeypatch.setattr(scaling, "_prepare_data",
                        lambda out, data, progress: (tiny_data["shards"], tiny_data["tokenizer"]))
    recipe = {"model": {"max_seq_len": 32}, "data": {"seq_len": 32},
              "train": {"batch_size": 4, "lr": 1e-2, "eval_batches": 2, "threads": 1},
              "schedule": {"warmup_steps": 1}}
    summary = sweep(tmp_path, recipe, widths=(16, 32, 48), steps=(3, 6), progress=False)
    assert len(summary["points"]) == 6
    for name in ("sweep.jsonl", "law.json", "isoflop.png", "fit.png"):
        assert (tmp_path / name).stat().st_size > 0
    point = summary["points"][0]
    assert point["flops"] == pytest.approx(6 * point["params"] * point["tokens"])
    assert point["tokens"] == 3 * 4 * 32
    runs_before = sorted(p.name for p in (tmp_path / "runs").iterdir())
    again = sweep(tmp_path, recipe, widths=(16, 32, 48), steps=(3, 6), progress=False)
    assert again["points"] == summary["points"]  # nothing retrained: same records, same order
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == runs_before
