"""Every alignment recipe that ships in recipes/ resolves with its stage's loader, for every method it serves."""

from pathlib import Path

import pytest

RECIPES = Path(__file__).parents[2] / "recipes"


def test_reward_recipe():
    from lmlab.align.reward import load_reward_recipe

    cfg = load_reward_recipe(RECIPES / "reward-speedrun.toml", model="m", data="d")
    assert cfg.train.lr > 0 and cfg.data.seq_len > 0


@pytest.mark.parametrize("method", ["dpo", "ipo", "cdpo", "kto", "orpo", "simpo"])
def test_dpo_recipe_serves_every_offline_method(method):
    from lmlab.align.offline import load_align_recipe

    cfg = load_align_recipe(RECIPES / "dpo-speedrun.toml", method=method, model="m", data="d")
    assert cfg.align.method == method and cfg.data.seq_len == 256 and cfg.train.out_dir == f"runs/{method}"


def test_rl_recipes():
    from lmlab.align.grpo import load_grpo_recipe
    from lmlab.align.ppo import load_ppo_recipe

    ppo = load_ppo_recipe(RECIPES / "ppo-speedrun.toml", model="m")
    grpo = load_grpo_recipe(RECIPES / "grpo-speedrun.toml", model="m")
    assert ppo.reward.functions == ["sentiment"] and grpo.reward.functions == ["synthetic"]
    assert ppo.rollout.prompts and grpo.rollout.prompts


def test_no_recipe_is_left_unchecked():
    checked = {"reward-speedrun.toml", "dpo-speedrun.toml", "ppo-speedrun.toml", "grpo-speedrun.toml"}
    shipped = {p.name for p in RECIPES.glob("*.toml") if p.name.startswith(("reward-", "dpo-", "ppo-", "grpo-"))}
    assert shipped == checked


def test_every_stage_refuses_unknown_sections_and_optim_lr():
    from lmlab.align.grpo import load_grpo_recipe
    from lmlab.align.offline import resolve_align
    from lmlab.align.online import resolve_online
    from lmlab.align.reward import resolve_reward

    stages = [lambda d: resolve_reward(d, model="m", data="d"),
              lambda d: resolve_align(d, method="dpo", model="m", data="d"),
              lambda d: resolve_online(d, model="m", prompts="p", rewards=["ended"])]
    for resolve in stages:
        with pytest.raises(ValueError, match=r"unknown recipe section\(s\) \['trian'\]"):
            resolve({"trian": {"lr": 1.0}})
        with pytest.raises(ValueError, match="the peak learning rate is train.lr"):
            resolve({"optim": {"lr": 1.0}})
    with pytest.raises(ValueError, match="unknown section 'trian'; did you mean train.lr"):
        load_grpo_recipe(None, ["trian.lr=1"], model="m")
    # RL fine-tunes a finished model: no weight decay unless the recipe asks
    assert load_grpo_recipe(None, [], model="m", prompts="p", rewards=["number"]).optim.weight_decay == 0.0
