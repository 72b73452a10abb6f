"""Recipes and --set overrides: every setting checked, typos named, vocab taken from the data."""

from __future__ import annotations

import pytest

from lmlab.cli import main
from lmlab.train.config import TrainConfig, load_recipe, parse_override, resolve

RECIPES = sorted(p for p in (__import__("pathlib").Path(__file__).parents[2] / "recipes").glob("*.toml")
                 if not p.name.startswith(("sft-", "reward-", "dpo-", "ppo-", "grpo-")))
# fine-tuning recipes are checked in tests/tune/test_sft.py, alignment recipes in tests/align/test_recipes.py


def test_overrides_are_toml_values_or_strings():
    assert parse_override("train.lr=6e-4") == (["train", "lr"], 6e-4)
    assert parse_override("train.compile=true") == (["train", "compile"], True)
    assert parse_override("data.path=runs/x/shards") == (["data", "path"], "runs/x/shards")
    assert parse_override('train.sample_prompts=["a", "b"]') == (["train", "sample_prompts"], ["a", "b"])
    with pytest.raises(ValueError, match="section.field=value"):
        parse_override("lr=1")


def test_resolve_applies_overrides_and_checks_types(tiny_data):
    base = {"model": {"d_model": 64, "n_layers": 2, "n_heads": 4}, "data": {"path": str(tiny_data["shards"])}}
    cfg = resolve(base, ["train.lr=6e-4", "train.steps=7", "optim.betas=[0.9, 0.99]", "schedule.name=wsd"])
    assert isinstance(cfg, TrainConfig)
    assert (cfg.train.lr, cfg.train.steps, cfg.optim.betas, cfg.schedule.name) == (6e-4, 7, (0.9, 0.99), "wsd")
    assert cfg.model.vocab_size == 512  # the data's vocabulary, rounded up to a multiple of 64
    assert resolve(base, ["train.grad_clip=1"]).train.grad_clip == 1.0  # int -> float is lossless
    assert "train" not in base  # the input dict is not modified
    with pytest.raises(ValueError, match="train.steps expects int"):
        resolve(base, ["train.steps=1.5"])
    with pytest.raises(ValueError, match="did you mean train.steps"):
        resolve(base, ["train.stpes=10"])
    with pytest.raises(ValueError, match="did you mean optim.betas"):
        resolve(base, ["train.betas=[0.9, 0.9]"])
    # nested tables: model.moe / model.ssm are built from --set too, and a typo names the nested field
    nested = resolve(base, ["model.moe.n_experts=4", "model.layer_pattern=['mamba', 'full']", "model.ssm.d_state=8"])
    assert (nested.model.moe.n_experts, nested.model.layer_types, nested.model.ssm.d_state) == (
        4, ["mamba", "full"], 8)
    with pytest.raises(ValueError, match="did you mean model.moe.n_experts"):
        resolve(base, ["model.moe.n_expert=4"])
    with pytest.raises(ValueError, match="unknown section"):
        resolve(base, ["trian.lr=1"])
    with pytest.raises(ValueError, match="train.lr"):
        resolve(base, ["optim.lr=1e-3"])
    with pytest.raises(ValueError, match="precision"):
        resolve(base, ["train.precision=fp8"])
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        resolve(base, ["data.seq_len=4096"])


def test_vocab_size_needs_data_or_a_value():
    with pytest.raises(ValueError, match="model.vocab_size is not set"):
        resolve({"model": {"d_model": 64}})
    assert resolve({"model": {"vocab_size": 100}}).model.vocab_size == 100


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_are_valid(recipe):
    cfg = load_recipe(recipe, ["model.vocab_size=50304"])
    assert cfg.train.steps > 0 and cfg.data.seq_len <= cfg.model.max_seq_len


def test_cli_reports_recipe_mistakes(tmp_path, capsys):
    assert main(["pretrain", "--recipe", str(tmp_path / "none.toml")]) == 1
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = 'ten'\n[model]\nvocab_size = 64\n")
    assert main(["pretrain", "--recipe", str(bad)]) == 1
    assert "train.steps expects int" in capsys.readouterr().err
    bad.write_text("[train\n")
    assert main(["pretrain", "--recipe", str(bad)]) == 1
    assert "not valid TOML" in capsys.readouterr().err


def test_cli_print_config(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[model]\nvocab_size = 128\nd_model = 64\nn_heads = 4\n")
    assert main(["pretrain", "--recipe", str(recipe), "--set", "train.lr=6e-4", "--print-config"]) == 0
    out = __import__("json").loads(capsys.readouterr().out)
    assert out["train"]["lr"] == 6e-4 and out["model"]["d_model"] == 64
