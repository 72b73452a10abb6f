"""Hugging Face mixture-of-experts families: Mixtral, Qwen2-MoE (Qwen1.5-MoE), Qwen3-MoE.

Each is a `hub.Family`: the Llama attention table plus the expert tensors, and a config mapping in both
directions, written against transformers 5.x (`models/<name>/modeling_<name>.py`, `configuration_<name>.py`).

    family      HF model_type  notes
    Mixtral     mixtral        softmax top-k, always renormalized; experts w1/w3/w2 under block_sparse_moe
    Qwen2-MoE   qwen2_moe      + a shared expert with a sigmoid gate; norm_topk_prob; q/k/v bias;
                               dense layers from decoder_sparse_step / mlp_only_layers (own widths)
    Qwen3-MoE   qwen3_moe      qk-norm; norm_topk_prob; dense layers as Qwen2-MoE; no shared expert

On disk. transformers 5 holds each layer's experts fused in memory (`experts.gate_up_proj` (E, 2I, H),
`experts.down_proj` (E, H, I)), but `save_pretrained` converts them back (conversion_mapping.py) and
writes one tensor per expert, as the released checkpoints have them: Mixtral
`model.layers.{i}.block_sparse_moe.experts.{e}.w1|w3|w2.weight` (gate | up | down) and
`...block_sparse_moe.gate.weight`; Qwen `model.layers.{i}.mlp.experts.{e}.gate_proj|up_proj|down_proj.weight`
and `...mlp.gate.weight`. Those per-expert names are what these tables link ("{e}": lmlab's stacked
(E, out, in) tensor is their stack). A checkpoint stored with fused 3-D expert tensors is not read.

Routing is the same computation in both libraries: router logits in float32 (lmlab computes them so
always; transformers in the model's dtype), softmax, top-k over the probabilities, optional renormalization.

Training-only settings: HF's `router_aux_loss_coef` applies only with `output_router_logits`, so it maps to
lmlab's moe.aux_loss_coef exactly when that flag is on (and back). transformers pools the router statistics
of all layers into one loss where lmlab sums one loss per layer; the two agree for a single layer.
Refused: Mixtral's `router_jitter_noise` (training-time input noise lmlab does not implement), a Qwen2-MoE
without a shared expert, and MoE configs with no sparse layer.
"""

from __future__ import annotations

from typing import Any

from .config import ModelConfig, MoEConfig
from .hub import (
    _LLAMA_DEFAULTS,
    _LLAMA_MODULES,
    Family,
    _attention_bias,
    _decoder_from_hf,
    _decoder_to_hf,
    _global_window_to_hf,
    _req,
    _windows_from_hf,
    _windows_to_hf,
)

_ATTENTION = {k: v for k, v in _LLAMA_MODULES.items() if not str(k).startswith("blocks.{i}.mlp.")}

_MIXTRAL_MODULES: dict[str | tuple[str, ...], str] = {
    **_ATTENTION,
    "blocks.{i}.mlp.router": "model.layers.{i}.block_sparse_moe.gate",
    "blocks.{i}.mlp.experts.gate_proj": "model.layers.{i}.block_sparse_moe.experts.{e}.w1",
    "blocks.{i}.mlp.experts.up_proj": "model.layers.{i}.block_sparse_moe.experts.{e}.w3",
    "blocks.{i}.mlp.experts.down_proj": "model.layers.{i}.block_sparse_moe.experts.{e}.w2",
}

# Dense layers (mlp_only_layers) keep Llama's mlp.gate_proj/...; entries whose lmlab tensors a layer lacks
# are skipped, so one table serves both kinds of layer.
_QWEN3_MOE_MODULES: dict[str | tuple[str, ...], str] = {
    **_LLAMA_MODULES,
    "blocks.{i}.mlp.router": "model.layers.{i}.mlp.gate",
    "blocks.{i}.mlp.experts.gate_proj": "model.layers.{i}.mlp.experts.{e}.gate_proj",
    "blocks.{i}.mlp.experts.up_proj": "model.layers.{i}.mlp.experts.{e}.up_proj",
    "blocks.{i}.mlp.experts.down_proj": "model.layers.{i}.mlp.experts.{e}.down_proj",
}

_QWEN2_MOE_MODULES: dict[str | tuple[str, ...], str] = {
    **_QWEN3_MOE_MODULES,
    "blocks.{i}.mlp.shared.gate_proj": "model.layers.{i}.mlp.shared_expert.gate_proj",
    "blocks.{i}.mlp.shared.up_proj": "model.layers.{i}.mlp.shared_expert.up_proj",
    "blocks.{i}.mlp.shared.down_proj": "model.layers.{i}.mlp.shared_expert.down_proj",
    "blocks.{i}.mlp.shared_gate": "model.layers.{i}.mlp.shared_expert_gate",
}

