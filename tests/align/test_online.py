"""Online DPO: labeling by rewards and by a judge in both orders, the round iterator's exact resume, and a run."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lmlab.align import online
from lmlab.align import rollout as ro
from lmlab.align.rewards import RewardSet


def _records(n: int) -> list[ro.PromptRecord]:
    return [ro.PromptRecord([{"role": "user", "content": f"Question {i}?"}], {"answer": str(i)}) for i in range(n)]


def test_reward_labeler_picks_the_higher_reward_and_drops_ties():
    label = online.reward_labeler(RewardSet.from_specs(["length=2"]))
    labels, stats = label(_records(3), ["a b", "a b c d", "x y"], ["a b c d e f", "a b", "p q"],
                          [True] * 3, [True] * 3)
    assert labels == [0, 1, None]  # 2 words is the optimum; the last pair ties
    assert stats["label_ties"] == pytest.approx(1 / 3)
    assert stats["label_reward_chosen"] == 0.0 and stats["label_reward_rejected"] == pytest.approx((-2 - 1) / 2)


class _Judge:
    """A Generator that answers every pairwise prompt the same way, or prefers the longer answer."""

    def __init__(self, mode: str):
        self.mode = mode

    def generate(self, prompts, params):
        from lmlab.infer.generate import Completion

        out = []
        for p in prompts:
            text = p[-1]["content"] if isinstance(p, list) else p
            if self.mode == "always-A":
                verdict = "A"
            else:  # the longer answer wins, wherever it is shown
                a = text.split("[The Start of Assistant A's Answer]")[1].split("[The End of Assistant A's Answer]")[0]
                b = text.split("[The Start of Assistant B's Answer]")[1].split("[The End of Assistant B's Answer]")[0]
                verdict = "A" if len(a) > len(b) else "B"
            out.append(Completion([], f"Reasoning. [[{verdict}]]", "stop"))
        return out


def test_judge_labeler_asks_both_orders():
    from lmlab.evals import judge as jd

    probe = jd.pair_prompt("q", "AAA", "BBB")[-1]["content"]
    if "[The Start of Assistant A's Answer]" not in probe:
        pytest.skip("the pairwise prompt's layout changed; update _Judge")
    cfg = online.JudgeConfig(model="x")
    labels, stats = online.judge_labeler(_Judge("always-A"), cfg)(_records(2), ["x", "y"], ["long one", "z"],
                                                                 [True] * 2, [True] * 2)
    assert labels == [None, None] and stats["label_inconsistent"] == 1.0  # position bias cancels out
    labels, stats = online.judge_labeler(_Judge("longer"), cfg)(_records(2), ["x", "a longer reply"],
                                                               ["a long one", "z"], [True] * 2, [True] * 2)
    assert labels == [1, 0] and stats["label_inconsistent"] == 0.0


@pytest.fixture(scope="module")
def policy(tiny_base):
    from lmlab.model.loading import load
    from lmlab.tokenizer import load_tokenizer

    return load(tiny_base), load_tokenizer(tiny_base)


def test_rounds_resume_exactly(policy):
    model, tok = policy
    ref = copy.deepcopy(model).eval()
    cfg = ro.RolloutConfig(prompts="x", prompts_per_rollout=4, max_new_tokens=6, epochs=2, temperature=1.0)
    label = online.reward_labeler(RewardSet.from_specs(["length=3"]))

    def make():
        return online.OnlinePairs(_records(10), model, ref, tok, label, cfg, batch_size=2, seed=3)

    a = make()
    assert a.steps_per_rollout == 4 and a.rollout_size == 8
    first = [next(a) for _ in range(5)]  # one round and the first batch of the next
    assert a.rounds >= 2 and first[0]["stats"]["pairs"] >= 1
    assert "ref_chosen" in first[0] and first[0]["ids"].shape[0] == 2 * first[0]["margin"].shape[0]
    state = a.state_dict()
    expect = [next(a) for _ in range(4)]
    b = make()
    b.load_state_dict(state)
    got = [next(b) for _ in range(4)]
    for x, y in zip(expect, got, strict=True):
        assert torch.equal(x["ids"], y["ids"]) and torch.equal(x["ref_chosen"], y["ref_chosen"])
        assert x["stats"] == y["stats"]
    with pytest.raises(ValueError, match="same prompts"):
        online.OnlinePairs(_records(9), model, ref, tok, label, cfg, batch_size=2).load_state_dict(state)


def test_config_needs_one_labeler(tiny_base):
    with pytest.raises(ValueError, match="needs a labeler"):
        online.resolve_online({}, [], model=str(tiny_base), prompts="p.jsonl")
    with pytest.raises(ValueError, match="not both"):
        online.resolve_online({}, [], model=str(tiny_base), prompts="p.jsonl", rewards=["ended"], judge="http://x")
    with pytest.raises(ValueError, match="labels pairs"):
        online.resolve_online({}, ["align.method='kto'"], model=str(tiny_base), prompts="p.jsonl", rewards=["ended"])
    cfg = online.resolve_online({}, [], model=str(tiny_base), prompts="p.jsonl", judge="http://h:1/v1")
    assert cfg.judge.model == "http://h:1/v1" and cfg.align.method == "dpo" and cfg.train.out_dir == "runs/online-dpo"


def test_online_dpo_run_and_cli(tiny_base, tmp_path, capsys):
    from lmlab.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Count to {i}."}) + "\n" for i in range(24)))
    out = tmp_path / "run"
    args = ["align", "online-dpo", "--model", str(tiny_base), "--prompts", str(prompts), "--reward", "length=3",
            "--no-progress", "--set", "rollout.prompts_per_rollout=4", "--set", "rollout.max_new_tokens=8",
            "--set", "rollout.rollouts=2", "--set", "rollout.val_fraction=0.2", "--set", "train.batch_size=2",
            "--set", "train.lr=1e-3", "--set", "train.log_every=1", "--set", f"train.out_dir='{out}'"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "held-out after" in text
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    assert len(train) == 4 and train[-1]["rounds"] == 2.0
    assert all(r["label_reward_chosen"] >= r["label_reward_rejected"] for r in train)
    evals = [r for r in lines if r["kind"] == "eval"]
    assert 0.0 <= evals[-1]["eval_win_rate"] <= 1.0
    summary = json.loads((out / "rl.json").read_text())
    assert summary["method"] == "online-dpo" and "eval_win_rate" in summary["after"]
    assert (out / "checkpoints" / "step_00000004" / "model.safetensors").is_file()
    with pytest.raises(SystemExit):
        main(["align", "online-dpo", "--help"])
    assert "both orders" in capsys.readouterr().out
