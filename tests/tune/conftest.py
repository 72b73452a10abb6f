"""Fixtures shared by the adapter tests: a tiny Hugging Face Llama on disk (the PEFT parity tests' common base)
and a few Adam steps (the "gradients reach only the adapter, and a step learns" tests)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn


@pytest.fixture(scope="session")
def save_tiny_llama(tmp_path_factory) -> Callable[..., Path]:
    """A function (folder name, **LlamaConfig settings) -> the directory of a tiny Hugging Face Llama built with
    seed 0 and saved there, its RMSNorm weights moved off 1 so that they are distinctive too."""
    transformers = pytest.importorskip("transformers")

    def save(name: str, **config) -> Path:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
        with torch.no_grad():
            for param_name, p in model.named_parameters():
                if "norm" in param_name:
                    p.add_(torch.randn_like(p) * 0.1)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        return path

    return save


@pytest.fixture
def adam_steps() -> Callable[..., list[float]]:
    """A function (model, ids, targets, steps=5, lr=1e-2) -> the losses of `steps` Adam steps on the model's
    trainable parameters; the last step's gradients stay on the parameters, for the test to inspect."""

    def run(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor, steps: int = 5, lr: float = 1e-2):
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            loss = model(ids, targets).loss
            loss.backward()
            losses.append(loss.item())
            opt.step()
        return losses

    return run
