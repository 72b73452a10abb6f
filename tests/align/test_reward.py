"""Reward models: the scalar head reads the last real token, the Bradley-Terry objective and the held-out metrics
against hand-computed values, the checkpoint format (a plain backbone checkpoint + the head + a marker), exact
resume, learning on easy pairs, the command line and its errors."""

from __future__ import annotations

import json
import math
import random
import shutil
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmlab.align import preference as prefs
from lmlab.align.losses import bradley_terry_loss
from lmlab.align.reward import (
    HEAD_FILE,
    MARKER,
    RewardModel,
    bradley_terry_objective,
    evaluate_pairs,
    load_reward_model,
    load_reward_recipe,
    pairwise_accuracy,
    resolve_reward,
    reward_metrics,
    save_reward_model,
    train_reward_model,
)
from lmlab.model.checkpoint import CheckpointError, CheckpointMismatchError, CheckpointNotFoundError, read_metadata
from lmlab.model.config import ModelConfig
from lmlab.model.loading import load
from lmlab.model.transformer import build_model

REPO = Path(__file__).resolve().parents[2]


def tiny_reward_model(seed: int = 0, head_init: str = "normal") -> RewardModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)
    return RewardModel(build_model(cfg), head_init=head_init).eval()


# --- the model ----------------------------------------------------------------------------------------
def test_reward_is_the_head_on_the_last_real_token_whatever_the_padding():
    model = tiny_reward_model()
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    batch = prefs.rows(seqs, [[] for _ in seqs], pad_to=10)  # right-padded with id 0 to 10 columns
    with torch.no_grad():
        together = model(batch["ids"], batch["lengths"])
        assert together.shape == (3,)
        for i, s in enumerate(seqs):
            alone = model(torch.tensor([s]), torch.tensor([len(s)]))
            torch.testing.assert_close(together[i:i + 1], alone, rtol=0, atol=1e-6)
            by_hand = model.head(model.backbone.hidden_states(torch.tensor([s]))[0, -1]).squeeze(-1)
            torch.testing.assert_close(alone[0], by_hand, rtol=0, atol=1e-6)
        # what follows a row's end (other padding ids) changes nothing; its last real token does
        other = batch["ids"].clone()
        other[1, 2:] = 63
        torch.testing.assert_close(model(other, batch["lengths"]), together, rtol=0, atol=1e-6)
        other[1, 1] = 63
        assert not torch.allclose(model(other, batch["lengths"])[1], together[1])
    with pytest.raises(ValueError, match="length"):
        model(batch["ids"], torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match="length"):
        model(batch["ids"], torch.tensor([11, 2, 4]))


def test_head_initialization():
    zero = tiny_reward_model(head_init="zero")
    with torch.no_grad():
        assert torch.equal(zero(torch.tensor([[1, 2, 3]]), torch.tensor([3])), torch.zeros(1))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=1023, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=8, d_ff=64,
                      max_seq_len=8)
    wide = RewardModel(build_model(cfg, init=False))
    assert wide.head.weight.shape == (1, 1023) and torch.equal(wide.head.bias, torch.zeros(1))
    assert float(wide.head.weight.detach().std()) == pytest.approx(1 / 32, rel=0.1)  # std 1/sqrt(d_model + 1)
    assert wide.cfg is wide.backbone.cfg
    with pytest.raises(ValueError, match="head_init='uniform'"):
        tiny_reward_model(head_init="uniform")


# --- the objective and the metrics --------------------------------------------------------------------
EXAMPLES = [prefs.PairExample([1, 2, 3], [4, 5], [6], margin=0.5),
            prefs.PairExample([7], [8, 9, 10, 11], [12, 13], margin=0.0),
            prefs.PairExample([14, 15], [16], [17, 18, 19], margin=2.0)]