_AUX_DEFAULT = 0.001  # router_aux_loss_coef in each of the three config classes


# --- shared pieces ------------------------------------------------------------------------------
def _aux_from_hf(hf: dict[str, Any]) -> float:
    return float(hf.get("router_aux_loss_coef") or 0.0) if hf.get("output_router_logits") else 0.0


def _aux_to_hf(m: MoEConfig) -> dict[str, Any]:
    on = m.aux_loss_coef > 0
    return {"output_router_logits": on, "router_aux_loss_coef": m.aux_loss_coef if on else _AUX_DEFAULT}


def _n_experts(hf: dict[str, Any], default: int) -> int:
    # Qwen3MoeConfig maps num_experts to num_local_experts and saves the latter; released Qwen3-MoE
    # checkpoints (written by transformers 4.x) say num_experts.
    value = hf.get("num_local_experts", hf.get("num_experts"))
    return int(default if value is None else value)


def _qwen_dense_layers(hf: dict[str, Any], n_layers: int, n_experts: int) -> list[int]:
    """Qwen{2,3}MoeDecoderLayer: layer i is sparse iff i not in mlp_only_layers and (i + 1) is a
    multiple of decoder_sparse_step."""
    if n_experts <= 0:
        raise ValueError(f"config.json of model_type={hf.get('model_type')!r} has num_experts={n_experts}: "
                         "a dense model; load it as its dense family (qwen2 / qwen3)")
    step = int(hf.get("decoder_sparse_step") or 1)
    only = set(hf.get("mlp_only_layers") or [])
    dense = [i for i in range(n_layers) if i in only or (i + 1) % step]
    if len(dense) == n_layers:
        raise ValueError(f"config.json of model_type={hf.get('model_type')!r} has no sparse layer "
                         f"(decoder_sparse_step={step}, mlp_only_layers={sorted(only)}); lmlab's MoE config "
                         "needs at least one")
    return dense


def _moe_of(cfg: ModelConfig, family: str) -> MoEConfig:
    if cfg.moe is None:
        raise ValueError(f"{family} is a mixture-of-experts family and this model has no moe config")
    return cfg.moe


def _qwen_moe_to_hf(m: MoEConfig) -> dict[str, Any]:
    return {
        "num_experts": m.n_experts,
        "num_experts_per_tok": m.top_k,
        "moe_intermediate_size": m.d_expert,
        "norm_topk_prob": m.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(m.dense_layers),
        **_aux_to_hf(m),
    }


# --- Mixtral ------------------------------------------------------------------------------------
def _mixtral_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """Mixtral (Jiang et al. 2024): every layer sparse, softmax top-k renormalized over the k (the
    router's `router_top_value /= sum`), the sliding window on every layer when set (as Mistral)."""
    if hf.get("router_jitter_noise"):
        raise ValueError(
            f"unsupported: router_jitter_noise={hf['router_jitter_noise']} (Mixtral's multiplicative noise on "
            "the MoE input during training); lmlab has no router jitter. Set it to 0.0 in config.json")
    kw = _decoder_from_hf(hf, MIXTRAL)
    kw.update(_windows_from_hf(hf.get("sliding_window"), None, 0))
    kw["moe"] = MoEConfig(
        n_experts=_n_experts(hf, 8), top_k=int(_req(hf, "num_experts_per_tok")), d_expert=kw["d_ff"],
        router="softmax_topk", norm_topk_prob=True, aux_loss_coef=_aux_from_hf(hf))
    return kw


def _mixtral_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    m = _moe_of(cfg, "mixtral")
    return {
        **_decoder_to_hf(cfg, MIXTRAL),
        "intermediate_size": m.d_expert,  # the experts' width: Mixtral has no dense MLP
        "num_local_experts": m.n_experts,
        "num_experts_per_tok": m.top_k,
        "router_jitter_noise": 0.0,
        **_global_window_to_hf(cfg),
        **_aux_to_hf(m),
    }


