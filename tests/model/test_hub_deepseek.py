"""DeepSeek-V2 / V3 conversion: logits and greedy decoding match transformers' DeepseekV2ForCausalLM and
DeepseekV3ForCausalLM, and save_hf writes checkpoints transformers loads with the same logits.

Every HF model is built by transformers from a tiny config with random weights, its norm weights, biases
and V3's routing-correction bias pushed away from their init so that a wrong mapping of any of them shows.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("quiet_transformers")

from hf_parity import HFCase, case_fixture, hf_greedy, lmlab_greedy, logits_of, max_diff, random_hf, random_ids  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from lmlab.model import ModelConfig, Transformer, build_model  # noqa: E402
from lmlab.model.hub import hf_config_to_lmlab, lmlab_config_to_hf, load_hf, save_hf  # noqa: E402
from lmlab.model.hub_deepseek import DEEPSEEK_V2, DEEPSEEK_V3  # noqa: E402

VOCAB, BATCH, SEQ, NEW = 96, 2, 20, 16
TOL = 1e-4
NO_SPECIAL_TOKENS = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
SMALL = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64,
    "kv_lora_rank": 16, "q_lora_rank": None, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6,
    "initializer_range": 0.1, **NO_SPECIAL_TOKENS,
}
DENSE = {"first_k_dense_replace": 2}  # every layer dense: MLA alone
MOE = {"first_k_dense_replace": 1, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1,
       "moe_intermediate_size": 16}
YARN = {"max_position_embeddings": 256, "rope_parameters": {
    "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
    "mscale": 0.9, "mscale_all_dim": 0.7, "beta_fast": 8.0, "beta_slow": 2.0}}

# name -> (model_type, HF config overrides)
CASES: dict[str, tuple[str, dict]] = {
    "v2": ("deepseek_v2", {**SMALL, **DENSE}),
    "v2-q-lora": ("deepseek_v2", {**SMALL, **DENSE, "q_lora_rank": 12, "attention_bias": True}),
    "v3": ("deepseek_v3", {**SMALL, **DENSE, "q_lora_rank": 12}),
    "v3-yarn": ("deepseek_v3", {**SMALL, **DENSE, **YARN}),
    "v3-halves": ("deepseek_v3", {**SMALL, **DENSE, "rope_interleave": False}),
    "v2-moe": ("deepseek_v2", {**SMALL, **MOE, "q_lora_rank": 12, "routed_scaling_factor": 1.5}),
    "v2-moe-groups": ("deepseek_v2", {**SMALL, **MOE, "topk_method": "group_limited_greedy", "n_group": 4,
                                      "topk_group": 1,  # with "max", only topk_group < top_k changes the choice
                                      "mlp_bias": True}),  # on the dense and shared MLPs, not the experts
    "v3-moe": ("deepseek_v3", {**SMALL, **MOE, "q_lora_rank": 12, "n_group": 4, "topk_group": 2}),
    "v3-moe-unnormalized": ("deepseek_v3", {**SMALL, **MOE, "n_group": 1, "topk_group": 1,
                                            "norm_topk_prob": False}),
}


def perturb_(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if "norm" in name or name.endswith("bias"):
            p.add_(torch.randn_like(p) * 0.3)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # large enough to change which experts are picked
            b.copy_(torch.randn_like(b) * 0.5)


def make_hf(model_type: str, overrides: dict, seed: int = 0):
    return random_hf(model_type, overrides, perturb_, seed)


case = case_fixture(CASES, make_hf, VOCAB, BATCH, SEQ)


# --- HF -> lmlab ------------------------------------------------------------------------------


def test_logits_match(case: HFCase):
    model = load_hf(case.path)
    assert model.cfg.meta["hf_model_type"] == case.model_type
    assert max_diff(logits_of(model, case.ids), case.ref) <= TOL


def test_greedy_tokens_match(case: HFCase):
    assert torch.equal(lmlab_greedy(load_hf(case.path), case.ids, NEW), hf_greedy(case.hf, case.ids, NEW))


def test_config_is_resolved(case: HFCase):
    cfg = load_hf(case.path).cfg
    overrides = CASES[case.name][1]
    assert cfg.mla.rope_interleave == overrides.get("rope_interleave", True)
    assert cfg.mla.q_lora_rank == overrides["q_lora_rank"]
    if "moe" in case.name:
        assert cfg.moe.dense_layers == [0] and cfg.is_moe(1)
        assert cfg.moe.router == ("sigmoid" if case.model_type == "deepseek_v3" else "softmax_topk")
        assert cfg.moe.bias_balancing == (case.model_type == "deepseek_v3")
    else:
        assert cfg.moe is None


# The features each case exists for are active: switching one off changes the logits.
ACTIVE_FEATURES = {
    "v2": [{"mla": {"rope_interleave": False}}],
    "v3": [{"mla": {"rope_interleave": False}}],
    "v3-halves": [{"mla": {"rope_interleave": True}}],
    "v3-yarn": [{"attn_scale": None}, {"rope_scaling": None}],
    "v2-q-lora": [{"qkv_bias": False, "attn_out_bias": False}],
    "v2-moe": [{"moe": {"routed_scaling_factor": 1.0}}],
    "v2-moe-groups": [{"moe": {"n_groups": 1, "topk_groups": 1}}, {"mlp_bias": False}],
    "v3-moe": [{"moe": {"n_groups": 1, "topk_groups": 1}}, {"moe": {"norm_topk_prob": False}}],
}


@pytest.mark.parametrize("name", list(ACTIVE_FEATURES))
def test_case_features_are_active(name: str, tmp_path):
    model_type, overrides = CASES[name]
    make_hf(model_type, overrides).save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    ids = random_ids(VOCAB, BATCH, SEQ)
    for changes in ACTIVE_FEATURES[name]:
        changes = {k: ({**dataclasses.asdict(getattr(model.cfg, k)), **v} if isinstance(v, dict) else v)
                   for k, v in changes.items()}
        other = build_model(model.cfg.replace(**changes), init=False)
        state = {k: v for k, v in model.state_dict().items() if k in other.state_dict()}
        other.load_state_dict(state, strict=False)
        for k, v in other.state_dict().items():
            if k not in state:  # a bias the variant adds: zero
                v.zero_()
        assert max_diff(logits_of(other, ids), logits_of(model, ids)) > 1e-3, changes


def test_yarn_attention_scale():
    """DeepSeek's YaRN scale: qk_head_dim^-1/2 * (0.1 * mscale_all_dim * ln(factor) + 1)^2."""
    cfg = hf_config_to_lmlab({"model_type": "deepseek_v3", **SMALL, **DENSE, **YARN})
    m = 0.1 * 0.7 * math.log(4.0) + 1
    assert cfg.attn_scale == pytest.approx(12**-0.5 * m * m, rel=1e-12)
    assert cfg.rope_scaling.attention_factor == pytest.approx((0.1 * 0.9 * math.log(4.0) + 1) / m, rel=1e-12)


