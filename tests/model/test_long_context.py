"""Long context: static NTK-aware RoPE scaling, and attention sinks with StreamingLLM eviction (SinkCache).

The sink cache is checked against its definition (Xiao et al. 2023): a decoded token sees the first n_sink
tokens and the `window` most recent ones, at positions 0..n-1 within the cache. For a one-layer model that
is exactly a full forward pass over those tokens; for deeper models the kept tokens' keys and values are the
ones computed when they were written (nothing is recomputed), so there the test checks that every key read
from the cache is the written key rotated to its current slot.
"""

from __future__ import annotations

import pytest
import torch

from lmlab.infer.generate import generate, stream
from lmlab.infer.sampling import SamplingParams
from lmlab.model import ModelConfig, RopeScaling, build_model, save_hf
from lmlab.model.cache import KVCache, SinkCache
from lmlab.model.position import apply_rope, rope_cos_sin, rope_frequencies

VOCAB = 64
TOL = 1e-5


def tiny(n_layers: int = 2, **changes) -> torch.nn.Module:
    torch.manual_seed(0)
    changes = {"n_kv_heads": 2 if "mla" not in changes else None, **changes}
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=n_layers, n_heads=4, max_seq_len=16, init_std=0.3,
                      **changes)  # large weights: attention that is far from uniform
    return build_model(cfg).eval()


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0)


# --- NTK-aware scaling ------------------------------------------------------------------------------------

def ntk(factor: float, **changes) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=1, n_heads=2, **changes,
                       rope_scaling=RopeScaling("ntk", factor, original_max_seq_len=128))


def test_ntk_factor_one_is_no_scaling():
    plain = ModelConfig(vocab_size=VOCAB, d_model=64, n_layers=1, n_heads=2)
    assert torch.equal(rope_frequencies(ntk(1.0), 0)[0], rope_frequencies(plain, 0)[0])
    positions = torch.arange(300)[None]
    assert torch.equal(rope_cos_sin(ntk(1.0), positions, torch.float32)[0],
                       rope_cos_sin(plain, positions, torch.float32)[0])


