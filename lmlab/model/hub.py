"""Hugging Face checkpoints in and out: `load_hf(dir) -> Transformer`, `save_hf(model, dir)`.

Works from config.json and the weight files alone (transformers is not imported), for the
families below (the MoE, DeepSeek and Mamba families are defined in hub_moe.py, hub_deepseek.py and
hub_ssm.py, on this module's machinery). Each family is one table read in both directions:

- a module map, lmlab module path -> HF module path ("{i}" stands for the layer index); a tuple
  of lmlab modules means HF stores them fused, concatenated along the output dimension
  (GPT-2's c_attn = q|k|v, Phi-3's qkv_proj = q|k|v and gate_up_proj = gate|up);
- the HF modules stored as GPT-2 `Conv1D`, whose weight is (in, out), the transpose of
  `nn.Linear`'s;
- a config mapping HF dict -> ModelConfig fields, and its inverse.

Loading splits and transposes along the table; saving concatenates and transposes back. Saving
checks that a config is expressible in the target family by mapping it to the HF config and back
and comparing: any field that does not survive the trip is named in the error.

    family     HF model_type  notes
    GPT-2      gpt2           learned positions, LayerNorm with bias, Conv1D, fused c_attn
    Llama 2/3  llama          RoPE scalings: linear, dynamic, yarn, llama3
    Mistral    mistral        sliding window on every layer
    Qwen2      qwen2          q/k/v bias; sliding layers from use_sliding_window / layer_types
    Qwen3      qwen3          RMSNorm over head_dim on q and k; explicit head_dim
    Gemma      gemma          (1 + weight) norms, embeddings * sqrt(d_model), GeGLU, tied
    Gemma 2    gemma2         + post-norms, attention and final soft-capping, per-layer windows
    Phi-3      phi3           fused qkv_proj and gate_up_proj, partial rotary, sliding window
    Mixtral    mixtral        sparse MoE MLP (softmax top-k), one tensor per expert on disk
    Qwen2-MoE  qwen2_moe      + a shared expert behind a sigmoid gate, dense layers by step / list
    Qwen3-MoE  qwen3_moe      MoE with QK-norm
    DeepSeek-V2 deepseek_v2  MLA (interleaved RoPE, YaRN mscale); DeepSeekMoE, softmax (group-limited) routing
    DeepSeek-V3 deepseek_v3  MLA (rope_interleave); sigmoid routing + correction bias, top-2-sum groups
    Mamba      mamba          pure SSM stack (no MLP, no positions), tied by default, backbone.* names
    Mamba-2    mamba2         SSD heads, n_groups for B/C, grouped gated RMSNorm

The semantics follow transformers 5.x (`modeling_rope_utils.py`, `masking_utils.py`); where
they differ from lmlab's conventions the mapping resolves them into explicit lmlab fields.
Refused with a ValueError that names the feature: LongRoPE (Phi-3 long-context), RoPE that
differs per layer type, GPT-2's scale_attn_by_inverse_layer_idx and cross-attention,
bidirectional Gemma, activations outside gelu / gelu_tanh / silu / relu, quantized weights.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .checkpoint import atomic_directory
from .config import ModelConfig, RopeScaling
from .transformer import Transformer, build_model

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "hf_config_to_lmlab",
    "lmlab_config_to_hf",
    "load_hf",
    "save_hf",
]

# ============================================================================================
# The tables
# ============================================================================================

_LLAMA_MODULES: dict[str | tuple[str, ...], str] = {
    "embed": "model.embed_tokens",
    "norm": "model.norm",
    "lm_head": "lm_head",
    "blocks.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "blocks.{i}.attn.q_proj": "model.layers.{i}.self_attn.q_proj",
    "blocks.{i}.attn.k_proj": "model.layers.{i}.self_attn.k_proj",
    "blocks.{i}.attn.v_proj": "model.layers.{i}.self_attn.v_proj",
    "blocks.{i}.attn.o_proj": "model.layers.{i}.self_attn.o_proj",
    "blocks.{i}.attn.q_norm": "model.layers.{i}.self_attn.q_norm",
    "blocks.{i}.attn.k_norm": "model.layers.{i}.self_attn.k_norm",
    "blocks.{i}.mlp_norm": "model.layers.{i}.post_attention_layernorm",
    "blocks.{i}.mlp.gate_proj": "model.layers.{i}.mlp.gate_proj",
    "blocks.{i}.mlp.up_proj": "model.layers.{i}.mlp.up_proj",
    "blocks.{i}.mlp.down_proj": "model.layers.{i}.mlp.down_proj",
}

# Gemma 2 normalizes each sublayer's input and output; its "post_attention_layernorm" is the
# attention *output* norm, where in Llama the same name is the MLP's input norm.
_GEMMA2_MODULES = {
    **_LLAMA_MODULES,
    "blocks.{i}.attn_post_norm": "model.layers.{i}.post_attention_layernorm",
    "blocks.{i}.mlp_norm": "model.layers.{i}.pre_feedforward_layernorm",
    "blocks.{i}.mlp_post_norm": "model.layers.{i}.post_feedforward_layernorm",
}

_PHI3_MODULES: dict[str | tuple[str, ...], str] = {
    k: v for k, v in _LLAMA_MODULES.items()
    if not str(k).endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
}
_PHI3_MODULES.update({
    ("blocks.{i}.attn.q_proj", "blocks.{i}.attn.k_proj", "blocks.{i}.attn.v_proj"):
        "model.layers.{i}.self_attn.qkv_proj",
    ("blocks.{i}.mlp.gate_proj", "blocks.{i}.mlp.up_proj"): "model.layers.{i}.mlp.gate_up_proj",
})

_GPT2_MODULES: dict[str | tuple[str, ...], str] = {
    "embed": "transformer.wte",
    "pos_embed": "transformer.wpe",
    "norm": "transformer.ln_f",
    "lm_head": "lm_head",
    "blocks.{i}.attn_norm": "transformer.h.{i}.ln_1",
    ("blocks.{i}.attn.q_proj", "blocks.{i}.attn.k_proj", "blocks.{i}.attn.v_proj"):
        "transformer.h.{i}.attn.c_attn",
    "blocks.{i}.attn.o_proj": "transformer.h.{i}.attn.c_proj",
    "blocks.{i}.mlp_norm": "transformer.h.{i}.ln_2",
    "blocks.{i}.mlp.up_proj": "transformer.h.{i}.mlp.c_fc",
    "blocks.{i}.mlp.down_proj": "transformer.h.{i}.mlp.c_proj",
}
_GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

# Tensors some checkpoints carry that are not parameters: GPT-2's causal-mask buffers and the
# RoPE inverse frequencies older transformers saved. lmlab recomputes both.
_IGNORABLE = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")

# HF activation names (transformers' ACT2FN) -> lmlab's. gelu_new / gelu_fast are the tanh
# approximation written out by hand (GPT-2), equal to F.gelu(approximate="tanh") up to rounding.
_ACTIVATIONS_FROM_HF = {
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
    "relu": "relu",
}
_ROPE_KINDS_FROM_HF = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class Link:
    """One HF tensor <-> the lmlab tensors it holds, concatenated along dim 0 in this order.
    With experts > 0, `hf` is a template with "{e}": HF stores one tensor per expert, and the one
    lmlab tensor is their stack, (experts, ...)."""

    hf: str
    lmlab: tuple[str, ...]
    conv1d: bool = False  # stored transposed (GPT-2 Conv1D), relative to nn.Linear
    experts: int = 0

    def hf_names(self) -> list[str]:
        return [self.hf.format(e=e) for e in range(self.experts)] if self.experts else [self.hf]


@dataclass(frozen=True)
class Family:
    """One HF model family: its tensor table (read forwards to load, backwards to save) and
    its config mapping in both directions."""

    model_type: str
    architecture: str
    modules: dict[str | tuple[str, ...], str]
    from_hf: Callable[[dict[str, Any]], dict[str, Any]]  # HF config -> ModelConfig kwargs
    to_hf: Callable[[ModelConfig], dict[str, Any]]  # ModelConfig -> HF config fields
    defaults: dict[str, Any] = field(default_factory=dict)  # the HF config class's defaults
    conv1d: tuple[str, ...] = ()
    partial_rotary: bool = False  # its attention rotates only a leading fraction of head_dim
    divisible_heads: bool = False  # its config class demands hidden_size % num_heads == 0
    # checkpoint tensors of this family that transformers itself does not load and lmlab may skip too
    # (e.g. DeepSeek-V3's multi-token-prediction layers past num_hidden_layers): name, config -> bool
    unused: Callable[[str, ModelConfig], bool] | None = None

    @property
    def base_prefix(self) -> str:
        return next(iter(self.modules.values())).split(".")[0] + "."


# ============================================================================================
# Config: HF -> lmlab
# ============================================================================================


def _req(hf: dict[str, Any], key: str) -> Any:
    value = hf.get(key)
    if value is None:
        raise ValueError(
            f"config.json of model_type={hf.get('model_type')!r} has no {key!r}; "
            "it is required to build the model (is the file complete?)"
        )
    return value


def _activation(hf: dict[str, Any], key: str) -> str:
    name = _req(hf, key)
    if name not in _ACTIVATIONS_FROM_HF:
        raise ValueError(
            f"unsupported activation {key}={name!r}; lmlab supports {sorted(_ACTIVATIONS_FROM_HF)}"
        )
    return _ACTIVATIONS_FROM_HF[name]


def _rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """The one RoPE dict, from either layout: transformers 5's `rope_parameters` (rope_theta
    inside) or 4.x's `rope_scaling` next to a top-level `rope_theta`. transformers 5 reads
    `rope_scaling` first when both are present, so this does too."""
    params = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    nested = [k for k in ("full_attention", "sliding_attention") if isinstance(params.get(k), dict)]
    if nested:  # per-layer-type RoPE (Gemma 3 style): fine only if every type has the same one
        distinct = {json.dumps(params[k], sort_keys=True) for k in nested}
        if len(distinct) > 1:
            raise ValueError(
                f"unsupported: different RoPE parameters per layer type ({params}); lmlab applies "
                "one RoPE to every layer"
            )
        params = params[nested[0]]
    return dict(params)


def _rope_from_hf(hf: dict[str, Any], family: Family) -> dict[str, Any]:
    """rope_theta, rope_fraction and rope_scaling, resolved the way transformers 5.x computes
    them (modeling_rope_utils.py), so no HF default or override is left implicit."""
    params = _rope_parameters(hf)
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    fraction = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor") or 1.0))
    if family.model_type == "phi3" and kind in ("su", "yarn"):
        kind = "longrope"  # Phi3Config renames these legacy names to longrope
    if fraction != 1.0 and not family.partial_rotary:
        raise ValueError(
            f"unsupported: partial_rotary_factor={fraction} for model_type={family.model_type!r}; "
            "transformers' attention for it rotates the whole head (only phi3 rotates a fraction)"
        )
    out: dict[str, Any] = {"rope_theta": theta, "rope_fraction": fraction, "rope_scaling": None}
    if kind == "default":
        return out
    if kind not in _ROPE_KINDS_FROM_HF:
        hint = ""
        if kind == "longrope":
            hint = (" (LongRoPE, Phi-3 long-context: per-dimension factors switched on sequence"
                    " length; lmlab's RopeScaling has no such kind)")
        raise ValueError(
            f"unsupported RoPE type {kind!r}{hint}; lmlab supports {list(_ROPE_KINDS_FROM_HF)}"
        )
    max_pos = _req(hf, "max_position_embeddings")
    if kind == "dynamic":
        # transformers' dynamic NTK measures growth against max_position_embeddings, not
        # original_max_position_embeddings, even when the latter is present.
        out["rope_scaling"] = RopeScaling("dynamic", float(_req(params, "factor")), int(max_pos))
        return out
    if kind == "linear":
        out["rope_scaling"] = RopeScaling("linear", float(_req(params, "factor")))
        return out
    # llama3 and yarn: a top-level original_max_position_embeddings (Phi-3 always has one)
    # overrides the one inside the RoPE dict; with neither, max_position_embeddings is used.
    original = hf.get("original_max_position_embeddings")
    if original is None:
        original = params.get("original_max_position_embeddings") or max_pos
    original = int(original)
    if kind == "llama3":
        out["rope_scaling"] = RopeScaling(
            "llama3", float(_req(params, "factor")), original,
            low_freq_factor=float(_req(params, "low_freq_factor")),
            high_freq_factor=float(_req(params, "high_freq_factor")),
        )
        return out
    out["rope_scaling"] = _yarn_from_hf(params, max_pos, original)
    return out


def _yarn_from_hf(params: dict[str, Any], max_pos: int, original: int) -> RopeScaling:
    """YaRN (Peng et al. 2023) as transformers 5 computes it: factor missing -> the ratio
    max_position_embeddings / original (DeepSeek-V3 configs); attention factor from mscale and
    mscale_all_dim when both are set (DeepSeek's variant), else 0.1 ln(factor) + 1; a beta of
    0 or None means the paper's default; truncate defaults to True."""
    factor = params.get("factor")
    factor = float(factor) if factor is not None else max_pos / original

    def mscale_of(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = mscale_of(factor, mscale) / mscale_of(factor, mscale_all_dim)
        else:
            attention_factor = mscale_of(factor)
    return RopeScaling(
        "yarn", factor, original,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=float(attention_factor),
        truncate=bool(params.get("truncate", True)),
    )


def _windows_from_hf(window: int | None, types: list[str] | None, n_layers: int) -> dict[str, Any]:
    """HF's sliding_window + layer_types ("full_attention" | "sliding_attention") -> lmlab's.
    Both mask with k > q - window (masking_utils.sliding_window_overlay): a query sees `window`
    keys including itself, as lmlab's `q - k < window` does, so the number carries over as is."""
    if window is None:
        return {"sliding_window": None, "layer_types": None}
    if types is None:
        return {"sliding_window": int(window), "layer_types": None}
    names = {"full_attention": "full", "sliding_attention": "sliding"}
    unknown = sorted(set(types) - set(names))
    if unknown or len(types) != n_layers:
        raise ValueError(
            f"unsupported layer_types {types}: lmlab supports {list(names)}, one per layer"
        )
    kinds = [names[t] for t in types]
    if "sliding" not in kinds:
        return {"sliding_window": None, "layer_types": None}
    if "full" not in kinds:
        return {"sliding_window": int(window), "layer_types": None}
    return {"sliding_window": int(window), "layer_types": kinds}


def _decoder_from_hf(hf: dict[str, Any], family: Family, act_key: str = "hidden_act") -> dict:
    """The fields every Llama-layout family shares."""
    d_model, n_heads = _req(hf, "hidden_size"), _req(hf, "num_attention_heads")
    return {
        "vocab_size": _req(hf, "vocab_size"),
        "d_model": d_model,
        "n_layers": _req(hf, "num_hidden_layers"),
        "n_heads": n_heads,
        "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
        "head_dim": hf.get("head_dim") or d_model // n_heads,
        "d_ff": _req(hf, "intermediate_size"),
        "max_seq_len": _req(hf, "max_position_embeddings"),
        "norm": "rmsnorm",
        "norm_eps": float(_req(hf, "rms_norm_eps")),
        "position": "rope",
        **_rope_from_hf(hf, family),
        "mlp_gated": True,
        "mlp_activation": _activation(hf, act_key),
        "tie_embeddings": bool(hf.get("tie_word_embeddings")),
        "init_std": float(hf.get("initializer_range") or 0.02),
    }


def _attention_bias(hf: dict[str, Any]) -> dict[str, Any]:
    bias = bool(hf.get("attention_bias"))  # one flag for q, k, v and o (Llama, Qwen3, Gemma)
    return {"qkv_bias": bias, "attn_out_bias": bias}


def _qwen_windows(hf: dict[str, Any], n_layers: int) -> dict[str, Any]:
    """Qwen2/3: the window exists only with use_sliding_window; without explicit layer_types,
    layers from max_window_layers on slide (Qwen2Config.__post_init__)."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    types = hf.get("layer_types")
    if window is not None and types is None:
        first = hf.get("max_window_layers", n_layers)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
    return _windows_from_hf(window, types, n_layers)


def _llama_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    return {
        **_decoder_from_hf(hf, FAMILIES["llama"]),
        **_attention_bias(hf),
        "mlp_bias": bool(hf.get("mlp_bias")),
    }


def _mistral_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    # Mistral slides on every layer (it ignores layer_types; transformers warns about them).
    window = _windows_from_hf(hf.get("sliding_window"), None, 0)
    return {**_decoder_from_hf(hf, FAMILIES["mistral"]), **window}


def _qwen2_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    kw = _decoder_from_hf(hf, FAMILIES["qwen2"])
    # Qwen2 hard-codes bias on q, k, v and none on o.
    return {**kw, "qkv_bias": True, "attn_out_bias": False, **_qwen_windows(hf, kw["n_layers"])}


def _qwen3_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    kw = _decoder_from_hf(hf, FAMILIES["qwen3"])
    return {**kw, **_attention_bias(hf), "qk_norm": True, **_qwen_windows(hf, kw["n_layers"])}


def _gemma_common(hf: dict[str, Any], family: Family, act_key: str) -> dict[str, Any]:
    """Gemma (Team Gemma 2024): RMSNorm scaled by (1 + weight), embeddings times sqrt(d_model)."""
    if hf.get("use_bidirectional_attention"):
        raise ValueError(
            "unsupported: use_bidirectional_attention=True (non-causal attention); lmlab models "
            "are causal decoders"
        )
    hf = dict(hf)
    if family.model_type == "gemma" and hf.get(act_key) == "gelu":
        # GemmaConfig rewrites the legacy "gelu" of the official releases to the tanh form
        # the model was trained with.
        hf[act_key] = "gelu_pytorch_tanh"
    kw = _decoder_from_hf(hf, family, act_key)
    return {
        **kw,
        **_attention_bias(hf),
        "norm_unit_offset": True,
        "embedding_scale": math.sqrt(kw["d_model"]),
    }


def _gemma_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    return _gemma_common(hf, FAMILIES["gemma"], "hidden_act")


def _gemma2_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """Gemma 2: pre- and post-norm on both sublayers, tanh soft-capping of attention scores and
    final logits, scores scaled by query_pre_attn_scalar^-1/2 instead of head_dim^-1/2, and
    sliding-window layers alternating with global ones (layer_types; default: even layers
    slide)."""
    kw = _gemma_common(hf, FAMILIES["gemma2"], "hidden_activation")
    n = kw["n_layers"]
    types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)
    ]
    softcaps = hf.get("attn_logit_softcapping"), hf.get("final_logit_softcapping")
    return {
        **kw,
        "post_norm": True,
        "attn_scale": float(_req(hf, "query_pre_attn_scalar")) ** -0.5,
        "attn_softcap": None if softcaps[0] is None else float(softcaps[0]),
        "logit_softcap": None if softcaps[1] is None else float(softcaps[1]),
        **_windows_from_hf(hf.get("sliding_window"), types, n),
    }


def _phi3_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    window = _windows_from_hf(hf.get("sliding_window"), None, 0)  # every layer, as Mistral
    return {**_decoder_from_hf(hf, FAMILIES["phi3"]), **window}


def _gpt2_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """GPT-2 (Radford et al. 2019): learned positions, LayerNorm with bias, plain GELU MLP."""
    for key in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(key):
            raise ValueError(
                f"unsupported GPT-2 feature {key}=True; lmlab supports plain decoder-only GPT-2 "
                "(one attention scale for all layers, no cross-attention)"
            )
    d_model = _req(hf, "n_embd")
    return {
        "vocab_size": _req(hf, "vocab_size"),
        "d_model": d_model,
        "n_layers": _req(hf, "n_layer"),
        "n_heads": _req(hf, "n_head"),
        "d_ff": hf.get("n_inner") or 4 * d_model,
        "max_seq_len": _req(hf, "n_positions"),
        "norm": "layernorm",
        "norm_eps": float(_req(hf, "layer_norm_epsilon")),
        "norm_bias": True,
        "position": "learned",
        "qkv_bias": True,
        "attn_out_bias": True,
        "attn_scale": None if hf.get("scale_attn_weights", True) else 1.0,
        "mlp_gated": False,
        "mlp_activation": _activation(hf, "activation_function"),
        "mlp_bias": True,
        "tie_embeddings": bool(hf.get("tie_word_embeddings")),
        "init_std": float(hf.get("initializer_range") or 0.02),
    }


def hf_config_to_lmlab(hf_cfg: dict[str, Any]) -> ModelConfig:
    """A Hugging Face config.json dict -> ModelConfig, with every HF default and quirk resolved
    into explicit fields. The source family is recorded in `meta` for `save_hf`.
    Raises ValueError naming anything lmlab cannot represent exactly."""
    model_type = hf_cfg.get("model_type")
    family = _family(model_type)
    if hf_cfg.get("quantization_config"):
        raise ValueError(
            "unsupported: quantized checkpoint (quantization_config); dequantize it first"
        )
    hf = {**family.defaults, **hf_cfg}
    kwargs = family.from_hf(hf)
    archs = hf_cfg.get("architectures") or [family.architecture]
    kwargs["meta"] = {
        "hf_model_type": model_type,
        "hf_architecture": archs[0],
        "hf_token_ids": {k: hf.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
    }
    return ModelConfig(**kwargs)


# ============================================================================================
# Config: lmlab -> HF
# ============================================================================================

_ACTIVATIONS_TO_HF = {
    "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu", "relu": "relu",
}


def _activation_to_hf(cfg: ModelConfig, family: Family) -> str:
    if family.model_type == "gpt2" and cfg.mlp_activation == "gelu_tanh":
        return "gelu_new"  # GPT-2's own name for it
    if family.model_type == "gemma" and cfg.mlp_activation == "gelu":
        return "gelu_python"  # GemmaConfig would turn "gelu" into the tanh approximation
    return _ACTIVATIONS_TO_HF[cfg.mlp_activation]


def _rope_to_hf(cfg: ModelConfig, family: Family) -> dict[str, Any]:
    """The transformers 5 layout: one `rope_parameters` dict with rope_theta inside."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    top: dict[str, Any] = {}
    if family.partial_rotary:
        params["partial_rotary_factor"] = cfg.rope_fraction
        top["partial_rotary_factor"] = cfg.rope_fraction
    rs = cfg.rope_scaling
    if rs is not None:
        if rs.kind == "ntk":
            raise ValueError("rope_scaling.kind='ntk' (static NTK-aware) has no transformers rope_type; "
                             "use 'dynamic' or 'yarn' to export")
        params.update(rope_type=rs.kind, factor=rs.factor)
        if rs.kind == "dynamic":
            top["max_position_embeddings"] = rs.original_max_seq_len  # HF's growth reference
        if rs.kind in ("llama3", "yarn"):
            params["original_max_position_embeddings"] = rs.original_max_seq_len
            if family.model_type == "phi3":  # Phi3Config's top-level field takes precedence
                top["original_max_position_embeddings"] = rs.original_max_seq_len
        if rs.kind == "llama3":
            params.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor)
        if rs.kind == "yarn":
            params.update(
                beta_fast=rs.beta_fast,
                beta_slow=rs.beta_slow,
                attention_factor=float(_yarn_attention_factor(rs)),
                truncate=rs.truncate,
            )
    return {"rope_parameters": params, **top}


def _yarn_attention_factor(rs: RopeScaling) -> float:
    if rs.attention_factor is not None:
        return rs.attention_factor
    return 0.1 * math.log(rs.factor) + 1.0 if rs.factor > 1 else 1.0


def _windows_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """Explicit per-layer types, the layout Qwen2/3 and Gemma 2 read first."""
    windows = [cfg.window_of(i) for i in range(cfg.n_layers)]
    types = ["full_attention" if w is None else "sliding_attention" for w in windows]
    sliding = "sliding_attention" in types
    return {
        "sliding_window": cfg.sliding_window if sliding else None,
        "layer_types": types,
        "use_sliding_window": sliding,
        "max_window_layers": types.index("sliding_attention") if sliding else cfg.n_layers,
    }


def _global_window_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """Mistral and Phi-3 slide on every layer or none."""
    sliding = any(cfg.window_of(i) is not None for i in range(cfg.n_layers))
    return {"sliding_window": cfg.sliding_window if sliding else None}


def _decoder_to_hf(cfg: ModelConfig, family: Family, act_key: str = "hidden_act") -> dict:
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        act_key: _activation_to_hf(cfg, family),
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        **_rope_to_hf(cfg, family),
    }


