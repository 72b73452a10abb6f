"""`ModelConfig`: every architectural knob of lmlab's decoder-only transformer, as one dataclass.

Each field is a switch on the one model in `transformer.py`, never a fork of it. Names follow the
Hugging Face configs where one exists (`n_kv_heads` ~ `num_key_value_heads`, `rope_theta`,
`sliding_window`), so that checkpoint conversion (`hub.py`) stays a table of renames.
`docs/model.md` lists each field with the paper or model that introduced it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned", "sinusoidal", "alibi", "none")
ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")
ROPE_SCALINGS = ("linear", "ntk", "dynamic", "yarn", "llama3")
LAYER_TYPES = ("full", "sliding", "linear", "mamba")  # softmax attention, windowed, linear attention, SSM
RECURRENT_LAYERS = ("linear", "mamba")  # a fixed-size state per sequence instead of a per-token cache
SSM_KINDS = ("mamba", "mamba2")  # Mamba (Gu & Dao 2023), Mamba-2 (Dao & Gu 2024)


@dataclass
class RopeScaling:
    """How RoPE frequencies are stretched to reach past the trained context length.

    kind: "linear" (position interpolation, Chen et al. 2023: positions / factor),
      "ntk" (static NTK-aware scaling, bloc97 2023: the base becomes base * factor^(d/(d-2)), so the
      lowest frequency is stretched by exactly factor and the highest is kept; no transformers
      equivalent, so such a model cannot be exported with `save_hf`),
      "dynamic" (dynamic NTK: the base grows with the current length once it exceeds
      `original_max_seq_len`), "yarn" (Peng et al. 2023: NTK-by-parts + attention temperature),
      "llama3" (Llama 3.1: wavelength-dependent interpolation between low/high frequency bands).
    factor: the context-extension factor s.
    original_max_seq_len: the context length the model was pretrained with (dynamic, yarn, llama3 read it;
      ntk only records it).
    low_freq_factor, high_freq_factor: llama3 band edges, as wavelength ratios.
    beta_fast, beta_slow: yarn ramp edges, in rotations over the original context.
    attention_factor: yarn's temperature on cos/sin; None means 0.1 * ln(factor) + 1.
    truncate: yarn only: round the ramp edges to whole dimensions (as the reference code does).
    """

    kind: str = "linear"
    factor: float = 1.0
    original_max_seq_len: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True


@dataclass
class MoEConfig:
    """A mixture-of-experts MLP (model/moe.py) in place of the dense one.

    n_experts routed experts of hidden width d_expert; each token goes to top_k of them.
    d_expert: None means the model's d_ff (resolved when the config is built). Fine-grained
      experts (DeepSeekMoE) are just many experts with a small d_expert and a larger top_k.
    router: "softmax_topk" (softmax over all experts, then the k largest: Mixtral, Qwen-MoE,
      DeepSeek-V2), "topk_softmax" (the k largest logits, then a softmax over those k), or
      "sigmoid" (independent sigmoid scores, DeepSeek-V3).
    norm_topk_prob: renormalize the k selected weights to sum to 1 (no effect for topk_softmax,
      whose weights already do).
    routed_scaling_factor: multiplies the routed experts' combined output (DeepSeek).
    n_groups / topk_groups / group_score: DeepSeek's group-limited routing: experts split into
      n_groups groups, each scored by group_score ("max": its best expert, V2; "top2_sum": the sum
      of its two best, V3), and only the topk_groups best groups are eligible.
    bias_balancing: DeepSeek-V3's auxiliary-loss-free balancing: a per-expert bias (the buffer
      `expert_bias`), added to the scores for selection only, nudged by bias_update_rate after
      every optimizer step towards even load (`moe.update_expert_biases`).
    aux_loss_coef: weight of the Switch/GShard load-balancing loss; z_loss_coef: of the ST-MoE
      router z-loss. Both are added to the training loss (training forwards only).
    capacity_factor: None routes every token (dropless); a number caps each expert at
      ceil(capacity_factor * tokens * top_k / n_experts) assignments per training forward and
      drops the rest, lowest routing priority first (evaluation and generation never drop).
    n_shared_experts / d_shared: always-on experts (DeepSeekMoE, Qwen2-MoE), held as one MLP of
      width n_shared_experts * d_shared (d_shared None: d_expert); shared_gate scales it by
      sigmoid(x w) (Qwen2-MoE).
    dense_layers: layers that keep the dense MLP of width d_ff (DeepSeek's first_k_dense_replace,
      Qwen's mlp_only_layers); kept sorted.
    """

    ROUTERS = ("softmax_topk", "topk_softmax", "sigmoid")  # class constants (no annotation: not fields)
    GROUP_SCORES = ("max", "top2_sum")

    n_experts: int = 8
    top_k: int = 2
    d_expert: int | None = None  # None: the model's d_ff
    router: str = "softmax_topk"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_groups: int = 1
    topk_groups: int = 1
    group_score: str = "max"
    bias_balancing: bool = False
    bias_update_rate: float = 1e-3
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    capacity_factor: float | None = None
    n_shared_experts: int = 0
    d_shared: int | None = None  # None: d_expert
    shared_gate: bool = False
    dense_layers: list[int] = field(default_factory=list)


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434; model/mla.py): keys and values are
    expanded from one compressed latent of kv_lora_rank dims per token, and RoPE goes on a separate
    qk_rope_head_dim-wide key shared by all heads, so the cache holds only the latent and that key.

    kv_lora_rank: d_c, the width of the joint KV latent c_kv (the cached part).
    q_lora_rank: compress queries through a latent of this rank too (q_a_proj, q_a_layernorm,
      q_b_proj); None: one full-rank q_proj.
    qk_nope_head_dim, qk_rope_head_dim: each head's query/key is the concatenation of a part without
      position (expanded from the latent) and a RoPE part (the key's is shared by all heads).
    v_head_dim: each head's value width.
    rope_interleave: the RoPE dims of q and k come out of their projections as interleaved pairs
      (x0, x1), (x2, x3), ... (DeepSeek's checkpoint layout, HF `rope_interleave`); the layer gathers
      them into lmlab's rotate-half layout before rotating. False: already rotate-half.
    latent_norm_eps: epsilon of the RMSNorms on the latents (q_a_layernorm, kv_a_layernorm); DeepSeek
      fixes it at 1e-6 whatever the model's norm_eps.
    """

    kv_lora_rank: int = 512
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_interleave: bool = False
    latent_norm_eps: float = 1e-6


@dataclass
class LinearAttentionConfig:
    """Linear attention layers (layer_types "linear", model/linear_attention.py; Katharopoulos et al.
    2020): softmax(q.k) is replaced by phi(q).phi(k), so a causal layer is an RNN whose state is
    S = sum phi(k) v^T (and z = sum phi(k)), of a fixed size per sequence.

    feature_map: phi, applied to queries and keys: "elu" (elu(x) + 1, the paper's choice: positive, so
      the normalizer is positive), "relu", or "identity" (only with normalize=False: phi(q).z could
      be zero or negative).
    normalize: divide by phi(q).z, the analogue of softmax's denominator; without it the output is
      phi(q).S * head_dim^-0.5 (attn_scale when set), as in unnormalized linear attention / RetNet.
    eps: added to the normalizer, so a row whose keys are all padding gives 0, not NaN.
    chunk_size: tokens per chunk of the parallel (training / prefill) form: quadratic within a chunk,
      the carried state across chunks. Changes speed and memory, never the result (beyond rounding).
    """

    feature_map: str = "elu"
    normalize: bool = True
    eps: float = 1e-6
    chunk_size: int = 64


@dataclass
class SSMConfig:
    """State-space layers (layer_types "mamba", model/ssm.py).

    kind: "mamba" (the selective scan of Gu & Dao 2023: A per channel and state) or "mamba2" (SSD,
      Dao & Gu 2024: a scalar A per head, heads of head_dim channels sharing B and C within n_groups).
    d_state: N, the state size per channel. d_conv: the causal depthwise convolution's width.
    expand: d_inner = expand * d_model, the width the SSM runs at.
    dt_rank: mamba only: the rank of the dt projection (x_proj -> dt_proj); None: ceil(d_model / 16).
    head_dim, n_groups: mamba2 only: d_inner / head_dim heads; B and C are shared by the heads of a group.
    chunk_size: the chunk length of the parallel (training and prefill) form; None: 8 for mamba (its
      per-chunk decay tensor is (L, L, d_inner, d_state): work and memory grow with L), 64 for mamba2.
      It changes the order of floating-point sums only, never the result.
    conv_bias / proj_bias: biases on conv1d / on in_proj and out_proj.
    mlp: whether a mamba layer also has an MLP sublayer (pure Mamba: no; Jamba-style hybrids: yes).
    dt_min, dt_max, dt_floor: initialization only: dt is drawn log-uniformly in [dt_min, dt_max],
      clamped below at dt_floor, and the dt bias set to its inverse softplus (Mamba's init).
    dt_rank and chunk_size left at None are resolved when the ModelConfig is validated, as head_dim is.
    """

    kind: str = "mamba"  # "mamba" (selective scan, Gu & Dao 2023) | "mamba2" (SSD, Dao & Gu 2024)
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # mamba: None means ceil(d_model / 16)
    head_dim: int = 64  # mamba2
    n_groups: int = 1  # mamba2
    chunk_size: int | None = None  # the chunk length of the parallel form; None: 8 (mamba), 64 (mamba2)
    conv_bias: bool = True
    proj_bias: bool = False
    mlp: bool = False  # whether a mamba layer also has an MLP sublayer (pure Mamba: no; Jamba: yes)
    dt_min: float = 0.001  # init: dt ~ log-uniform in [dt_min, dt_max]
    dt_max: float = 0.1
    dt_floor: float = 1e-4  # init: dt clamped below at this


@dataclass
class ModelConfig:
    """A decoder-only transformer, fully described. Defaults give a small Llama-style model."""

    # --- sizes -----------------------------------------------------------------------------
    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: = n_heads (MHA); 1: MQA; in between: GQA
    head_dim: int | None = None  # None: d_model // n_heads; may be set independently
    d_ff: int | None = None  # None: 4 * d_model, or the 2/3 of it rounded to 256 when gated
    max_seq_len: int = 2048

    # --- normalization ---------------------------------------------------------------------
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    norm_eps: float = 1e-5
    norm_bias: bool = False  # LayerNorm only: learn an additive bias
    norm_unit_offset: bool = False  # Gemma: scale by (1 + weight), weight initialized at 0
    pre_norm: bool = True  # normalize each sublayer's input
    post_norm: bool = False  # also normalize each sublayer's output before the residual add
    qk_norm: bool = False  # RMSNorm over head_dim on queries and keys, before RoPE

    # --- positions -------------------------------------------------------------------------
    position: str = "rope"  # "rope" | "learned" | "sinusoidal" | "alibi" | "none"
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0  # rotate only this leading fraction of each head's dims
    rope_scaling: RopeScaling | None = None

    # --- attention -------------------------------------------------------------------------
    qkv_bias: bool = False
    attn_out_bias: bool = False
    attn_scale: float | None = None  # None: 1 / sqrt(head_dim)
    attn_softcap: float | None = None  # Gemma 2: cap * tanh(scores / cap) before softmax
    sliding_window: int | None = None  # a query sees at most this many keys, itself included
    layer_types: list[str] | None = None  # per layer "full" | "sliding" | "linear" | "mamba"; None: all "full"
    layer_pattern: list[str] | None = None  # repeated to fill layer_types, e.g. ["mamba"] * 3 + ["full"]
    mla: MLAConfig | None = None  # multi-head latent attention in place of q/k/v projections
    linear_attention: LinearAttentionConfig | None = None  # set by default when a layer is "linear"
    ssm: SSMConfig | None = None  # set by default when a layer is "mamba"

    # --- MLP -------------------------------------------------------------------------------
    mlp_gated: bool = True  # act(x W_gate) * (x W_up): SwiGLU / GeGLU
    mlp_activation: str = "silu"  # "gelu" | "gelu_tanh" | "silu" | "relu"
    mlp_bias: bool = False
    moe: MoEConfig | None = None  # a mixture of experts in place of the dense MLP

    # --- embeddings and output -------------------------------------------------------------
    tie_embeddings: bool = False
    embedding_scale: float | None = None  # Gemma: sqrt(d_model)
    logit_softcap: float | None = None  # Gemma 2: cap * tanh(logits / cap)

    # --- initialization --------------------------------------------------------------------
    init_std: float = 0.02
    scaled_residual_init: bool = True  # GPT-2: output projections get std / sqrt(2 n_layers)

    # Free-form provenance (e.g. the HF architecture it came from); never read by the model.
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, kind in (("rope_scaling", RopeScaling), ("moe", MoEConfig), ("mla", MLAConfig),
                           ("linear_attention", LinearAttentionConfig), ("ssm", SSMConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                unknown = sorted(set(value) - {f.name for f in fields(kind)})
                if unknown:
                    raise ValueError(f"invalid ModelConfig: unknown {name} fields {unknown}; "
                                     f"known: {[f.name for f in fields(kind)]}")
                setattr(self, name, kind(**value))
        if self.layer_pattern is not None:
            if self.layer_types is not None:
                raise ValueError("invalid ModelConfig: set layer_types or layer_pattern, not both")
            if not self.layer_pattern:
                raise ValueError("invalid ModelConfig: layer_pattern is empty")
            self.layer_pattern = list(self.layer_pattern)
            self.layer_types = [self.layer_pattern[i % len(self.layer_pattern)] for i in range(self.n_layers)]
            self.layer_pattern = None  # expanded once: layer_types is the one source of truth from here on
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                    "set head_dim explicitly or change one of them"
                )
            self.head_dim = self.d_model // self.n_heads
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
            if self.mlp_gated:  # keep the parameter count of a 4x MLP (Shazeer 2020)
                self.d_ff = 256 * ((2 * self.d_ff // 3 + 255) // 256)
        if self.layer_types is not None:
            self.layer_types = list(self.layer_types)
            if "linear" in self.layer_types and self.linear_attention is None:
                self.linear_attention = LinearAttentionConfig()
            if "mamba" in self.layer_types and self.ssm is None:
                self.ssm = SSMConfig()
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field and the fix, for any inconsistent setting."""

        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid ModelConfig: {msg}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim"):
            check(getattr(self, name) > 0, f"{name} must be positive, got {getattr(self, name)}")
        check(self.max_seq_len > 0, f"max_seq_len must be positive, got {self.max_seq_len}")
        check(
            self.n_heads % self.n_kv_heads == 0,
            f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}",
        )
        check(self.norm in NORMS, f"norm={self.norm!r}; choose one of {NORMS}")
        check(self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}")
        check(self.position in POSITIONS, f"position={self.position!r}; choose one of {POSITIONS}")
        check(
            self.mlp_activation in ACTIVATIONS,
            f"mlp_activation={self.mlp_activation!r}; choose one of {ACTIVATIONS}",
        )
        check(self.pre_norm or self.post_norm, "at least one of pre_norm / post_norm must be set")
        check(0 < self.rope_fraction <= 1, f"rope_fraction must be in (0, 1], got {self.rope_fraction}")
        if self.position == "rope" and self.mla is None:  # MLA checks its own RoPE dims
            rot = self.rotary_dim
            check(
                rot >= 2 and rot % 2 == 0,
                f"rope_fraction={self.rope_fraction} of head_dim={self.head_dim} gives "
                f"{rot} rotary dims; it must be even and at least 2",
            )
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            check(rs.kind in ROPE_SCALINGS, f"rope_scaling.kind={rs.kind!r}; choose one of {ROPE_SCALINGS}")
            check(rs.factor >= 1.0 or rs.kind == "linear", f"rope_scaling.factor must be >= 1, got {rs.factor}")
            check(rs.factor > 0, f"rope_scaling.factor must be positive, got {rs.factor}")
            check(
                rs.kind in ("linear", "ntk") or rs.original_max_seq_len,
                f"rope_scaling.kind={rs.kind!r} needs original_max_seq_len",
            )
            check(self.position == "rope", "rope_scaling is set but position is not 'rope'")
        if self.sliding_window is not None:
            check(self.sliding_window > 0, f"sliding_window must be positive, got {self.sliding_window}")
        if self.layer_types is not None:
            check(
                len(self.layer_types) == self.n_layers,
                f"layer_types has {len(self.layer_types)} entries for n_layers={self.n_layers}",
            )
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            check(not bad, f"layer_types has unknown kinds {bad}; choose from {LAYER_TYPES}")
            check(
                "sliding" not in self.layer_types or self.sliding_window is not None,
                "layer_types has 'sliding' layers but sliding_window is not set",
            )
        if self.moe is not None:
            self._validate_moe(check)
        if self.mla is not None:
            self._validate_mla(check)
        if self.linear_attention is not None:
            self._validate_linear_attention(check)
        if self.ssm is not None:
            self._validate_ssm(check)
        for name in ("attn_softcap", "logit_softcap"):
            value = getattr(self, name)
            check(value is None or value > 0, f"{name} must be positive or None, got {value}")

    def _validate_moe(self, check) -> None:
        m = self.moe
        check(m.n_experts >= 1 and 1 <= m.top_k <= m.n_experts,
              f"moe needs n_experts >= 1 and 1 <= top_k <= n_experts, got {m.n_experts} and {m.top_k}")
        # Sizes left to default are resolved here, as d_ff and head_dim are, so that a saved config
        # (and the Hugging Face round trip in hub.py) states every width explicitly.
        if m.d_expert is None:
            m.d_expert = self.d_ff
        if m.d_shared is None:
            m.d_shared = m.d_expert
        m.dense_layers = sorted(set(m.dense_layers))
        check(m.d_expert > 0 and m.d_shared > 0,
              f"moe.d_expert and moe.d_shared must be positive, got {m.d_expert} and {m.d_shared}")
        check(m.router in m.ROUTERS, f"moe.router={m.router!r}; choose one of {m.ROUTERS}")
        check(m.group_score in m.GROUP_SCORES,
              f"moe.group_score={m.group_score!r}; choose one of {m.GROUP_SCORES}")
        check(m.n_groups >= 1 and m.n_experts % m.n_groups == 0,
              f"moe.n_groups={m.n_groups} must be >= 1 and divide n_experts={m.n_experts}")
        per_group = m.n_experts // m.n_groups
        check(1 <= m.topk_groups <= m.n_groups,
              f"moe.topk_groups={m.topk_groups} must be in [1, n_groups={m.n_groups}]")
        check(m.top_k <= m.topk_groups * per_group,
              f"moe.top_k={m.top_k} experts cannot be chosen from topk_groups={m.topk_groups} groups of "
              f"{per_group}; raise topk_groups or lower top_k")
        check(m.n_groups == 1 or m.group_score != "top2_sum" or per_group >= 2,
              f"moe.group_score='top2_sum' needs at least 2 experts per group, got {per_group}")
        check(m.routed_scaling_factor > 0, f"moe.routed_scaling_factor must be positive, got {m.routed_scaling_factor}")
        check(m.bias_update_rate >= 0, f"moe.bias_update_rate must be >= 0, got {m.bias_update_rate}")
        check(m.aux_loss_coef >= 0 and m.z_loss_coef >= 0,
              f"moe.aux_loss_coef and moe.z_loss_coef must be >= 0, got {m.aux_loss_coef} and {m.z_loss_coef}")
        check(m.capacity_factor is None or m.capacity_factor > 0,
              f"moe.capacity_factor must be positive, or None for dropless routing; got {m.capacity_factor}")
        check(m.n_shared_experts >= 0, f"moe.n_shared_experts must be >= 0, got {m.n_shared_experts}")
        check(not m.shared_gate or m.n_shared_experts > 0,
              "moe.shared_gate=True gates the shared experts, but n_shared_experts is 0; set n_shared_experts")
        bad = [i for i in m.dense_layers if not 0 <= i < self.n_layers]
        check(not bad, f"moe.dense_layers {bad} are outside the model's layers 0..{self.n_layers - 1}")

    def _validate_mla(self, check) -> None:
        m = self.mla
        check(m.kv_lora_rank > 0 and m.v_head_dim > 0 and m.qk_nope_head_dim >= 0,
              f"mla needs kv_lora_rank > 0, v_head_dim > 0 and qk_nope_head_dim >= 0, got {m.kv_lora_rank}, "
              f"{m.v_head_dim} and {m.qk_nope_head_dim}")
        check(m.qk_rope_head_dim > 0 and m.qk_rope_head_dim % 2 == 0,
              f"mla.qk_rope_head_dim must be even and positive, got {m.qk_rope_head_dim}")
        check(m.q_lora_rank is None or m.q_lora_rank > 0,
              f"mla.q_lora_rank must be positive, or None for a full-rank q_proj; got {m.q_lora_rank}")
        check(m.latent_norm_eps > 0, f"mla.latent_norm_eps must be positive, got {m.latent_norm_eps}")
        # Every head expands its own keys and values from the one latent: there are no KV head groups to set.
        check(self.n_kv_heads == self.n_heads,
              f"mla: n_kv_heads={self.n_kv_heads} has no meaning under multi-head latent attention (each head "
              f"expands its own keys and values from the shared latent); leave it unset (= n_heads={self.n_heads})")
        check(not self.qk_norm, "mla: qk_norm is not supported; MLA normalizes its latents instead "
                                "(q_a_layernorm, kv_a_layernorm); set qk_norm=False")
        check(self.rope_fraction == 1.0,
              f"mla: rope_fraction={self.rope_fraction} does not apply (MLA rotates exactly its "
              "mla.qk_rope_head_dim dims); leave it at 1.0 and size mla.qk_rope_head_dim instead")

    def _validate_linear_attention(self, check) -> None:
        la, maps = self.linear_attention, ("elu", "relu", "identity")
        check(la.feature_map in maps, f"linear_attention.feature_map={la.feature_map!r}; choose one of {maps}")
        check(la.feature_map != "identity" or not la.normalize,
              "linear_attention.feature_map='identity' with normalize=True divides by phi(q).sum(phi(k)), which can "
              "be zero or negative; set normalize=False or use feature_map='elu'")
        check(la.eps > 0, f"linear_attention.eps must be positive, got {la.eps}")
        check(la.chunk_size >= 1, f"linear_attention.chunk_size must be at least 1, got {la.chunk_size}")

    def _validate_ssm(self, check) -> None:
        s = self.ssm
        check(s.kind in SSM_KINDS, f"ssm.kind={s.kind!r}; choose one of {SSM_KINDS}")
        for name in ("d_state", "d_conv", "expand"):
            check(getattr(s, name) > 0, f"ssm.{name} must be positive, got {getattr(s, name)}")
        # Resolved here, once, so the saved config (and an HF export) states the sizes explicitly.
        if s.dt_rank is None and s.kind == "mamba":
            s.dt_rank = -(-self.d_model // 16)
        if s.chunk_size is None:
            s.chunk_size = 8 if s.kind == "mamba" else 64
        check(s.chunk_size > 0, f"ssm.chunk_size must be positive, got {s.chunk_size}")
        check(s.dt_rank is None or s.dt_rank > 0, f"ssm.dt_rank must be positive, got {s.dt_rank}")
        check(0 < s.dt_min <= s.dt_max, f"ssm needs 0 < dt_min <= dt_max, got dt_min={s.dt_min}, dt_max={s.dt_max}")
        check(s.dt_floor >= 0, f"ssm.dt_floor must be >= 0, got {s.dt_floor}")
        if s.kind == "mamba2":
            d_inner = s.expand * self.d_model
            check(s.head_dim > 0 and d_inner % s.head_dim == 0,
                  f"ssm.head_dim={s.head_dim} must divide d_inner = expand * d_model = {d_inner}; pick a divisor")
            n_heads = d_inner // s.head_dim
            check(s.n_groups > 0 and n_heads % s.n_groups == 0,
                  f"ssm.n_groups={s.n_groups} must divide the {n_heads} SSM heads (d_inner / head_dim)")

    # --- derived quantities ----------------------------------------------------------------
    def layer_kind(self, layer: int) -> str:
        """"full", "sliding", "linear" or "mamba": what mixes tokens in this layer."""
        if self.layer_types is not None:
            return self.layer_types[layer]
        return "sliding" if self.sliding_window is not None else "full"

    def is_moe(self, layer: int) -> bool:
        return self.moe is not None and layer not in self.moe.dense_layers

    def has_mlp(self, layer: int) -> bool:
        """Every layer has an MLP (or MoE) sublayer except a Mamba layer without ssm.mlp."""
        return self.layer_kind(layer) != "mamba" or self.ssm.mlp

    def cache_layout(self, layer: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """What each token adds to this layer's cache: (heads, dim) of its two cached tensors
        (keys and values; with MLA the KV latent and the shared RoPE key); None for a recurrent
        layer, which keeps a fixed-size state per sequence instead."""
        if self.layer_kind(layer) in RECURRENT_LAYERS:
            return None
        if self.mla is not None:
            return (1, self.mla.kv_lora_rank), (1, self.mla.qk_rope_head_dim)
        return (self.n_kv_heads, self.head_dim), (self.n_kv_heads, self.head_dim)

    @property
    def recurrent(self) -> bool:
        """Whether any layer keeps a recurrent state (linear attention, SSM)."""
        return any(self.layer_kind(i) in RECURRENT_LAYERS for i in range(self.n_layers))

    @property
    def rotary_dim(self) -> int:
        if self.mla is not None:  # MLA rotates only its decoupled RoPE key/query dims
            return self.mla.qk_rope_head_dim
        return int(self.head_dim * self.rope_fraction)

    def window_of(self, layer: int) -> int | None:
        """The sliding window of one layer, or None when it attends to the whole prefix."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding":
            return self.sliding_window
        return None

    # --- (de)serialization -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown ModelConfig fields {unknown}; this config may come from a newer lmlab "
                "or be a Hugging Face config.json (convert it with `lmlab convert --from-hf`)"
            )
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); restore it from the source checkpoint") from e
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)
