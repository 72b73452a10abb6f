"""Linear attention (model/linear_attention.py) against its oracles: a naive O(T^2) evaluation of
y_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps), the chunked and recurrent forms against it and each
other, cached decoding against the full forward pass, padding that leaves the state untouched, a
state whose size does not depend on the context, gradients, init on the meta device, and a hybrid
model through the training loop and a checkpoint round trip."""

from __future__ import annotations

import pytest
import torch

from lmlab.infer.generate import generate
from lmlab.infer.sampling import SamplingParams
from lmlab.model import KVCache, ModelConfig, build_model, load_checkpoint, save_checkpoint
from lmlab.model.linear_attention import (
    LinearAttention,
    chunked_linear_attention,
    recurrent_linear_attention,
)

BASE = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64, init_std=0.1)
VARIANTS = {
    "hybrid_elu": dict(layer_types=["linear", "full"], linear_attention={"chunk_size": 4}),
    "linear_relu_mqa": dict(layer_types=["linear", "linear"], n_kv_heads=1,
                            linear_attention={"feature_map": "relu", "chunk_size": 3}),
    "linear_identity_unnormalized": dict(layer_types=["full", "linear"],
                                         linear_attention={"feature_map": "identity", "normalize": False,
                                                           "chunk_size": 5}),
}


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(**{**BASE, **VARIANTS[name]})).eval()


