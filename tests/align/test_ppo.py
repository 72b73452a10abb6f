"""PPO (lmlab/align/ppo.py): GAE against a plain reverse loop, the KL-penalized token rewards, the clipped value loss
and the adaptive KL controller by hand, the policy-with-value module and its checkpoints, and a tiny end-to-end run
whose known reward rises while the KL to the reference stays bounded."""

from __future__ import annotations

import json
import random

import pytest
import torch

from lmlab.align import rollout as ro
from lmlab.align.ppo import (
    KLController,
    PolicyValueIO,
    PolicyWithValue,
    PPOSettings,
    adaptive_kl_coef,
    clipped_value_loss,
    gae,
    ppo,
    ppo_objective,
    resolve_ppo,
    token_rewards,
)
from lmlab.model import ModelConfig, Transformer


def reference_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list, list]:
    """GAE of one reply by the definition: A_t = sum_l (gamma lam)^l delta_{t+l}, V after the end = 0."""
    T = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < T else 0.0) - values[t] for t in range(T)]
    adv = [sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, T)) for t in range(T)]
    return adv, [a + v for a, v in zip(adv, values, strict=True)]


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_the_definition_on_ragged_replies(gamma, lam):
    rng = random.Random(0)
    lengths = [5, 1, 3, 4]
    R = max(lengths)
    rewards, values = torch.zeros(4, R), torch.zeros(4, R)
    for i, n in enumerate(lengths):
        rewards[i, :n] = torch.tensor([rng.uniform(-1, 1) for _ in range(n)])
        values[i, :n] = torch.tensor([rng.uniform(-1, 1) for _ in range(n)])
    mask = (torch.arange(R)[None] < torch.tensor(lengths)[:, None]).float()
    values_with_junk = values + 7.0 * (1 - mask)  # values past the end must not leak in
    adv, ret = gae(rewards, values_with_junk * mask, mask, gamma, lam)
    for i, n in enumerate(lengths):
        want_adv, want_ret = reference_gae(rewards[i, :n].tolist(), values[i, :n].tolist(), gamma, lam)
        assert adv[i, :n].tolist() == pytest.approx(want_adv, abs=1e-6)
        assert ret[i, :n].tolist() == pytest.approx(want_ret, abs=1e-6)
        assert adv[i, n:].abs().sum() == 0 and ret[i, n:].abs().sum() == 0


def test_gae_of_a_single_terminal_reward_by_hand():
    # r = (0, 0, 1), V = (0.5, 0.5, 0.5), gamma = 1, lambda = 0.5:
    # delta = (0, 0, 0.5); A_2 = 0.5, A_1 = 0 + 0.5 * 0.5 = 0.25, A_0 = 0.125
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.full((1, 3), 0.5), torch.ones(1, 3), 1.0, 0.5)
    assert adv.tolist() == [[0.125, 0.25, 0.5]] and ret.tolist() == [[0.625, 0.75, 1.0]]


def test_token_rewards_put_the_score_on_the_last_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    r = token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    assert r.flatten().tolist() == pytest.approx([-0.05, -0.1, -0.15 + 2.0, -0.25 - 1.0, 0.0, 0.0])


def test_clipped_value_loss_by_hand():
    values, old, returns = torch.tensor([1.5, 1.5, 0.9]), torch.tensor([1.0, 1.0, 1.0]), torch.tensor([2.0, 0.0, 1.0])
    loss, clipped = clipped_value_loss(values, old, returns, clip=0.2)
    # V_clip = (1.2, 1.2, 0.9): max((1.5-2)^2, (1.2-2)^2) = 0.64; max(2.25, 1.44) = 2.25; max(0.01, 0.01) = 0.01
    assert loss.tolist() == pytest.approx([0.32, 1.125, 0.005])
    assert clipped.tolist() == [1.0, 0.0, 0.0]


