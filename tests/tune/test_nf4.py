"""NF4 (QLoRA's 4-bit NormalFloat): the code book against the published table and its quantile derivation,
round-trip error bounds, the packed size, the frozen 4-bit linear layer under autograd, a LoRA adapter
training on a 4-bit base, and the memory a quantized model takes against the same model in bf16."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.model import ModelConfig, build_model
from lmlab.tune.adapters import ADAPTER_MARKERS, AdapterConfig, apply_adapter, count_parameters
from lmlab.tune.nf4 import (
    DQ_BLOCK,
    NF4_CODE,
    Linear4bit,
    dequantize_nf4,
    model_nbytes,
    nf4_code,
    nf4_nbytes,
    quantize_nf4,
)

# The NF4 table as published with QLoRA (bitsandbytes' NF4 lookup table), written out independently here.
PUBLISHED = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]
CODE = torch.tensor(NF4_CODE, dtype=torch.float32)
MAX_GAP = float((CODE[1:] - CODE[:-1]).max())  # 0.3038, between -1 and -0.696


def unpack(q) -> torch.Tensor:
    """The 4-bit code indices, in element order (first element in the high nibble), without the padding."""
    idx = torch.stack([q.codes >> 4, q.codes & 15], dim=1).reshape(-1).long()
    return idx[: q.numel]


def true_absmax(w: torch.Tensor, block: int) -> torch.Tensor:
    flat = w.reshape(-1).float()
    flat = F.pad(flat, (0, -flat.numel() % block))
    return flat.view(-1, block).abs().amax(dim=1)


def per_element(values: torch.Tensor, block: int, numel: int) -> torch.Tensor:
    return values.repeat_interleave(block)[:numel]


# --- the code book ----------------------------------------------------------------------------
def test_code_book_is_the_published_table():
    assert len(NF4_CODE) == 16
    assert list(NF4_CODE) == PUBLISHED
    assert all(a < b for a, b in zip(NF4_CODE, NF4_CODE[1:], strict=False))  # sorted, distinct
    assert NF4_CODE[0] == -1.0 and NF4_CODE[-1] == 1.0 and NF4_CODE[7] == 0.0
    assert sum(c > 0 for c in NF4_CODE) == 8 and sum(c < 0 for c in NF4_CODE) == 7  # asymmetric: exact zero


def test_quantile_derivation_reproduces_the_table():
    derived = nf4_code()
    assert derived.shape == (16,) and derived.dtype == torch.float64
    # the published values were computed in float32 (one float32 ulp near 0.7 is 6e-8)
    assert (derived - torch.tensor(PUBLISHED, dtype=torch.float64)).abs().max() < 1.5e-7
    # and it is not a coincidence of the normalization: the raw positive quantiles are N(0,1)'s
    p = torch.tensor([0.9677083, 0.5], dtype=torch.float64)
    assert torch.special.ndtri(p)[0] == pytest.approx(1.848, abs=1e-3)


# --- quantization ----------------------------------------------------------------------------
def test_each_weight_gets_its_nearest_code_packed_high_nibble_first():
    w = torch.randn(37, 64, generator=torch.Generator().manual_seed(0))
    q = quantize_nf4(w, block=64, double_quant=False)
    normed = w.reshape(-1) / per_element(q.absmax, 64, w.numel())
    brute = (normed[:, None] - CODE[None, :]).abs().argmin(dim=1)
    assert torch.equal(unpack(q), brute)
    # the absmax is exactly each block's max |w| (here, one block per row)
    assert torch.equal(q.absmax, w.abs().amax(dim=1))


def test_ties_go_to_the_lower_code():
    midpoints = (CODE[:-1] + CODE[1:]) / 2
    w = torch.cat([torch.tensor([1.0]), midpoints, torch.zeros(64 - 16)])  # absmax 1: w / absmax is w itself
    idx = unpack(quantize_nf4(w, block=64, double_quant=False))
    assert idx[0] == 15
    assert torch.equal(idx[1:16], torch.arange(15))  # midpoint i lies between codes i and i + 1: code i


@pytest.mark.parametrize("double_quant", [False, True])
def test_round_trip_error_bounds_on_gaussian_weights(double_quant):
    torch.manual_seed(0)
    w = torch.randn(512, 512) * 0.02
    block = 64
    q = quantize_nf4(w, block=block, double_quant=double_quant)
    w_hat = dequantize_nf4(q)
    assert w_hat.shape == w.shape and w_hat.dtype == torch.float32

    a = true_absmax(w, block)
    a_hat = q.block_absmax()
    absmax_err = (a_hat - a).abs()
    if double_quant:
        # linear int8 on absmax - mean, per 256 blocks: off by at most max|absmax - mean| / 254 in its group
        centred = F.pad(a - a.mean(), (0, -a.numel() % DQ_BLOCK)).view(-1, DQ_BLOCK).abs().amax(dim=1)
        bound = per_element(centred / 254, DQ_BLOCK, a.numel())
        assert (absmax_err <= bound * (1 + 1e-5) + 1e-9).all()
        assert absmax_err.max() > 0  # the absmaxes really were quantized
        assert (absmax_err / a).max() < 0.01  # about 0.2% here: DQ costs little
    else:
        assert torch.equal(a_hat, a)

    # each weight: half the widest code gap times its block's absmax, plus what DQ moved the absmax
    err = (w_hat - w).abs().reshape(-1)
    bound = MAX_GAP / 2 * per_element(a, block, w.numel()) + per_element(absmax_err, block, w.numel())
    assert (err <= bound * (1 + 1e-5)).all()
    # mean error in units of the standard deviation: 0.073 for NF4 at block 64 (measured), ...
    mae = err.mean().item() / 0.02
    assert mae < 0.075
    # ... better than a linear 4-bit code (15 levels, same absmax blocks) on the normal weights NF4 is built for
    blocks = w.view(-1, block)
    scale = blocks.abs().amax(dim=1, keepdim=True) / 7
    int4 = (torch.round(blocks / scale) * scale - blocks).abs().mean().item() / 0.02
    assert mae < 0.85 * int4


def test_representable_values_round_trip_exactly():
    gen = torch.Generator().manual_seed(1)
    block = 64
    # every block holds the 16 code values (so -1 and 1 too) in random order, times a power-of-two scale
    rows = [CODE.repeat(4)[torch.randperm(block, generator=gen)] for _ in range(300)]
    scales = 2.0 ** torch.randint(-8, 3, (300, 1), generator=gen).float()
    w = torch.stack(rows) * scales
    q = quantize_nf4(w, block=block, double_quant=False)
    assert torch.equal(dequantize_nf4(q), w)
    # with double quantization, equal absmaxes are stored exactly (as their mean, with scale 0)
    w_same = torch.stack(rows) * 0.25
    assert torch.equal(dequantize_nf4(quantize_nf4(w_same, block=block, double_quant=True)), w_same)
    # zeros stay exactly zero, an all-zero tensor included
    z = torch.zeros(3, 50)
    assert torch.equal(dequantize_nf4(quantize_nf4(z)), z)


@pytest.mark.parametrize(("shape", "block", "double_quant"), [
    ((3, 5), 64, True), ((7, 9), 4, False), ((64 * 300 + 17,), 64, True), ((2, 3, 37), 16, True),
])
def test_sizes_that_are_not_a_multiple_of_the_block(shape, block, double_quant):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    q = quantize_nf4(w, block=block, double_quant=double_quant)
    w_hat = dequantize_nf4(q)
    assert w_hat.shape == w.shape
    n_blocks = -(-w.numel() // block)
    assert q.codes.numel() == n_blocks * block // 2
    assert q.nbytes() == nf4_nbytes(w.numel(), block, double_quant)
    a = true_absmax(w, block)
    err = (w_hat - w).abs().reshape(-1)
    slack = per_element((q.block_absmax() - a).abs(), block, w.numel())
    assert (err <= MAX_GAP / 2 * per_element(a, block, w.numel()) + slack + 1e-6).all()
    # the zero padding is coded as 0.0 (index 7), so it could never leak into a neighbouring block's absmax
    padding = torch.stack([q.codes >> 4, q.codes & 15], dim=1).reshape(-1)[w.numel():]
    assert (padding == 7).all()


def test_packed_size_is_the_formula_about_4_5_and_4_127_bits_per_weight():
    w = torch.randn(1024, 1024)
    plain, dq = quantize_nf4(w, 64, double_quant=False), quantize_nf4(w, 64, double_quant=True)
    n = w.numel()
    assert plain.nbytes() == n // 2 + 4 * (n // 64)  # 4 bits + a float32 per 64
    assert dq.nbytes() == n // 2 + n // 64 + 4 * (n // 64 // 256) + 4  # 4 bits + an int8 per 64 + a float32 per 256
    assert 8 * plain.nbytes() / n == 4.5
    assert 8 * dq.nbytes() / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)  # 4.127


def test_other_dtypes():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    q = quantize_nf4(w)
    assert torch.equal(q.codes, quantize_nf4(w.float()).codes)
    assert torch.equal(dequantize_nf4(q, torch.bfloat16), dequantize_nf4(q).to(torch.bfloat16))


def test_mistakes_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="even number"):
        quantize_nf4(torch.randn(8, 8), block=5)
    with pytest.raises(TypeError, match="floating-point"):
        quantize_nf4(torch.ones(8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_nf4(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.zeros(0, 4))


# --- the layer ---------------------------------------------------------------------------------
def make_layer(bias: bool = True, seed: int = 0, **kwargs) -> tuple[nn.Linear, Linear4bit]:
    torch.manual_seed(seed)
    linear = nn.Linear(96, 40, bias=bias)
    return linear, Linear4bit.from_linear(linear, **kwargs)


@pytest.mark.parametrize("bias", [True, False])
def test_linear4bit_is_f_linear_with_the_dequantized_weight(bias):
    linear, layer = make_layer(bias)
    x = torch.randn(3, 7, 96)
    w = layer.dequantize()
    assert w.shape == (40, 96)
    assert torch.equal(w, dequantize_nf4(quantize_nf4(linear.weight)))
    assert torch.allclose(layer(x), F.linear(x, w, linear.bias), atol=1e-6, rtol=0)
    # and close to the unquantized layer: the error of 4-bit weights, relative to the output's size
    rel = (layer(x) - linear(x)).norm() / linear(x).norm()
    assert 0.01 < rel < 0.15


def test_gradients_reach_the_input_never_the_4bit_weight():
    linear, layer = make_layer()
    assert not any(p.requires_grad for p in layer.parameters())
    x = torch.randn(5, 96, requires_grad=True)
    g = torch.randn(5, 40)
    (layer(x) * g).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (F.linear(x_ref, layer.dequantize(), linear.bias) * g).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6, rtol=0)
    assert all(b.grad is None for b in layer.buffers()) and layer.bias.grad is None
    for name, _ in (*layer.named_buffers(), *layer.named_parameters()):
        assert not any(marker in name for marker in ADAPTER_MARKERS)  # never taken for adapter tensors


def test_backward_keeps_only_the_packed_weight():
    """What autograd saves for backward: the input at most, never a (out, in) dequantized weight."""
    _, layer = make_layer()
    saved = []
    x = torch.randn(5, 96, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        layer(x).pow(2).sum().backward()
    assert (5, 40) in saved  # the hook does see what is saved: pow's input, the layer's output
    assert all(torch.Size(shape).numel() != 40 * 96 for shape in saved)  # W, in neither orientation


def test_compute_dtype_and_moves_keep_the_constants():
    linear, layer = make_layer(compute_dtype=torch.bfloat16)
    x = torch.randn(4, 96)
    y = layer(x)
    assert y.dtype == torch.float32  # returned in the input's dtype
    assert torch.equal(y, y.bfloat16().float())  # computed in bf16: every output is a bf16 number
    reference = F.linear(x, layer.dequantize(torch.float32), linear.bias)
    assert torch.allclose(y, reference, rtol=2e-2, atol=2e-2) and not torch.equal(y, reference)
    w = layer.dequantize(torch.float32)
    layer.to(torch.bfloat16)  # the float32 absmax constants are not rounded to 16 bits
    assert layer.weight_absmax_scale.dtype == torch.float32 and layer.weight_absmax_offset.dtype == torch.float32
    assert torch.equal(layer.dequantize(torch.float32), w)


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trip_into_a_fresh_layer(double_quant):
    _, layer = make_layer(block=32, double_quant=double_quant)
    fresh = Linear4bit(96, 40, bias=True, block=32, double_quant=double_quant)
    assert torch.equal(fresh.dequantize(), torch.zeros(40, 96))  # the empty layout stands for zeros
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(2, 96)
    assert torch.equal(fresh(x), layer(x))
    assert layer.logical_numel() == 40 * 96
    assert layer.nbytes() == nf4_nbytes(40 * 96, 32, double_quant) + 40 * 4


# --- whole models --------------------------------------------------------------------------------
def tiny_transformer(seed: int = 0, dtype: torch.dtype = torch.float32, **changes):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)
    cfg.update(changes)
    return build_model(ModelConfig(**cfg), dtype=dtype)


PROJECTIONS = ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
               "mlp.down_proj"]


def test_quantize_linears_replaces_every_projection_and_nothing_else():
    from lmlab.tune.nf4 import quantize_linears

    model = tiny_transformer()
    reference = copy.deepcopy(model)
    names = quantize_linears(model, ["all-linear"])
    assert names == [f"blocks.{i}.{p}" for i in range(2) for p in PROJECTIONS]
    assert all(isinstance(model.get_submodule(n), Linear4bit) for n in names)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.embed, nn.Embedding)
    assert quantize_linears(model, ["all-linear"]) == []  # already done: nothing left to replace
    assert count_parameters(model).total == count_parameters(reference).total  # logical sizes
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids).logits, reference(ids).logits
    assert (got - want).norm() / want.norm() < 0.1
    only_q = tiny_transformer()
    assert quantize_linears(only_q, [r"blocks\.1\.attn\.q_proj"]) == ["blocks.1.attn.q_proj"]


def test_gradients_flow_through_4bit_layers_to_what_comes_before():
    """Train only the first layer's norm of a quantized model: its gradient has to pass backward through
    every 4-bit projection above it. The loss falls; the 4-bit weights do not move."""
    from lmlab.tune.nf4 import quantize_linears

    model = tiny_transformer()
    quantize_linears(model, ["all-linear"])
    model.requires_grad_(False)
    trainable = list(model.blocks[0].attn_norm.parameters())
    for p in trainable:
        p.requires_grad_(True)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "blocks.0.attn_norm" not in k}
    losses = train(model, trainable, steps=30, lr=3e-2)
    assert losses[-1] < losses[0] - 0.05
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k


def train(model: nn.Module, params: list, steps: int, lr: float) -> list[float]:
    """Overfit one fixed batch: a pattern the model can learn fast."""
    ids = torch.arange(33).remainder(12)[None].repeat(4, 1) + torch.arange(4)[:, None]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_qlora_trains_only_the_adapters():
    model = tiny_transformer()
    apply_adapter(model, AdapterConfig(method="lora", r=4, alpha=8, quantize="nf4"))
    quantized = [n for n, m in model.named_modules() if isinstance(m, Linear4bit)]
    assert len(quantized) == 2 * len(PROJECTIONS)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = train(model, list(trainable.values()), steps=30, lr=1e-2)
    assert losses[-1] < losses[0] - 0.2
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any(".lora_A." in k for k in changed) and any(".lora_B." in k for k in changed)


def test_memory_of_a_quantized_model_against_bf16():
    model16 = tiny_transformer(dtype=torch.bfloat16, d_model=128, d_ff=384, vocab_size=256)
    from lmlab.tune.nf4 import quantize_linears

    quantized = copy.deepcopy(model16)
    names = quantize_linears(quantized, ["all-linear"])
    weights = {n: model16.get_submodule(n).weight.numel() for n in names}
    layers_bf16 = 2 * sum(weights.values())
    layers_nf4 = sum(quantized.get_submodule(n).nbytes() for n in names)
    assert layers_nf4 == sum(nf4_nbytes(n, 64, True) for n in weights.values())  # no biases in this model
    assert layers_nf4 / layers_bf16 < 0.3  # 4.127 / 16 = 0.258, plus the partial last DQ group of each layer
    rest = model_nbytes(model16) - layers_bf16  # embeddings, head and norms stay as they were
    assert model_nbytes(quantized) == rest + layers_nf4
    assert model_nbytes(quantized) < model_nbytes(model16)
