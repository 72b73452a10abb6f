"""Hugging Face DeepSeek-V2 / DeepSeek-V3 checkpoints in and out (transformers' `DeepseekV2ForCausalLM`,
`DeepseekV3ForCausalLM`): multi-head latent attention (model/mla.py) and DeepSeekMoE (model/moe.py).

    family       HF model_type  notes
    DeepSeek-V2  deepseek_v2    MLA, RoPE pairs interleaved (complex form), softmax routing:
                                greedy or group-limited (group score = best expert), shared experts
    DeepSeek-V3  deepseek_v3    MLA (rope_interleave), sigmoid routing with the bias of auxiliary-loss-
                                free balancing (e_score_correction_bias), groups scored by their top-2 sum

The attention weights carry DeepSeek's module names (q_a_proj, kv_a_proj_with_mqa, kv_b_proj, ...), so
the tensor table is a list of renames. The semantics follow transformers 5.x's modeling files:

- RoPE pairing. DeepSeek rotates dims (0, 1), (2, 3), ... of q_R and k_R (V2 as complex numbers, V3
  with `rope_interleave`, on by default); lmlab rotates dim i with i + d/2. Rather than permute the
  RoPE rows of q_b_proj / q_proj and kv_a_proj_with_mqa, the layer gathers the interleaved pairs
  into halves before rotating (`MLAConfig.rope_interleave`, what transformers' V3 does too), so the
  weights load and save unchanged and q . k is the same number.
- Softmax scale. 1/sqrt(qk_nope_head_dim + qk_rope_head_dim); with a RoPE scaling and
  `mscale_all_dim`, DeepSeek multiplies it by mscale(factor, mscale_all_dim)^2 (YaRN's
  0.1 * mscale_all_dim * ln(factor) + 1): that becomes an explicit `attn_scale`. YaRN's own
  temperature on cos/sin (mscale / mscale_all_dim) is resolved by hub._yarn_from_hf.
- Latent norms. q_a_layernorm and kv_a_layernorm use eps 1e-6 whatever rms_norm_eps is.
- MoE. Layers from first_k_dense_replace on are MoE (MoEConfig.dense_layers = the ones before).
  V2 (topk_method "greedy" | "group_limited_greedy"): softmax scores, the top_k of them are the
  weights, unnormalized (transformers' V2 router ignores norm_topk_prob, so a config that sets it is
  refused rather than guessed), times routed_scaling_factor; with mlp_bias, the dense and shared
  MLPs have biases and the routed experts none, in transformers as in lmlab. V3 ("noaux_tc"): sigmoid scores; the
  correction bias is added for selection only; selected scores renormalized when norm_topk_prob;
  times routed_scaling_factor. Shared experts are one MLP of width n_shared_experts *
  moe_intermediate_size. Experts are stored one tensor per expert (`mlp.experts.{e}.gate_proj`), the
  layout transformers writes and reads back.
- num_key_value_heads does not enter MLA (each head expands its own keys and values); it is written
  as num_attention_heads, the only value with which transformers' eager attention runs. HF's head_dim
  is the RoPE width (qk_rope_head_dim); lmlab's head_dim is unused under MLA and left at its default.
- Multi-token prediction modules (V3's num_nextn_predict_layers) are not part of the causal LM;
  transformers builds none, and neither does lmlab.

Refused with a ValueError that names the field: moe_layer_freq != 1 (transformers ignores it), V2's
norm_topk_prob=True, routing methods other than the ones above, n_shared_experts = 0 (transformers
would build an empty shared expert); group settings that ModelConfig rejects (groups that do not divide
the experts, fewer eligible experts than num_experts_per_tok) fail its validation, naming the field.
"""

from __future__ import annotations

import math
import re
from typing import Any

from .config import MLAConfig, ModelConfig, MoEConfig
from .hub import Family, _decoder_from_hf, _decoder_to_hf, _req, _rope_parameters

