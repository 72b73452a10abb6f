"""Mamba and Mamba-2 checkpoints: logits and greedy decoding match transformers' MambaForCausalLM and
Mamba2ForCausalLM (their plain torch paths, which run on CPU), in both directions.

Every HF model is built by transformers from a tiny config with random weights (no hub). Norm weights,
biases, A_log and D are pushed off their init, so a mapping that drops or misplaces one changes the
logits; dt is raised to 0.1-1 so each token moves the state visibly.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("quiet_transformers")

from hf_parity import HFCase, case_fixture, hf_greedy, lmlab_greedy, logits_of, max_diff, random_hf, random_ids  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from lmlab.model import ModelConfig, build_model  # noqa: E402
from lmlab.model.config import SSMConfig  # noqa: E402
from lmlab.model.hub import hf_config_to_lmlab, lmlab_config_to_hf, load_hf, save_hf  # noqa: E402

VOCAB, BATCH, SEQ, NEW = 96, 2, 24, 12
TOL = 1e-4
BASE = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "state_size": 8,
        "initializer_range": 0.1, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}

CASES: dict[str, tuple[str, dict]] = {
    "mamba": ("mamba", BASE),  # tied embeddings, time_step_rank "auto"
    "mamba-bias": ("mamba", {**BASE, "use_bias": True, "use_conv_bias": False, "time_step_rank": 3,
                             "tie_word_embeddings": False, "conv_kernel": 3, "expand": 3}),
    # chunk_size 8 < SEQ: transformers' SSD runs several chunks too
    "mamba2": ("mamba2", {**BASE, "num_heads": 4, "head_dim": 16, "n_groups": 2, "chunk_size": 8}),
    # hidden_size not a multiple of 8, one group, tied, biases
    "mamba2-odd": ("mamba2", {**BASE, "hidden_size": 36, "num_heads": 6, "head_dim": 12, "n_groups": 1,
                              "chunk_size": 5, "use_bias": True, "tie_word_embeddings": True}),
}


def perturb_(model: torch.nn.Module, scale: float = 0.3) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("bias", "A_log", ".D")):
                p.add_(torch.randn_like(p) * scale)
            if name.endswith(("dt_proj.bias", "dt_bias")):
                p.add_(2.0)


def make_hf(model_type: str, overrides: dict, seed: int = 0):
    return random_hf(model_type, overrides, perturb_, seed, attn_implementation=None)


case = case_fixture(CASES, make_hf, VOCAB, BATCH, SEQ)


def test_logits_match(case: HFCase):
    model = load_hf(case.path)
    cfg = model.cfg
    assert cfg.meta["hf_model_type"] == case.model_type and cfg.ssm.kind == case.model_type
    assert cfg.layer_types == ["mamba"] * cfg.n_layers and not cfg.ssm.mlp and cfg.position == "none"
    assert all(block.mlp is None for block in model.blocks)
    assert max_diff(logits_of(model, case.ids), case.ref) <= TOL


def test_greedy_tokens_match(case: HFCase):
    assert torch.equal(lmlab_greedy(load_hf(case.path), case.ids, NEW), hf_greedy(case.hf, case.ids, NEW))


def test_left_padded_row_matches_transformers_on_the_row_alone(case: HFCase):
    """lmlab keeps padding out of the state, so a left-padded row gives what transformers gives for the
    row alone. (transformers zeroes the inputs of in_proj at padding, which is the same only without
    in_proj's bias: with use_bias its padded rows differ from the rows alone.)"""
    model = load_hf(case.path)
    mask = torch.ones_like(case.ids)
    mask[0, :7] = 0
    ours = logits_of(model, case.ids, attention_mask=mask)
    assert max_diff(ours[0, 7:], logits_of(case.hf, case.ids[:1, 7:])[0]) <= TOL
    assert max_diff(ours[1], case.ref[1]) <= TOL


def test_export_roundtrip(case: HFCase, tmp_path):
    model = load_hf(case.path)
    out = save_hf(model, tmp_path / "export")
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["model_type"] == case.model_type
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert max_diff(logits_of(reloaded, case.ids), case.ref) <= TOL
    assert hf_config_to_lmlab(hf_cfg) == model.cfg


def test_config_roundtrip():
    for name, (model_type, overrides) in CASES.items():
        cfg = hf_config_to_lmlab(AutoConfig.for_model(model_type, **overrides).to_dict())
        assert hf_config_to_lmlab(lmlab_config_to_hf(cfg)) == cfg, name
    cfg = hf_config_to_lmlab({"model_type": "mamba", **BASE})
    assert cfg.ssm.dt_rank == 2 and cfg.tie_embeddings and cfg.ssm.d_conv == 4  # the config class's defaults
    cfg = hf_config_to_lmlab({"model_type": "mamba2", **BASE, "num_heads": 8, "head_dim": 8})
    assert (cfg.ssm.n_groups, cfg.ssm.chunk_size, cfg.tie_embeddings) == (8, 256, False)


def native(kind: str, **changes) -> ModelConfig:
    ssm = SSMConfig(kind=kind, d_state=8, head_dim=16, n_groups=2) if kind == "mamba2" else SSMConfig(d_state=8)
    kw = dict(vocab_size=VOCAB, d_model=32, n_layers=2, layer_types=["mamba"] * 2, position="none", ssm=ssm)
    return ModelConfig(**{**kw, **changes})


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_native_model_exports(kind, tmp_path):
    """A pure Mamba model built from a ModelConfig goes to its family, and transformers computes the same."""
    torch.manual_seed(0)
    model = build_model(native(kind))
    perturb_(model)
    save_hf(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == kind
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = random_ids(VOCAB, BATCH, SEQ)
    assert max_diff(logits_of(reloaded, ids), logits_of(model, ids)) <= TOL


def test_hybrid_export_is_refused(tmp_path):
    cfg = native("mamba", n_layers=2, layer_types=["mamba", "full"], n_heads=4)
    with pytest.raises(ValueError, match=r"cannot be saved as HF 'mamba'.*pure Mamba stacks"):
        save_hf(build_model(cfg), tmp_path / "out", model_type="mamba")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type, change, match", [
    ("mamba", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("mamba", {"expand": 1.5}, "expand=1.5"),
    ("mamba2", {"num_heads": 4, "head_dim": 16, "time_step_limit": [0.0, 1.0]}, "time_step_limit"),
    ("mamba2", {"num_heads": 3, "head_dim": 16}, "num_heads=3 \\* head_dim=16"),
])
def test_unsupported_configs(model_type, change, match):
    with pytest.raises(ValueError, match=match):
        hf_config_to_lmlab({"model_type": model_type, **BASE, **change})
