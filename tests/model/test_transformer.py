"""The transformer against its own oracles: the reference attention path, full-sequence forward
passes, hand-derived invariants (causality, window reach, GQA = repeated MHA, RoPE relativity)."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmlab.model import KVCache, ModelConfig, RopeScaling, Transformer, build_model
from lmlab.model.norm import Norm
from lmlab.model.position import alibi_slopes, apply_rope, rope_cos_sin, rope_frequencies, sinusoidal_embedding

BASE = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)

# Each entry switches on a different part of the model; together they touch every config field.
VARIANTS = {
    "llama_gqa": dict(n_kv_heads=2),
    "mqa_head_dim": dict(n_kv_heads=1, head_dim=12),
    "gpt2_like": dict(position="learned", norm="layernorm", norm_bias=True, mlp_gated=False,
                      mlp_activation="gelu_tanh", qkv_bias=True, attn_out_bias=True, mlp_bias=True,
                      tie_embeddings=True),
    "sinusoidal_relu": dict(position="sinusoidal", mlp_gated=False, mlp_activation="relu"),
    "alibi_6_heads": dict(position="alibi", n_heads=6, d_model=36),
    "no_position": dict(position="none"),
    "sliding": dict(sliding_window=4, n_kv_heads=2),
    "alternating_sliding": dict(sliding_window=3, layer_types=["sliding", "full"]),
    "gemma2_like": dict(norm_unit_offset=True, post_norm=True, attn_softcap=5.0, logit_softcap=4.0,
                        embedding_scale=32**0.5, mlp_activation="gelu_tanh", attn_scale=0.3,
                        tie_embeddings=True),
    "qk_norm": dict(qk_norm=True, head_dim=16),
    "post_norm_only": dict(pre_norm=False, post_norm=True),
    "geglu_exact": dict(mlp_activation="gelu"),
    "partial_rope_linear": dict(rope_fraction=0.5, rope_scaling=RopeScaling("linear", 2.0)),
    "rope_dynamic": dict(rope_scaling=RopeScaling("dynamic", 3.0, original_max_seq_len=8)),
    "rope_yarn": dict(rope_scaling=RopeScaling("yarn", 4.0, original_max_seq_len=8)),
    "rope_llama3": dict(rope_theta=500000.0, rope_scaling=RopeScaling("llama3", 8.0, original_max_seq_len=8)),
}


def make(name: str, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**BASE, **VARIANTS[name], **overrides})
    model = build_model(cfg)
    with torch.no_grad():  # move norms away from identity so a mis-applied norm would show
        for m in model.modules():
            if isinstance(m, Norm):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
                if m.bias is not None:
                    m.bias.add_(0.1 * torch.randn_like(m.bias))
    return model.eval()


def ids_for(model, batch=2, length=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.cfg.vocab_size, (batch, length), generator=g)


@pytest.mark.parametrize("name", VARIANTS)
def test_sdpa_matches_reference(name):
    model = make(name)
    ids = ids_for(model)
    fast = model(ids).logits
    ref = model.set_attn_impl("reference")(ids).logits
    assert torch.allclose(fast, ref, atol=1e-5, rtol=0), (fast - ref).abs().max()


CACHE_CONSISTENT = [v for v in VARIANTS if v != "rope_dynamic"]


@pytest.mark.parametrize("name", CACHE_CONSISTENT)
def test_incremental_decoding_matches_full_forward(name):
    """Prefill a prefix, then feed one token at a time (and one chunk of 3): same logits."""
    model = make(name)
    ids = ids_for(model, length=20)
    full = model(ids).logits
    cache = model.new_cache(2, 24)
    steps = [model(ids[:, :9], cache=cache).logits]
    steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(9, 17)]
    steps.append(model(ids[:, 17:20], cache=cache).logits)  # a chunk after decoding
    inc = torch.cat(steps, dim=1)
    assert cache.length == 20
    assert torch.allclose(full, inc, atol=1e-5, rtol=0), (full - inc).abs().max()


def test_dynamic_ntk_is_cache_consistent_only_within_the_trained_length():
    """Dynamic NTK picks its base from the current length, so keys cached under a shorter
    length were rotated with another base: exact within original_max_seq_len, not beyond
    (transformers' implementation has the same property; see docs/model.md)."""
    model = make("rope_dynamic")  # original_max_seq_len = 8
    ids = ids_for(model, length=14)
    full8, full14 = model(ids[:, :8]).logits, model(ids).logits
    cache = model.new_cache(2, 16)
    inc = torch.cat([model(ids[:, :4], cache=cache).logits]
                    + [model(ids[:, t : t + 1], cache=cache).logits for t in range(4, 14)], dim=1)
    assert torch.allclose(inc[:, :8], full8, atol=1e-5)
    assert not torch.allclose(inc[:, 8:], full14[:, 8:], atol=1e-6)


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2_like", "alibi_6_heads", "sliding", "gemma2_like", "rope_dynamic"])
def test_left_padding_gives_the_unpadded_logits(name):
    model = make(name)
    a, b = ids_for(model, 1, 12, seed=2)[0], ids_for(model, 1, 7, seed=3)[0]
    batch = torch.zeros(2, 12, dtype=torch.long)
    batch[0], batch[1, 5:] = a, b
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0
    out = model(batch, attention_mask=mask).logits
    assert torch.allclose(out[0], model(a[None]).logits[0], atol=1e-5)
    assert torch.allclose(out[1, 5:], model(b[None]).logits[0], atol=1e-5)
    # and through the cache: padded prefill, then decode steps
    cache = model.new_cache(2, 16)
    model(batch, cache=cache, attention_mask=mask)
    nxt = torch.tensor([[3], [4]])
    step = model(nxt, cache=cache).logits[:, -1]
    alone = model(torch.cat([b, nxt[1]])[None]).logits[0, -1]
    assert torch.allclose(step[1], alone, atol=1e-5)


@pytest.mark.parametrize("name", ["llama_gqa", "gpt2_like", "alibi_6_heads", "sliding", "sinusoidal_relu"])
def test_causal(name):
    model = make(name)
    ids = ids_for(model)
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % model.cfg.vocab_size
    a, b = model(ids).logits, model(changed).logits
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


def test_sliding_window_reach():
    """One layer, window 4: position t sees tokens t-3..t only, so changing token 0 changes
    outputs at positions 0..3 and nothing after."""
    model = make("sliding", n_layers=1)
    ids = ids_for(model, 1, 12)
    changed = ids.clone()
    changed[0, 0] = (changed[0, 0] + 1) % model.cfg.vocab_size
    diff = (model(ids).logits - model(changed).logits).abs().amax(dim=-1)[0]
    assert (diff[:4] > 1e-4).all() and (diff[4:] == 0).all(), diff


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = make("llama_gqa")
    mha = build_model(gqa.cfg.replace(n_kv_heads=4))
    sd = gqa.state_dict()
    hd, rep = gqa.cfg.head_dim, 2
    for key in list(sd):
        if key.endswith(("k_proj.weight", "v_proj.weight")):
            w = sd[key].view(2, hd, -1)
            sd[key] = w.repeat_interleave(rep, dim=0).reshape(4 * hd, -1)
    mha.load_state_dict(sd)
    ids = ids_for(gqa)
    assert torch.allclose(gqa(ids).logits, mha.eval()(ids).logits, atol=1e-5)


def test_rope_is_relative():
    """<R(m) q, R(n) k> depends only on m - n."""
    cfg = ModelConfig(**BASE)
    q, k = torch.randn(1, 1, 1, cfg.head_dim), torch.randn(1, 1, 1, cfg.head_dim)

    def score(m, n):
        cq, sq = rope_cos_sin(cfg, torch.tensor([[m]]), torch.float32)
        ck, sk = rope_cos_sin(cfg, torch.tensor([[n]]), torch.float32)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()

    assert torch.allclose(score(5, 2), score(13, 10), atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3)
    # rotation preserves the norm, and position 0 is the identity
    c0, s0 = rope_cos_sin(cfg, torch.tensor([[0]]), torch.float32)
    assert torch.allclose(apply_rope(q, c0, s0), q)


def test_partial_rope_leaves_the_tail_untouched():
    cfg = ModelConfig(**BASE, rope_fraction=0.25)
    x = torch.randn(1, 1, 3, cfg.head_dim)
    cos, sin = rope_cos_sin(cfg, torch.tensor([[4, 5, 6]]), torch.float32)
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[..., cfg.rotary_dim :], x[..., cfg.rotary_dim :])
    assert not torch.allclose(y[..., : cfg.rotary_dim], x[..., : cfg.rotary_dim])


