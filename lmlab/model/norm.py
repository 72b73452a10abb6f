"""Normalization layers: LayerNorm (Ba et al. 2016) and RMSNorm (Zhang & Sennrich 2019).

Both are computed in float32 whatever the activation dtype (statistics of bf16 activations are
too coarse), and both can scale by `1 + weight` instead of `weight` (Gemma), which keeps the
identity at initialization with the weight at zero, where weight decay pulls it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


class Norm(nn.Module):
    def __init__(self, dim: int, kind: str = "rmsnorm", eps: float = 1e-5, bias: bool = False,
                 unit_offset: bool = False):
        super().__init__()
        self.kind, self.eps, self.unit_offset = kind, eps, unit_offset
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias and kind == "layernorm" else None
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: ModelConfig, dim: int | None = None) -> Norm:
        return cls(dim or cfg.d_model, cfg.norm, cfg.norm_eps, cfg.norm_bias, cfg.norm_unit_offset)

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 0.0 if self.unit_offset else 1.0)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float()
        if self.unit_offset:
            weight = weight + 1.0
        shape = (x.shape[-1],)
        if self.kind == "rmsnorm":
            y = F.rms_norm(x.float(), shape, weight, self.eps)
        else:
            bias = None if self.bias is None else self.bias.float()
            y = F.layer_norm(x.float(), shape, weight, bias, self.eps)
        return y.type_as(x)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, kind={self.kind}, eps={self.eps}, unit_offset={self.unit_offset}"