@pytest.mark.parametrize("factor", [2.0, 8.0, 32.0])
@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_ntk_stretches_the_lowest_frequency_by_exactly_the_factor(factor, fraction):
    cfg, plain = ntk(factor, rope_fraction=fraction), ntk(1.0, rope_fraction=fraction)
    d = cfg.rotary_dim
    scaled, base = rope_frequencies(cfg, 0)[0].double(), rope_frequencies(plain, 0)[0].double()
    assert scaled.shape == (d // 2,)
    assert scaled[0] == base[0] == 1.0  # the highest frequency is kept
    torch.testing.assert_close(base[-1] / scaled[-1], torch.tensor(factor, dtype=torch.float64), rtol=1e-6, atol=0)
    # in between: theta_i' = theta_i / s^(2i/(d-2)), i.e. b' = b * s^(d/(d-2))
    i = torch.arange(d // 2, dtype=torch.float64)
    torch.testing.assert_close(base / scaled, factor ** (2 * i / (d - 2)), rtol=1e-6, atol=0)
    assert (scaled[1:] < base[1:]).all()


def test_ntk_changes_every_position_but_the_first():
    torch.manual_seed(0)
    plain = build_model(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, init_std=0.3)).eval()
    scaled = build_model(plain.cfg.replace(rope_scaling=RopeScaling("ntk", 4.0, 16))).eval()
    scaled.load_state_dict(plain.state_dict())
    ids = torch.randint(0, VOCAB, (2, 12))
    a, b = plain(ids).logits, scaled(ids).logits
    assert torch.equal(a[:, 0], b[:, 0])  # position 0 is not rotated at all
    assert (a[:, 1:] - b[:, 1:]).abs().amax() > 1e-3


def test_ntk_config_checks():
    with pytest.raises(ValueError, match="factor must be >= 1"):
        ntk(0.5)
    with pytest.raises(ValueError, match="at least 4 rotary dims"):
        rope_frequencies(ModelConfig(vocab_size=VOCAB, d_model=8, n_layers=1, n_heads=2, rope_fraction=0.5,
                                     rope_scaling=RopeScaling("ntk", 2.0, 16)), 0)


def test_ntk_export_to_hf_is_refused_naming_the_kind(tmp_path):
    model = build_model(ntk(4.0, n_kv_heads=2))
    with pytest.raises(ValueError, match="'ntk'.*has no transformers rope_type"):
        save_hf(model, tmp_path / "hf", model_type="llama")
    assert not (tmp_path / "hf").exists()


def test_ntk_export_to_hf_without_a_family_is_refused(tmp_path):
    # no family maps it; the error names the field among the nearest family's differences
    with pytest.raises(ValueError, match=r"rope_scaling=\{'kind': 'ntk'"):
        save_hf(build_model(ntk(4.0, n_kv_heads=2)), tmp_path / "hf")


# --- SinkCache: the definition ----------------------------------------------------------------------------

POSITION_CASES = {
    "rope": {},
    "rope-partial": {"rope_fraction": 0.5},
    "rope-linear": {"rope_scaling": RopeScaling("linear", 2.0)},
    "rope-ntk": {"rope_scaling": RopeScaling("ntk", 4.0, 16)},
    "rope-yarn": {"rope_scaling": RopeScaling("yarn", 4.0, 16)},
    "rope-llama3": {"rope_scaling": RopeScaling("llama3", 4.0, 8)},
    "rope-dynamic": {"rope_scaling": RopeScaling("dynamic", 2.0, 64)},  # inactive below 64: exact
    "alibi": {"position": "alibi"},
    "none": {"position": "none"},
    # multi-head latent attention: the rotated tensor is the second cached one, the shared RoPE key
    "mla": {"mla": {"kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8}},
}


@pytest.mark.parametrize("case", POSITION_CASES)
def test_one_layer_decoding_equals_a_forward_over_sinks_and_window(case):
    """The paper's definition, exactly: after evictions, a decoded token's logits are those of a full
    forward pass over [the first n_sink tokens + the window most recent], at positions 0..n-1."""
    model = tiny(n_layers=1, **POSITION_CASES[case])
    n_sink, window = 3, 6
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 5 * (n_sink + window)))
    cache = SinkCache(model.cfg, 2, n_sink, window)
    with torch.no_grad():
        for t in range(ids.shape[1]):
            got = model.logits(model.hidden_states(ids[:, t:t + 1], cache))[:, -1]
            seen = torch.cat((ids[:, :min(n_sink, t + 1)], ids[:, max(n_sink, t + 1 - window):t + 1]), dim=1)
            want = model(seen).logits[:, -1]
            torch.testing.assert_close(got, want, rtol=0, atol=TOL, msg=f"step {t}")
            assert cache.length == min(t + 1, n_sink + window - 1)
            assert cache.n_tokens.tolist() == [cache.length] * 2  # positions are slots in the cache


@pytest.mark.parametrize("case", ["rope", "rope-yarn", "alibi"])
def test_one_layer_chunk_sees_sinks_and_everything_since(case):
    """A call with T tokens: its last query sees the sinks and the window - 1 + T most recent tokens."""
    model = tiny(n_layers=1, **POSITION_CASES[case])
    n_sink, window, chunk = 2, 5, 4
    torch.manual_seed(2)
    ids = torch.randint(0, VOCAB, (1, 30))
    cache = SinkCache(model.cfg, 1, n_sink, window, chunk=chunk)
    with torch.no_grad():
        for start in range(0, 28, chunk):
            end = start + chunk
            got = model.logits(model.hidden_states(ids[:, start:end], cache))[:, -1]
            recent = max(n_sink, end - (window - 1 + chunk))
            want = model(torch.cat((ids[:, :n_sink], ids[:, recent:end]), dim=1)).logits[:, -1]
            torch.testing.assert_close(got, want, rtol=0, atol=TOL, msg=f"chunk at {start}")


class SpyCache(SinkCache):
    """Remembers what each layer read back from the cache in the last call (copies: before the first
    eviction reads are views of the buffers, which the eviction at the end of the call rewrites)."""

    def update(self, layer, k, v):
        out = super().update(layer, k, v)
        self.read = getattr(self, "read", {})
        self.read[layer] = tuple(t.clone() for t in out)
        return out


@pytest.mark.parametrize("case", ["rope", "rope-partial", "rope-yarn"])
def test_deep_model_reads_every_key_rotated_to_its_current_slot(case):
    """In deeper models the cache keeps the keys and values computed when each token was written; each key
    read back must be that token's unrotated key rotated at its slot in the cache now."""
    model = tiny(n_layers=3, **POSITION_CASES[case])
    n_sink, window = 2, 5
    raw = {i: ([], []) for i in range(3)}  # layer -> (keys, values) of every token, before RoPE
    kv = model.cfg.n_kv_heads, model.cfg.head_dim
    for i, block in enumerate(model.blocks):
        block.attn.k_proj.register_forward_hook(lambda m, a, out, i=i: raw[i][0].append(out.unflatten(-1, kv)))
        block.attn.v_proj.register_forward_hook(lambda m, a, out, i=i: raw[i][1].append(out.unflatten(-1, kv)))
    torch.manual_seed(3)
    ids = torch.randint(0, VOCAB, (2, 25))
    cache = SpyCache(model.cfg, 2, n_sink, window)
    with torch.no_grad():
        for t in range(ids.shape[1]):
            model.hidden_states(ids[:, t:t + 1], cache)
            kept = [*range(min(n_sink, t + 1)), *range(max(n_sink, t + 1 - window), t + 1)]
            cos, sin = rope_cos_sin(model.cfg, torch.arange(len(kept))[None].expand(2, -1), torch.float32)
            for layer in range(3):
                keys = torch.cat(raw[layer][0], dim=1)[:, kept].transpose(1, 2)  # (B, H, n, D)
                values = torch.cat(raw[layer][1], dim=1)[:, kept].transpose(1, 2)
                k_read, v_read = cache.read[layer]
                torch.testing.assert_close(k_read, apply_rope(keys, cos, sin), rtol=0, atol=TOL)
                assert torch.equal(v_read, values)


# --- SinkCache: generation --------------------------------------------------------------------------------

def test_generation_before_any_eviction_equals_kv_cache_generation():
    model = tiny()
    prompt = [5, 9, 2, 33, 7, 1]
    plain = generate(model, [prompt], greedy(20), output_logits=True)[0]
    # the prompt in one call; 6 + 19 tokens go in, and the cache keeps n_sink + window - 1 = 25: no eviction
    whole = generate(model, [prompt], greedy(20), output_logits=True, streaming=(4, 22, 6))[0]
    assert whole.token_ids == plain.token_ids
    assert torch.equal(whole.logits, plain.logits)  # the same buffers, the same kernels: bit for bit
    chunked = generate(model, [prompt], greedy(20), output_logits=True, streaming=(4, 22, 4))[0]
    assert chunked.token_ids == plain.token_ids
    torch.testing.assert_close(chunked.logits, plain.logits, rtol=0, atol=TOL)


def test_generation_goes_past_max_seq_len_with_constant_memory():
    model = tiny()  # max_seq_len 16
    n_sink, window = 4, 12
    cache = SinkCache(model.cfg, 1, n_sink, window)
    buffers = [b for b in cache.k + cache.v if b is not None]
    before = [(b.data_ptr(), b.shape) for b in buffers]
    tok = torch.tensor([[3]])
    with torch.no_grad():
        for _ in range(5 * window):
            tok = model.logits(model.hidden_states(tok, cache))[:, -1:].argmax(-1)
            assert cache.length <= cache.max_len == n_sink + window
            assert [b for b in cache.k + cache.v if b is not None] == buffers
    assert [(b.data_ptr(), b.shape) for b in buffers] == before
    assert (cache.valid.shape, cache.shift.shape) == ((1, cache.max_len), (1, cache.max_len))
    assert cache.n_tokens.item() == n_sink + window - 1

    out = generate(model, [[1, 2, 3]], greedy(5 * window), streaming=(n_sink, window))[0]
    assert len(out.token_ids) == 5 * window
    assert out.token_ids[:8] == generate(model, [[1, 2, 3]], greedy(8))[0].token_ids  # before any eviction


@pytest.mark.parametrize("case", ["rope", "alibi", "none"])
def test_left_padded_batch_rows_generate_as_alone(case):
    model = tiny(**POSITION_CASES[case])
    prompts = [[4, 8, 15], [16, 23, 42, 4, 8, 15, 16, 23, 42, 1, 2, 3, 5, 7, 11, 13, 17, 19]]
    option = (2, 6, 3)
    batch = generate(model, prompts, greedy(25), output_logits=True, streaming=option)
    for prompt, row in zip(prompts, batch, strict=True):
        alone = generate(model, [prompt], greedy(25), output_logits=True, streaming=option)[0]
        assert row.token_ids == alone.token_ids
        torch.testing.assert_close(row.logits, alone.logits, rtol=0, atol=TOL)


@pytest.mark.parametrize("layer_types", [["linear", "full"], ["mamba", "full"]])
def test_hybrid_models_keep_their_recurrent_state(layer_types):
    """Recurrent layers keep a state of the whole stream (nothing to evict) beside the sink cache."""
    model = tiny(layer_types=layer_types)
    prompts = [[4, 8, 15], [16, 23, 42, 4, 8, 15, 16, 23, 42, 1, 2, 3, 5, 7, 11, 13, 17, 19]]
    plain = generate(model, prompts, greedy(5), output_logits=True)
    no_eviction = generate(model, prompts, greedy(5), output_logits=True, streaming=(4, 40, 18))
    for a, b in zip(plain, no_eviction, strict=True):
        assert a.token_ids == b.token_ids and torch.equal(a.logits, b.logits)
    batch = generate(model, prompts, greedy(25), output_logits=True, streaming=(2, 6, 3))
    for prompt, row in zip(prompts, batch, strict=True):
        alone = generate(model, [prompt], greedy(25), output_logits=True, streaming=(2, 6, 3))[0]
        assert row.token_ids == alone.token_ids
        torch.testing.assert_close(row.logits, alone.logits, rtol=0, atol=5 * TOL)


def test_stream_with_sinks_equals_generate():
    model = tiny()
    option = (1, 5, 2)
    chunks = list(stream(model, [1, 2, 3, 4, 5, 6, 7, 8, 9], greedy(30), streaming=option))
    (out,) = generate(model, [[1, 2, 3, 4, 5, 6, 7, 8, 9]], greedy(30), streaming=option)
    assert [c.token_id for c in chunks] == out.token_ids


def test_sink_cache_errors():
    with pytest.raises(ValueError, match="absolute position embeddings"):
        SinkCache(tiny(position="learned").cfg, 1, 4, 8)
    model = tiny()
    cache = SinkCache(model.cfg, 1, 4, 8, chunk=2)
    with pytest.raises(ValueError, match="at most chunk=2"):
        model.hidden_states(torch.tensor([[1, 2, 3]]), cache)
    with pytest.raises(ValueError, match="window must be >= 1"):
        SinkCache(model.cfg, 1, 4, 0)
    with pytest.raises(ValueError, match="streaming="):
        generate(model, [[1]], greedy(2), streaming=(4,))
    with pytest.raises(ValueError, match="streaming="):
        generate(model, [[1]], greedy(2), streaming=(4, 0))


def test_kv_cache_and_sink_cache_share_the_interface():
    cfg = tiny().cfg
    plain, sink = KVCache(cfg, 2, 8), SinkCache(cfg, 2, 1, 4)
    for name in ("update", "reserve", "advance", "get_state", "set_state", "length", "valid", "n_tokens",
                 "has_padding", "max_len", "batch_size"):
        assert hasattr(plain, name) and hasattr(sink, name), name


def test_ntk_needs_no_original_length():
    cfg = ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, rope_scaling=RopeScaling("ntk", 2.0))
    assert cfg.rope_scaling.original_max_seq_len is None
