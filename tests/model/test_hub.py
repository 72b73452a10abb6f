"""Hugging Face conversion: logits and greedy decoding match transformers, in both directions.

Every HF model here is built by transformers from a tiny config with random weights (no hub), its
norm weights and biases pushed away from their init so a wrong norm mapping would show, and
saved to a temporary directory.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("quiet_transformers")

from hf_parity import HFCase, case_fixture, hf_greedy, lmlab_greedy, logits_of, max_diff, random_hf, random_ids  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from lmlab.model import ModelConfig, RopeScaling, build_model  # noqa: E402
from lmlab.model.hub import (  # noqa: E402
    SUPPORTED_MODEL_TYPES,
    hf_config_to_lmlab,
    lmlab_config_to_hf,
    load_hf,
    save_hf,
)

VOCAB, BATCH, SEQ, NEW = 96, 2, 24, 20
TOL = 1e-4
NO_SPECIAL_TOKENS = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
SMALL = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # GQA unless a case says otherwise
    "max_position_embeddings": 64,
    "initializer_range": 0.1,  # logits of order 1, so a 1e-4 tolerance means something
    **NO_SPECIAL_TOKENS,
}


def rope(kind: str, **params) -> dict:
    return {"rope_parameters": {"rope_type": kind, "rope_theta": 10000.0, **params}}


# name -> (model_type, HF config overrides)
CASES: dict[str, tuple[str, dict]] = {
    "gpt2": ("gpt2", {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4,
                      "n_positions": 64, "initializer_range": 0.1, **NO_SPECIAL_TOKENS}),
    "llama": ("llama", {**SMALL, "num_key_value_heads": 4}),  # Llama 2: MHA, no scaling
    "llama-linear": ("llama", {**SMALL, **rope("linear", factor=2.0),
                               "attention_bias": True, "mlp_bias": True}),
    # max_position_embeddings < SEQ, so dynamic NTK actually grows the base
    "llama-dynamic": ("llama", {**SMALL, "max_position_embeddings": 16,
                                **rope("dynamic", factor=2.0)}),
    "llama-yarn": ("llama", {**SMALL, **rope("yarn", factor=4.0,
                                             original_max_position_embeddings=16)}),
    # DeepSeek-style YaRN: attention factor from mscale / mscale_all_dim, untruncated ramp
    "llama-yarn-mscale": ("llama", {**SMALL, "max_position_embeddings": 256, "head_dim": 16,
                                    "num_attention_heads": 2, "num_key_value_heads": 1,
                                    **rope("yarn", factor=4.0, original_max_position_embeddings=32,
                                           mscale=1.0, mscale_all_dim=0.5, beta_fast=8.0,
                                           beta_slow=2.0, truncate=False)}),
    "llama3": ("llama", {**SMALL, "head_dim": 16, "num_attention_heads": 2,
                         "num_key_value_heads": 1, "rope_parameters": {
                             "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 32}}),
    "mistral": ("mistral", {**SMALL, "sliding_window": 8}),
    "qwen2": ("qwen2", {**SMALL, "use_sliding_window": True, "sliding_window": 8,
                        "max_window_layers": 1}),
    "qwen3": ("qwen3", {**SMALL, "head_dim": 16, "num_key_value_heads": 1}),
    "gemma": ("gemma", {**SMALL, "head_dim": 16}),
    "gemma2": ("gemma2", {**SMALL, "head_dim": 16, "sliding_window": 8,
                          "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0,
                          "query_pre_attn_scalar": 12}),
    "phi3": ("phi3", {**SMALL, "partial_rotary_factor": 0.5, "sliding_window": 8}),
}


def perturb_(model: torch.nn.Module, scale: float = 0.3) -> None:
    """Move norm weights and all biases off their init (ones / zeros), so a norm or bias that
    the conversion drops or misplaces changes the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * scale)


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


# The features each case exists for are active: switching one off changes the logits.
NO_WINDOW = {"sliding_window": None, "layer_types": None}
ACTIVE_FEATURES = {
    "llama-dynamic": [{"rope_scaling": None}],
    "llama-yarn": [{"rope_scaling": None}],
    "llama3": [{"rope_scaling": None}],
    # an off-by-one in the window (HF: k > q - window; lmlab: q - k < window) would show
    "mistral": [NO_WINDOW, {"sliding_window": 7}, {"sliding_window": 9}],
    "qwen2": [NO_WINDOW],
    "qwen3": [{"qk_norm": False}],
    "gemma2": [{"attn_softcap": None}, {"logit_softcap": None}, NO_WINDOW],
    "phi3": [NO_WINDOW, {"rope_fraction": 1.0}],
}