def _llama_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**_decoder_to_hf(cfg, FAMILIES["llama"]), "attention_bias": cfg.qkv_bias,
            "mlp_bias": cfg.mlp_bias}


def _mistral_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**_decoder_to_hf(cfg, FAMILIES["mistral"]), **_global_window_to_hf(cfg)}


def _qwen2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**_decoder_to_hf(cfg, FAMILIES["qwen2"]), **_windows_to_hf(cfg)}


def _qwen3_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**_decoder_to_hf(cfg, FAMILIES["qwen3"]), "attention_bias": cfg.qkv_bias,
            **_windows_to_hf(cfg)}


def _gemma_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {**_decoder_to_hf(cfg, FAMILIES["gemma"]), "attention_bias": cfg.qkv_bias}


def _gemma2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim**-0.5
    windows = _windows_to_hf(cfg)
    return {
        **_decoder_to_hf(cfg, FAMILIES["gemma2"], "hidden_activation"),
        "attention_bias": cfg.qkv_bias,
        # An int in Gemma2Config: a scale that is not 1/sqrt(integer) does not survive the trip
        # back, and the export check reports attn_scale.
        "query_pre_attn_scalar": round(scale**-2.0),
        "attn_logit_softcapping": cfg.attn_softcap,
        "final_logit_softcapping": cfg.logit_softcap,
        # Gemma2Model builds a sliding mask whether or not a layer uses it, so it needs a
        # number even when every layer is global; any number does then.
        "sliding_window": windows["sliding_window"] or cfg.max_seq_len,
        "layer_types": windows["layer_types"],
    }


