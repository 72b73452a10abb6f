"""Hugging Face families of state-space models: Mamba (MambaForCausalLM) and Mamba-2 (Mamba2ForCausalLM).

A pure Mamba model in lmlab is `layer_types = ["mamba"] * n_layers` with `ssm.mlp = False` (blocks of
RMSNorm -> mixer -> residual, no MLP), `position = "none"` and RMSNorm: transformers' MambaBlock /
Mamba2Block exactly. The mixers keep the reference parameter names (model/ssm.py), so the tables
below are renames: backbone.embeddings, backbone.layers.{i}.norm, backbone.layers.{i}.mixer.*,
backbone.norm_f, lm_head (tied to the embedding when tie_word_embeddings, Mamba's default).

What the mapping resolves or refuses:
- time_step_rank "auto" is ceil(hidden_size / 16), written out as ssm.dt_rank.
- Mamba-2's num_heads must equal expand * hidden_size / head_dim (Mamba2Config checks the same).
- hidden_act other than silu is refused: both mixers apply SiLU after the convolution.
- Mamba-2's time_step_limit other than (0, inf) is refused: transformers clamps dt with it in the
  chunked form but not in its decoding step, so no single lmlab computation matches both.
- Initialization-only fields (time_step_min / max / floor, initializer_range) are carried over;
  time_step_scale, time_step_init_scheme and rescale_prenorm_residual only shape transformers' own
  init and are not. residual_in_fp32 keeps transformers' residual stream in float32 under bf16;
  lmlab's residual is in the model's dtype (identical in float32).
Attention and MLP fields of ModelConfig mean nothing to these models: they stay at their defaults.
"""

from __future__ import annotations

import math
from typing import Any

from .config import ModelConfig, SSMConfig
from .hub import Family, _req

_MAMBA_MODULES: dict[str | tuple[str, ...], str] = {
    "embed": "backbone.embeddings",  # first: it names the base prefix, "backbone."
    "norm": "backbone.norm_f",
    "lm_head": "lm_head",
    "blocks.{i}.attn_norm": "backbone.layers.{i}.norm",
    "blocks.{i}.attn.in_proj": "backbone.layers.{i}.mixer.in_proj",
    "blocks.{i}.attn.conv1d": "backbone.layers.{i}.mixer.conv1d",
    "blocks.{i}.attn.x_proj": "backbone.layers.{i}.mixer.x_proj",
    "blocks.{i}.attn.dt_proj": "backbone.layers.{i}.mixer.dt_proj",
    "blocks.{i}.attn.A_log": "backbone.layers.{i}.mixer.A_log",
    "blocks.{i}.attn.D": "backbone.layers.{i}.mixer.D",
    "blocks.{i}.attn.out_proj": "backbone.layers.{i}.mixer.out_proj",
}

_MAMBA2_MODULES: dict[str | tuple[str, ...], str] = {
    **{k: v for k, v in _MAMBA_MODULES.items() if not k.endswith(("x_proj", "dt_proj"))},
    "blocks.{i}.attn.dt_bias": "backbone.layers.{i}.mixer.dt_bias",
    "blocks.{i}.attn.norm": "backbone.layers.{i}.mixer.norm",
}

# The config classes' defaults (transformers' MambaConfig / Mamba2Config), for keys a config.json omits.
_MAMBA_DEFAULTS = {
    "state_size": 16, "layer_norm_epsilon": 1e-5, "expand": 2, "conv_kernel": 4, "use_bias": False,
    "use_conv_bias": True, "hidden_act": "silu", "initializer_range": 0.1, "time_step_rank": "auto",
    "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 1e-4, "tie_word_embeddings": True,
}
_MAMBA2_DEFAULTS = {
    **_MAMBA_DEFAULTS, "state_size": 128, "num_heads": 128, "head_dim": 64, "n_groups": 8, "chunk_size": 256,
    "time_step_limit": (0.0, math.inf), "tie_word_embeddings": False,
}


def _expand(hf: dict[str, Any]) -> int:
    expand = _req(hf, "expand")
    if float(expand) != int(expand):
        raise ValueError(f"unsupported expand={expand}: lmlab's SSM width is an integer multiple of hidden_size")
    return int(expand)


def _json_float(value: Any) -> float:
    """A float from config.json, where transformers writes infinity as {"__float__": "Infinity"}."""
    if isinstance(value, dict) and "__float__" in value:
        return float(value["__float__"])
    return float(value)