@pytest.mark.parametrize("name", list(ACTIVE_FEATURES))
def test_case_features_are_active(name: str, tmp_path):
    model_type, overrides = CASES[name]
    make_hf(model_type, overrides).save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    ids = random_ids(VOCAB, BATCH, SEQ)
    for changes in ACTIVE_FEATURES[name]:
        other = build_model(model.cfg.replace(**changes), init=False)
        state = {k: v for k, v in model.state_dict().items() if k in other.state_dict()}
        other.load_state_dict(state)
        assert max_diff(logits_of(other, ids), logits_of(model, ids)) > 1e-3, changes


def test_skipped_norm_weight_is_detected(tmp_path):
    """The parity check can fail: a norm left at its init gives different logits."""
    model_type, overrides = CASES["llama"]
    hf = make_hf(model_type, overrides)
    hf.save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    ids = random_ids(VOCAB, BATCH, SEQ)
    ref = logits_of(hf, ids)
    assert max_diff(logits_of(model, ids), ref) <= TOL
    with torch.no_grad():
        model.blocks[0].mlp_norm.weight.fill_(1.0)
    assert max_diff(logits_of(model, ids), ref) > 1e-3


def test_sharded_safetensors(tmp_path):
    model_type, overrides = CASES["qwen2"]
    hf = make_hf(model_type, overrides)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ids = random_ids(VOCAB, BATCH, SEQ)
    assert max_diff(logits_of(load_hf(tmp_path), ids), logits_of(hf, ids)) <= TOL


def test_pytorch_bin_in_original_gpt2_layout(tmp_path):
    """The original GPT-2 release: pytorch_model.bin, names without "transformer.", and the
    causal-mask buffers attn.bias / attn.masked_bias (ignored)."""
    model_type, overrides = CASES["gpt2"]
    hf = make_hf(model_type, overrides)
    hf.config.save_pretrained(tmp_path)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()
             if k != "lm_head.weight"}
    for i in range(hf.config.n_layer):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    ids = random_ids(VOCAB, BATCH, SEQ)
    assert max_diff(logits_of(load_hf(tmp_path), ids), logits_of(hf, ids)) <= TOL


def test_dtype_follows_checkpoint_unless_given(tmp_path):
    model_type, overrides = CASES["llama"]
    make_hf(model_type, overrides).to(torch.bfloat16).save_pretrained(tmp_path)
    assert load_hf(tmp_path).embed.weight.dtype == torch.bfloat16
    assert load_hf(tmp_path, dtype=torch.float32).embed.weight.dtype == torch.float32


def test_legacy_config_layout_matches_transformers(tmp_path):
    """transformers 4.x wrote `rope_scaling` (with "type") beside a top-level `rope_theta`; a
    top-level original_max_position_embeddings overrides the one in the RoPE dict. Whatever
    transformers makes of such a file, lmlab must make the same."""
    model_type, overrides = CASES["llama-yarn"]
    hf = make_hf(model_type, overrides)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["rope_parameters"]
    cfg.update(rope_theta=5000.0, original_max_position_embeddings=200, rope_scaling={
        "type": "yarn", "factor": 3.0, "original_max_position_embeddings": 16})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    model = load_hf(tmp_path)
    rs = model.cfg.rope_scaling
    assert (model.cfg.rope_theta, rs.factor, rs.original_max_seq_len) == (5000.0, 3.0, 200)
    ids = random_ids(VOCAB, BATCH, SEQ)
    ref = logits_of(reloaded.eval(), ids)
    assert max_diff(logits_of(model, ids), ref) <= TOL
    # and the override matters: with the nested value the YaRN ramp would differ
    nested = RopeScaling("yarn", 3.0, 16, attention_factor=rs.attention_factor)
    other = build_model(model.cfg.replace(rope_scaling=nested), init=False)
    other.load_state_dict(model.state_dict())
    assert max_diff(logits_of(other, ids), ref) > 1e-3


# --- lmlab -> HF ------------------------------------------------------------------------------


def test_export_roundtrip(case: HFCase, tmp_path):
    model = load_hf(case.path)
    out = save_hf(model, tmp_path / "export")
    hf_cfg = json.loads((out / "config.json").read_text())
    assert hf_cfg["model_type"] == case.model_type
    names = load_file(out / "model.safetensors").keys()
    assert ("lm_head.weight" in names) == (not model.cfg.tie_embeddings)
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert max_diff(logits_of(reloaded, case.ids), case.ref) <= TOL


def _native(**changes) -> ModelConfig:
    base = {"vocab_size": VOCAB, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
            "d_ff": 64, "max_seq_len": 64}
    return ModelConfig(**{**base, **changes})


GPT2_STYLE = {"norm": "layernorm", "norm_bias": True, "position": "learned", "qkv_bias": True,
              "attn_out_bias": True, "mlp_gated": False, "mlp_activation": "gelu_tanh",
              "mlp_bias": True, "tie_embeddings": True, "n_kv_heads": 4}