def test_rope_scalings_by_hand():
    cfg = ModelConfig(**BASE)  # head_dim 8: frequencies theta^(-0/8), theta^(-2/8), ...
    plain, _ = rope_frequencies(cfg, 10)
    assert torch.allclose(plain, torch.tensor([10000.0 ** (-i / 8) for i in (0, 2, 4, 6)]))
    linear, _ = rope_frequencies(cfg.replace(rope_scaling=RopeScaling("linear", 4.0)), 10)
    assert torch.allclose(linear, plain / 4)
    dyn = cfg.replace(rope_scaling=RopeScaling("dynamic", 2.0, original_max_seq_len=16))
    assert torch.allclose(rope_frequencies(dyn, 10)[0], plain)  # within the trained length: unchanged
    base = 10000.0 * ((2.0 * 32 / 16) - 1) ** (8 / 6)  # length 32 = 2x: base * (s L/L0 - (s-1))^(d/(d-2))
    assert torch.allclose(rope_frequencies(dyn, 32)[0], torch.tensor([base ** (-i / 8) for i in (0, 2, 4, 6)]))
    # llama3: wavelengths above L0/low_freq_factor are divided by the factor, below L0/high kept
    l3 = cfg.replace(rope_scaling=RopeScaling("llama3", 8.0, original_max_seq_len=64, high_freq_factor=4.0))
    freqs, _ = rope_frequencies(l3, 10)
    wavelen = 2 * math.pi / plain
    assert torch.allclose(freqs[wavelen < 16], plain[wavelen < 16])
    assert torch.allclose(freqs[wavelen > 64], plain[wavelen > 64] / 8)
    # yarn: default temperature 0.1 ln(s) + 1; highest frequency kept, lowest interpolated
    yarn = cfg.replace(rope_scaling=RopeScaling("yarn", 4.0, original_max_seq_len=64))
    freqs, factor = rope_frequencies(yarn, 10)
    assert factor == pytest.approx(0.1 * math.log(4.0) + 1)
    assert freqs[0] == pytest.approx(plain[0]) and freqs[-1] == pytest.approx(plain[-1] / 4)


