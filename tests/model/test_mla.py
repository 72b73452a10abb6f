"""Multi-head latent attention: the absorbed (cached) form computes the naive form's logits, RoPE touches only
the decoupled dims, the cache holds only the latent and the RoPE key, and serving works on both caches."""

from __future__ import annotations

import random

import pytest
import torch

from lmlab.infer.engine import Engine, EngineConfig
from lmlab.infer.generate import generate
from lmlab.infer.paged import PagedKVCache
from lmlab.infer.sampling import SamplingParams
from lmlab.model import ModelConfig, build_model
from lmlab.model.mla import MultiHeadLatentAttention, deinterleave
from lmlab.model.position import apply_rope, rope_cos_sin

V, B, T = 61, 3, 14
TOL = 1e-5
MLA = dict(kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=10)


@pytest.fixture(autouse=True, scope="module")
def _single_threaded():
    """Tiny matmuls on a shared CPU: intra-op threads would spin-wait for each other far longer than they compute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(seed: int = 0, q_lora_rank: int | None = None, **over) -> torch.nn.Module:
    torch.manual_seed(seed)
    kw = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, init_std=0.1,
              mla={**MLA, "q_lora_rank": q_lora_rank, **over.pop("mla", {})})
    kw.update(over)
    model = build_model(ModelConfig(**kw)).eval()
    with torch.no_grad():  # norms away from identity, so a misplaced latent norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def ids(seed: int = 1, batch: int = B, length: int = T) -> torch.Tensor:
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def cached_logits(model, x: torch.Tensor, prefill: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of every position through the KV cache (absorbed form): a prefill of `prefill` tokens, then one
    token per step."""
    cache = model.new_cache(x.shape[0], x.shape[1])
    with torch.no_grad():
        mask = None if attention_mask is None else attention_mask[:, :prefill]
        out = [model(x[:, :prefill], cache=cache, attention_mask=mask).logits]
        for t in range(prefill, x.shape[1]):
            out.append(model(x[:, t : t + 1], cache=cache).logits)
    return torch.cat(out, dim=1)


MODELS = {
    "full-q": {},
    "low-rank-q": {"q_lora_rank": 10},
    "interleaved": {"q_lora_rank": 10, "mla": {"rope_interleave": True}, "qkv_bias": True, "attn_out_bias": True},
    "window": {"sliding_window": 5, "layer_types": ["sliding", "full"]},
    "softcap": {"attn_softcap": 3.0},
    "alibi": {"position": "alibi"},
}


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_absorbed_equals_naive(kind, impl):
    """Prefill and step-by-step decode through the cache (absorbed: attention over the latents) give the logits
    of one uncached forward (naive: keys and values expanded per head)."""
    model = tiny(**MODELS[kind]).set_attn_impl(impl)
    x = ids()
    with torch.no_grad():
        naive = model(x).logits
    assert max_diff(cached_logits(model, x, prefill=T), naive) <= TOL  # prefill only
    assert max_diff(cached_logits(model, x, prefill=5), naive) <= TOL  # prefill, then 9 decode steps
    assert max_diff(cached_logits(model, x, prefill=1), naive) <= TOL  # decode from the first token


@pytest.mark.parametrize("q_lora_rank", [None, 10])
def test_absorbed_equals_naive_left_padded(q_lora_rank):
    """A left-padded batch through the cache gives each row the logits of that row alone without a cache."""
    model = tiny(q_lora_rank=q_lora_rank, sliding_window=6)
    x = ids()
    pad = [0, 4, 7]
    mask = torch.ones(B, T, dtype=torch.long)
    for i, n in enumerate(pad):
        mask[i, :n] = 0
    got = cached_logits(model, x, prefill=9, attention_mask=mask)
    with torch.no_grad():
        batched_naive = model(x, attention_mask=mask).logits
    for i, n in enumerate(pad):
        with torch.no_grad():
            alone = model(x[i : i + 1, n:]).logits[0]
        assert max_diff(got[i, n:], alone) <= TOL
        assert max_diff(batched_naive[i, n:], alone) <= TOL