# lmlab module (or tensor) -> HF. Entries whose lmlab tensors a layer lacks are skipped, so one table serves
# dense and MoE layers, with and without q_lora_rank, V2 and V3.
_DEEPSEEK_MODULES: dict[str | tuple[str, ...], str] = {
    "embed": "model.embed_tokens",
    "norm": "model.norm",
    "lm_head": "lm_head",
    "blocks.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "blocks.{i}.attn.q_proj": "model.layers.{i}.self_attn.q_proj",
    "blocks.{i}.attn.q_a_proj": "model.layers.{i}.self_attn.q_a_proj",
    "blocks.{i}.attn.q_a_layernorm": "model.layers.{i}.self_attn.q_a_layernorm",
    "blocks.{i}.attn.q_b_proj": "model.layers.{i}.self_attn.q_b_proj",
    "blocks.{i}.attn.kv_a_proj_with_mqa": "model.layers.{i}.self_attn.kv_a_proj_with_mqa",
    "blocks.{i}.attn.kv_a_layernorm": "model.layers.{i}.self_attn.kv_a_layernorm",
    "blocks.{i}.attn.kv_b_proj": "model.layers.{i}.self_attn.kv_b_proj",
    "blocks.{i}.attn.o_proj": "model.layers.{i}.self_attn.o_proj",
    "blocks.{i}.mlp_norm": "model.layers.{i}.post_attention_layernorm",
    # dense layers
    "blocks.{i}.mlp.gate_proj": "model.layers.{i}.mlp.gate_proj",
    "blocks.{i}.mlp.up_proj": "model.layers.{i}.mlp.up_proj",
    "blocks.{i}.mlp.down_proj": "model.layers.{i}.mlp.down_proj",
    # MoE layers
    "blocks.{i}.mlp.router": "model.layers.{i}.mlp.gate",
    "blocks.{i}.mlp.expert_bias": "model.layers.{i}.mlp.gate.e_score_correction_bias",
    "blocks.{i}.mlp.experts.gate_proj": "model.layers.{i}.mlp.experts.{e}.gate_proj",
    "blocks.{i}.mlp.experts.up_proj": "model.layers.{i}.mlp.experts.{e}.up_proj",
    "blocks.{i}.mlp.experts.down_proj": "model.layers.{i}.mlp.experts.{e}.down_proj",
    "blocks.{i}.mlp.shared.gate_proj": "model.layers.{i}.mlp.shared_experts.gate_proj",
    "blocks.{i}.mlp.shared.up_proj": "model.layers.{i}.mlp.shared_experts.up_proj",
    "blocks.{i}.mlp.shared.down_proj": "model.layers.{i}.mlp.shared_experts.down_proj",
}

LATENT_NORM_EPS = 1e-6  # DeepseekV2/V3RMSNorm(q_lora_rank / kv_lora_rank) take no eps argument