def quadratic_reference(q, k, v, S0, z0, normalize=True, eps=1e-6):
    """The definition, term by term: weights w_ts = phi(q_t).phi(k_s) for s <= t, plus the initial state."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    S0, z0 = S0.repeat_interleave(G, 1), z0.repeat_interleave(G, 1)
    T = q.shape[2]
    w = (q @ k.transpose(-1, -2)) * torch.ones(T, T, dtype=torch.bool).tril()
    num = w @ v + q @ S0
    if not normalize:
        return num
    den = w.sum(-1) + (q @ z0.unsqueeze(-1)).squeeze(-1)
    return num / (den.unsqueeze(-1) + eps)


def random_qkv(B=2, H=4, Hkv=2, T=13, d=5, dv=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    phi = lambda x: torch.nn.functional.elu(x) + 1  # noqa: E731
    q = phi(torch.randn(B, H, T, d, generator=g, dtype=dtype))
    k = phi(torch.randn(B, Hkv, T, d, generator=g, dtype=dtype))
    v = torch.randn(B, Hkv, T, dv, generator=g, dtype=dtype)
    S0 = torch.randn(B, Hkv, d, dv, generator=g, dtype=dtype)
    z0 = phi(torch.randn(B, Hkv, d, generator=g, dtype=dtype))
    return q, k, v, S0, z0


# --- the two forms against the definition --------------------------------------------------------
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("chunk", [1, 3, 4, 8, 64])
def test_chunked_and_recurrent_forms_equal_the_quadratic_reference(chunk, normalize):
    q, k, v, S0, z0 = random_qkv()  # T=13 is a multiple of none of the chunk sizes above 1
    expected = quadratic_reference(q, k, v, S0, z0, normalize)
    y, S, z = chunked_linear_attention(q, k, v, S0, z0, chunk, normalize)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    y_rec, S_rec, z_rec = recurrent_linear_attention(q, k, v, S0, z0, normalize)
    torch.testing.assert_close(y_rec, expected, rtol=1e-10, atol=1e-10)
    # the final state is the sum of every outer product
    G = q.shape[1] // k.shape[1]
    assert G == 2
    torch.testing.assert_close(S, S0 + k.transpose(-1, -2) @ v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(z, z0 + k.sum(2), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close((S_rec, z_rec), (S, z), rtol=1e-10, atol=1e-10)


def test_one_token_steps_and_split_chunks_continue_the_state():
    q, k, v, S0, z0 = random_qkv(T=11)
    full, S_full, z_full = chunked_linear_attention(q, k, v, S0, z0, 4)
    S, z, steps = S0, z0, []
    for t in range(11):  # the decoding loop: one token at a time through the RNN form
        y, S, z = recurrent_linear_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], S, z)
        steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 2), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close((S, z), (S_full, z_full), rtol=1e-10, atol=1e-10)
    # a prefill of 6 tokens, then the remaining 5 in chunks of 3, from the carried state
    y1, S1, z1 = chunked_linear_attention(q[:, :, :6], k[:, :, :6], v[:, :, :6], S0, z0, 4)
    y2, S2, z2 = chunked_linear_attention(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], S1, z1, 3)
    torch.testing.assert_close(torch.cat((y1, y2), 2), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close((S2, z2), (S_full, z_full), rtol=1e-10, atol=1e-10)


def test_gradients_of_the_chunked_form():
    q, k, v, S0, z0 = random_qkv(B=1, H=2, Hkv=1, T=7, d=3, dv=2)
    inputs = tuple(t.requires_grad_() for t in (q, k, v, S0, z0))
    assert torch.autograd.gradcheck(lambda *a: chunked_linear_attention(*a, 3)[0], inputs)


# --- the layer: padding and the cached state ------------------------------------------------------
def layer_and_input(T=9, seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**BASE, **VARIANTS["hybrid_elu"]})
    layer = build_model(cfg).blocks[0].attn
    assert isinstance(layer, LinearAttention)
    return cfg, layer, torch.randn(2, T, cfg.d_model)


@torch.no_grad()
def run_layer(cfg, layer, x, valid=None, cache=None):
    cache = cache or KVCache(cfg, x.shape[0], 64)
    y = layer(x, None, {"valid": valid}, cache)
    return y, cache.get_state(0)


PHI = {"elu": lambda x: torch.nn.functional.elu(x) + 1, "relu": torch.relu, "identity": lambda x: x}


@pytest.mark.parametrize("name", VARIANTS)
@torch.no_grad()
def test_the_layer_computes_the_definition(name):
    model = make(name)
    cfg, la = model.cfg, model.cfg.linear_attention
    layer_index = cfg.layer_types.index("linear")
    layer = model.blocks[layer_index].attn
    x = torch.randn(2, 11, cfg.d_model, generator=torch.Generator().manual_seed(4))
    heads = lambda t, h: t.view(2, 11, h, cfg.head_dim).transpose(1, 2)  # noqa: E731
    q = PHI[la.feature_map](heads(layer.q_proj(x), cfg.n_heads))
    k = PHI[la.feature_map](heads(layer.k_proj(x), cfg.n_kv_heads))
    v = heads(layer.v_proj(x), cfg.n_kv_heads)
    scale = 1.0 if la.normalize else cfg.head_dim**-0.5
    zeros = k.new_zeros(2, cfg.n_kv_heads, cfg.head_dim, cfg.head_dim), k.new_zeros(2, cfg.n_kv_heads, cfg.head_dim)
    y = quadratic_reference(q * scale, k, v, *zeros, la.normalize, la.eps)
    expected = layer.o_proj(y.transpose(1, 2).reshape(2, 11, -1))
    torch.testing.assert_close(layer(x, None, {}), expected, rtol=1e-5, atol=1e-6)


def test_left_and_right_padding_leave_the_state_unchanged():
    cfg, layer, x = layer_and_input()
    y, state = run_layer(cfg, layer, x)
    pad = torch.randn(2, 4, cfg.d_model)  # arbitrary content: only the mask may keep it out
    valid_left = torch.cat((torch.zeros(2, 4, dtype=torch.bool), torch.ones(2, 9, dtype=torch.bool)), 1)
    y_left, state_left = run_layer(cfg, layer, torch.cat((pad, x), 1), valid_left)
    y_right, state_right = run_layer(cfg, layer, torch.cat((x, pad), 1), valid_left.flip(1))
    for name in ("S", "z"):
        torch.testing.assert_close(state_left[name], state[name], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(state_right[name], state[name], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y_left[:, 4:], y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_right[:, :9], y, rtol=1e-5, atol=1e-6)
    # without the mask the padding does change the state: the test above can fail
    _, unmasked = run_layer(cfg, layer, torch.cat((pad, x), 1))
    assert not torch.allclose(unmasked["S"], state["S"], atol=1e-3)


def test_a_padding_decode_step_leaves_the_state_bit_for_bit_unchanged():
    cfg, layer, x = layer_and_input()
    _, state = run_layer(cfg, layer, x)
    before = {name: t.clone() for name, t in state.items()}
    cache = KVCache(cfg, 2, 64)
    cache.set_state(0, state)
    _, after = run_layer(cfg, layer, torch.randn(2, 1, cfg.d_model), torch.tensor([[False], [True]]), cache)
    assert torch.equal(after["S"][0], before["S"][0]) and torch.equal(after["z"][0], before["z"][0])
    assert not torch.equal(after["S"][1], before["S"][1])  # the real token of row 1 was added


# --- the model: cached generation against the full forward ----------------------------------------
@pytest.mark.parametrize("name", VARIANTS)
def test_greedy_generation_of_a_left_padded_batch_equals_the_full_forward(name):
    model = make(name)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 61, (n,), generator=g).tolist() for n in (3, 14, 9)]
    outs = generate(model, prompts, SamplingParams(max_new_tokens=8, temperature=0), output_logits=True)
    for prompt, out in zip(prompts, outs, strict=True):
        ids = torch.tensor([prompt + out.token_ids])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1:-1]  # the row alone, no cache, no padding
        torch.testing.assert_close(out.logits, logits, rtol=1e-4, atol=1e-4)
        assert logits.argmax(-1).tolist() == out.token_ids


@pytest.mark.parametrize("name", VARIANTS)
def test_padded_batch_forward_gives_each_rows_own_logits(name):
    model = make(name)
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0  # row 0 left-padded
    mask[1, 8:] = 0  # row 1 right-padded
    with torch.no_grad():
        padded = model(ids, attention_mask=mask).logits
        row0 = model(ids[:1, 5:]).logits[0]
        row1 = model(ids[1:, :8]).logits[0]
    torch.testing.assert_close(padded[0, 5:], row0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(padded[1, :8], row1, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_the_state_does_not_grow_with_the_context():
    model = make("hybrid_elu")
    cfg = model.cfg
    sizes = {}
    for length in (5, 50):
        cache = model.new_cache(2, 64)
        model.hidden_states(torch.randint(0, 61, (2, length)), cache)
        assert cache.k[0] is None and cache.v[0] is None  # the linear layer holds no per-token cache
        state = cache.get_state(0)
        assert state["S"].shape == (2, cfg.n_kv_heads, cfg.head_dim, cfg.head_dim)
        assert state["z"].shape == (2, cfg.n_kv_heads, cfg.head_dim)
        sizes[length] = sum(t.numel() * t.element_size() for t in state.values())
        assert cache.get_state(1) is None  # the softmax layer keeps keys/values instead
    assert sizes[5] == sizes[50] == 2 * cfg.n_kv_heads * (cfg.head_dim**2 + cfg.head_dim) * 4


@torch.no_grad()
def test_state_stays_float32_in_a_bfloat16_model():
    model = make("hybrid_elu").to(torch.bfloat16)
    cache = model.new_cache(1, 16)
    model.hidden_states(torch.randint(0, 61, (1, 7)), cache)
    assert cache.get_state(0)["S"].dtype == torch.float32
    assert cache.k[1].dtype == torch.bfloat16


# --- training, init, checkpoints, config ----------------------------------------------------------
def test_gradients_reach_every_parameter():
    model = make("hybrid_elu").train()
    ids = torch.randint(0, 61, (2, 11))
    model(ids, targets=ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_meta_build_and_init():
    cfg = ModelConfig(**{**BASE, **VARIANTS["hybrid_elu"], "d_model": 64, "init_std": 0.02})
    model = build_model(cfg)
    attn = model.blocks[0].attn
    assert isinstance(attn, LinearAttention) and not any(p.is_meta for p in model.parameters())
    residual_std = 0.02 / (2 * cfg.n_layers) ** 0.5
    assert abs(attn.q_proj.weight.std().item() - 0.02) < 0.002
    assert abs(attn.o_proj.weight.std().item() - residual_std) < 0.002
    assert [n for n, _ in attn.named_parameters()] == ["q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                         "o_proj.weight"]


class RepeatingBatches:
    """The same few sequences over and over, with the loader protocol the loop resumes from."""

    def __init__(self, vocab: int, seq_len: int):
        from lmlab.data.loader import Batch

        ids = torch.randint(0, vocab, (4, seq_len + 1), generator=torch.Generator().manual_seed(3))
        self.batch, self.position = Batch(ids[:, :-1], ids[:, 1:]), 0

    def __next__(self):
        self.position += 1
        return self.batch

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def test_a_hybrid_model_trains_through_the_loop_and_round_trips(tmp_path):
    from lmlab.train.config import resolve
    from lmlab.train.loop import train
    from lmlab.train.metrics import read_metrics
    from lmlab.train.objectives import next_token

    model_fields = {**BASE, **VARIANTS["hybrid_elu"], "init_std": 0.02}
    cfg = resolve({"model": model_fields, "data": {"seq_len": 16},
                   "train": {"out_dir": str(tmp_path / "run"), "steps": 6, "batch_size": 4, "lr": 1e-2,
                             "log_every": 1, "eval_every": 0, "save_every": 0, "threads": 1},
                   "schedule": {"name": "constant"}})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    result = train(cfg, model, next_token, RepeatingBatches(61, 16), progress=False)
    curve = [r["loss"] for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert len(curve) == 6 and curve[-1] < curve[0] - 0.3  # it learns the repeated batch
    ids = torch.randint(0, 61, (2, 10))
    model.eval()
    for path in (result.checkpoint, save_checkpoint(model, tmp_path / "again")):
        loaded = load_checkpoint(path).eval()
        assert loaded.cfg.layer_types == ["linear", "full"] and loaded.cfg.linear_attention.chunk_size == 4
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("bad, match", [
    (dict(feature_map="softmax"), "feature_map='softmax'"),
    (dict(feature_map="identity"), "normalize=False"),
    (dict(eps=0.0), "eps must be positive"),
    (dict(chunk_size=0), "chunk_size must be at least 1"),
    (dict(chunk=8), "unknown linear_attention fields"),
])
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**BASE, "layer_types": ["linear", "full"], "linear_attention": bad})


def test_a_linear_layer_gets_the_default_config():
    cfg = ModelConfig(**{**BASE, "layer_types": ["linear", "full"]})
    assert cfg.linear_attention.feature_map == "elu" and cfg.linear_attention.normalize
    assert cfg.cache_layout(0) is None and cfg.recurrent
