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
ROPE_SCALINGS = ("linear", "dynamic", "yarn", "llama3")
LAYER_TYPES = ("full", "sliding")


@dataclass
class RopeScaling:
    """How RoPE frequencies are stretched to reach past the trained context length.

    kind: "linear" (position interpolation, Chen et al. 2023: positions / factor),
      "dynamic" (dynamic NTK: the base grows with the current length once it exceeds
      `original_max_seq_len`), "yarn" (Peng et al. 2023: NTK-by-parts + attention temperature),
      "llama3" (Llama 3.1: wavelength-dependent interpolation between low/high frequency bands).
    factor: the context-extension factor s.
    original_max_seq_len: the context length the model was pretrained with (dynamic, yarn, llama3).
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
    layer_types: list[str] | None = None  # per layer "full" | "sliding"; None: all the same

    # --- MLP -------------------------------------------------------------------------------
    mlp_gated: bool = True  # act(x W_gate) * (x W_up): SwiGLU / GeGLU
    mlp_activation: str = "silu"  # "gelu" | "gelu_tanh" | "silu" | "relu"
    mlp_bias: bool = False

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
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
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
        if self.position == "rope":
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
                rs.kind == "linear" or rs.original_max_seq_len,
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
        for name in ("attn_softcap", "logit_softcap"):
            value = getattr(self, name)
            check(value is None or value > 0, f"{name} must be positive or None, got {value}")

    # --- derived quantities ----------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
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