GEMMA2_STYLE = {"norm_unit_offset": True, "post_norm": True, "embedding_scale": math.sqrt(32),
                "mlp_activation": "gelu_tanh", "attn_scale": 0.25, "attn_softcap": 5.0,
                "logit_softcap": 10.0, "sliding_window": 8, "layer_types": ["sliding", "full"],
                "tie_embeddings": True}

NATIVE = {
    "llama": _native(),
    "llama-yarn": _native(rope_scaling=RopeScaling("yarn", factor=4.0, original_max_seq_len=16)),
    "llama-dynamic": _native(rope_scaling=RopeScaling("dynamic", 2.0, original_max_seq_len=16)),
    "mistral": _native(sliding_window=8),
    "qwen2": _native(qkv_bias=True),
    "qwen3": _native(qk_norm=True, head_dim=16, n_kv_heads=1),
    "gemma2": _native(**GEMMA2_STYLE),
    "gemma2-global": _native(**{**GEMMA2_STYLE, "sliding_window": None, "layer_types": None}),
    "phi3": _native(rope_fraction=0.5, sliding_window=8),
    "gpt2": _native(**GPT2_STYLE),
}


@pytest.mark.parametrize("name", list(NATIVE))
def test_native_model_exports(name: str, tmp_path):
    """A model built from a ModelConfig (no HF origin) goes to the simplest family that fits."""
    torch.manual_seed(0)
    model = build_model(NATIVE[name])
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.normal_(0.0, 0.1)
            if "norm" in pname and pname.endswith("weight"):
                p.add_(1.0)
    save_hf(model, tmp_path / "out")
    hf_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf_cfg["model_type"] == name.split("-")[0]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    ids = random_ids(VOCAB, BATCH, SEQ)
    assert max_diff(logits_of(reloaded.eval(), ids), logits_of(model, ids)) <= TOL