# --- lmlab -> HF ------------------------------------------------------------------------------


def test_save_round_trip(case: HFCase, tmp_path):
    """load_hf -> save_hf: transformers loads the export with the original logits, every tensor unchanged."""
    model = load_hf(case.path)
    out = save_hf(model, tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    assert type(back).__name__ == type(case.hf).__name__
    assert max_diff(logits_of(back, case.ids), case.ref) <= TOL
    original, exported = load_file(case.path / "model.safetensors"), load_file(out / "model.safetensors")
    assert original.keys() == exported.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, exported[name]), name
    assert hf_config_to_lmlab(json.loads((out / "config.json").read_text())).to_dict() == model.cfg.to_dict()


NATIVE = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=64, norm_eps=1e-6,
              init_std=0.1, mla={"kv_lora_rank": 16, "q_lora_rank": 12, "qk_nope_head_dim": 8,
                                 "qk_rope_head_dim": 4, "v_head_dim": 6})


@pytest.mark.parametrize("interleave", [False, True])
def test_native_mla_model_exports(interleave, tmp_path):
    """An MLA model built in lmlab (rotate-half RoPE unless told otherwise) exports as the first family that
    expresses it exactly, and transformers computes its logits."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**NATIVE, "mla": {**NATIVE["mla"], "rope_interleave": interleave}})
    model = build_model(cfg).eval()
    out = save_hf(model, tmp_path / "out")
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["model_type"] == ("deepseek_v2" if interleave else "deepseek_v3")
    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    ids = random_ids(VOCAB, BATCH, SEQ)
    assert max_diff(logits_of(hf, ids), logits_of(model, ids)) <= TOL
    assert load_hf(out).cfg.mla == cfg.mla


def test_native_attention_scale_exports(tmp_path):
    """A non-default softmax scale survives export as DeepSeek's mscale_all_dim, under a YaRN scaling."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**NATIVE, "attn_scale": 0.4, "max_seq_len": 256,
                         "rope_scaling": {"kind": "yarn", "factor": 4.0, "original_max_seq_len": 32}})
    model = build_model(cfg).eval()
    out = save_hf(model, tmp_path / "out", model_type="deepseek_v3")
    hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    ids = random_ids(VOCAB, BATCH, SEQ)
    assert max_diff(logits_of(hf, ids), logits_of(model, ids)) <= TOL
    assert load_hf(out).cfg.attn_scale == pytest.approx(0.4, rel=1e-12)


def test_inexpressible_configs_are_refused():
    v2_halves = ModelConfig(**NATIVE)  # rotate-half RoPE: V2 pairs dims interleaved, always
    with pytest.raises(ValueError, match="rope_interleave"):
        lmlab_config_to_hf(v2_halves, "deepseek_v2")
    no_mla = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4)
    with pytest.raises(ValueError, match="latent attention"):
        lmlab_config_to_hf(no_mla, "deepseek_v3")
    with pytest.raises(ValueError, match="latent_norm_eps"):
        lmlab_config_to_hf(ModelConfig(**{**NATIVE, "mla": {**NATIVE["mla"], "latent_norm_eps": 1e-5}}),
                           "deepseek_v3")


