"""GRPO (lmlab/align/grpo.py): group advantages (GRPO and Dr. GRPO) and the three loss aggregations by hand, the
objective at the rollout policy, a tiny end-to-end run whose known reward rises, exact resume through the loop, and
the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmlab.align import rollout as ro
from lmlab.align.grpo import (
    GRPOSettings,
    aggregate,
    group_advantages,
    grpo,
    grpo_objective,
    grpo_token_loss,
    resolve_grpo,
)
from lmlab.model import ModelConfig, Transformer


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 3.0])
    a = group_advantages(rewards, 4)
    std = math.sqrt(4 * 0.25 / 3)  # the unbiased std of (1, 0, 0, 1)
    assert a[:4].tolist() == pytest.approx([x / (std + 1e-4) for x in (0.5, -0.5, -0.5, 0.5)])
    assert a[4:8].tolist() == [0.0] * 4  # a group that all scored the same teaches nothing
    std3 = math.sqrt((3 * 0.75**2 + 2.25**2) / 3)
    assert a[8:].tolist() == pytest.approx([-0.75 / (std3 + 1e-4)] * 3 + [2.25 / (std3 + 1e-4)])
    dr = group_advantages(rewards, 4, scale=False)  # Dr. GRPO: centered, not scaled
    assert dr.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0, -0.75, -0.75, -0.75, 2.25])
    with pytest.raises(ValueError, match="groups of 5"):
        group_advantages(rewards, 5)


def test_aggregations_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert aggregate(loss, mask, "sequence").item() == pytest.approx((2.0 + 4.0) / 2)  # GRPO: per-reply means
    assert aggregate(loss, mask, "token").item() == pytest.approx(10.0 / 4)  # DAPO: per-token mean
    assert aggregate(loss, mask, "constant", max_tokens=8).item() == pytest.approx(10.0 / (2 * 8))  # Dr. GRPO
    with pytest.raises(ValueError, match="choose one of"):
        aggregate(loss, mask, "median")


def test_grpo_token_loss_is_the_negated_summand_of_eq_3():
    logps = torch.log(torch.tensor([[0.6, 0.3]]))
    old = torch.log(torch.tensor([[0.5, 0.3]]))
    ref = torch.log(torch.tensor([[0.4, 0.6]]))
    adv = torch.tensor([2.0])
    loss, clipped, kl = grpo_token_loss(logps, old, ref, adv, epsilon=0.1, beta=0.5)
    # token 0: rho = 1.2, clipped to 1.1 -> min(2.4, 2.2) = 2.2; k3 with r = 0.4 / 0.6
    r0, r1 = 0.4 / 0.6, 0.6 / 0.3
    k3 = [r0 - math.log(r0) - 1, r1 - math.log(r1) - 1]
    assert kl[0].tolist() == pytest.approx(k3)
    assert loss[0].tolist() == pytest.approx([-2.2 + 0.5 * k3[0], -2.0 + 0.5 * k3[1]])
    assert clipped[0].tolist() == [1.0, 0.0]
    no_ref, _, none = grpo_token_loss(logps, old, None, adv, epsilon=0.1)
    assert none is None and no_ref[0].tolist() == pytest.approx([-2.2, -2.0])
    measured, _, kl0 = grpo_token_loss(logps, old, ref, adv, epsilon=0.1, beta=0.0)  # log_kl: measured, not paid
    assert torch.equal(measured, no_ref) and kl0[0].tolist() == pytest.approx(k3)


def test_objective_at_the_rollout_policy():
    """Ratio 1 and pi = pi_ref: the loss is -mean over replies of A (sequence aggregation), KL and clipping are 0."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                    max_seq_len=64))
    batch = ro.pad_rollout([[1, 2], [3, 4, 5], [6], [7, 8]], [[9, 10, 11], [12], [13, 14], [15]])
    with torch.no_grad():
        old, _ = ro.response_logps(model(batch["ids"]).logits, batch["ids"], batch["prompt_len"], 3)
    batch.update(old_logps=old * batch["mask"], ref_logps=old * batch["mask"],
                 advantages=torch.tensor([1.0, -1.0, 0.5, 2.0]), stats={"accuracy": 0.5})
    objective = grpo_objective(GRPOSettings(beta=0.1), max_tokens=4)
    loss, metrics = objective(model, batch)
    assert loss.item() == pytest.approx(-(1.0 - 1.0 + 0.5 + 2.0) / 4, abs=1e-6)
    assert metrics["kl"].item() == pytest.approx(0.0, abs=1e-6) and metrics["clipfrac"] == 0
    assert metrics["accuracy"] == 0.5 and objective.count(batch) == 4
    token = grpo_objective(GRPOSettings(loss_agg="token"), max_tokens=4)
    assert token(model, batch)[0].item() == pytest.approx(-(3 * 1.0 - 1.0 + 2 * 0.5 + 2.0) / 7, abs=1e-6)
    assert token.count(batch) == 7
    dr = grpo_objective(GRPOSettings(loss_agg="constant"), max_tokens=4)
    assert dr(model, batch)[0].item() == pytest.approx(-(3 * 1.0 - 1.0 + 2 * 0.5 + 2.0) / (4 * 4), abs=1e-6)


