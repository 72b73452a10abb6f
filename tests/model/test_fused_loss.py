"""The chunked, fused output-projection + cross-entropy loss equals the plain one, gradients included."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmlab.model.config import ModelConfig
from lmlab.model.loss import linear_cross_entropy
from lmlab.model.transformer import build_model


def plain(h, w, t, softcap=None):
    z = F.linear(h, w).float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z.flatten(0, -2), t.flatten(), ignore_index=-100)


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_loss_and_both_gradients_match_the_plain_loss(softcap, chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 11, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (3, 11), generator=g)
    t[0, :4] = -100  # ignored targets
    ref = plain(h, w, t, softcap)
    gh, gw = torch.autograd.grad(ref * 3.0, (h, w))  # an upstream factor, as loss / grad_accum gives
    got = linear_cross_entropy(h, w, t, softcap, chunk_size=chunk)
    fh, fw = torch.autograd.grad(got * 3.0, (h, w))
    torch.testing.assert_close(got, ref.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fh, gh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fw.double(), gw, rtol=1e-5, atol=1e-7)


def test_model_training_path_matches_the_logits_path():
    cfg = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                      tie_embeddings=True, logit_softcap=30.0)
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, 97, (2, 20))
    targets = torch.roll(ids, -1, 1)
    ref = model(ids, targets=targets).loss
    grads_ref = torch.autograd.grad(ref, list(model.parameters()))
    out = model(ids, targets=targets, return_logits=False)
    assert out.logits is None
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    torch.testing.assert_close(out.loss, ref, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # evaluation: loss only, no gradient work
        torch.testing.assert_close(model(ids, targets=targets, return_logits=False).loss, ref.detach())


def test_out_of_vocabulary_target_is_a_clear_error():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        linear_cross_entropy(h, w, torch.tensor([1, 2, 10, 3]))