def test_alibi_slopes():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    # 6 heads: the 4 slopes of n=4 (2^-2k), then every other slope of n=8 (2^-1, 2^-3)
    assert torch.allclose(alibi_slopes(6), torch.tensor([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]))


def test_sinusoidal_table():
    pe = sinusoidal_embedding(torch.tensor([0, 3]), 6)
    assert torch.allclose(pe[0], torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 1.0]))
    assert pe[1, 0] == pytest.approx(math.sin(3)) and pe[1, 3] == pytest.approx(math.cos(3 / 10000 ** (2 / 6)))


def test_norms_by_hand():
    x = torch.randn(3, 8)
    w = torch.randn(8)
    rms = Norm(8, "rmsnorm", 1e-6)
    rms.weight.data = w.clone()
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    assert torch.allclose(rms(x), expected, atol=1e-6)
    gemma = Norm(8, "rmsnorm", 1e-6, unit_offset=True)
    assert torch.equal(gemma.weight, torch.zeros(8))  # identity at init
    gemma.weight.data = w - 1
    assert torch.allclose(gemma(x), expected, atol=1e-6)
    ln = Norm(8, "layernorm", 1e-5, bias=True)
    ln.weight.data, ln.bias.data = w.clone(), torch.randn(8)
    assert torch.allclose(ln(x), F.layer_norm(x, (8,), w, ln.bias, 1e-5), atol=1e-6)
    assert rms(x.bfloat16()).dtype == torch.bfloat16


def test_loss_is_masked_mean_cross_entropy():
    model = make("llama_gqa")
    ids = ids_for(model)
    targets = ids.roll(-1, dims=1)
    targets[:, -1] = -100
    targets[0, :5] = -100
    out = model(ids, targets)
    keep = targets != -100
    manual = -out.logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0][keep].mean()
    assert out.loss.item() == pytest.approx(manual.item(), rel=1e-5)


