"""Offline preference optimization: each method's objective is its loss on the model's log-probabilities, runs learn
the preference, the reference is computed once and cached, resume is exact, and the command line drives it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lmlab.align import losses
from lmlab.align import preference as prefs
from lmlab.align.offline import METHODS, PreferenceConfig, align_offline, load_align_recipe, preference_objective
from lmlab.model.loading import load


def _pairs_file(path: Path, n: int, seed: int = 0) -> Path:
    """Pairs with one simple preference to learn: whatever the question, "zebra" is preferred to "the" (which the
    tiny base model finds far more likely, so the preference has to be learned)."""
    import random

    rng = random.Random(seed)
    words = ["cat", "dog", "sun", "tree", "boat", "milk", "rain", "star"]
    with path.open("w") as f:
        for _ in range(n):
            q = " ".join(rng.choices(words, k=3))
            f.write(json.dumps({"prompt": f"Pick one: {q}", "chosen": "zebra", "rejected": "the"}) + "\n")
    return path


def _cfg(base, data, out, method="dpo", *sets):
    overrides = ["train.steps=6", "data.epochs=0", "train.batch_size=4", "train.log_every=1", "train.eval_every=3",
                 "train.save_every=3", "train.lr=1e-3", "train.threads=1", "data.seq_len=48", "data.val_fraction=0.2",
                 "schedule.name='constant'", f"train.out_dir='{out}'", *sets]
    return load_align_recipe(None, overrides, method=method, model=str(base), data=str(data))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return _pairs_file(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", 40)


@pytest.fixture(scope="module")
def batch(tiny_base, pairs):
    from lmlab.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_base)
    examples = prefs.tokenize_pairs(tok, prefs.load_pairs(str(pairs))[:4], 48).examples
    for i, e in enumerate(examples):  # a reference that differs from the policy, so every term matters
        e.ref_chosen, e.ref_rejected = -10.0 - i, -12.0 + 0.5 * i
    unpaired = prefs.tokenize_unpaired(tok, prefs.load_unpaired(str(pairs))[:4], 48).examples
    for i, e in enumerate(unpaired):
        e.ref_chosen, e.ref_rejected = -9.0 + i, -11.0 - i
    return prefs.collate(examples), prefs.collate(unpaired)


@pytest.mark.parametrize("method", METHODS)
def test_objective_is_the_methods_loss(method, tiny_base, batch):
    torch.manual_seed(0)
    model = load(tiny_base).eval()
    pairs, unpaired = batch
    b = unpaired if method == "kto" else pairs
    cfg = PreferenceConfig(method=method, gamma=0.7).resolved()
    loss, metrics = preference_objective(cfg)(model, b)
    with torch.no_grad():  # by hand: per-row log-probs from the logits, then the loss function
        logits = model(b["ids"]).logits.float().log_softmax(-1)
        mask = b["targets"] != -100
        tok = logits.gather(-1, b["targets"].clamp(min=0)[..., None])[..., 0] * mask
        logps, n = tok.sum(-1).double(), mask.sum(-1).double()
    B = 4
    c, r, nc, nr = logps[:B], logps[B:], n[:B], n[B:]
    rc, rr = b["ref_chosen"], b["ref_rejected"]
    if method in ("dpo", "cdpo"):
        want = losses.dpo_loss(c, r, rc, rr, 0.1, 0.1 if method == "cdpo" else 0.0).loss
    elif method == "ipo":
        want = losses.ipo_loss(c / nc, r / nr, rc / nc, rr / nr, 0.1).loss
    elif method == "kto":
        kl = (r - rr).mean().clamp(min=0)
        want = losses.kto_loss(c, rc, b["desirable"], kl, 0.1).loss
    elif method == "orpo":
        want = losses.orpo_loss(c / nc, r / nr, -c.sum() / nc.sum(), 0.1).loss
    else:
        want = losses.simpo_loss(c / nc, r / nr, 2.0, 0.7).loss
    assert loss.item() == pytest.approx(want.item(), rel=1e-4, abs=1e-5)
    assert "reward_chosen" in metrics
    if method != "kto":
        assert 0.0 <= float(metrics["reward_accuracy"]) <= 1.0
    assert preference_objective(cfg).count(b) == 4


def test_dpo_learns_the_preference_and_caches_the_reference(tiny_base, pairs, tmp_path, monkeypatch):
    out = tmp_path / "run"
    result = align_offline(_cfg(tiny_base, pairs, out, "dpo", "train.steps=20", "train.eval_every=20", "align.beta=0.5",
                                "train.lr=3e-3"),
                           progress=False, log=lambda _: None)
    before, after = result.before, result.after
    assert before["reward_accuracy"] <= 0.5 and abs(before["val_loss"] - 0.6931) < 1e-3  # policy == reference
    assert after["reward_accuracy"] == 1.0 and after["val_loss"] < 0.5
    assert after["win_rate"] >= before["win_rate"] and after["win_rate"] > 0.75
    summary = json.loads((out / "alignment.json").read_text())
    assert summary["after"]["reward_accuracy"] == 1.0 and summary["data"]["held_out_examples"] == 8
    assert (out / "align.png").is_file() and (out / "reference_logps.pt").is_file()
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if r["kind"] == "train"]
    assert {"reward_accuracy", "reward_margin", "logp_chosen", "logp_rejected"} <= set(train_lines[-1])
    assert train_lines[-1]["reward_margin"] > train_lines[0]["reward_margin"]
    # the checkpoint is a plain model; the same data and reference reuse the cache (never run the reference again)
    assert load(result.run.checkpoint).cfg.vocab_size > 0

    def boom(*a, **k):
        raise AssertionError("the reference model ran again")

    monkeypatch.setattr(prefs, "reference_logps", boom)
    align_offline(_cfg(tiny_base, pairs, out, "dpo", "train.steps=1"), overwrite=True, progress=False,
                  log=lambda _: None)


@pytest.mark.parametrize("method", ["ipo", "kto", "simpo"])
def test_other_methods_learn(method, tiny_base, pairs, tmp_path):
    sets = ["train.steps=20", "train.eval_every=20", "train.lr=3e-3"]
    sets += ["align.gamma=0.5"] if method == "simpo" else []
    result = align_offline(_cfg(tiny_base, pairs, tmp_path / method, method, *sets), progress=False,
                           log=lambda _: None)
    assert result.before["win_rate"] == 0.0 and result.after["win_rate"] == 1.0
    assert result.after["val_loss"] < result.before["val_loss"]


def test_resume_is_exact(tiny_base, pairs, tmp_path):
    out = tmp_path / "run"
    align_offline(_cfg(tiny_base, pairs, out), progress=False, log=lambda _: None)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    whole = [json.loads(x)["loss"] for x in lines if json.loads(x)["kind"] == "train"]
    final = load(out / "checkpoints" / "step_00000006")
    shutil.rmtree(out / "checkpoints" / "step_00000006")
    align_offline(_cfg(tiny_base, pairs, out), resume=True, progress=False, log=lambda _: None)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["loss"] for x in lines if json.loads(x)["kind"] == "train"] == whole
    resumed = load(out / "checkpoints" / "step_00000006")
    for x, y in zip(final.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(x, y)


def test_config_errors(tiny_base, pairs):
    with pytest.raises(ValueError, match="align.method"):
        load_align_recipe(None, ["align.method='ppo2'"], model=str(tiny_base), data=str(pairs))
    with pytest.raises(ValueError, match="data.train is not set"):
        load_align_recipe(None, [], method="dpo", model=str(tiny_base))
    with pytest.raises(ValueError, match="unknown setting align.betaa"):
        load_align_recipe(None, ["align.betaa=1"], method="dpo", model=str(tiny_base), data=str(pairs))
    cfg = load_align_recipe(None, [], method="cdpo", model=str(tiny_base), data=str(pairs))
    assert cfg.align.resolved().label_smoothing == 0.1 and cfg.train.out_dir == "runs/cdpo"
    assert load_align_recipe(None, [], method="simpo", model="m", data="d").align.resolved().beta == 2.0


def test_cli(tiny_base, pairs, tmp_path, capsys):
    from lmlab.cli import main

    for method in METHODS:
        with pytest.raises(SystemExit):
            main(["align", method, "--help"])
        assert method.upper() in capsys.readouterr().out.upper()
    assert main(["align", "ipo", "--model", str(tiny_base), "--data", str(pairs), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["align"]["method"] == "ipo"
    out = tmp_path / "cli"
    code = main(["align", "orpo", "--model", str(tiny_base), "--data", str(pairs), "--no-progress",
                 "--set", "train.steps=2", "--set", "data.epochs=0", "--set", "train.batch_size=4",
                 "--set", "data.seq_len=48", "--set", f"train.out_dir='{out}'"])
    assert code == 0 and "held-out after" in capsys.readouterr().out
    assert (out / "checkpoints" / "step_00000002" / "model.safetensors").is_file()
    assert main(["align", "dpo", "--model", str(tiny_base), "--data", str(tmp_path / "missing.jsonl"),
                 "--no-progress", "--set", "data.seq_len=999"]) == 1
    assert "exceeds the model's max_seq_len=128" in capsys.readouterr().err
    assert main(["align", "dpo", "--model", str(tiny_base), "--data", str(tmp_path / "missing.jsonl"),
                 "--no-progress"]) == 1
    assert "does not exist" in capsys.readouterr().err