# --- Qwen2-MoE ----------------------------------------------------------------------------------
def _qwen2_moe_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """Qwen2-MoE (Qwen1.5-MoE): routed experts of moe_intermediate_size plus one shared expert of
    shared_expert_intermediate_size scaled by sigmoid(x w); q/k/v bias (qkv_bias); sliding layers per
    layer_types (by default even layers below max_window_layers, when use_sliding_window)."""
    kw = _decoder_from_hf(hf, QWEN2_MOE)
    n = kw["n_layers"]
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    first = hf.get("max_window_layers", n)
    types = hf.get("layer_types") or [  # Qwen2MoeConfig.__post_init__'s default
        "sliding_attention" if (i + 1) % 2 and i < first and window is not None else "full_attention"
        for i in range(n)]
    shared = int(_req(hf, "shared_expert_intermediate_size"))
    if shared <= 0:
        raise ValueError(f"unsupported: shared_expert_intermediate_size={shared}; Qwen2-MoE layers always hold a "
                         "gated shared expert, and lmlab's mapping needs a positive width")
    n_experts = _n_experts(hf, 60)
    kw.update(_windows_from_hf(window, types, n))
    kw.update(qkv_bias=bool(hf.get("qkv_bias", True)), attn_out_bias=False)
    kw["moe"] = MoEConfig(
        n_experts=n_experts, top_k=int(_req(hf, "num_experts_per_tok")),
        d_expert=int(_req(hf, "moe_intermediate_size")), router="softmax_topk",
        norm_topk_prob=bool(hf.get("norm_topk_prob")), n_shared_experts=1, d_shared=shared, shared_gate=True,
        dense_layers=_qwen_dense_layers(hf, n, n_experts), aux_loss_coef=_aux_from_hf(hf))
    return kw


def _qwen2_moe_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    m = _moe_of(cfg, "qwen2_moe")
    if not (m.n_shared_experts and m.shared_gate):
        raise ValueError("qwen2_moe layers always have a shared expert with a sigmoid gate; this model has "
                         f"n_shared_experts={m.n_shared_experts}, shared_gate={m.shared_gate} (qwen3_moe or "
                         "mixtral have none)")
    return {
        **_decoder_to_hf(cfg, QWEN2_MOE),
        "qkv_bias": cfg.qkv_bias,
        "shared_expert_intermediate_size": m.n_shared_experts * m.d_shared,
        **_qwen_moe_to_hf(m),
        **_windows_to_hf(cfg),
    }


# --- Qwen3-MoE ----------------------------------------------------------------------------------
def _qwen3_moe_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """Qwen3-MoE: Qwen3 attention (qk-norm, attention_bias on q/k/v/o), routed experts only; its attention
    slides on every layer when use_sliding_window (it reads no layer_types)."""
    kw = _decoder_from_hf(hf, QWEN3_MOE)
    n = kw["n_layers"]
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    n_experts = _n_experts(hf, 128)
    kw.update(_attention_bias(hf))
    kw.update(_windows_from_hf(window, None, 0), qk_norm=True)
    kw["moe"] = MoEConfig(
        n_experts=n_experts, top_k=int(_req(hf, "num_experts_per_tok")),
        d_expert=int(_req(hf, "moe_intermediate_size")), router="softmax_topk",
        norm_topk_prob=bool(hf.get("norm_topk_prob")),
        dense_layers=_qwen_dense_layers(hf, n, n_experts), aux_loss_coef=_aux_from_hf(hf))
    return kw


def _qwen3_moe_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    m = _moe_of(cfg, "qwen3_moe")
    sliding = _global_window_to_hf(cfg)["sliding_window"]
    return {
        **_decoder_to_hf(cfg, QWEN3_MOE),
        "attention_bias": cfg.qkv_bias,
        "use_sliding_window": sliding is not None,
        "sliding_window": sliding,
        **_qwen_moe_to_hf(m),
    }


# --- registry -------------------------------------------------------------------------------------
_QWEN_MOE_DEFAULTS = {**_LLAMA_DEFAULTS, "max_position_embeddings": 32768, "use_sliding_window": False,
                      "sliding_window": 4096, "norm_topk_prob": False, "decoder_sparse_step": 1,
                      "output_router_logits": False, "router_aux_loss_coef": _AUX_DEFAULT}

MIXTRAL = Family(
    "mixtral", "MixtralForCausalLM", _MIXTRAL_MODULES, _mixtral_from_hf, _mixtral_to_hf,
    {**_LLAMA_DEFAULTS, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "rope_theta": 1e6,
     "num_key_value_heads": 8, "num_experts_per_tok": 2, "output_router_logits": False,
     "router_aux_loss_coef": _AUX_DEFAULT, "router_jitter_noise": 0.0})
QWEN2_MOE = Family(
    "qwen2_moe", "Qwen2MoeForCausalLM", _QWEN2_MOE_MODULES, _qwen2_moe_from_hf, _qwen2_moe_to_hf,
    {**_QWEN_MOE_DEFAULTS, "num_key_value_heads": 16, "max_window_layers": 28, "qkv_bias": True,
     "num_experts_per_tok": 4, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632})
QWEN3_MOE = Family(
    "qwen3_moe", "Qwen3MoeForCausalLM", _QWEN3_MOE_MODULES, _qwen3_moe_from_hf, _qwen3_moe_to_hf,
    {**_QWEN_MOE_DEFAULTS, "num_key_value_heads": 4, "attention_bias": False, "num_experts_per_tok": 8,
     "moe_intermediate_size": 768})

FAMILIES: tuple[Family, ...] = (MIXTRAL, QWEN2_MOE, QWEN3_MOE)