def yarn_mscale(factor: float, mscale: float) -> float:
    """DeepSeek's YaRN magnitude scale: 0.1 * mscale * ln(s) + 1 for a context extension s > 1, else 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


# ============================================================================================
# HF -> lmlab
# ============================================================================================


def _mla_from_hf(hf: dict[str, Any], interleave: bool) -> MLAConfig:
    q_lora_rank = hf.get("q_lora_rank")
    return MLAConfig(
        kv_lora_rank=int(_req(hf, "kv_lora_rank")),
        q_lora_rank=None if q_lora_rank is None else int(q_lora_rank),
        qk_nope_head_dim=int(_req(hf, "qk_nope_head_dim")),
        qk_rope_head_dim=int(_req(hf, "qk_rope_head_dim")),
        v_head_dim=int(_req(hf, "v_head_dim")),
        rope_interleave=interleave,
        latent_norm_eps=LATENT_NORM_EPS,
    )


def _unused_head_sizes(kw: dict[str, Any], mla: MLAConfig) -> dict[str, Any]:
    """n_kv_heads and head_dim, which MLA does not read: its widths are in MLAConfig. HF's head_dim is the RoPE
    width (qk_rope_head_dim, what transformers' rotary embedding reads); lmlab's is left at its default,
    d_model // n_heads (the per-head q/k width when that does not divide), so a config built in lmlab
    without one survives the round trip through config.json."""
    d_model, n_heads = kw["d_model"], kw["n_heads"]
    head_dim = d_model // n_heads if d_model % n_heads == 0 else mla.qk_nope_head_dim + mla.qk_rope_head_dim
    return {"n_kv_heads": n_heads, "head_dim": head_dim}


def _attn_scale_from_hf(hf: dict[str, Any], mla: MLAConfig) -> float | None:
    """DeepseekV2/V3Attention.scaling: qk_head_dim^-1/2, times mscale(factor, mscale_all_dim)^2 under a RoPE
    scaling that sets mscale_all_dim (yarn_apply_mscale). None when it is the plain default."""
    params = _rope_parameters(hf)
    kind = params.get("rope_type", params.get("type", "default"))
    mscale_all_dim = params.get("mscale_all_dim")
    if kind == "default" or not mscale_all_dim:
        return None
    factor = params.get("factor")
    if factor is None:
        raise ValueError(f"config.json sets rope_parameters.mscale_all_dim={mscale_all_dim} without a 'factor'; "
                         "DeepSeek's attention scale needs both (add the RoPE scaling factor)")
    m = yarn_mscale(float(factor), float(mscale_all_dim))
    if m == 1.0:
        return None
    return (mla.qk_nope_head_dim + mla.qk_rope_head_dim) ** -0.5 * m * m


def _check_moe_layout(hf: dict[str, Any]) -> None:
    freq = hf.get("moe_layer_freq", 1)
    if freq not in (None, 1):
        raise ValueError(f"unsupported: moe_layer_freq={freq}; transformers' DeepSeek models make every layer from "
                         "first_k_dense_replace on an MoE layer (they ignore moe_layer_freq), so this checkpoint's "
                         "layout is ambiguous. Only moe_layer_freq=1 is supported")
    shared = hf.get("n_shared_experts")
    if not shared:
        raise ValueError(f"unsupported: n_shared_experts={shared}; transformers' DeepSeek MoE always has a shared "
                         "expert MLP (of width n_shared_experts * moe_intermediate_size), so it needs at least 1")


def _groups_from_hf(hf: dict[str, Any]) -> tuple[int, int]:
    """n_group, topk_group; ModelConfig's MoE checks then say what is wrong with them, if anything."""
    return int(_req(hf, "n_group")), int(_req(hf, "topk_group"))


def _moe_common(hf: dict[str, Any], n_layers: int) -> dict[str, Any] | None:
    """The MoEConfig fields V2 and V3 share, or None when every layer is dense."""
    first_dense = int(hf.get("first_k_dense_replace") or 0)
    if first_dense >= n_layers:
        return None
    _check_moe_layout(hf)
    d_expert = int(_req(hf, "moe_intermediate_size"))
    return {
        "n_experts": int(_req(hf, "n_routed_experts")),
        "top_k": int(_req(hf, "num_experts_per_tok")),
        "d_expert": d_expert,
        "routed_scaling_factor": float(hf.get("routed_scaling_factor") or 1.0),
        "n_shared_experts": int(hf["n_shared_experts"]),
        "d_shared": d_expert,  # DeepSeek's shared experts are as wide as the routed ones
        "dense_layers": list(range(first_dense)),
    }


def _deepseek_v2_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V2 (arXiv 2405.04434): MLA with complex-form (interleaved) RoPE, DeepSeekMoE with softmax
    routing."""
    kw = _decoder_from_hf(hf, DEEPSEEK_V2)
    mla = _mla_from_hf(hf, interleave=True)
    kw.update(**_unused_head_sizes(kw, mla), mla=mla, attn_scale=_attn_scale_from_hf(hf, mla),
              qkv_bias=bool(hf.get("attention_bias")), attn_out_bias=bool(hf.get("attention_bias")),
              mlp_bias=bool(hf.get("mlp_bias")))
    moe = _moe_common(hf, kw["n_layers"])
    if moe is not None:
        if hf.get("scoring_func") not in (None, "softmax"):
            raise ValueError(f"unsupported: scoring_func={hf['scoring_func']!r} for deepseek_v2, whose router "
                             "transformers implements with softmax scores only")
        if hf.get("norm_topk_prob"):
            raise ValueError("unsupported: norm_topk_prob=True for deepseek_v2. transformers' DeepseekV2 router "
                             "ignores it (weights stay unnormalized) while DeepSeek's reference code renormalizes, "
                             "so the model's output is ambiguous; set it to false if transformers' behaviour is "
                             "the one intended")
        method = hf.get("topk_method") or "greedy"
        if method == "greedy":
            groups = {}
        elif method == "group_limited_greedy":
            n_group, topk_group = _groups_from_hf(hf)
            groups = {"n_groups": n_group, "topk_groups": topk_group, "group_score": "max"}
        else:
            raise ValueError(f"unsupported: topk_method={method!r} for deepseek_v2; transformers' DeepseekV2 router "
                             "implements 'greedy' and 'group_limited_greedy'")
        kw["moe"] = MoEConfig(**moe, router="softmax_topk", norm_topk_prob=False, **groups)
    return kw


def _deepseek_v3_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V3 (arXiv 2412.19437): MLA (RoPE interleaved unless rope_interleave=False), DeepSeekMoE with
    sigmoid routing, auxiliary-loss-free bias balancing and node-limited (group) routing."""
    kw = _decoder_from_hf(hf, DEEPSEEK_V3)
    interleave = hf.get("rope_interleave")
    mla = _mla_from_hf(hf, interleave=True if interleave is None else bool(interleave))
    kw.update(**_unused_head_sizes(kw, mla), mla=mla, attn_scale=_attn_scale_from_hf(hf, mla),
              qkv_bias=bool(hf.get("attention_bias")), attn_out_bias=bool(hf.get("attention_bias")))
    moe = _moe_common(hf, kw["n_layers"])
    if moe is not None:
        for key, allowed in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
            if hf.get(key) not in (None, allowed):
                raise ValueError(f"unsupported: {key}={hf[key]!r} for deepseek_v3, whose router transformers "
                                 f"implements as {key}={allowed!r} only")
        n_group, topk_group = _groups_from_hf(hf)
        # One group is every expert: the group step then selects nothing away, and group_score has no effect.
        groups = {"n_groups": n_group, "topk_groups": topk_group, "group_score": "top2_sum"} if n_group > 1 else {}
        kw["moe"] = MoEConfig(**moe, router="sigmoid", bias_balancing=True,
                              norm_topk_prob=bool(hf.get("norm_topk_prob")), **groups)
    return kw


# ============================================================================================
# lmlab -> HF
# ============================================================================================


def _deepseek_to_hf(cfg: ModelConfig, family: Family) -> dict[str, Any]:
    m = cfg.mla
    if m is None:
        raise ValueError(f"{family.model_type} models use multi-head latent attention; this config has no mla")
    hf = _decoder_to_hf(cfg, family)
    hf.update(
        num_key_value_heads=cfg.n_heads,
        head_dim=m.qk_rope_head_dim,  # the width transformers' rotary embedding reads
        kv_lora_rank=m.kv_lora_rank,
        q_lora_rank=m.q_lora_rank,
        qk_nope_head_dim=m.qk_nope_head_dim,
        qk_rope_head_dim=m.qk_rope_head_dim,
        v_head_dim=m.v_head_dim,
        attention_bias=cfg.qkv_bias,
    )
    default_scale = (m.qk_nope_head_dim + m.qk_rope_head_dim) ** -0.5
    rs = cfg.rope_scaling
    if cfg.attn_scale is not None and not math.isclose(cfg.attn_scale, default_scale, rel_tol=1e-12) \
            and rs is not None and rs.factor > 1:
        # the mscale_all_dim whose mscale^2 turns the default scale into attn_scale (any other scale does not
        # survive the trip back, and the export check names attn_scale)
        m_all = math.sqrt(cfg.attn_scale / default_scale)
        hf["rope_parameters"]["mscale_all_dim"] = (m_all - 1.0) / (0.1 * math.log(rs.factor))
    n_layers = cfg.n_layers
    if cfg.moe is None:
        hf["first_k_dense_replace"] = n_layers
        return hf
    moe = cfg.moe
    moe_layers = [i for i in range(n_layers) if cfg.is_moe(i)]
    hf.update(
        first_k_dense_replace=moe_layers[0] if moe_layers else n_layers,
        n_routed_experts=moe.n_experts,
        num_experts_per_tok=moe.top_k,
        moe_intermediate_size=moe.d_expert,  # the shared experts' width too: a d_shared of another width is refused
        n_shared_experts=moe.n_shared_experts,
        routed_scaling_factor=moe.routed_scaling_factor,
        n_group=moe.n_groups,
        topk_group=moe.topk_groups,
    )
    return hf


def _deepseek_v2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    hf = _deepseek_to_hf(cfg, DEEPSEEK_V2)
    hf["mlp_bias"] = cfg.mlp_bias
    if cfg.moe is not None:
        hf["topk_method"] = "group_limited_greedy" if cfg.moe.n_groups > 1 else "greedy"
        hf["norm_topk_prob"] = False  # what transformers' V2 router computes, whatever this field says
    return hf


def _deepseek_v3_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    hf = _deepseek_to_hf(cfg, DEEPSEEK_V3)
    hf["rope_interleave"] = cfg.mla.rope_interleave
    if cfg.moe is not None:
        hf["norm_topk_prob"] = cfg.moe.norm_topk_prob
    return hf


# ============================================================================================
# Registry
# ============================================================================================

# The HF config classes' defaults (configuration_deepseek_v2/v3.py): config.json leaves out what equals them.
_V2_DEFAULTS = {
    "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "first_k_dense_replace": 0,
    "kv_lora_rank": 512, "q_lora_rank": 1536, "n_routed_experts": 64, "n_shared_experts": 2,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "routed_scaling_factor": 1.0,
    "topk_method": "greedy", "norm_topk_prob": False, "moe_intermediate_size": 1407,
}
_V3_DEFAULTS = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "num_hidden_layers": 61,
    "num_attention_heads": 128, "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "attention_bias": False, "first_k_dense_replace": 3, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "routed_scaling_factor": 2.5,
    "n_group": 8, "topk_group": 4, "norm_topk_prob": True, "moe_intermediate_size": 2048, "rope_interleave": True,
}

def _mtp_layer(name: str, cfg: ModelConfig) -> bool:
    """DeepSeek-V3 checkpoints carry multi-token-prediction modules as layers num_hidden_layers and on; transformers
    does not load them, and neither does lmlab (they serve speculative training, not next-token prediction)."""
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return match is not None and int(match.group(1)) >= cfg.n_layers


DEEPSEEK_V2 = Family("deepseek_v2", "DeepseekV2ForCausalLM", _DEEPSEEK_MODULES, _deepseek_v2_from_hf,
                     _deepseek_v2_to_hf, _V2_DEFAULTS, divisible_heads=True)
DEEPSEEK_V3 = Family("deepseek_v3", "DeepseekV3ForCausalLM", _DEEPSEEK_MODULES, _deepseek_v3_from_hf,
                     _deepseek_v3_to_hf, _V3_DEFAULTS, unused=_mtp_layer)

FAMILIES: tuple[Family, ...] = (DEEPSEEK_V2, DEEPSEEK_V3)
