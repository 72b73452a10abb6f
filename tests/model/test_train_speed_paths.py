"""The training fast path (`forward(..., return_logits=False)`, the chunked loss of model/loss.py)
against transformers' LlamaForCausalLM loss and gradients, and its edge cases: ignored targets,
frozen parameters, gradient accumulation, bfloat16, and the errors a caller can cause."""

from __future__ import annotations

import re
import tempfile

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lmlab.model.loss import linear_cross_entropy


def plain_loss(h, w, t, softcap=None):
    z = F.linear(h, w).float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return F.cross_entropy(z.flatten(0, -2), t.flatten(), ignore_index=-100)


def _hf_name(name: str) -> str:
    """lmlab parameter name -> LlamaForCausalLM's."""
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    if name == "lm_head.weight":
        return name
    name = re.sub(r"^blocks\.(\d+)\.", r"model.layers.\1.", name)
    return (name.replace(".attn.", ".self_attn.").replace(".attn_norm.", ".input_layernorm.")
            .replace(".mlp_norm.", ".post_attention_layernorm."))


@pytest.mark.parametrize("tie", [False, True])
def test_training_path_matches_transformers_loss_and_every_gradient(tie):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmlab.model.hub import load_hf

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=96, tie_word_embeddings=tie,
                      bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = LlamaForCausalLM(cfg).float()
    hf.config._attn_implementation = "sdpa"
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_hf(d, dtype=torch.float32)
    ids = torch.randint(0, 300, (3, 41))
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    y[1, :7] = -100  # e.g. a prompt masked out of the loss

    ref = hf(input_ids=x, labels=y, shift_labels=y).loss
    ref.backward()
    out = ours(x, targets=y, return_logits=False)
    out.loss.backward()

    assert out.logits is None
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    hf_params = dict(hf.named_parameters())
    names = [n for n, _ in ours.named_parameters()]
    assert ("lm_head.weight" in names) == (not tie)
    for name, p in ours.named_parameters():
        expected = hf_params[_hf_name(name)].grad
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")


def test_all_targets_ignored_gives_nan_loss_and_zero_gradients_like_cross_entropy():
    h = torch.randn(2, 5, 8, requires_grad=True)
    w = torch.randn(20, 8, requires_grad=True)
    t = torch.full((2, 5), -100)
    ref = plain_loss(h, w, t)
    ref_grads = torch.autograd.grad(ref, (h, w))
    loss = linear_cross_entropy(h, w, t, chunk_size=3)
    grads = torch.autograd.grad(loss, (h, w))
    assert torch.isnan(ref) and torch.isnan(loss)
    for got, expected in zip(grads, ref_grads, strict=True):
        assert torch.equal(got, expected) and not got.any()


@pytest.mark.parametrize("trainable", ["hidden", "head"])
def test_frozen_head_or_frozen_body_gets_no_gradient_and_the_other_the_right_one(trainable):
    """LoRA freezes the output head; a linear probe trains only the head."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 9, 16, generator=g, requires_grad=trainable == "hidden")
    w = torch.randn(33, 16, generator=g, requires_grad=trainable == "head")
    t = torch.randint(0, 33, (4, 9), generator=g)
    leaf = h if trainable == "hidden" else w
    (expected,) = torch.autograd.grad(plain_loss(h, w, t), (leaf,))
    linear_cross_entropy(h, w, t, chunk_size=5).backward()
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-5, atol=1e-7)
    assert (w if trainable == "hidden" else h).grad is None


def test_gradients_accumulate_over_micro_batches_as_with_the_plain_loss():
    g = torch.Generator().manual_seed(1)
    w_ref = torch.randn(40, 12, generator=g, requires_grad=True)
    w = w_ref.detach().clone().requires_grad_()
    batches = [(torch.randn(2, 6, 12, generator=g), torch.randint(0, 40, (2, 6), generator=g)) for _ in range(3)]
    for h, t in batches:
        (plain_loss(h, w_ref, t) / 3).backward()
        (linear_cross_entropy(h, w, t, chunk_size=4) / 3).backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-5, atol=1e-7)


def test_bfloat16_weights_give_bfloat16_gradients_close_to_the_plain_bfloat16_path():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(64, 32, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(500, 32, generator=g) * 0.2).bfloat16().requires_grad_()
    t = torch.randint(0, 500, (64,), generator=g)
    ref = plain_loss(h, w, t)
    ref_h, ref_w = torch.autograd.grad(ref, (h, w))
    loss = linear_cross_entropy(h, w, t, chunk_size=16)
    got_h, got_w = torch.autograd.grad(loss, (h, w))
    assert loss.dtype == torch.float32 and got_h.dtype == got_w.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)  # the same bf16 logits, float32 softmax
    torch.testing.assert_close(got_h, ref_h, rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(got_w, ref_w, rtol=2e-2, atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), vocab=st.integers(2, 70), chunk=st.integers(1, 50), seed=st.integers(0, 2**16),
       ignored=st.floats(0.0, 0.9), softcap=st.sampled_from([None, 3.0]))
def test_any_shape_chunking_and_masking_matches_cross_entropy(n, vocab, chunk, seed, ignored, softcap):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, 8, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, vocab, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignored] = -100
    t[0] = 0  # at least one counted token: the all-ignored case has its own test
    ref = plain_loss(h, w, t, softcap)
    ref_grads = torch.autograd.grad(ref * 0.5, (h, w))
    loss = linear_cross_entropy(h, w, t, softcap, chunk_size=chunk)
    grads = torch.autograd.grad(loss * 0.5, (h, w))
    torch.testing.assert_close(loss, ref.float(), rtol=1e-6, atol=1e-6)
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_without_grad_mode_only_the_loss_is_computed():
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    t = torch.randint(0, 30, (10,))
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t, chunk_size=3)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, plain_loss(h, w, t).detach())


@pytest.mark.parametrize("targets, message", [
    (torch.tensor([[1, 2, 3]]), "do not match"),  # wrong shape
    (torch.tensor([1, -5, 3, 4]), "outside the vocabulary"),  # negative, not the ignore index
    (torch.tensor([1, 2, 3, 10]), r"outside the vocabulary \[0, 10\)"),
])
def test_bad_targets_are_clear_errors(targets, message):
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), targets)


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, 4]), chunk_size=0)


def test_return_logits_false_without_targets_still_returns_the_logits():
    """Documents the contract: return_logits=False only changes anything when there is a loss."""
    from lmlab.model.config import ModelConfig
    from lmlab.model.transformer import build_model

    model = build_model(ModelConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, max_seq_len=16))
    ids = torch.randint(0, 50, (1, 5))
    out = model(ids, return_logits=False)
    assert out.loss is None and out.logits is not None and out.logits.shape == (1, 5, 50)


@pytest.mark.slow
def test_compiled_training_path_matches_eager():
    from lmlab.model.config import ModelConfig
    from lmlab.model.transformer import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=4, max_seq_len=32))
    ids = torch.randint(0, 128, (2, 17))
    x, y = ids[:, :-1], ids[:, 1:]
    eager = model(x, targets=y, return_logits=False).loss
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(model)(x, targets=y, return_logits=False).loss
    grads = torch.autograd.grad(compiled, list(model.parameters()))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