@pytest.mark.parametrize("model_type, changes, match", [
    ("deepseek_v2", {"moe_layer_freq": 2}, "moe_layer_freq"),
    ("deepseek_v2", {"norm_topk_prob": True}, "norm_topk_prob"),
    ("deepseek_v2", {"topk_method": "noaux_tc"}, "topk_method"),
    ("deepseek_v2", {"topk_method": "group_limited_greedy", "n_group": 3, "topk_group": 1}, "n_group"),
    ("deepseek_v2", {"n_shared_experts": 0}, "n_shared_experts"),
    ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func"),
    ("deepseek_v3", {"n_group": 4, "topk_group": 1, "num_experts_per_tok": 3}, "top_k"),
])
def test_unsupported_hf_configs_are_refused(model_type, changes, match):
    with pytest.raises(ValueError, match=match):
        hf_config_to_lmlab({"model_type": model_type, **SMALL, **MOE, "n_group": 1, "topk_group": 1, **changes})


@pytest.mark.parametrize("family", [DEEPSEEK_V2, DEEPSEEK_V3])
def test_family_defaults_are_transformers_defaults(family):
    """config.json leaves out fields equal to the config class's defaults: the family must fill in the same."""
    hf_defaults = AutoConfig.for_model(family.model_type).to_dict()
    for key, value in family.defaults.items():
        assert hf_defaults[key] == value, key


# The published config.json of DeepSeek-V2-Lite and DeepSeek-V3 (the latter without its FP8 quantization_config),
# legacy `rope_scaling` layout and DeepSeek's own extra keys included.
_EXTRA = {"aux_loss_alpha": 0.001, "ep_size": 1, "moe_layer_freq": 1, "seq_aux": True, "pretraining_tp": 1,
          "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu", "initializer_range": 0.02,
          "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "use_cache": True, "torch_dtype": "bfloat16",
          "max_position_embeddings": 163840, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
          "v_head_dim": 128, "rope_theta": 10000}
_YARN40 = {"beta_fast": 32, "beta_slow": 1, "factor": 40, "original_max_position_embeddings": 4096, "type": "yarn"}
PUBLISHED = {
    "DeepSeek-V2-Lite": {
        **_EXTRA, "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "bos_token_id": 100000,
        "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_size": 2048, "intermediate_size": 10944,
        "moe_intermediate_size": 1408, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
        "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
        "num_key_value_heads": 16, "q_lora_rank": None, "rope_scaling": {**_YARN40, "mscale": 0.707,
                                                                         "mscale_all_dim": 0.707},
        "routed_scaling_factor": 1.0, "scoring_func": "softmax", "topk_group": 1, "topk_method": "greedy",
        "vocab_size": 102400},
    "DeepSeek-V3": {
        **_EXTRA, "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"], "bos_token_id": 0,
        "eos_token_id": 1, "first_k_dense_replace": 3, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1,
        "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
        "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
        "rope_scaling": {**_YARN40, "mscale": 1.0, "mscale_all_dim": 1.0}, "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid", "topk_group": 4, "topk_method": "noaux_tc", "vocab_size": 129280},
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_configs(name):
    """The real models' configs convert, and (both built on the meta device, no memory) lmlab's model has
    transformers' parameter count, softmax scale and RoPE temperature."""
    hf_cfg = PUBLISHED[name]
    cfg = hf_config_to_lmlab(hf_cfg)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{k: v for k, v in hf_cfg.items()
                                                                      if k != "architectures"}))
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())
    assert cfg.attn_scale == pytest.approx(hf.model.layers[0].self_attn.scaling, rel=1e-12)
    assert cfg.rope_scaling.attention_factor == pytest.approx(hf.model.rotary_emb.attention_scaling, rel=1e-12)
    assert cfg.moe.dense_layers == list(range(hf_cfg["first_k_dense_replace"]))


def test_multi_token_prediction_layers_are_skipped_but_other_extras_refused(tmp_path):
    """DeepSeek-V3 checkpoints carry their multi-token-prediction module as layer num_hidden_layers; transformers
    does not load it, so neither does lmlab. Any other unused tensor is still an error."""
    from safetensors.torch import load_file, save_file

    _, overrides = CASES["v3"]
    make_hf("deepseek_v3", overrides).save_pretrained(tmp_path)
    n_layers = overrides["num_hidden_layers"]
    tensors = load_file(tmp_path / "model.safetensors")
    ids = random_ids(VOCAB, BATCH, SEQ)
    want = logits_of(load_hf(tmp_path), ids)
    tensors[f"model.layers.{n_layers}.eh_proj.weight"] = torch.zeros(4, 4)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert torch.equal(logits_of(load_hf(tmp_path), ids), want)
    tensors["model.layers.0.unknown.weight"] = torch.zeros(4, 4)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unknown"):
        load_hf(tmp_path)