def _phi3_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    hf = {**_decoder_to_hf(cfg, FAMILIES["phi3"]), **_global_window_to_hf(cfg)}
    hf.setdefault("original_max_position_embeddings", cfg.max_seq_len)
    return hf


def _gpt2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.d_ff,
        "n_positions": cfg.max_seq_len,
        "layer_norm_epsilon": cfg.norm_eps,
        "activation_function": _activation_to_hf(cfg, FAMILIES["gpt2"]),
        "scale_attn_weights": cfg.attn_scale is None or cfg.attn_scale != 1.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
    }


_ATTENTION_FIELDS = ("n_heads", "n_kv_heads", "head_dim", "qkv_bias", "attn_out_bias", "attn_scale",
                     "attn_softcap", "qk_norm", "sliding_window/layer_types", "mla", "linear_attention")
_MLP_FIELDS = ("d_ff", "mlp_gated", "mlp_bias")
# MoE settings that act only in training (losses, the bias update, token dropping), not on what the model computes
_MOE_TRAINING_FIELDS = ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "capacity_factor")


def _canonical(cfg: ModelConfig) -> dict[str, Any]:
    """The fields that decide what the model computes, with equivalent spellings unified
    (defaults spelled out, windows and layer kinds per layer, RoPE fields only where RoPE is used,
    attention fields only where a layer attends, MLP fields only where a layer has an MLP)."""
    d = cfg.to_dict()
    for name in ("meta", "init_std", "scaled_residual_init", "sliding_window", "layer_types", "layer_pattern"):
        d.pop(name)
    kinds = [cfg.layer_kind(i) for i in range(cfg.n_layers)]
    d["layer_kinds"] = ["attention" if k in ("full", "sliding") else k for k in kinds]
    d["sliding_window/layer_types"] = [cfg.window_of(i) for i in range(cfg.n_layers)]
    if cfg.attn_scale is not None:
        d["attn_scale"] = cfg.attn_scale
    elif cfg.mla is not None:
        d["attn_scale"] = (cfg.mla.qk_nope_head_dim + cfg.mla.qk_rope_head_dim) ** -0.5
    else:
        d["attn_scale"] = cfg.head_dim**-0.5
    if cfg.mla is not None:  # MLA has its own head sizes and no key/value heads
        d.pop("head_dim")
        d.pop("n_kv_heads")
    if cfg.moe is not None:  # flattened, so a difference names its field
        moe = d.pop("moe")
        for name in _MOE_TRAINING_FIELDS:
            moe.pop(name)
        # one MLP of n_shared_experts * d_shared hidden units, however it is split
        moe["shared_width"] = moe.pop("n_shared_experts") * (moe.pop("d_shared") or 0)
        d.update({f"moe.{k}": v for k, v in moe.items()})
        if not any(cfg.has_mlp(i) and not cfg.is_moe(i) for i in range(cfg.n_layers)):
            d.pop("d_ff")  # no dense MLP uses it
    if cfg.ssm is not None:
        d["ssm"].pop("chunk_size")  # how the scan is computed, not what
    if all(k == "mamba" for k in kinds):
        for name in _ATTENTION_FIELDS:
            d.pop(name, None)
    if not any(cfg.has_mlp(i) for i in range(cfg.n_layers)):
        for name in _MLP_FIELDS:
            d.pop(name, None)
        for name in [k for k in d if k.startswith("moe.")]:
            d.pop(name)
    if cfg.norm != "layernorm":
        d.pop("norm_bias")
    if cfg.position != "learned":
        d.pop("max_seq_len")  # only sizes the default cache; the weights do not depend on it
    if cfg.position != "rope":
        for name in ("rope_theta", "rope_fraction", "rope_scaling"):
            d.pop(name)
    elif cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        used = {
            "linear": ("factor",),
            "ntk": ("factor",),
            "dynamic": ("factor", "original_max_seq_len"),
            "llama3": ("factor", "original_max_seq_len", "low_freq_factor", "high_freq_factor"),
            "yarn": ("factor", "original_max_seq_len", "beta_fast", "beta_slow", "truncate"),
        }[rs.kind]
        d["rope_scaling"] = {"kind": rs.kind, **{k: getattr(rs, k) for k in used}}
        if rs.kind == "yarn":
            d["rope_scaling"]["attention_factor"] = _yarn_attention_factor(rs)
    return d


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _inexpressible(cfg: ModelConfig, family: Family) -> list[str]:
    """Why `cfg` cannot be written as `family`, one line per field; empty when it can. When the
    family cannot even map the config (its to_hf raises), the one line starts with "cannot map"."""
    problems = []
    if family.divisible_heads and cfg.d_model % cfg.n_heads:
        problems.append(
            f"d_model={cfg.d_model} must be a multiple of n_heads={cfg.n_heads} "
            f"({family.architecture}'s config requires it)"
        )
    try:
        back = hf_config_to_lmlab({"model_type": family.model_type, **family.to_hf(cfg)})
    except ValueError as e:
        return [*problems, f"cannot map: {e}"]
    want, got = _canonical(cfg), _canonical(back)
    for name in want.keys() | got.keys():
        if not _same(want.get(name), got.get(name)):
            as_hf = f"{family.model_type} gives {got.get(name)!r}"
            problems.append(f"{name}={want.get(name)!r} ({as_hf})")
    return sorted(problems)