def test_config_and_dr_grpo_preset():
    cfg = resolve_grpo({"grpo": {"loss_agg": "token"}}, model="m", prompts="p.jsonl", rewards=["number"], dr_grpo=True)
    assert cfg.grpo.scale_rewards is False and cfg.grpo.loss_agg == "constant"
    with pytest.raises(ValueError, match="num_generations must be at least 2"):
        resolve_grpo({"grpo": {"num_generations": 1}}, model="m", prompts="p.jsonl", rewards=["number"])
    with pytest.raises(ValueError, match="rollout.prompts is not set"):
        resolve_grpo({}, model="m", rewards=["number"])


def vowels(prompts, completions, **columns):
    """The known reward of the end-to-end tests: the share of the reply's characters that are vowels."""
    return [sum(c in "aeiou" for c in text) / max(len(text), 1) for text in completions]


def _recipe(tmp_path, tiny_base, out: str, **train) -> dict:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Tell me about the {w}.", "answer": "1"})
                                 for w in "cat dog fox owl hen cow pig bee ant elk yak emu".split()))
    return {"rollout": {"prompts": str(prompts), "validation": str(prompts), "val_limit": 4, "prompts_per_rollout": 4,
                        "max_new_tokens": 8, "epochs": 2},
            "grpo": {"num_generations": 4, "beta": 0.02},
            "train": {"out_dir": str(tmp_path / out), "batch_size": 8, "lr": 1e-2, "log_every": 1, "eval_every": 0,
                      "save_every": 0, "threads": 1, **train},
            "schedule": {"name": "constant"}}


def test_grpo_raises_a_known_reward(tiny_base, tmp_path):
    cfg = resolve_grpo(_recipe(tmp_path, tiny_base, "run", steps=60), model=str(tiny_base),
                       rewards=[f"{__file__}:vowels", "format"])
    result = grpo(cfg, progress=False, log=lambda _: None)
    train = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["kind"] == "train"]
    per_rollout = train[::4]
    first = sum(r["reward"] for r in per_rollout[:2]) / 2
    last = sum(r["reward"] for r in per_rollout[-3:]) / 3
    assert last > first + 0.1, (first, last)  # about 0.25 -> 0.5 and more
    assert f"reward_{__file__}:vowels" in train[-1] and "reward_format" in train[-1] and "frac_zero_std" in train[-1]
    assert train[-1]["kl"] > 0 and "eval_reward" in result.after and "eval_reward" in result.before
    summary = json.loads((tmp_path / "run" / "rl.json").read_text())
    assert summary["method"] == "grpo" and summary["data"]["steps_per_rollout"] == 4
    assert (tmp_path / "run" / "align.png").is_file()


def test_resume_takes_the_steps_the_uninterrupted_run_took(tiny_base, tmp_path):
    """Killed after step 6 (mid-rollout: 4 steps per rollout) and resumed, the run ends with the same weights as the
    run that never stopped."""
    from safetensors.torch import load_file

    straight = resolve_grpo(_recipe(tmp_path, tiny_base, "straight", steps=10), model=str(tiny_base),
                            rewards=[f"{__file__}:vowels"])
    grpo(straight, progress=False, log=lambda _: None)
    first = resolve_grpo(_recipe(tmp_path, tiny_base, "resumed", steps=6, save_every=6), model=str(tiny_base),
                         rewards=[f"{__file__}:vowels"])
    grpo(first, progress=False, log=lambda _: None)
    rest = resolve_grpo(_recipe(tmp_path, tiny_base, "resumed", steps=10), model=str(tiny_base),
                        rewards=[f"{__file__}:vowels"])
    result = grpo(rest, resume=True, progress=False, log=lambda _: None)
    assert result.run.step == 10
    a = load_file(tmp_path / "straight" / "checkpoints" / "step_00000010" / "model.safetensors")
    b = load_file(result.run.checkpoint / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_command_line_help_and_print_config(capsys, tmp_path):
    from lmlab.cli import main

    for method, word in (("grpo", "group"), ("ppo", "value head")):
        with pytest.raises(SystemExit) as exit_info:
            main(["align", method, "--help"])
        assert exit_info.value.code == 0
        assert word in " ".join(capsys.readouterr().out.split())
    assert main(["align", "grpo", "--model", str(tmp_path), "--prompts", "p.jsonl", "--reward", "number",
                 "--reward", "format", "--dr-grpo", "--set", "grpo.num_generations=4", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["reward"]["functions"] == ["number", "format"] and cfg["grpo"]["num_generations"] == 4
    assert cfg["grpo"]["loss_agg"] == "constant" and cfg["grpo"]["scale_rewards"] is False