def test_logit_softcap_bounds_logits():
    model = make("gemma2_like")
    with torch.no_grad():
        model.embed.weight.mul_(100)
    logits = model(ids_for(model)).logits
    assert logits.abs().max() <= 4.0 and logits.abs().max() > 3.0


def test_embedding_scale_and_tied_head():
    model = make("gemma2_like")
    assert model.lm_head is None
    ids = ids_for(model)
    h = model.hidden_states(ids)
    assert torch.allclose(model(ids).logits, 4.0 * torch.tanh(h @ model.embed.weight.T / 4.0), atol=1e-5)


def test_init_weights():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=1000, d_model=256, n_layers=8, n_heads=4, norm_unit_offset=True)
    model = build_model(cfg)
    assert model.blocks[0].attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.o_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert model.blocks[0].mlp.down_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert torch.equal(model.norm.weight, torch.zeros(256))
    plain = build_model(cfg.replace(scaled_residual_init=False))
    assert plain.blocks[0].attn.o_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert all(not p.is_meta for p in model.parameters())


def test_build_model_materializes_in_the_target_dtype(monkeypatch):
    """Weights are allocated once, already in the requested dtype: a bf16 model must never pass
    through a float32 copy (for a 7B model on a GPU, 28 GB before the cast)."""
    materialized = []
    real = torch.nn.Module.to_empty

    def spy(self, *args, **kwargs):
        materialized.extend(p.dtype for p in self.parameters())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to_empty", spy)
    model = build_model(ModelConfig(**BASE), dtype=torch.bfloat16, init=False)
    assert materialized and set(materialized) == {torch.bfloat16}
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in model.parameters())


def test_bf16_forward_and_cache_dtype():
    model = make("llama_gqa").to(torch.bfloat16)
    ids = ids_for(model)
    cache = model.new_cache(2, 24)
    assert cache.k[0].dtype == torch.bfloat16
    assert model(ids, cache=cache).logits.dtype == torch.bfloat16


def test_cache_overflow_is_a_clear_error():
    model = make("llama_gqa")
    cache = KVCache(model.cfg, 2, 8)
    with pytest.raises(ValueError, match="KV cache is full"):
        model(ids_for(model, length=9), cache=cache)


def test_learned_positions_beyond_context_is_a_clear_error():
    model = make("gpt2_like", max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(ids_for(model, length=17))


@pytest.mark.parametrize("bad, match", [
    (dict(n_heads=4, n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(d_model=30, n_heads=4), "not divisible"),
    (dict(norm="batchnorm"), "norm='batchnorm'"),
    (dict(position="xpos"), "position='xpos'"),
    (dict(mlp_activation="tanh"), "mlp_activation"),
    (dict(rope_fraction=0.1), "rotary dims"),
    (dict(rope_scaling=RopeScaling("yarn", 4.0)), "original_max_seq_len"),
    (dict(position="alibi", rope_scaling=RopeScaling("linear", 2.0)), "position is not 'rope'"),
    (dict(layer_types=["sliding", "full"]), "sliding_window is not set"),
    (dict(layer_types=["full"]), "layer_types has 1 entries"),
    (dict(pre_norm=False), "pre_norm / post_norm"),
])
def test_config_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**BASE, **bad})


def test_config_round_trip(tmp_path):
    cfg = ModelConfig(**BASE, **VARIANTS["rope_yarn"], layer_types=None)
    cfg.save(tmp_path / "config.json")
    again = ModelConfig.load(tmp_path / "config.json")
    assert again == cfg and isinstance(again.rope_scaling, RopeScaling)
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({**cfg.to_dict(), "hidden_size": 3})


def test_pair_mask_is_checked_and_anded_with_the_sliding_window():
    cfg = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=32, sliding_window=3)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    ids = torch.randint(0, 50, (2, 10))
    everything = torch.ones(2, 1, 10, 10, dtype=torch.bool)  # causal and window still apply
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=everything).logits, model(ids).logits)
    with pytest.raises(ValueError, match=r"\(B, T\) or \(B, 1, T, T\)"):
        model(ids, attention_mask=torch.ones(2, 1, 9, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="KV cache"):
        model(ids, attention_mask=everything, cache=model.new_cache(2))