def _choose_family(cfg: ModelConfig, model_type: str | None) -> Family:
    """The requested family, else the one the model came from (cfg.meta), else the first
    family, simplest first, that expresses the config exactly."""
    model_type = model_type or cfg.meta.get("hf_model_type")
    if model_type is not None:
        family = _family(model_type)
        problems = _inexpressible(cfg, family)
        if problems:
            raise ValueError(
                f"this model cannot be saved as HF {model_type!r}: " + "; ".join(problems)
                + ". Change those fields, or pass another family (one of "
                f"{list(SUPPORTED_MODEL_TYPES)})"
            )
        return family
    attempts = {name: _inexpressible(cfg, family) for name, family in FAMILIES.items()}
    for name, problems in attempts.items():
        if not problems:
            return FAMILIES[name]
    # nearest: fewest differing fields among the families that could map the config at all
    nearest = min(attempts, key=lambda name: (any(p.startswith("cannot map") for p in attempts[name]),
                                              len(attempts[name])))
    raise ValueError(
        "this model's config cannot be expressed in any supported Hugging Face family "
        f"({list(SUPPORTED_MODEL_TYPES)}); the nearest, {nearest!r}, differs in: "
        + "; ".join(attempts[nearest])
    )


def lmlab_config_to_hf(cfg: ModelConfig, model_type: str | None = None) -> dict[str, Any]:
    """ModelConfig -> a config.json dict for `model_type` (default: from cfg.meta, else
    inferred). Raises ValueError naming each field the family cannot express."""
    family = _choose_family(cfg, model_type)
    tokens = cfg.meta.get("hf_token_ids") or {}
    hf = {
        "model_type": family.model_type,
        "architectures": [family.architecture],
        **family.to_hf(cfg),
        # Written out, as None when unknown, so no family default (e.g. Phi-3's pad id 32000)
        # points outside a small vocabulary.
        **{k: tokens.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")},
        "use_cache": True,
    }
    return dict(sorted(hf.items()))


# ============================================================================================
# Weights
# ============================================================================================


def _links(family: Family, params: dict[str, torch.Size], n_layers: int) -> list[Link]:
    """The table expanded for one model: a Link for every HF tensor whose lmlab parameters exist.
    A table entry names modules (their weight and bias are linked) or, for tensors that are not
    a weight or a bias (an SSM's A_log), the tensors themselves. An HF name with "{e}" stores one
    tensor per expert of the lmlab tensor's leading dimension. Raises if an lmlab parameter has no
    HF counterpart in this family."""
    links, covered = [], set()
    for lm, hf in family.modules.items():
        group = (lm,) if isinstance(lm, str) else lm
        for i in range(n_layers) if "{i}" in hf else [None]:
            mods = [m.format(i=i) for m in group]
            hf_mod = hf.replace("{i}", str(i)) if i is not None else hf
            if len(mods) == 1 and mods[0] in params:  # a tensor named directly
                experts = params[mods[0]][0] if "{e}" in hf_mod else 0
                links.append(Link(hf_mod, (mods[0],), experts=experts))
                covered.add(mods[0])
                continue
            for kind in ("weight", "bias"):
                names = tuple(f"{m}.{kind}" for m in mods)
                present = [n in params for n in names]
                if not any(present):
                    continue
                if not all(present):
                    raise ValueError(
                        f"{hf_mod}.{kind} fuses {list(names)}, but only some exist in this model"
                    )
                conv1d = kind == "weight" and hf_mod.endswith(family.conv1d)
                experts = params[names[0]][0] if "{e}" in hf_mod else 0
                links.append(Link(f"{hf_mod}.{kind}", names, conv1d, experts))
                covered.update(names)
    missing = sorted(set(params) - covered)
    if missing:
        raise ValueError(
            f"lmlab parameters {missing} have no counterpart in HF {family.model_type}; "
            "this config uses a feature that family does not have"
        )
    return links


class _Checkpoint:
    """The tensors of a HF checkpoint directory, read one at a time (safetensors lazily)."""

    def __init__(self, path: Path, family: Family):
        self.path = path
        self._where: dict[str, tuple[Path, str]] = {}  # normalized name -> (file, stored name)
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}
        for file in self._files(path):
            for name in self._names(file):
                self._where[self._normalize(name, family)] = (file, name)

    @staticmethod
    def _files(path: Path) -> list[Path]:
        for single, index in (("model.safetensors", "model.safetensors.index.json"),
                              ("pytorch_model.bin", "pytorch_model.bin.index.json")):
            if (path / index).is_file():
                weight_map = json.loads((path / index).read_text())["weight_map"]
                return [path / f for f in sorted(set(weight_map.values()))]
            if (path / single).is_file():
                return [path / single]
        raise FileNotFoundError(
            f"no weights in {path}: expected model.safetensors, model.safetensors.index.json, "
            "pytorch_model.bin or pytorch_model.bin.index.json"
        )

    def _names(self, file: Path) -> list[str]:
        if file.suffix == ".safetensors":
            with safe_open(file, "pt") as f:
                return list(f.keys())
        return list(self._bin(file))

    def _bin(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._loaded:  # weights_only: a pickle may not run code on load
            self._loaded[file] = torch.load(file, map_location="cpu", weights_only=True)
        return self._loaded[file]

    @staticmethod
    def _normalize(name: str, family: Family) -> str:
        # Checkpoints of the bare base model (GPT2Model, LlamaModel) lack the "transformer." /
        # "model." prefix that the *ForCausalLM classes save.
        if name.startswith((family.base_prefix, "lm_head.")):
            return name
        return family.base_prefix + name

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        file, stored = self._where[name]
        if file.suffix == ".safetensors":
            with safe_open(file, "pt") as f:
                return f.get_tensor(stored)
        return self._bin(file)[stored]


def _split(link: Link, tensor: torch.Tensor, shapes: list[torch.Size]) -> Iterator[torch.Tensor]:
    """One HF tensor -> its lmlab parts, checking every shape."""
    if link.conv1d:
        tensor = tensor.t()
    sizes = [s[0] for s in shapes]
    rest_ok = all(tuple(tensor.shape[1:]) == tuple(s[1:]) for s in shapes)
    if tensor.shape[0] != sum(sizes) or not rest_ok:
        want = [tuple(s) for s in shapes]
        raise ValueError(
            f"checkpoint tensor {link.hf} has shape {tuple(tensor.shape)}"
            f"{' (transposed, Conv1D)' if link.conv1d else ''}; lmlab expects {want} for "
            f"{list(link.lmlab)}. config.json does not match the weights"
        )
    return iter(tensor.split(sizes, dim=0))


def _read(link: Link, ckpt: _Checkpoint) -> torch.Tensor:
    """The HF tensor of a link; one per expert, stacked, for an expert link."""
    if link.experts:
        return torch.stack([ckpt.get(name) for name in link.hf_names()])
    return ckpt.get(link.hf)


def _fuse(link: Link, parts: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """lmlab parts -> the HF tensors, by name (the inverse of _split and _read)."""
    tensor = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    tensor = tensor.t() if link.conv1d else tensor
    if link.experts:
        return {name: t.contiguous() for name, t in zip(link.hf_names(), tensor.unbind(0), strict=True)}
    return {link.hf: tensor.contiguous()}


def _tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """What a checkpoint stores of a model: its parameters and persistent buffers (e.g. an MoE router's bias)."""
    return dict(model.state_dict(keep_vars=True))


def _check_names(ckpt: _Checkpoint, links: list[Link], cfg: ModelConfig, family: Family) -> None:
    available, wanted = ckpt.names(), {name: link for link in links for name in link.hf_names()}
    missing = [f"{n} (-> {', '.join(wanted[n].lmlab)})" for n in wanted if n not in available]
    if missing:
        raise ValueError(
            f"checkpoint {ckpt.path} lacks {len(missing)} tensor(s) that lmlab's "
            f"{family.model_type} model needs: {missing[:8]}{' ...' if len(missing) > 8 else ''}."
            " The weights are incomplete or config.json describes a different model"
        )
    extra = sorted(n for n in available - wanted.keys()
                   if not _IGNORABLE.search(n) and not (family.unused is not None and family.unused(n, cfg)))
    if cfg.tie_embeddings and "lm_head.weight" in extra:
        # Some tied checkpoints still store the output matrix; harmless if it is the embedding.
        embed = f"{family.modules['embed']}.weight"
        if torch.equal(ckpt.get("lm_head.weight"), ckpt.get(embed)):
            extra.remove("lm_head.weight")
    if extra:
        raise ValueError(
            f"checkpoint {ckpt.path} has {len(extra)} tensor(s) lmlab's {family.model_type} "
            f"mapping does not use: {extra[:8]}{' ...' if len(extra) > 8 else ''}. Dropping "
            "them would change the model; config.json may not match the weights, or the model "
            "has a feature lmlab does not implement"
        )


def load_hf(path: str | Path, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None) -> Transformer:
    """Load a Hugging Face checkpoint directory (config.json + model.safetensors, sharded
    safetensors with an index, or pytorch_model.bin) into an lmlab Transformer.

    dtype: None keeps the checkpoint's dtype (that of its embedding matrix).
    Raises ValueError for an unsupported model_type or feature, a missing tensor, a tensor
    lmlab would not use, or a shape that contradicts config.json.
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found; point load_hf at a HF model directory")
    cfg = hf_config_to_lmlab(json.loads(config_file.read_text()))
    family = FAMILIES[cfg.meta["hf_model_type"]]
    ckpt = _Checkpoint(path, family)
    with torch.device("meta"):  # parameter names and shapes, without allocating
        shapes = {n: p.shape for n, p in _tensors(Transformer(cfg)).items()}
    links = _links(family, shapes, cfg.n_layers)
    _check_names(ckpt, links, cfg, family)
    if dtype is None:
        dtype = ckpt.get(f"{family.modules['embed']}.weight").dtype
    model = build_model(cfg, device, dtype, init=False)
    params = _tensors(model)
    with torch.no_grad():
        for link in tqdm(links, desc=f"loading {path.name}", unit="tensor", leave=False, disable=None):
            parts = _split(link, _read(link, ckpt), [shapes[n] for n in link.lmlab])
            for name, part in zip(link.lmlab, parts, strict=True):
                params[name].copy_(part)
    return model


def save_hf(model: Transformer, out_dir: str | Path, *, model_type: str | None = None,
            overwrite: bool = False, extra_files: Iterable[str | Path] = ()) -> Path:
    """Write `model` as a Hugging Face checkpoint directory (config.json, model.safetensors)
    that `transformers.AutoModelForCausalLM.from_pretrained` loads with the same logits.

    model_type: the HF family; by default the one the model was loaded from (cfg.meta), else
    the first of SUPPORTED_MODEL_TYPES that expresses the config exactly.
    extra_files: copied in as they are (tokenizer files).
    The directory is written beside `out_dir` and renamed into place; an existing non-empty
    `out_dir` is refused unless overwrite=True. Tied embeddings are written once, as
    transformers expects (it ties lm_head to the embedding on load).
    Returns the output path.
    """
    cfg = model.cfg
    hf_cfg = lmlab_config_to_hf(cfg, model_type)
    family = FAMILIES[hf_cfg["model_type"]]
    params = _tensors(model)
    hf_cfg["dtype"] = str(params["embed.weight"].dtype).removeprefix("torch.")
    links = _links(family, {n: t.shape for n, t in params.items()}, cfg.n_layers)
    out_dir, extra = Path(out_dir), [Path(f) for f in extra_files]
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:  # refuses a non-empty out_dir first
        tensors = {}
        for link in links:
            tensors.update(_fuse(link, [params[n].detach().cpu() for n in link.lmlab]))
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        for src in extra:
            if src.name in ("config.json", "model.safetensors"):
                raise ValueError(f"extra file {src} would overwrite the exported {src.name}")
            shutil.copy2(src, tmp / src.name)
    return out_dir


# ============================================================================================
# Registry
# ============================================================================================

_LLAMA_DEFAULTS = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "max_position_embeddings": 2048,
}

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        # Order matters: save_hf without a target picks the first that fits, simplest first.
        Family("llama", "LlamaForCausalLM", _LLAMA_MODULES, _llama_from_hf, _llama_to_hf,
               _LLAMA_DEFAULTS, divisible_heads=True),
        Family("mistral", "MistralForCausalLM", _LLAMA_MODULES, _mistral_from_hf, _mistral_to_hf,
               {**_LLAMA_DEFAULTS, "max_position_embeddings": 131072, "sliding_window": 4096}),
        Family("qwen2", "Qwen2ForCausalLM", _LLAMA_MODULES, _qwen2_from_hf, _qwen2_to_hf,
               {**_LLAMA_DEFAULTS, "max_position_embeddings": 32768, "sliding_window": 4096,
                "max_window_layers": 28}),
        Family("qwen3", "Qwen3ForCausalLM", _LLAMA_MODULES, _qwen3_from_hf, _qwen3_to_hf,
               {**_LLAMA_DEFAULTS, "max_position_embeddings": 32768, "sliding_window": 4096,
                "max_window_layers": 28, "head_dim": 128}),
        Family("gemma", "GemmaForCausalLM", _LLAMA_MODULES, _gemma_from_hf, _gemma_to_hf,
               {**_LLAMA_DEFAULTS, "hidden_act": "gelu_pytorch_tanh", "head_dim": 256,
                "max_position_embeddings": 8192, "tie_word_embeddings": True}),
        Family("gemma2", "Gemma2ForCausalLM", _GEMMA2_MODULES, _gemma2_from_hf, _gemma2_to_hf,
               {**_LLAMA_DEFAULTS, "hidden_activation": "gelu_pytorch_tanh", "head_dim": 256,
                "max_position_embeddings": 8192, "tie_word_embeddings": True,
                "query_pre_attn_scalar": 256, "sliding_window": 4096,
                "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},
               divisible_heads=True),
        Family("phi3", "Phi3ForCausalLM", _PHI3_MODULES, _phi3_from_hf, _phi3_to_hf,
               {**_LLAMA_DEFAULTS, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
                "original_max_position_embeddings": 4096},
               partial_rotary=True),
        Family("gpt2", "GPT2LMHeadModel", _GPT2_MODULES, _gpt2_from_hf, _gpt2_to_hf,
               {"n_positions": 1024, "activation_function": "gelu_new",
                "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True},
               conv1d=_GPT2_CONV1D),
    )
}

# Families built on the machinery above, kept beside the layers they load: mixtures of experts,
# DeepSeek's latent attention, state-space models. Imported last, since they import this module.
from .hub_deepseek import FAMILIES as _DEEPSEEK  # noqa: E402
from .hub_moe import FAMILIES as _MOE  # noqa: E402
from .hub_ssm import FAMILIES as _SSM  # noqa: E402

FAMILIES.update((f.model_type, f) for f in (*_MOE, *_DEEPSEEK, *_SSM))
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def _family(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported model_type {model_type!r}; lmlab converts {list(SUPPORTED_MODEL_TYPES)}"
        )
    return FAMILIES[model_type]
