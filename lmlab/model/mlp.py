"""The feed-forward sublayer: a plain two-layer MLP, or a gated one (GLU variants, Shazeer 2020).

Gated: down(act(x W_gate) * (x W_up)); with SiLU this is SwiGLU (Llama, Mistral, Qwen), with GELU
GeGLU (Gemma). Plain: down(act(x W_up)) (GPT-2 with tanh-approximated GELU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

ACTIVATION_FNS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.act = ACTIVATION_FNS[cfg.mlp_activation]
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias) if cfg.mlp_gated else None
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is not None:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(self.act(self.up_proj(x)))