def test_adaptive_kl_controller_is_ziegler_equation_2():
    # e = clip(KL / target - 1, -0.2, 0.2); beta <- beta (1 + e n / horizon)
    assert adaptive_kl_coef(0.1, 9.0, 6.0, 64, 10_000) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10_000))
    assert adaptive_kl_coef(0.1, 6.6, 6.0, 100, 1_000) == pytest.approx(0.1 * (1 + 0.1 * 0.1))
    assert adaptive_kl_coef(0.1, 0.0, 6.0, 500, 1_000) == pytest.approx(0.1 * (1 - 0.2 * 0.5))
    assert adaptive_kl_coef(0.1, 6.0, 6.0, 500, 1_000) == pytest.approx(0.1)
    fixed = KLController(PPOSettings(kl_coef=0.2))
    fixed.update(100.0, 64)
    assert fixed.value == 0.2
    adaptive = KLController(PPOSettings(kl_coef=0.2, adaptive_kl=True, kl_target=1.0, kl_horizon=100))
    adaptive.update(100.0, 50)
    assert adaptive.value == pytest.approx(0.2 * 1.1)


def tiny_policy() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                   max_seq_len=64, tie_embeddings=False))


@pytest.mark.parametrize("value_model", ["head", "separate"])
def test_policy_with_value_and_its_checkpoints(tmp_path, value_model):
    from lmlab.model.loading import load

    policy = tiny_policy()
    model = PolicyWithValue(policy, value_model)
    ids = torch.randint(0, 64, (2, 7))
    logits, values = model(ids)
    assert torch.equal(logits, policy(ids).logits) and values.shape == (2, 7) and values.abs().sum() == 0
    assert (model.critic is None) == (value_model == "head")
    with torch.no_grad():
        model.value_head.weight.normal_()
        model.value_head.bias.fill_(0.3)
        if model.critic is not None:
            model.critic.blocks[0].mlp.down_proj.weight.add_(1.0)
    io = PolicyValueIO()
    io.write(model, tmp_path, [], {"note": "test"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "value.safetensors"]
    alone = load(tmp_path)  # the policy alone, as `lmlab generate` reads it
    assert torch.equal(alone(ids).logits, logits)
    fresh = PolicyWithValue(tiny_policy(), value_model)
    io.read(fresh, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(),
                                                  strict=True))
    if value_model == "head":
        with pytest.raises(ValueError, match="value_model"):
            io.read(PolicyWithValue(tiny_policy(), "separate"), tmp_path)


def test_objective_at_the_rollout_policy_is_the_advantage_mean():
    """Before any update the ratio is 1: nothing is clipped, approx_kl is 0, and the policy loss is -mean(A)."""
    model = PolicyWithValue(tiny_policy())
    batch = ro.pad_rollout([[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10]])
    with torch.no_grad():
        logits, _ = model(batch["ids"])
        old, _ = ro.response_logps(logits, batch["ids"], batch["prompt_len"], 3)
    adv = torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.5, 3.0]])
    batch.update(old_logps=old * batch["mask"], old_values=torch.zeros(2, 3), advantages=adv,
                 returns=torch.ones(2, 3), stats={"reward": 0.25})
    objective = ppo_objective(PPOSettings(vf_coef=0.5))
    loss, metrics = objective(model, batch)
    mean_adv = (1.0 - 2.0 + 0.5 + 0.5 + 3.0) / 5
    assert metrics["policy_loss"].item() == pytest.approx(-mean_adv, abs=1e-6)
    assert metrics["value_loss"].item() == pytest.approx(0.5)  # 1/2 (0 - 1)^2
    assert loss.item() == pytest.approx(-mean_adv + 0.5 * 0.5, abs=1e-6)
    assert metrics["clipfrac"] == 0 and metrics["approx_kl"] == pytest.approx(0, abs=1e-7)
    assert metrics["reward"] == 0.25 and objective.count(batch) == 5


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="reward.functions is empty"):
        resolve_ppo({}, model="m", prompts="p.jsonl")
    with pytest.raises(ValueError, match="ppo.kl_estimator"):
        resolve_ppo({"ppo": {"kl_estimator": "k7"}}, model="m", prompts="p.jsonl", rewards=["format"])
    with pytest.raises(ValueError, match="unknown setting ppo.cliprang"):
        resolve_ppo({}, ["ppo.cliprang=0.1"], model="m", prompts="p.jsonl", rewards=["format"])
    cfg = resolve_ppo({}, ["ppo.kl_coef=0.1"], model="m", prompts="p.jsonl", rewards=["format"])
    assert cfg.ppo.kl_coef == 0.1 and cfg.optim.weight_decay == 0.0 and cfg.train.out_dir == "runs/ppo"