def test_export_refuses_non_empty_directory(tmp_path):
    model = build_model(_native())
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_hf(model, out)
    assert (out / "notes.txt").read_text() == "mine"
    save_hf(model, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_export_copies_extra_files(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    tokenizer = tmp_path / "tokenizer.json"
    out = save_hf(build_model(_native()), tmp_path / "out", extra_files=[tokenizer])
    assert (out / "tokenizer.json").read_text() == "{}"


# --- errors -------------------------------------------------------------------------------


def _saved(name: str, tmp_path):
    model_type, overrides = CASES[name]
    make_hf(model_type, overrides).save_pretrained(tmp_path)
    return tmp_path


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"unsupported model_type 'bert'.*llama"):
        load_hf(tmp_path)


def test_missing_tensor(tmp_path):
    path = _saved("llama", tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.post_attention_layernorm.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*layers\.1\.post_attention_layernorm"):
        load_hf(path)


def test_unexpected_tensor(tmp_path):
    path = _saved("llama", tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not use.*q_norm"):
        load_hf(path)


def test_tied_checkpoint_with_different_lm_head(tmp_path):
    path = _saved("gemma", tmp_path)
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    load_hf(path)  # a stored copy of the tied matrix is fine
    tensors["lm_head.weight"] += 1.0
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_hf(path)


def test_shape_mismatch(tmp_path):
    path = _saved("phi3", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_key_value_heads"] = 4
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"qkv_proj.weight has shape"):
        load_hf(path)


@pytest.mark.parametrize("change, match", [
    ({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 2,
                          "long_factor": [2.0] * 2, "rope_theta": 10000.0}}, "longrope"),
    ({"rope_parameters": {"rope_type": "su", "rope_theta": 10000.0}}, "longrope"),
    ({"hidden_act": "quick_gelu"}, "activation.*quick_gelu"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantized"),
])
def test_unsupported_features(change, match):
    hf_cfg = {"model_type": "phi3", **SMALL, **change}
    with pytest.raises(ValueError, match=match):
        hf_config_to_lmlab(hf_cfg)


def test_partial_rotary_outside_phi3_is_refused():
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        hf_config_to_lmlab({"model_type": "llama", **SMALL, "partial_rotary_factor": 0.5})


@pytest.mark.parametrize("changes, field", [
    ({"position": "alibi"}, "position"),
    ({"norm": "layernorm", "position": "sinusoidal"}, "position"),
    ({"pre_norm": False, "post_norm": True}, "pre_norm"),
])
def test_export_of_inexpressible_config(changes, field, tmp_path):
    with pytest.raises(ValueError, match=f"any supported Hugging Face family.*{field}="):
        save_hf(build_model(_native(**changes)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_to_a_family_that_lacks_a_feature(tmp_path):
    model = build_model(_native(qk_norm=True))
    with pytest.raises(ValueError, match=r"cannot be saved as HF 'llama'.*qk_norm=True"):
        save_hf(model, tmp_path / "out", model_type="llama")
    with pytest.raises(ValueError, match=r"'mistral'.*sliding"):
        lmlab_config_to_hf(_native(sliding_window=8, layer_types=["sliding", "full"]), "mistral")
    with pytest.raises(ValueError, match="d_model=30 must be a multiple of n_heads=4"):
        lmlab_config_to_hf(_native(d_model=30, head_dim=8), "llama")


# --- config quirks, resolved into explicit fields ------------------------------------------


def test_yarn_defaults_and_overrides():
    base = {"model_type": "llama", **SMALL, "max_position_embeddings": 128}
    # factor missing: the ratio of max to original positions (transformers 5)
    rs = hf_config_to_lmlab({**base, **rope("yarn", factor=None,
                                            original_max_position_embeddings=32)}).rope_scaling
    assert rs.factor == 4.0 and rs.attention_factor == pytest.approx(0.1 * math.log(4) + 1)
    # mscale and mscale_all_dim both set: their ratio; beta 0 means the default
    rs = hf_config_to_lmlab({**base, **rope("yarn", factor=4.0, mscale=1.0, mscale_all_dim=0.5,
                                            beta_fast=0, truncate=False)}).rope_scaling
    want = (0.1 * math.log(4) + 1) / (0.05 * math.log(4) + 1)
    assert rs.attention_factor == pytest.approx(want)
    assert (rs.beta_fast, rs.truncate, rs.original_max_seq_len) == (32.0, False, 128)


def test_dynamic_ntk_measures_against_max_position_embeddings():
    rs = hf_config_to_lmlab({"model_type": "llama", **SMALL, **rope(
        "dynamic", factor=2.0, original_max_position_embeddings=8)}).rope_scaling
    assert rs.original_max_seq_len == SMALL["max_position_embeddings"]


def test_qwen_windows_from_max_window_layers():
    cfg = hf_config_to_lmlab({"model_type": "qwen2", **SMALL, "num_hidden_layers": 3,
                              "use_sliding_window": True, "sliding_window": 8,
                              "max_window_layers": 1})
    assert (cfg.sliding_window, cfg.layer_types) == (8, ["full", "sliding", "sliding"])
    off = hf_config_to_lmlab({"model_type": "qwen2", **SMALL, "sliding_window": 8})
    assert off.sliding_window is None  # use_sliding_window defaults to False


def test_gemma_legacy_gelu_means_tanh():
    cfg = hf_config_to_lmlab({"model_type": "gemma", **SMALL, "hidden_act": "gelu"})
    assert cfg.mlp_activation == "gelu_tanh"
    assert cfg.embedding_scale == pytest.approx(math.sqrt(32)) and cfg.norm_unit_offset


def test_config_roundtrip_for_every_family():
    for name, (model_type, overrides) in CASES.items():
        cfg = hf_config_to_lmlab(AutoConfig.for_model(model_type, **overrides).to_dict())
        back = hf_config_to_lmlab(lmlab_config_to_hf(cfg))
        assert back == cfg, name
    # every family is covered here or by its own parity tests
    tested_elsewhere = {"mixtral", "qwen2_moe", "qwen3_moe",  # test_hub_moe.py
                        "deepseek_v2", "deepseek_v3",  # test_hub_deepseek.py
                        "mamba", "mamba2"}  # test_hub_ssm.py
    assert set(SUPPORTED_MODEL_TYPES) == {m for m, _ in CASES.values()} | tested_elsewhere


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_bf16_is_as_accurate_as_transformers(family, tmp_path):
    """In bfloat16, lmlab and transformers round in different places (lmlab keeps norm
    statistics and scaling in float32 and rounds once), so their logits differ at the bf16
    level. What must hold: lmlab's bf16 logits are no further from the float32 truth than
    transformers' own bf16 logits. (Computing the RoPE angles in bf16, for one, makes lmlab's
    error 2-7x transformers' at this length and fails here.)"""
    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, initializer_range=0.1, max_position_embeddings=2048)
    if family == "llama":
        cfg = transformers.LlamaConfig(**common, num_key_value_heads=2)
    else:
        cfg = transformers.GemmaConfig(**common, num_key_value_heads=1, head_dim=16)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, 300, (1, 1024))  # long enough that RoPE angle precision shows
    with torch.no_grad():
        truth = hf(ids).logits
        hf_err = (hf.to(torch.bfloat16)(ids).logits.float() - truth).abs().mean()
        ours = load_hf(tmp_path, dtype=torch.bfloat16)
        assert ours.embed.weight.dtype == torch.bfloat16
        our_err = (ours(ids).logits.float() - truth).abs().mean()
    assert 0 < our_err <= 1.25 * hf_err, (our_err, hf_err)
