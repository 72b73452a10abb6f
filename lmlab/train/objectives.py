"""Objectives for the one training loop: `(model, batch) -> (loss, metrics)`.

An objective says what is learned from a batch; the loop (train/loop.py) does the rest. The
loss it returns is a mean over the batch's target tokens, which the loop divides by the number
of accumulated micro-batches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..data.loader import Batch, document_causal_mask
from ..model.moe import router_metric_tensors


def next_token(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
    """Pretraining: the mean cross-entropy of predicting each next token,

        L = -1/N sum_t log p(y_t | x_<=t),   y_t = x_{t+1}

    With document masking (batch.doc_ids set), each token attends only to earlier tokens of its
    own document and positions restart at every document start. A mixture-of-experts model's loss includes
    its auxiliary losses, and its router statistics (moe/load_max, moe/entropy, ...: model/moe.py) are the
    metrics; other models have none."""
    mask = None if batch.doc_ids is None else document_causal_mask(batch.doc_ids)
    out = model(batch.x, targets=batch.y, positions=batch.positions, attention_mask=mask, return_logits=False)
    return out.loss, router_metric_tensors(model)