def vowels(prompts, completions, **columns):
    """The known reward of the end-to-end test: the share of the reply's characters that are vowels."""
    return [sum(c in "aeiou" for c in text) / max(len(text), 1) for text in completions]


def test_ppo_raises_a_known_reward_with_bounded_kl(tiny_base, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Tell me about the {w}."})
                                 for w in "cat dog fox owl hen cow pig bee ant elk yak emu".split()))
    cfg = resolve_ppo({
        "rollout": {"prompts": str(prompts), "validation": "none", "prompts_per_rollout": 12, "max_new_tokens": 8,
                    "epochs": 4, "rollouts": 20},
        "ppo": {"kl_coef": 0.02, "adaptive_kl": True, "kl_target": 4.0, "kl_horizon": 200, "vf_coef": 0.5},
        "train": {"out_dir": str(tmp_path / "run"), "batch_size": 12, "lr": 1e-2, "log_every": 1, "save_every": 0,
                  "threads": 1},
        "schedule": {"name": "constant"}},
        model=str(tiny_base), rewards=[f"{__file__}:vowels"])
    result = ppo(cfg, progress=False, log=lambda _: None)
    logs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logs if r["kind"] == "train"]
    assert result.run.step == 80 and len(train) == 80
    per_rollout = train[::4]  # the rollout's statistics repeat on its 4 steps
    first = sum(r["reward"] for r in per_rollout[:2]) / 2
    last = sum(r["reward"] for r in per_rollout[-5:]) / 5
    assert last > first + 0.05, (first, last)  # the share of vowels: about 0.25 at the start, 0.35 at the end
    assert max(r["kl"] for r in train) < 15.0  # nats per 8-token reply: the penalty holds the policy near pi_ref
    assert train[-1]["kl_coef"] != train[0]["kl_coef"]  # the controller moved beta
    for key in ("entropy", "clipfrac", "approx_kl", "value_loss", "rlhf_reward", "response_length"):
        assert key in train[-1]
    assert max(r["clipfrac"] for r in train) > 0  # later epochs over a rollout do clip
    checkpoint = result.run.checkpoint
    assert (checkpoint / "value.safetensors").is_file() and (checkpoint / "model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "rl.json").read_text())["method"] == "ppo"


def test_resume_restores_the_value_head_and_the_kl_controller(tiny_base, tmp_path):
    """A run stopped mid-rollout and resumed ends with the weights, critic and KL coefficient of the run that never
    stopped (the adaptive beta lives in the batch iterator's state, the critic in value.safetensors)."""
    from safetensors.torch import load_file

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Tell me about the {w}."}) for w in "cat dog fox owl".split()))

    def config(out: str, steps: int, save_every: int = 0):
        return resolve_ppo({
            "rollout": {"prompts": str(prompts), "validation": "none", "prompts_per_rollout": 4, "max_new_tokens": 6,
                        "epochs": 2},
            "ppo": {"kl_coef": 0.05, "adaptive_kl": True, "kl_target": 0.5, "kl_horizon": 10,
                    "value_model": "separate"},
            "train": {"out_dir": str(tmp_path / out), "steps": steps, "batch_size": 2, "lr": 1e-2, "log_every": 1,
                      "save_every": save_every, "threads": 1},
            "schedule": {"name": "constant"}},
            model=str(tiny_base), rewards=[f"{__file__}:vowels"])

    ppo(config("straight", 9), progress=False, log=lambda _: None)
    ppo(config("resumed", 5, save_every=5), progress=False, log=lambda _: None)
    result = ppo(config("resumed", 9), resume=True, progress=False, log=lambda _: None)
    straight = tmp_path / "straight" / "checkpoints" / "step_00000009"
    for name in ("model.safetensors", "value.safetensors"):
        a, b = load_file(straight / name), load_file(result.run.checkpoint / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    logs = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("straight", "resumed")}
    betas = {name: [r["kl_coef"] for r in rows if r["kind"] == "train"] for name, rows in logs.items()}
    assert betas["straight"] == betas["resumed"] and len(set(betas["straight"])) > 1