def test_absorbed_form_never_expands_keys():
    """With a cache the layer attends over the latents: kv_b_proj (the per-head expansion) is never run, its
    weight is folded into the query and the output instead. Without a cache, it is."""
    model = tiny(q_lora_rank=10)
    calls = []
    for block in model.blocks:
        block.attn.kv_b_proj.register_forward_hook(lambda *args: calls.append(1))
    x = ids()
    cached_logits(model, x, prefill=4)
    assert calls == []
    with torch.no_grad():
        model(x)
    assert len(calls) == model.cfg.n_layers


def test_wrapped_up_projection_decodes_through_the_cache():
    """A kv_b_proj that is not a plain nn.Linear (an adapter's wrapper) has no weight to fold: cached decoding
    expands the cached latents through it instead, with the same logits."""
    model = tiny(q_lora_rank=10)
    for block in model.blocks:
        block.attn.kv_b_proj = torch.nn.Sequential(block.attn.kv_b_proj)
    x = ids()
    with torch.no_grad():
        naive = model(x).logits
    assert max_diff(cached_logits(model, x, prefill=5), naive) <= TOL


def test_cache_holds_only_latent_and_rope_key():
    """Per token and layer the cache stores kv_lora_rank + qk_rope_head_dim numbers, and they are the normalized
    latent and the rotated RoPE key of that token."""
    model = tiny(q_lora_rank=10)
    cfg, m = model.cfg, model.cfg.mla
    cache = model.new_cache(B, 32)
    x = ids()
    with torch.no_grad():
        model(x, cache=cache)
    itemsize = torch.empty((), dtype=torch.float32).element_size()
    per_token = sum(t.element_size() * t[0, :, 0].numel() for t in (*cache.k, *cache.v))
    assert per_token == (m.kv_lora_rank + m.qk_rope_head_dim) * itemsize * cfg.n_layers
    assert PagedKVCache.bytes_per_block(cfg, 1, torch.float32) == per_token
    expanded = cfg.n_layers * cfg.n_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim) * itemsize
    assert 5 * per_token < expanded  # what caching the per-head keys and values would take

    # layer 0's cached latent and RoPE key, recomputed from its input
    attn = model.blocks[0].attn
    with torch.no_grad():
        h = model.blocks[0].attn_norm(model.embed(x))
        c_kv, k_pe = attn.kv_a_proj_with_mqa(h).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        cos, sin = rope_cos_sin(cfg, torch.arange(T)[None], torch.float32)
        k_pe = apply_rope(k_pe[:, None], cos, sin)
        c_kv = attn.kv_a_layernorm(c_kv)[:, None]
    assert max_diff(cache.k[0][:, :, :T], c_kv) <= 1e-6
    assert max_diff(cache.v[0][:, :, :T], k_pe) <= 1e-6