def _ssm_from_hf(hf: dict[str, Any], kind: str) -> dict[str, Any]:
    """The fields both families share: sizes, norm, embeddings, and the SSMConfig common part."""
    act = _req(hf, "hidden_act")
    if act not in ("silu", "swish"):
        raise ValueError(f"unsupported hidden_act={act!r} for {kind}: lmlab's mixers apply SiLU after the "
                         "convolution, as the reference Mamba does")
    d_model, n_layers = _req(hf, "hidden_size"), _req(hf, "num_hidden_layers")
    ssm = {
        "kind": kind,
        "d_state": _req(hf, "state_size"),
        "d_conv": _req(hf, "conv_kernel"),
        "expand": _expand(hf),
        "conv_bias": bool(hf.get("use_conv_bias")),
        "proj_bias": bool(hf.get("use_bias")),
        "mlp": False,
        "dt_min": float(_req(hf, "time_step_min")),
        "dt_max": float(_req(hf, "time_step_max")),
        "dt_floor": float(_req(hf, "time_step_floor")),
    }
    kw: dict[str, Any] = {
        "vocab_size": _req(hf, "vocab_size"),
        "d_model": d_model,
        "n_layers": n_layers,
        "norm": "rmsnorm",
        "norm_eps": float(_req(hf, "layer_norm_epsilon")),
        "position": "none",
        "layer_types": ["mamba"] * n_layers,
        "tie_embeddings": bool(hf.get("tie_word_embeddings")),
        "init_std": float(hf.get("initializer_range") or 0.1),
        "ssm": ssm,
    }
    if d_model % 8:  # ModelConfig's default of 8 attention heads would not divide it (and is unused)
        kw["n_heads"] = 1
    return kw


def _mamba_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    kw = _ssm_from_hf(hf, "mamba")
    rank = _req(hf, "time_step_rank")
    kw["ssm"]["dt_rank"] = math.ceil(kw["d_model"] / 16) if rank == "auto" else int(rank)
    return kw


def _mamba2_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    kw = _ssm_from_hf(hf, "mamba2")
    limit = tuple(_json_float(v) for v in _req(hf, "time_step_limit"))
    if limit != (0.0, math.inf):
        raise ValueError(f"unsupported time_step_limit={list(limit)}: transformers clamps dt to it in the chunked "
                         "form only, not when decoding; lmlab supports the default (0.0, inf)")
    s = kw["ssm"]
    s.update(head_dim=_req(hf, "head_dim"), n_groups=_req(hf, "n_groups"), chunk_size=_req(hf, "chunk_size"))
    heads = _req(hf, "num_heads")
    if heads * s["head_dim"] != s["expand"] * kw["d_model"]:
        raise ValueError(f"num_heads={heads} * head_dim={s['head_dim']} must equal expand * hidden_size = "
                         f"{s['expand'] * kw['d_model']}; config.json is inconsistent")
    return kw


def _ssm_of(cfg: ModelConfig, kind: str) -> SSMConfig:
    """cfg's SSM settings, refusing a hybrid stack (no HF family here holds one). A config without SSM
    layers gets the defaults, so the export check can name every field that differs."""
    if cfg.ssm is None:
        return SSMConfig(kind=kind, dt_rank=math.ceil(cfg.d_model / 16), chunk_size=64)
    kinds = sorted({cfg.layer_kind(i) for i in range(cfg.n_layers)})
    if kinds != ["mamba"]:
        raise ValueError(f"layer_types={kinds}: HF {kind} models are pure Mamba stacks (every layer 'mamba'); "
                         "lmlab exports no hybrid family")
    return cfg.ssm


def _ssm_to_hf(cfg: ModelConfig, s: SSMConfig) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "layer_norm_epsilon": cfg.norm_eps,
        "state_size": s.d_state,
        "conv_kernel": s.d_conv,
        "expand": s.expand,
        "use_conv_bias": s.conv_bias,
        "use_bias": s.proj_bias,
        "hidden_act": "silu",
        "time_step_min": s.dt_min,
        "time_step_max": s.dt_max,
        "time_step_floor": s.dt_floor,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
    }


def _mamba_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    s = _ssm_of(cfg, "mamba")
    return {**_ssm_to_hf(cfg, s), "time_step_rank": s.dt_rank or math.ceil(cfg.d_model / 16)}


def _mamba2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    s = _ssm_of(cfg, "mamba2")
    return {**_ssm_to_hf(cfg, s), "num_heads": s.expand * cfg.d_model // s.head_dim, "head_dim": s.head_dim,
            "n_groups": s.n_groups, "chunk_size": s.chunk_size}


FAMILIES: tuple[Family, ...] = (
    Family("mamba", "MambaForCausalLM", _MAMBA_MODULES, _mamba_from_hf, _mamba_to_hf, _MAMBA_DEFAULTS),
    Family("mamba2", "Mamba2ForCausalLM", _MAMBA2_MODULES, _mamba2_from_hf, _mamba2_to_hf, _MAMBA2_DEFAULTS),
)
