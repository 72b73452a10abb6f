"""State-space layers (model/ssm.py): the chunked scans equal the recurrence they unroll, for every chunk
size; gradients are right; decoding with the cache, padding on either side and holes in the middle give
what the full forward pass of each row alone gives; the init is the reference one, on the meta device too.
"""

from __future__ import annotations

import math

import pytest
import torch

from lmlab.model import ModelConfig, build_model
from lmlab.model.cache import KVCache
from lmlab.model.config import SSMConfig
from lmlab.model.ssm import (
    Mamba,
    Mamba2,
    causal_conv1d,
    segsum,
    selective_scan,
    selective_scan_step,
    ssd_chunked,
    ssd_step,
)

V = 61
F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- references written from the papers' recurrences, one token at a time ---------------------


def naive_mamba(x, dt, A, B, C, h):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t;  y_t = h_t C_t  (Gu & Dao 2023, eq. 2a/2b + ZOH)."""
    ys = []
    for t in range(x.shape[1]):
        dA = torch.exp(dt[:, t, :, None] * A[None])  # (b, d, n)
        h = dA * h + dt[:, t, :, None] * x[:, t, :, None] * B[:, t, None, :]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
    return torch.stack(ys, 1), h


def naive_ssd(x, dt, A, B, C, h):
    """The same with a scalar A per head and B, C shared by the heads of a group (Dao & Gu 2024)."""
    heads, groups = x.shape[2], B.shape[2]
    group_of = torch.arange(heads) // (heads // groups)
    ys = []
    for t in range(x.shape[1]):
        Bt, Ct = B[:, t, group_of], C[:, t, group_of]  # (b, h, n)
        h = torch.exp(dt[:, t] * A)[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bt[:, :, None]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ct))
    return torch.stack(ys, 1), h


def mamba_inputs(b=2, T=13, d=5, n=3, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, T, d, generator=g, dtype=dtype),
            torch.rand(b, T, d, generator=g, dtype=dtype) * 0.5,  # dt > 0
            -torch.rand(d, n, generator=g, dtype=dtype) * 3 - 0.1,  # A < 0
            torch.randn(b, T, n, generator=g, dtype=dtype),
            torch.randn(b, T, n, generator=g, dtype=dtype),
            torch.randn(b, d, n, generator=g, dtype=dtype))


def ssd_inputs(b=2, T=13, h=4, p=3, g=2, n=3, dtype=F64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, T, h, p, generator=gen, dtype=dtype),
            torch.rand(b, T, h, generator=gen, dtype=dtype) * 0.5,
            -torch.rand(h, generator=gen, dtype=dtype) * 3 - 0.1,
            torch.randn(b, T, g, n, generator=gen, dtype=dtype),
            torch.randn(b, T, g, n, generator=gen, dtype=dtype),
            torch.randn(b, h, p, n, generator=gen, dtype=dtype))


def close(a, b, tol=1e-10):
    return (a - b).abs().max().item() <= tol


# --- the scans ------------------------------------------------------------------------------------


def test_segsum_is_the_sum_over_each_segment():
    a = torch.randn(6, dtype=F64)
    S = segsum(a)
    for t in range(6):
        for s in range(6):
            want = a[s + 1:t + 1].sum().item() if s <= t else -math.inf
            assert S[t, s].item() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("chunk", [1, 3, 4, 13, 32])  # 3 and 4 do not divide T = 13
def test_selective_scan_chunked_equals_recurrent(chunk):
    x, dt, A, B, C, h0 = mamba_inputs()
    y_ref, h_ref = naive_mamba(x, dt, A, B, C, h0)
    y, h = selective_scan(x, dt, A, B, C, h0, chunk)
    assert close(y, y_ref) and close(h, h_ref)
    h, ys = h0, []
    for t in range(x.shape[1]):  # the decoding step, token by token
        y_t, h = selective_scan_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], h)
        ys.append(y_t)
    assert close(torch.stack(ys, 1), y_ref) and close(h, h_ref)


@pytest.mark.parametrize("chunk", [1, 3, 5, 13, 32])
def test_ssd_chunked_equals_recurrent(chunk):
    x, dt, A, B, C, h0 = ssd_inputs()
    y_ref, h_ref = naive_ssd(x, dt, A, B, C, h0)
    y, h = ssd_chunked(x, dt, A, B, C, h0, chunk)
    assert close(y, y_ref) and close(h, h_ref)
    h, ys = h0, []
    for t in range(x.shape[1]):
        y_t, h = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], h)
        ys.append(y_t)
    assert close(torch.stack(ys, 1), y_ref) and close(h, h_ref)


def test_ssd_is_mamba_with_one_decay_per_channel():
    """Two implementations, one special case: Mamba with A[d, :] constant is SSD with one channel per head."""
    x, dt, A, B, C, h0 = mamba_inputs()
    A = A[:, :1].expand_as(A).contiguous()
    y1, h1 = selective_scan(x, dt, A, B, C, h0, 4)
    y2, h2 = ssd_chunked(x[..., None], dt, A[:, 0], B[:, :, None], C[:, :, None], h0[:, :, None], 4)
    assert close(y1, y2[..., 0]) and close(h1, h2[:, :, 0])


def test_long_chunks_stay_finite():
    """Large dt * |A| over a chunk: the segment sums never exponentiate a positive number."""
    x, dt, A, B, C, h0 = mamba_inputs(dtype=torch.float32)
    y, h = selective_scan(x, dt * 50, A * 20, B, C, h0, 13)
    y_ref, h_ref = naive_mamba(x, dt * 50, A * 20, B, C, h0)
    assert torch.isfinite(y).all() and close(y, y_ref, 1e-4) and close(h, h_ref, 1e-4)


def test_selective_scan_gradients():
    x, dt, A, B, C, h0 = (t.requires_grad_() for t in mamba_inputs(b=1, T=5, d=2, n=2))
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, 2), (x, dt, A, B, C, h0))
    y, h = selective_scan(x, dt, A, B, C, h0, 2)
    y_ref, h_ref = naive_mamba(x, dt, A, B, C, h0)
    w_y, w_h = torch.randn_like(y), torch.randn_like(h)
    grads = torch.autograd.grad((y * w_y).sum() + (h * w_h).sum(), (x, dt, A, B, C, h0))
    grads_ref = torch.autograd.grad((y_ref * w_y).sum() + (h_ref * w_h).sum(), (x, dt, A, B, C, h0))
    assert all(close(g, r) for g, r in zip(grads, grads_ref, strict=True))


def test_ssd_gradients():
    x, dt, A, B, C, h0 = (t.requires_grad_() for t in ssd_inputs(b=1, T=5, h=2, p=2, g=1, n=2))
    assert torch.autograd.gradcheck(lambda *a: ssd_chunked(*a, 2), (x, dt, A, B, C, h0))
    y, h = ssd_chunked(x, dt, A, B, C, h0, 2)
    y_ref, h_ref = naive_ssd(x, dt, A, B, C, h0)
    w_y, w_h = torch.randn_like(y), torch.randn_like(h)
    grads = torch.autograd.grad((y * w_y).sum() + (h * w_h).sum(), (x, dt, A, B, C, h0))
    grads_ref = torch.autograd.grad((y_ref * w_y).sum() + (h_ref * w_h).sum(), (x, dt, A, B, C, h0))
    assert all(close(g, r) for g, r in zip(grads, grads_ref, strict=True))


def test_causal_conv_over_real_tokens_only():
    """With padding anywhere, each real token's output and the final window are those of the row's real
    inputs convolved alone."""
    g = torch.Generator().manual_seed(0)
    C_, K, T = 3, 4, 9
    w, bias = torch.randn(C_, 1, K, generator=g), torch.randn(C_, generator=g)
    state = torch.randn(2, C_, K - 1, generator=g)
    x = torch.randn(2, C_, T, generator=g)
    valid = torch.tensor([[0, 0, 1, 1, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    out, new = causal_conv1d(x, state, w, bias, valid)
    for r in range(2):
        real = x[r:r + 1, :, valid[r]]
        alone, alone_state = causal_conv1d(real, state[r:r + 1], w, bias)
        assert torch.allclose(out[r:r + 1, :, valid[r]], alone, atol=1e-6)
        assert torch.equal(new[r:r + 1], alone_state)
    seq = torch.cat((state, x), -1)  # without padding: a plain causal convolution over state + x
    out, new = causal_conv1d(x, state, w, bias)
    assert torch.allclose(out, torch.nn.functional.conv1d(seq, w, bias, groups=C_), atol=1e-6)
    assert torch.equal(new, x[..., -(K - 1):])


# --- the layers inside a model ---------------------------------------------------------------------


def tiny(kind: str, seed: int = 0, **ssm) -> torch.nn.Module:
    torch.manual_seed(seed)
    s = dict(kind=kind, d_state=8, chunk_size=4)
    if kind == "mamba2":
        s.update(head_dim=8, n_groups=2)
    s.update(ssm)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, layer_types=["mamba"] * 2, position="none",
                      max_seq_len=64, init_std=0.1, ssm=SSMConfig(**s))
    model = build_model(cfg).eval()
    with torch.no_grad():  # away from the init's symmetries (D = 1, norms at 1), so wiring mistakes show
        for name, p in model.named_parameters():
            if name.endswith(("D", "norm.weight", "bias", "A_log")):
                p.add_(torch.randn_like(p) * 0.2)
            if name.endswith(("dt_proj.bias", "dt_bias")):
                p.add_(2.0)  # dt ~ 0.1-1 rather than 0.001-0.1: each token moves the state visibly
    return model


def ids_of(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


KINDS = ["mamba", "mamba2"]


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_then_decode_equals_full_forward(kind):
    model, ids = tiny(kind), ids_of(2, 19)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2, 19)
        parts = [model(ids[:, :11], cache=cache).logits]  # 11 tokens: three chunks of 4, the last short
        parts += [model(ids[:, t:t + 1], cache=cache).logits for t in range(11, 19)]
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_size_does_not_change_the_model(kind):
    a, b = tiny(kind, chunk_size=3), tiny(kind, chunk_size=64)
    b.load_state_dict(a.state_dict())
    ids = ids_of(2, 17)
    with torch.no_grad():
        assert (a(ids).logits - b(ids).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_rows_equal_rows_alone(kind):
    model = tiny(kind)
    lengths, new = [5, 12, 17], 4
    rows = [ids_of(1, n, seed=n)[0] for n in lengths]
    T = max(lengths)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    nxt = ids_of(3, new, seed=9)
    with torch.no_grad():
        cache = model.new_cache(3, T + new)
        out = model(ids, cache=cache, attention_mask=mask).logits
        steps = [model(nxt[:, j:j + 1], cache=cache).logits for j in range(new)]
        nocache = model(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = model(torch.cat((r, nxt[i]))[None]).logits[0]
            n = len(r)
            assert (out[i, T - n:] - alone[:n]).abs().max().item() < 1e-5
            assert (nocache[i, T - n:] - alone[:n]).abs().max().item() < 1e-5
            got = torch.cat([s[i] for s in steps])
            assert (got - alone[n:]).abs().max().item() < 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_right_padding_and_holes_leave_the_state_unchanged(kind):
    """Rows feeding different numbers of tokens in one call (right padding), then going on: every real
    token's logits are those of the row's real tokens alone."""
    model = tiny(kind)
    ids = ids_of(2, 14, seed=3)
    feed = [(0, 6, [6, 6]), (6, 10, [4, 1]), (10, 11, [1, 1]), (11, 14, [2, 3])]  # (from, to, real per row)
    got = {0: [], 1: []}
    real = {0: [], 1: []}
    with torch.no_grad():
        cache = model.new_cache(2, 14)
        for a, b, n_real in feed:
            mask = torch.tensor([[j < n for j in range(b - a)] for n in n_real])
            logits = model(ids[:, a:b], cache=cache, attention_mask=mask).logits
            for r in range(2):
                got[r].append(logits[r, :n_real[r]])
                real[r].append(ids[r, a:a + n_real[r]])
        for r in range(2):
            alone = model(torch.cat(real[r])[None]).logits[0]
            assert (torch.cat(got[r]) - alone).abs().max().item() < 1e-5


@pytest.mark.parametrize("cls, kind", [(Mamba, "mamba"), (Mamba2, "mamba2")])
def test_padding_token_leaves_cached_state_exactly(cls, kind):
    model = tiny(kind)
    layer = model.blocks[0].attn
    assert isinstance(layer, cls)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    valid = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 0, 1, 0]], dtype=torch.bool)
    with torch.no_grad():
        padded = KVCache(model.cfg, 2, 8)
        layer(x, None, {"valid": valid}, padded)
        for r in range(2):
            alone = KVCache(model.cfg, 1, 8)
            layer(x[r:r + 1, valid[r]], None, {"valid": None}, alone)
            for name in ("conv", "ssm"):
                assert torch.allclose(padded.get_state(0)[name][r], alone.get_state(0)[name][0], atol=1e-6), name


@pytest.mark.parametrize("kind", KINDS)
def test_state_shapes_and_dtypes(kind):
    model = tiny(kind)
    cache = model.new_cache(2, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids_of(2, 6), cache=cache)
    state = cache.get_state(1)
    d_inner = 64
    if kind == "mamba":
        assert state["conv"].shape == (2, d_inner, 3) and state["ssm"].shape == (2, d_inner, 8)
    else:
        assert state["conv"].shape == (2, d_inner + 2 * 2 * 8, 3) and state["ssm"].shape == (2, 8, 8, 8)
    assert state["ssm"].dtype == torch.float32  # the state's sums stay float32 under mixed precision
    assert state["conv"].dtype == torch.bfloat16


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter(kind):
    model = tiny(kind).train()
    ids = ids_of(2, 10)
    loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", KINDS)
def test_meta_build_and_init(kind):
    cfg = tiny(kind).cfg
    torch.manual_seed(0)
    model = build_model(cfg, init=False)  # built on meta, materialized with garbage
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.init_weights()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), f"{name} was not initialized"
    s, layer = cfg.ssm, model.blocks[0].attn
    dt = torch.nn.functional.softplus(layer.dt_proj.bias if kind == "mamba" else layer.dt_bias)
    assert (dt >= s.dt_min * 0.999).all() and (dt <= s.dt_max * 1.001).all()
    assert dt.std() > 0  # drawn, not constant
    assert torch.equal(layer.D, torch.ones_like(layer.D))
    if kind == "mamba":
        assert torch.allclose(-torch.exp(layer.A_log), -torch.arange(1.0, 9.0).expand(64, 8))  # S4D-real
        assert layer.dt_proj.weight.abs().max() <= s.dt_rank**-0.5
    else:
        A = torch.exp(layer.A_log)
        assert ((A >= 1) & (A <= 16)).all()
        assert torch.equal(layer.norm.weight, torch.ones_like(layer.norm.weight))
    assert layer.conv1d.weight.abs().max() <= s.d_conv**-0.5  # PyTorch's conv init: U(+-1/sqrt(fan_in))
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    assert layer.out_proj.weight.std().item() == pytest.approx(residual_std, rel=0.2)


def test_config_resolves_and_validates():
    cfg = ModelConfig(d_model=40, n_heads=5, n_layers=2, layer_types=["mamba", "full"])
    assert cfg.ssm.kind == "mamba" and cfg.ssm.dt_rank == 3 and cfg.ssm.chunk_size == 8
    assert ModelConfig(d_model=64, n_layers=1, layer_types=["mamba"], ssm={"kind": "mamba2"}).ssm.chunk_size == 64
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="ssm.kind='s4'"):
        ModelConfig(n_layers=1, layer_types=["mamba"], ssm={"kind": "s4"})
    with pytest.raises(ValueError, match="ssm.head_dim=48 must divide d_inner"):
        ModelConfig(d_model=64, n_layers=1, layer_types=["mamba"], ssm={"kind": "mamba2", "head_dim": 48})
    with pytest.raises(ValueError, match="ssm.n_groups=3 must divide the 2 SSM heads"):
        ModelConfig(d_model=64, n_layers=1, layer_types=["mamba"], ssm={"kind": "mamba2", "n_groups": 3})
    with pytest.raises(ValueError, match="dt_min <= dt_max"):
        ModelConfig(n_layers=1, layer_types=["mamba"], ssm={"dt_min": 0.5, "dt_max": 0.1})
    with pytest.raises(ValueError, match="unknown ssm fields"):
        ModelConfig(n_layers=1, layer_types=["mamba"], ssm={"state": 4})