def test_rope_only_on_decoupled_dims():
    """Positions reach the scores only through the RoPE part: with the RoPE rows of the query and key
    projections zeroed, any positions give the same output; with them, positions matter."""
    model = tiny()
    cfg, m = model.cfg, model.cfg.mla
    attn: MultiHeadLatentAttention = model.blocks[0].attn
    x = torch.randn(2, 7, cfg.d_model, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(7)[None].expand(2, -1)
    shuffled = torch.tensor([[3, 9, 4, 40, 2, 0, 11], [5, 1, 30, 2, 8, 17, 6]])  # arbitrary, not just shifted
    masks = {None: None}

    def out(pos):
        with torch.no_grad():
            return attn(x, rope_cos_sin(cfg, pos, torch.float32), masks)

    assert max_diff(out(positions), out(shuffled)) > 1e-3
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    with torch.no_grad():
        attn.q_proj.weight.view(cfg.n_heads, qk, -1)[:, m.qk_nope_head_dim:] = 0
        attn.kv_a_proj_with_mqa.weight[m.kv_lora_rank:] = 0
    assert max_diff(out(positions), out(shuffled)) <= 1e-6


def test_rope_interleave_is_a_permutation_of_the_rope_rows():
    """An interleaved layer equals a rotate-half layer whose RoPE rows of q and k are de-interleaved: the
    pairing is a renaming of dims, which q . k does not see."""
    a = tiny(q_lora_rank=10, mla={"rope_interleave": True})
    b = tiny(q_lora_rank=10, mla={"rope_interleave": False})
    m, H = a.cfg.mla, a.cfg.n_heads
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    state = a.state_dict()
    for i in range(a.cfg.n_layers):
        q = state[f"blocks.{i}.attn.q_b_proj.weight"].view(H, qk, -1).clone()
        q[:, m.qk_nope_head_dim:] = deinterleave(q[:, m.qk_nope_head_dim:].transpose(1, 2)).transpose(1, 2)
        state[f"blocks.{i}.attn.q_b_proj.weight"] = q.view(H * qk, -1)
        kv = state[f"blocks.{i}.attn.kv_a_proj_with_mqa.weight"].clone()
        kv[m.kv_lora_rank:] = deinterleave(kv[m.kv_lora_rank:].T).T
        state[f"blocks.{i}.attn.kv_a_proj_with_mqa.weight"] = kv
    b.load_state_dict(state)
    x = ids()
    with torch.no_grad():
        la, lb = a(x).logits, b(x).logits
    assert max_diff(la, lb) <= TOL
    b.load_state_dict(a.state_dict())  # the same weights without the permutation: different positions pair up
    with torch.no_grad():
        assert max_diff(b(x).logits, la) > 1e-3


def test_softmax_scale():
    m = tiny().blocks[0].attn
    assert m.scale == pytest.approx((MLA["qk_nope_head_dim"] + MLA["qk_rope_head_dim"]) ** -0.5)
    assert tiny(attn_scale=0.5).blocks[0].attn.scale == 0.5


def test_trains_and_builds_on_meta():
    """The naive form is differentiable end to end; build_model's meta-device init gives identity latent norms."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, mla={**MLA, "q_lora_rank": 10})
    model = build_model(cfg)
    attn = model.blocks[0].attn
    assert torch.equal(attn.kv_a_layernorm.weight, torch.ones(MLA["kv_lora_rank"]))
    assert torch.equal(attn.q_a_layernorm.weight, torch.ones(10))
    x = ids()
    model.train()
    loss = model(x[:, :-1], targets=x[:, 1:]).loss
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_config_errors():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(d_model=32, n_heads=4, n_kv_heads=2, mla=MLA)
    with pytest.raises(ValueError, match="qk_norm"):
        ModelConfig(d_model=32, n_heads=4, qk_norm=True, mla=MLA)
    with pytest.raises(ValueError, match="qk_rope_head_dim|5 rotary dims"):
        ModelConfig(d_model=32, n_heads=4, mla={**MLA, "qk_rope_head_dim": 5})
    with pytest.raises(ValueError, match="q_lora_rank"):
        ModelConfig(d_model=32, n_heads=4, mla={**MLA, "q_lora_rank": 0})


@pytest.mark.parametrize("q_lora_rank", [None, 10])
def test_engine_equals_plain_generation(q_lora_rank):
    """The serving engine's paged cache stores the same latent + RoPE key per token: greedy requests, prefilled
    in chunks and preempted in a tight pool, give the tokens of plain generation."""
    model = tiny(q_lora_rank=q_lora_rank, mla={"rope_interleave": True})
    rng = random.Random(0)
    prompts = [[rng.randrange(V) for _ in range(rng.randrange(1, 30))] for _ in range(8)]
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    engine = Engine(model, config=EngineConfig(block_size=4, num_blocks=24, max_num_seqs=4, max_batch_tokens=12))
    out = engine.generate(prompts, params)
    batched = generate(model, prompts, params)
    for prompt, got, ref in zip(prompts, out, batched, strict=True):
        assert got.token_ids == ref.token_ids, prompt
    stats = engine.stats()
    assert stats.preemptions > 0 and stats.blocks_used == 0
