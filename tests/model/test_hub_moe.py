"""Hugging Face mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE): logits and greedy decoding
match transformers, exports load back in transformers with the same logits, and what cannot be
expressed is refused by name.

Every HF model is built by transformers from a tiny config with random weights, its norms and biases
moved off their init and its router weights scaled up (so routing is decisive and differs from token to
token: a wrong expert choice, order or weighting changes the logits), and saved to a temporary directory.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("quiet_transformers")

from hf_parity import HFCase, case_fixture, hf_greedy, lmlab_greedy, logits_of, max_diff, random_hf, random_ids  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from lmlab.model import ModelConfig, build_model  # noqa: E402
from lmlab.model.hub import hf_config_to_lmlab, lmlab_config_to_hf, load_hf, save_hf  # noqa: E402
from lmlab.model.moe import MoE, route  # noqa: E402

VOCAB, BATCH, SEQ, NEW = 96, 2, 24, 20
TOL = 1e-4
SMALL = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    "initializer_range": 0.1, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None,
}

CASES: dict[str, tuple[str, dict]] = {
    "mixtral": ("mixtral", {**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "mixtral-window-top1": ("mixtral", {**SMALL, "num_local_experts": 4, "num_experts_per_tok": 1,
                                        "sliding_window": 8}),
    # a dense layer of its own width (mlp_only_layers), sliding layers, unnormalized top-k
    "qwen2_moe": ("qwen2_moe", {**SMALL, "num_hidden_layers": 3, "num_experts": 8, "num_experts_per_tok": 2,
                                "moe_intermediate_size": 16, "shared_expert_intermediate_size": 24,
                                "mlp_only_layers": [1], "norm_topk_prob": False, "use_sliding_window": True,
                                "sliding_window": 8, "max_window_layers": 2}),
    "qwen2_moe-normalized": ("qwen2_moe", {**SMALL, "num_experts": 4, "num_experts_per_tok": 3,
                                           "moe_intermediate_size": 16, "shared_expert_intermediate_size": 40,
                                           "norm_topk_prob": True}),
    # every second layer sparse (decoder_sparse_step), explicit head_dim, q/k/v/o bias
    "qwen3_moe": ("qwen3_moe", {**SMALL, "num_hidden_layers": 4, "num_experts": 8, "num_experts_per_tok": 2,
                                "moe_intermediate_size": 16, "norm_topk_prob": True, "head_dim": 16,
                                "decoder_sparse_step": 2, "attention_bias": True}),
    "qwen3_moe-unnormalized": ("qwen3_moe", {**SMALL, "num_experts": 8, "num_experts_per_tok": 4,
                                             "moe_intermediate_size": 8, "norm_topk_prob": False,
                                             "use_sliding_window": True, "sliding_window": 8}),
}


def perturb_(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if "norm" in name or name.endswith("bias"):
            p.add_(torch.randn_like(p) * 0.3)
        if name.endswith("mlp.gate.weight"):  # the router
            p.mul_(4.0)


def make_hf(model_type: str, overrides: dict, seed: int = 0):
    return random_hf(model_type, overrides, perturb_, seed)


case = case_fixture(CASES, make_hf, VOCAB, BATCH, SEQ)


# --- HF -> lmlab ----------------------------------------------------------------------------------
def test_logits_match(case: HFCase):
    model = load_hf(case.path)
    assert model.cfg.meta["hf_model_type"] == case.model_type and model.cfg.moe is not None
    assert max_diff(logits_of(model, case.ids), case.ref) <= TOL


def test_greedy_tokens_match(case: HFCase):
    assert torch.equal(lmlab_greedy(load_hf(case.path), case.ids, NEW), hf_greedy(case.hf, case.ids, NEW))


def test_routing_is_non_trivial(case: HFCase):
    """Tokens spread over many expert sets, and the router matters: with its rows permuted (the same
    experts, chosen for other tokens) the logits move far beyond the tolerance."""
    model = load_hf(case.path)
    layer = next(b.mlp for b in model.blocks if isinstance(b.mlp, MoE))
    x = torch.randn(SEQ * BATCH, 32)
    _, experts = route(layer.router_logits(x), layer.moe)
    assert len({tuple(sorted(e)) for e in experts.tolist()}) >= 3
    with torch.no_grad():
        for block in model.blocks:
            if isinstance(block.mlp, MoE):
                block.mlp.router.weight.copy_(block.mlp.router.weight.roll(1, dims=0))
    assert max_diff(logits_of(model, case.ids), case.ref) > 1e-2


def test_checkpoint_holds_one_tensor_per_expert(case: HFCase):
    """transformers 5 fuses experts in memory, but save_pretrained writes them one per expert: the
    layout the family tables read."""
    with safe_open(case.path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    prefix = "model.layers.0.block_sparse_moe.experts" if case.model_type == "mixtral" else "model.layers.0.mlp.experts"
    if case.name == "qwen3_moe":  # decoder_sparse_step 2: layer 1 is the first sparse one
        prefix = prefix.replace("layers.0", "layers.1")
    assert any(n.startswith(prefix + ".0.") for n in names)
    assert not any(n.endswith(("gate_up_proj", "experts.down_proj")) for n in names)


# The feature a case exists for is active: switching it off in lmlab changes the logits.
ACTIVE = {
    "qwen2_moe": [{"norm_topk_prob": True}, {"shared_gate": False}],
    "qwen2_moe-normalized": [{"norm_topk_prob": False}],
    "qwen3_moe": [{"norm_topk_prob": False}],
    "qwen3_moe-unnormalized": [{"norm_topk_prob": True}],
    "mixtral": [{"top_k": 1}],
}


@pytest.mark.parametrize("name", list(ACTIVE))
def test_case_features_are_active(name: str, tmp_path):
    model_type, overrides = CASES[name]
    make_hf(model_type, overrides).save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    ids = random_ids(VOCAB, BATCH, SEQ)
    for changes in ACTIVE[name]:
        moe = {**model.cfg.moe.__dict__, **changes}
        other = build_model(model.cfg.replace(moe=type(model.cfg.moe)(**moe)), init=False)
        state = {k: v for k, v in model.state_dict().items() if k in other.state_dict()}
        other.load_state_dict(state)
        assert max_diff(logits_of(other, ids), logits_of(model, ids)) > 1e-3, changes


def test_qwen_dense_layers_from_sparse_step_and_mlp_only_layers():
    cfg = hf_config_to_lmlab({"model_type": "qwen3_moe", **SMALL, "num_hidden_layers": 6, "num_experts": 4,
                              "num_experts_per_tok": 2, "moe_intermediate_size": 8, "decoder_sparse_step": 2,
                              "mlp_only_layers": [3]})
    assert cfg.moe.dense_layers == [0, 2, 3, 4] and cfg.d_ff == 64 and cfg.moe.d_expert == 8
    qwen3 = hf_config_to_lmlab({"model_type": "qwen3_moe", **SMALL, "num_experts": 4, "num_experts_per_tok": 2,
                                "moe_intermediate_size": 8})
    assert qwen3.moe.n_experts == 4 and qwen3.qk_norm
    # released Qwen3-MoE configs say num_experts; transformers 5 writes num_local_experts
    legacy = hf_config_to_lmlab({"model_type": "qwen3_moe", **SMALL, "num_local_experts": 6, "num_experts_per_tok": 2,
                                 "moe_intermediate_size": 8})
    assert legacy.moe.n_experts == 6


def test_qwen2_moe_default_sliding_layers_follow_transformers():
    """Without layer_types, Qwen2MoeConfig slides on even layers below max_window_layers (not Qwen2's
    layers from max_window_layers on)."""
    hf = {"model_type": "qwen2_moe", **SMALL, "num_hidden_layers": 5, "num_experts": 4, "num_experts_per_tok": 2,
          "moe_intermediate_size": 8, "shared_expert_intermediate_size": 8, "use_sliding_window": True,
          "sliding_window": 8, "max_window_layers": 3}
    theirs = AutoConfig.for_model(**hf).layer_types
    assert theirs == ["sliding_attention", "full_attention", "sliding_attention", "full_attention", "full_attention"]
    cfg = hf_config_to_lmlab(hf)
    assert cfg.layer_types == ["sliding", "full", "sliding", "full", "full"] and cfg.sliding_window == 8


# --- lmlab -> HF ----------------------------------------------------------------------------------
def test_export_roundtrip(case: HFCase, tmp_path):
    model = load_hf(case.path)
    out = save_hf(model, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["model_type"] == case.model_type
    reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert max_diff(logits_of(reloaded, case.ids), case.ref) <= TOL


def test_config_roundtrip_for_every_case():
    for name, (model_type, overrides) in CASES.items():
        cfg = hf_config_to_lmlab(AutoConfig.for_model(model_type, **overrides).to_dict())
        assert hf_config_to_lmlab(lmlab_config_to_hf(cfg)) == cfg, name


def _native(**changes) -> ModelConfig:
    base = {"vocab_size": VOCAB, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64,
            "max_seq_len": 64}
    return ModelConfig(**{**base, **changes})


NATIVE = {
    "mixtral": _native(moe={"n_experts": 4, "top_k": 2}),
    "qwen2_moe": _native(qkv_bias=True, moe={"n_experts": 4, "top_k": 2, "d_expert": 16, "norm_topk_prob": False,
                                            "n_shared_experts": 1, "d_shared": 24, "shared_gate": True}),
    "qwen3_moe": _native(qk_norm=True, n_layers=3, moe={"n_experts": 4, "top_k": 2, "d_expert": 16,
                                                        "norm_topk_prob": False, "dense_layers": [1]}),
}


@pytest.mark.parametrize("name", list(NATIVE))
def test_native_moe_model_exports(name: str, tmp_path):
    """A model built from a ModelConfig goes to the first family that expresses it, and transformers
    computes the same logits from the export."""
    torch.manual_seed(0)
    model = build_model(NATIVE[name])
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.normal_(0.0, 0.5 if pname.endswith("router.weight") else 0.1)
            if "norm" in pname and pname.endswith("weight"):
                p.add_(1.0)
    save_hf(model, tmp_path / "out")
    assert json.loads((tmp_path / "out/config.json").read_text())["model_type"] == name
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids = random_ids(VOCAB, BATCH, SEQ)
    assert max_diff(logits_of(reloaded, ids), logits_of(model, ids)) <= TOL


def test_aux_loss_matches_transformers_for_one_layer(tmp_path):
    """With output_router_logits, transformers adds router_aux_loss_coef x its balance loss to the
    loss; lmlab maps that to moe.aux_loss_coef and, for one layer (where transformers' pooling over
    layers is the same as lmlab's per-layer sum), the training losses agree."""
    hf = make_hf("mixtral", {**SMALL, "num_hidden_layers": 1, "num_local_experts": 4, "num_experts_per_tok": 2,
                             "output_router_logits": True, "router_aux_loss_coef": 0.3})
    hf.save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    assert model.cfg.moe.aux_loss_coef == pytest.approx(0.3)
    ids = random_ids(VOCAB, BATCH, SEQ)
    targets = torch.cat([ids[:, 1:], torch.full((BATCH, 1), -100)], dim=1)
    hf.train(), model.train()
    with torch.no_grad():
        theirs = hf(ids, labels=ids)
        ours = model(ids, targets=targets)
    assert ours.aux_loss.item() == pytest.approx(0.3 * theirs.aux_loss.item(), rel=1e-5)
    assert ours.loss.item() == pytest.approx(theirs.loss.item(), rel=1e-5)
    back = lmlab_config_to_hf(model.cfg)
    assert back["output_router_logits"] is True and back["router_aux_loss_coef"] == pytest.approx(0.3)


# --- refusals -------------------------------------------------------------------------------------
def test_router_jitter_is_refused():
    with pytest.raises(ValueError, match="router_jitter_noise"):
        hf_config_to_lmlab({"model_type": "mixtral", **SMALL, "num_local_experts": 4, "router_jitter_noise": 0.1})


# The export check compares the moe settings field by field; the error names the field and both values.
@pytest.mark.parametrize("moe, model_type, match", [
    ({"router": "sigmoid"}, "mixtral", r"moe.router='sigmoid' \(mixtral gives 'softmax_topk'\)"),
    ({"n_groups": 2, "topk_groups": 1}, "mixtral", r"moe.n_groups=2 \(mixtral gives 1\)"),
    ({"norm_topk_prob": False}, "mixtral", r"moe.norm_topk_prob=False \(mixtral gives True\)"),
    ({}, "qwen2_moe", "always have a shared expert"),
    # one shared expert of d_expert = 16 hidden units (the _native default) that qwen3_moe has no place for
    ({"n_shared_experts": 1}, "qwen3_moe", r"moe.shared_width=\d+ \(qwen3_moe gives 0\)"),
])
def test_inexpressible_moe_configs_are_named(moe, model_type, match, tmp_path):
    cfg = _native(qk_norm=model_type == "qwen3_moe", moe={"n_experts": 4, "top_k": 2, **moe})
    with pytest.raises(ValueError, match=match):
        save_hf(build_model(cfg), tmp_path / "out", model_type=model_type)
    assert not (tmp_path / "out").exists()


def test_dense_model_is_not_an_moe_family():
    with pytest.raises(ValueError, match="no moe config"):
        lmlab_config_to_hf(_native(), "mixtral")
    with pytest.raises(ValueError, match="num_experts=0"):
        hf_config_to_lmlab({"model_type": "qwen3_moe", **SMALL, "num_experts": 0, "num_experts_per_tok": 2,
                            "moe_intermediate_size": 8})