@pytest.mark.parametrize("use_margin", [False, True])
def test_objective_is_bradley_terry_on_the_pair_rows(use_margin):
    model = tiny_reward_model()
    batch = prefs.collate(EXAMPLES)
    loss, metrics = bradley_terry_objective(use_margin)(model, batch)
    with torch.no_grad():  # each reply scored alone
        def alone(e, reply):
            return float(model(torch.tensor([e.prompt + reply]), torch.tensor([len(e.prompt + reply)]))[0])

        chosen = [alone(e, e.chosen) for e in EXAMPLES]
        rejected = [alone(e, e.rejected) for e in EXAMPLES]
    m = [e.margin if use_margin else 0.0 for e in EXAMPLES]
    # L = -1/B sum log sigma(r_w - r_l - m), sigma(z) = 1 / (1 + e^-z)
    by_hand = -sum(math.log(1 / (1 + math.exp(-(c - r - mi)))) for c, r, mi in zip(chosen, rejected, m, strict=True))
    by_hand /= 3
    assert loss.item() == pytest.approx(by_hand, abs=1e-5)
    expected = bradley_terry_loss(torch.tensor(chosen), torch.tensor(rejected), torch.tensor(m))
    assert loss.item() == pytest.approx(float(expected), abs=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(sum(c > r for c, r in zip(chosen, rejected, strict=True)) / 3)
    assert float(metrics["reward_chosen"]) == pytest.approx(sum(chosen) / 3, abs=1e-6)
    assert float(metrics["reward_rejected"]) == pytest.approx(sum(rejected) / 3, abs=1e-6)
    assert float(metrics["reward_margin"]) == pytest.approx((sum(chosen) - sum(rejected)) / 3, abs=1e-6)
    loss.backward()  # the gradient reaches the head and the backbone
    assert model.head.weight.grad.abs().sum() > 0 and model.backbone.embed.weight.grad.abs().sum() > 0
    assert bradley_terry_objective(use_margin).count(batch) == 3


def test_accuracy_counts_ties_half_and_held_out_metrics_by_hand():
    chosen, rejected = torch.tensor([2.0, 1.0, 0.0, 3.0]), torch.tensor([0.0, 1.0, 1.0, 3.0])
    assert float(pairwise_accuracy(chosen, rejected)) == (1 + 0.5 + 0 + 0.5) / 4
    assert float(pairwise_accuracy(torch.zeros(5), torch.zeros(5))) == 0.5  # an untrained zero head: chance
    m = reward_metrics(chosen, rejected)
    diffs = [2.0, 0.0, -1.0, 0.0]
    assert m["val_loss"] == pytest.approx(sum(math.log1p(math.exp(-d)) for d in diffs) / 4, abs=1e-12)
    assert m["accuracy"] == 0.5
    assert m["reward_chosen"] == 1.5 and m["reward_rejected"] == 1.25 and m["reward_margin"] == 0.25
    everything = [2.0, 1.0, 0.0, 3.0, 0.0, 1.0, 1.0, 3.0]
    assert m["reward_mean"] == pytest.approx(statistics.fmean(everything))
    assert m["reward_std"] == pytest.approx(statistics.pstdev(everything))
    with_margin = reward_metrics(chosen, rejected, torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    assert with_margin["val_loss"] == pytest.approx((math.log1p(math.exp(-1.0)) + 2 * math.log(2)
                                                     + math.log1p(math.e)) / 4, abs=1e-12)
    assert reward_metrics(torch.zeros(0), torch.zeros(0)) == {}


def test_held_out_evaluation_scores_every_pair_in_batches():
    model = tiny_reward_model()
    full = evaluate_pairs(model, EXAMPLES, batch_size=3)
    assert evaluate_pairs(model, EXAMPLES, batch_size=2) == pytest.approx(full, abs=1e-6)  # a smaller last batch
    with torch.no_grad():
        rewards = model(**{k: v for k, v in prefs.collate(EXAMPLES).items() if k in ("ids", "lengths")})
    assert full["accuracy"] == float(pairwise_accuracy(rewards[:3], rewards[3:]))
    assert full["val_loss"] == pytest.approx(float(-F.logsigmoid(rewards[:3] - rewards[3:]).mean()), abs=1e-6)


# --- checkpoints -------------------------------------------------------------------------------------
def test_checkpoint_round_trip_and_it_stays_a_plain_checkpoint(tiny_base, tmp_path):
    from lmlab.cli import main
    from lmlab.tokenizer import load_tokenizer, tokenizer_files

    torch.manual_seed(1)
    model = RewardModel(load(tiny_base))
    path = save_reward_model(model, tmp_path / "rm", tokenizer_files(tiny_base), {"note": "x"})
    assert (path / HEAD_FILE).is_file() and (path / "model.safetensors").is_file()
    assert read_metadata(path)[MARKER]["head"] == HEAD_FILE and read_metadata(path)["note"] == "x"
    loaded, tokenizer = load_reward_model(path)
    assert not loaded.training and tokenizer.vocab_size == load_tokenizer(tiny_base).vocab_size
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    chats = [[{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}],
             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, how are you?"}]]
    scores = loaded.score(tokenizer, chats)
    assert scores == pytest.approx(model.score(tokenizer, chats, batch_size=1), abs=1e-6)
    assert len(set(scores)) == 2
    # the backbone is an ordinary checkpoint: load_checkpoint and `lmlab info` read it
    assert all(torch.equal(a, b) for a, b in zip(load(path).state_dict().values(),
                                                 model.backbone.state_dict().values(), strict=True))
    assert main(["info", str(path)]) == 0
    with pytest.raises(ValueError, match="must end with the assistant reply"):
        loaded.score(tokenizer, [chats[0][:1]])


def test_load_errors(tiny_base, tmp_path):
    from lmlab.tokenizer import tokenizer_files

    with pytest.raises(CheckpointError, match="not a reward model.*lmlab reward train"):
        load_reward_model(tiny_base)
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_reward_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not an lmlab checkpoint"):
        load_reward_model(tmp_path / "empty")
    path = save_reward_model(RewardModel(load(tiny_base)), tmp_path / "rm", tokenizer_files(tiny_base))
    broken = shutil.copytree(path, tmp_path / "no_head")
    (broken / HEAD_FILE).unlink()
    with pytest.raises(CheckpointNotFoundError, match="head"):
        load_reward_model(broken)
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(1, 7), "bias": torch.zeros(1)}, path / HEAD_FILE)
    with pytest.raises(CheckpointMismatchError, match="another model"):
        load_reward_model(path)
    (path / HEAD_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="damaged"):
        load_reward_model(path)


# --- training ---------------------------------------------------------------------------------------
def write_easy_pairs(path: Path, n: int, seed: int = 0) -> Path:
    """Pairs a tiny model can learn: the preferred reply is polite, the other rude, whatever the question."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            record = {"prompt": f"What is {a} plus {b}?", "chosen": f"It is {a + b}. Thank you for asking!",
                      "rejected": f"It is {a + b}. Go away."}
            f.write(json.dumps(record) + "\n")
    return path


def _cfg(base, data, out, *sets):
    overrides = ["train.steps=6", "train.batch_size=4", "train.log_every=1", "train.eval_every=3",
                 "train.save_every=3", "train.keep_last=3", "train.lr=3e-3", "train.threads=1", "data.seq_len=64",
                 "data.val_fraction=0.25", f"train.out_dir='{out}'", *sets]
    return load_reward_recipe(None, overrides, model=str(base), data=str(data))


def _losses(out_dir: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


def test_a_short_run_learns_easy_pairs(tiny_base, tmp_path):
    data = write_easy_pairs(tmp_path / "pairs.jsonl", 48)
    cfg = _cfg(tiny_base, data, tmp_path / "run", "train.steps=30", "train.eval_every=15", "train.save_every=0",
               "train.lr=1e-2")
    result = train_reward_model(cfg, progress=False, log=lambda _: None)
    assert result.data["train_pairs"] == 36 and result.data["held_out_pairs"] == 12
    assert result.data["held_out"].startswith("0.25 of")
    assert result.after["accuracy"] >= 0.9 and result.after["accuracy"] > result.before["accuracy"]
    assert result.after["reward_chosen"] > result.after["reward_rejected"]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rec = [r for r in records if r["kind"] == "train"]
    assert {"loss", "accuracy", "reward_chosen", "reward_rejected", "reward_margin"} <= set(train_rec[-1])
    assert [r["step"] for r in records if r["kind"] == "eval"] == [15, 30]
    assert {"val_loss", "accuracy", "reward_mean", "reward_std"} <= set(records[-1])
    summary = json.loads((tmp_path / "run" / "reward.json").read_text())
    assert summary["after"]["accuracy"] == result.after["accuracy"] and summary["before"] == result.before
    # the final checkpoint reproduces the held-out numbers of the run
    model, tokenizer = load_reward_model(tmp_path / "run")
    assert model.max_len == 64
    pairs = prefs.split_held_out(prefs.load_pairs(str(data)), 0.25, 0)[1]
    again = evaluate_pairs(model, prefs.tokenize_pairs(tokenizer, pairs, 64).examples)
    assert again == pytest.approx(result.after, abs=1e-5)


def test_resume_is_exact(tiny_base, tmp_path):
    data = write_easy_pairs(tmp_path / "pairs.jsonl", 40)
    train_reward_model(_cfg(tiny_base, data, tmp_path / "run"), progress=False, log=lambda _: None)
    whole = _losses(tmp_path / "run")
    final, _ = load_reward_model(tmp_path / "run" / "checkpoints" / "step_00000006")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000006")  # what a run killed after step 3 leaves
    with pytest.raises(FileExistsError, match="--resume"):
        train_reward_model(_cfg(tiny_base, data, tmp_path / "run"), progress=False, log=lambda _: None)
    train_reward_model(_cfg(tiny_base, data, tmp_path / "run"), resume=True, progress=False, log=lambda _: None)
    assert _losses(tmp_path / "run") == whole  # bitwise, CPU float32
    resumed, _ = load_reward_model(tmp_path / "run" / "checkpoints" / "step_00000006")
    for (name, x), y in zip(final.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_hh_rlhf_test_split_is_split_for_held_out_pairs(tiny_base, tmp_path, shared_data, monkeypatch):
    monkeypatch.setenv("LMLAB_DATA", str(shared_data))
    cfg = _cfg(tiny_base, "hh-rlhf:test", tmp_path / "hh", "train.steps=1", "data.limit=16", "data.val_limit=3")
    result = train_reward_model(cfg, progress=False, log=lambda _: None)
    # 16 pairs read, 4 held out of them (seeded), a seeded 3 of those evaluated
    assert result.data["held_out"] == "0.25 of hh-rlhf:test (seed 0), 3 of them"
    assert result.data["train_pairs"] + result.data["held_out_pairs"] + result.data["dropped"] == 15
    assert result.data["held_out_pairs"] > 0 and 0 <= result.after["accuracy"] <= 1


# --- configuration and command line ----------------------------------------------------------------------
def test_recipe_and_config_errors():
    cfg = load_reward_recipe(REPO / "recipes" / "reward-speedrun.toml", model="m", data="synthetic")
    assert cfg.data.seq_len == 256 and cfg.train.out_dir == "runs/speedrun/reward" and cfg.loss.margin is False
    defaults = resolve_reward({}, ["train.steps=5"], model="m", data="d.jsonl")
    assert defaults.data.epochs == 0 and defaults.train.lr == 1e-5 and defaults.train.sample_tokens == 0
    # --set train.steps wins over the recipe's epochs, unless --set data.epochs says otherwise
    recipe = {"data": {"epochs": 1, "seq_len": 64}}
    assert resolve_reward(recipe, ["train.steps=7"], model="m", data="d").data.epochs == 0
    assert resolve_reward(recipe, ["train.steps=7", "data.epochs=2"], model="m", data="d").data.epochs == 2
    assert resolve_reward(recipe, [], model="m", data="d").data.epochs == 1
    with pytest.raises(ValueError, match="model.path is not set"):
        resolve_reward({}, data="d.jsonl")
    with pytest.raises(ValueError, match="data.train is not set"):
        resolve_reward({}, model="m")
    with pytest.raises(ValueError, match="head_init"):
        resolve_reward({}, ["model.head_init='xavier'"], model="m", data="d")
    with pytest.raises(ValueError, match="unknown setting loss.beta"):
        resolve_reward({}, ["loss.beta=1"], model="m", data="d")
    with pytest.raises(ValueError, match="ddp"):
        resolve_reward({}, ["distributed.strategy='fsdp'"], model="m", data="d")
    with pytest.raises(ValueError, match="train.lr"):
        resolve_reward({"optim": {"lr": 1.0}}, model="m", data="d")


def test_cli(tiny_base, tmp_path, capsys):
    from lmlab.cli import main

    with pytest.raises(SystemExit) as e:
        main(["reward", "--help"])
    assert e.value.code == 0 and "train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["reward", "train", "--help"])
    assert e.value.code == 0 and "Bradley-Terry" in capsys.readouterr().out
    data = write_easy_pairs(tmp_path / "pairs.jsonl", 12)
    out = tmp_path / "run"
    args = ["reward", "train", "--model", str(tiny_base), "--data", str(data), "--no-progress", "--set",
            "train.steps=2", "--set", "train.batch_size=4", "--set", "data.seq_len=64", "--set", "train.threads=1",
            "--set", f"train.out_dir='{out}'"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "held-out pairwise accuracy" in printed and "step_00000002" in printed
    assert main(args) == 1 and "--resume" in capsys.readouterr().err  # the run exists
    assert main([*args, "--print-config"]) == 0 and '"head_init": "normal"' in capsys.readouterr().out
    assert main(["reward", "score", "--model", str(out), "--data", str(data), "--out", str(tmp_path / "r.jsonl")]) == 0
    assert "12 pairs: pairwise accuracy" in capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and set(rows[0]) == {"chosen_reward", "rejected_reward"}
    assert main(["reward", "score", "--model", str(out), "--prompt", "Hi", "--response", "Hello!", "--response",
                 "Go away."]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].endswith("\tGo away.")
    assert main(["reward", "score", "--model", str(tiny_base), "--prompt", "Hi", "--response", "Hello"]) == 1
    assert "not a reward model" in capsys.readouterr().err
    assert main(["reward", "score", "--model", str(out), "--prompt", "Hi"]) == 1  # no reply to score
