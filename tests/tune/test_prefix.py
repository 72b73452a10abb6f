"""Prefix tuning against its equations (softmax over [prefix ; keys], written out per query and head, under every
kind of mask), against its defining invariant (a prefix equal to a real context's KV cache reproduces the model on
that context), against PEFT (same tiny Hugging Face Llama), with the KV cache, and its bookkeeping: counts,
gradients, reparameterization and folding, several adapters, save/load."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.model import ModelConfig, build_model
from lmlab.model.attention import causal_mask
from lmlab.model.norm import Norm
from lmlab.model.position import alibi_slopes, apply_rope, rope_cos_sin
from lmlab.tune import prefix
from lmlab.tune.adapters import AdapterConfig, apply_adapter, count_parameters, load_adapter, save_adapter
from lmlab.tune.prefix import LayerPrefix, real_token_prefixes

VOCAB = 96
BASE = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64)


def tiny_model(seed: int = 0, **changes) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**{**BASE, "init_std": 0.1, **changes}))
    with torch.no_grad():  # move norms away from identity so a mis-applied norm would show
        for m in model.modules():
            if isinstance(m, Norm):
                m.weight.add_(0.1 * torch.randn_like(m.weight))
    return model.eval()


def ids_for(batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def set_prefix(model: nn.Module, name: str, kvs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Overwrite the plain prefixes of adapter `name`, layer by layer."""
    with torch.no_grad():
        for layer, (k, v) in zip(prefix.prefix_layers(model), kvs, strict=True):
            layer.prefix_k[name].copy_(k)
            layer.prefix_v[name].copy_(v)


def random_prefixes(model: nn.Module, length: int, seed: int = 3, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    shape = (model.cfg.n_kv_heads, length, model.cfg.head_dim)
    return [(scale * torch.randn(shape, generator=g), scale * torch.randn(shape, generator=g))
            for _ in range(model.cfg.n_layers)]


# --- the equations, by hand ---------------------------------------------------------------------------
def attention_by_hand(attn, x, rope, k_p, v_p, allowed, alibi=None, softcap=None):
    """softmax([q K_p^T ; q K^T] * scale) [V_p ; V] for each batch row, head and query, one at a time: prefix keys
    not rotated, seen by every query with no bias; a sequence key s seen by query t where allowed[b, t, s]."""
    B, T, _ = x.shape
    H, G, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, T, H, D).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, G, D).transpose(1, 2)
    v = attn.v_proj(x).view(B, T, G, D).transpose(1, 2)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    out = torch.zeros(B, H, T, D, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            g = h // (H // G)  # the KV head this query head reads (GQA)
            for t in range(T):
                scores, values = [], []
                for j in range(k_p.shape[1]):
                    scores.append(q[b, h, t] @ k_p[g, j] * attn.scale)
                    values.append(v_p[g, j])
                for s in range(T):
                    if allowed[b, t, s]:
                        score = q[b, h, t] @ k[b, g, s] * attn.scale
                        if softcap is not None:
                            score = softcap * torch.tanh(score / softcap)
                        scores.append(score + (0 if alibi is None else alibi[h, t, s]))
                        values.append(v[b, g, s])
                if softcap is not None:  # the prefix scores are capped too: they are attention logits
                    P = k_p.shape[1]
                    scores[:P] = [softcap * torch.tanh(sc / softcap) for sc in scores[:P]]
                weights = torch.stack(scores).softmax(dim=0)
                out[b, h, t] = (weights[:, None] * torch.stack(values)).sum(dim=0)
    return attn.o_proj(out.transpose(1, 2).reshape(B, T, H * D))


MASK_CASES = ["causal", "packed", "left_padding", "window", "alibi", "softcap"]


def mask_case(case: str, B: int, T: int):
    """(model config changes, the masks dict Attention.forward reads, allowed[b, t, s] written from the rules)."""
    t, s = torch.arange(T)[:, None], torch.arange(T)[None, :]
    causal = (s <= t).expand(B, T, T)
    if case in ("causal", "alibi", "softcap"):
        changes = {"alibi": dict(position="alibi"), "softcap": dict(attn_softcap=2.0)}.get(case, {})
        return changes, {None: None}, causal
    if case == "packed":  # row 0: documents of 3 and 5 tokens; row 1: one document
        doc = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 2], [1] * 8])[:, :T]
        same = doc[:, :, None] == doc[:, None, :]
        return {}, {None: causal_mask(0, T, T, None, None) & same[:, None]}, causal & same
    if case == "left_padding":  # row 0 has 3 padding slots in front
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[0, :3] = False
        allowed = (causal & valid[:, None, :]) | torch.eye(T, dtype=torch.bool)
        return {}, {None: causal_mask(0, T, T, None, valid)}, allowed
    assert case == "window"
    return dict(sliding_window=3), {3: causal_mask(0, T, T, 3, None)}, causal & (t - s < 3)


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
@pytest.mark.parametrize("case", MASK_CASES)
def test_attention_with_a_prefix_matches_the_equations(case, impl):
    B, T, P = 2, 8, 3
    changes, masks, allowed = mask_case(case, B, T)
    model = tiny_model(**changes).double()
    attn = model.blocks[0].attn
    attn.impl = impl
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, model.cfg.d_model, generator=g, dtype=torch.float64)
    k_p = torch.randn(model.cfg.n_kv_heads, P, model.cfg.head_dim, generator=g, dtype=torch.float64)
    v_p = torch.randn(model.cfg.n_kv_heads, P, model.cfg.head_dim, generator=g, dtype=torch.float64)
    rope = None if case == "alibi" else rope_cos_sin(model.cfg, torch.arange(T).expand(B, T), torch.float64)
    alibi = None
    if case == "alibi":
        # (H, T, T) key-minus-query distances times the slopes, in float32 as the transformer builds it
        alibi = alibi_slopes(model.cfg.n_heads)[:, None, None] * (torch.arange(T)[None, :] - torch.arange(T)[:, None])
    attn.prefix = lambda batch: (k_p.expand(batch, -1, -1, -1), v_p.expand(batch, -1, -1, -1))
    with torch.no_grad():
        got = attn(x, rope, masks, None, alibi)
        expected = attention_by_hand(attn, x, rope, k_p, v_p, allowed, alibi, model.cfg.attn_softcap)
        attn.prefix = None
        without = attn(x, rope, masks, None, alibi)
    # the reference path computes in float32 by design (and soft-capping always takes it); SDPA stays in float64
    tol = 1e-6 if impl == "reference" or case == "softcap" else 1e-10
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    assert (got - without).abs().max() > 1e-3  # the prefix changed the output


def test_prefix_with_zero_keys_and_values_rescales_attention_by_its_share():
    """q . 0 = 0, so each of the P prefix slots gets softmax weight exp(0) and adds the value 0: the attention output
    (before o_proj) is the plain one times Z / (Z + P), where Z = sum over visible keys of exp(score)."""
    B, T, P = 2, 6, 5
    model = tiny_model().double()
    attn = model.blocks[0].attn
    x = torch.randn(B, T, model.cfg.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rope = rope_cos_sin(model.cfg, torch.arange(T).expand(B, T), torch.float64)
    captured = {}
    attn.o_proj.register_forward_pre_hook(lambda _, args: captured.__setitem__("y", args[0]))
    zeros = torch.zeros(model.cfg.n_kv_heads, P, model.cfg.head_dim, dtype=torch.float64)
    with torch.no_grad():
        attn(x, rope, {None: None})
        plain = captured["y"].view(B, T, attn.n_heads, attn.head_dim)
        attn.prefix = lambda batch: (zeros.expand(batch, -1, -1, -1), zeros.expand(batch, -1, -1, -1))
        attn(x, rope, {None: None})
        with_prefix = captured["y"].view(B, T, attn.n_heads, attn.head_dim)
        q = apply_rope(attn.q_proj(x).view(B, T, 4, -1).transpose(1, 2), *rope)
        k = apply_rope(attn.k_proj(x).view(B, T, 2, -1).transpose(1, 2), *rope).repeat_interleave(2, dim=1)
        scores = (q @ k.transpose(-1, -2) * attn.scale).masked_fill(~causal_mask(0, T, T, None, None), -math.inf)
        Z = scores.exp().sum(dim=-1).transpose(1, 2)  # (B, T, H)
    torch.testing.assert_close(with_prefix, plain * (Z / (Z + P))[..., None], rtol=1e-10, atol=1e-12)


# --- the defining invariant: a prefix is a KV cache the model never had to compute ----------------------------
INVARIANT_MODELS = {
    "llama_gqa": {},
    "mqa_qk_norm": dict(n_kv_heads=1, qk_norm=True),
    "gpt2_like": dict(position="learned", norm="layernorm", mlp_gated=False, mlp_activation="gelu_tanh",
                      qkv_bias=True, tie_embeddings=True),
    "gemma2_like": dict(norm_unit_offset=True, post_norm=True, attn_softcap=5.0, logit_softcap=4.0,
                        embedding_scale=32**0.5, tie_embeddings=True),
}


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
@pytest.mark.parametrize("variant", INVARIANT_MODELS)
def test_prefix_equal_to_a_contexts_kv_cache_reproduces_the_model_on_that_context(variant, impl):
    """Prefill a context c of P tokens into a KV cache; use each layer's cached keys/values as that layer's prefix;
    run the text x at positions P..P+T-1. The logits must equal the plain model's on [c ; x] at x's positions:
    attention sees exactly the same keys and values, for every layer, head and query."""
    model = tiny_model(**INVARIANT_MODELS[variant]).set_attn_impl(impl)
    P, T = 4, 7
    context, text = ids_for(1, P, seed=5), ids_for(1, T, seed=6)
    with torch.no_grad():
        full = model(torch.cat([context, text], dim=1)).logits[:, P:]
        cache = model.new_cache(1, P)
        model(context, cache=cache)
        kvs = [(cache.k[i][0, :, :P], cache.v[i][0, :, :P]) for i in range(model.cfg.n_layers)]
    apply_adapter(model, AdapterConfig(method="prefix", prefix_len=P))
    set_prefix(model, "default", kvs)
    with torch.no_grad():
        got = model(text, positions=P + torch.arange(T)[None]).logits
        default_positions = model(text).logits
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
    assert (default_positions - full).abs().max() > 1e-4 or variant == "no_position"  # positions 0.. differ


# --- the KV cache, padding and packing ------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["sdpa", "reference"])
def test_decoding_with_the_kv_cache_equals_the_full_forward_and_never_caches_the_prefix(impl):
    model = tiny_model(sliding_window=4).set_attn_impl(impl)
    apply_adapter(model, AdapterConfig(method="prefix", prefix_len=5))
    set_prefix(model, "default", random_prefixes(model, 5))
    ids = ids_for(2, 9)
    valid = torch.ones(2, 9, dtype=torch.long)
    valid[1, :2] = 0  # row 1's prompt is left-padded by two slots
    with torch.no_grad():
        full = model(ids, attention_mask=valid).logits
        cache = model.new_cache(2, 16)
        steps = [model(ids[:, :4], cache=cache, attention_mask=valid[:, :4]).logits]  # prefill 4, then one by one
        steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(4, 9)]
    assert cache.length == 9  # the cache holds the tokens only
    real = valid.bool()
    torch.testing.assert_close(torch.cat(steps, dim=1)[real], full[real], rtol=1e-5, atol=1e-5)


def test_left_padded_and_packed_rows_equal_each_sequence_alone():
    model = tiny_model()
    apply_adapter(model, AdapterConfig(method="prefix", prefix_len=3))
    set_prefix(model, "default", random_prefixes(model, 3))
    a, b = ids_for(1, 5, seed=11), ids_for(1, 4, seed=12)
    with torch.no_grad():
        alone_a, alone_b = model(a).logits, model(b).logits
        # left padding: b padded to 5 in a batch with a
        batch = torch.cat([a, torch.cat([torch.zeros(1, 1, dtype=torch.long), b], dim=1)])
        valid = torch.ones(2, 5, dtype=torch.long)
        valid[1, 0] = 0
        padded = model(batch, attention_mask=valid).logits
        # packing: a and b in one row, attention kept inside each, positions restarting
        row = torch.cat([a, b], dim=1)
        doc = torch.tensor([[1] * 5 + [2] * 4])
        packed = model(row, positions=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3]]),
                       attention_mask=(doc[:, :, None] == doc[:, None, :])[:, None]).logits
    torch.testing.assert_close(padded[0], alone_a[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[1, 1:], alone_b[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[0, :5], alone_a[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[0, 5:], alone_b[0], rtol=1e-5, atol=1e-5)


# --- parity with PEFT ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(save_tiny_llama):
    return save_tiny_llama(
        "tiny-llama-prefix", vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        initializer_range=0.1,
    )


@pytest.mark.parametrize("hidden", [0, 24])
def test_peft_parity_logits_and_gradients(hf_dir, hidden):
    """PEFT feeds the prefix as a past-key-value cache, so its tokens sit at positions P..; lmlab gets the same
    positions explicitly. Same prefix weights (or the same reparameterization MLP) -> same logits and gradients."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lmlab.model.hub import load_hf

    P, T = 5, 8
    ours = load_hf(hf_dir, dtype=torch.float64)
    apply_adapter(ours, AdapterConfig(method="prefix", prefix_len=P, prefix_hidden=hidden))
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float64, attn_implementation="eager")
    peft_cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=hidden > 0,
                                       encoder_hidden_size=hidden or None)
    theirs = peft.get_peft_model(hf, peft_cfg)
    encoder = theirs.prompt_encoder["default"].double()  # PEFT keeps adapters in float32; compare in float64
    L, G, D = 2, 2, 16
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.5 if p.dim() > 1 else 0.1))
        if hidden == 0:  # PEFT's (P, L * 2 * G * D) rows, ordered (layer, key/value, head, dim)
            table = encoder.embedding.weight.view(P, L, 2, G, D)
            set_prefix(ours, "default", [(table[:, i, 0].transpose(0, 1), table[:, i, 1].transpose(0, 1))
                                         for i in range(L)])
        else:
            mine = ours.prefix_encoder["default"]
            mine.embedding.copy_(encoder.embedding.weight)
            for i in (0, 2):
                mine.mlp[i].weight.copy_(encoder.transform[i].weight)
                mine.mlp[i].bias.copy_(encoder.transform[i].bias)
    assert count_parameters(ours).trainable == sum(p.numel() for p in encoder.parameters())

    ids, targets = ids_for(2, T, seed=8) % 128, ids_for(2, T, seed=9) % 128
    out_theirs = theirs(input_ids=ids).logits
    out_ours = ours(ids, positions=P + torch.arange(T).expand(2, T)).logits
    # float64; ~5e-8 of the gap is the two RoPE implementations' float32 angles (the base models differ by that)
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-6, atol=1e-6)
    F.cross_entropy(out_theirs.flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(out_ours.flatten(0, 1), targets.flatten()).backward()
    if hidden == 0:
        grad = encoder.embedding.weight.grad.view(P, L, 2, G, D)
        for i, layer in enumerate(prefix.prefix_layers(ours)):
            for j, store in enumerate((layer.prefix_k, layer.prefix_v)):
                expected = grad[:, i, j].transpose(0, 1)
                assert expected.abs().max() > 1e-4
                torch.testing.assert_close(store["default"].grad, expected, rtol=1e-6,
                                           atol=1e-6 * expected.abs().max().item())
    else:
        mine = ours.prefix_encoder["default"]
        pairs = [(mine.embedding, encoder.embedding.weight)] + [
            (getattr(mine.mlp[i], w), getattr(encoder.transform[i], w)) for i in (0, 2) for w in ("weight", "bias")]
        for a, b in pairs:
            assert b.grad.abs().max() > 1e-5
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6 * b.grad.abs().max().item())
    assert all(p.grad is None for n, p in ours.named_parameters() if "prefix_" not in n)


# --- initialization, reparameterization, counts -----------------------------------------------------------
def test_initial_prefixes_are_real_tokens_keys_and_values_at_position_0():
    model = tiny_model(qk_norm=True).double()  # float64: batches of different sizes round alike
    tokens = torch.tensor([5, 17, 3])
    with torch.no_grad():
        cache = model.new_cache(3, 1)  # each token alone: a batch of three one-token sequences
        model(tokens[:, None], cache=cache)
    for i, (k, v) in enumerate(real_token_prefixes(model, tokens)):
        torch.testing.assert_close(k, cache.k[i][:, :, 0].transpose(0, 1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(v, cache.v[i][:, :, 0].transpose(0, 1), rtol=1e-12, atol=1e-12)
    # add_prefix draws its tokens at random: every slot of every layer must be some vocabulary token's
    apply_adapter(model, AdapterConfig(method="prefix", prefix_len=6))
    prefix.set_active(model, [])
    every = real_token_prefixes(model, torch.arange(VOCAB))
    for layer, (k_all, v_all) in zip(prefix.prefix_layers(model), every, strict=True):
        for slot in range(6):
            distance = (k_all - layer.prefix_k["default"][:, slot : slot + 1]).abs().amax(dim=(0, 2))
            token = int(distance.argmin())
            assert distance[token] < 1e-12
            torch.testing.assert_close(layer.prefix_v["default"][:, slot], v_all[:, token], rtol=1e-12, atol=1e-12)


def test_trainable_counts_follow_the_formulas():
    model = tiny_model()
    total = count_parameters(model).total
    cfg = model.cfg
    L, G, D, P = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 7
    apply_adapter(model, AdapterConfig(method="prefix", prefix_len=P))
    plain = L * 2 * G * P * D
    assert count_parameters(model) == (plain, total + plain)
    print(f"prefix tuning, P={P}: {count_parameters(model)}")

    other = tiny_model()
    h, w = 24, G * D
    apply_adapter(other, AdapterConfig(method="prefix", prefix_len=P, prefix_hidden=h))
    # P' (P, w), Linear(w, h), Linear(h, L * 2 * w)
    reparam = P * w + (w * h + h) + (h * L * 2 * w + L * 2 * w)
    assert count_parameters(other) == (reparam, total + reparam)
    print(f"prefix tuning, P={P}, MLP hidden {h}: {count_parameters(other)}")
    prefix.fold_prefix(other)
    assert count_parameters(other) == (plain, total + plain)


def test_reparameterization_computes_every_layer_from_one_mlp_and_folds_exactly():
    model = tiny_model()
    P, h = 4, 16
    apply_adapter(model, AdapterConfig(method="prefix", prefix_len=P, prefix_hidden=h))
    encoder = model.prefix_encoder["default"]
    L, G, D = model.cfg.n_layers, model.cfg.n_kv_heads, model.cfg.head_dim
    with torch.no_grad():  # the whole MLP, by hand: rows ordered (layer, key/value, head, dim)
        hidden = torch.tanh(encoder.embedding @ encoder.mlp[0].weight.T + encoder.mlp[0].bias)
        table = (hidden @ encoder.mlp[2].weight.T + encoder.mlp[2].bias).view(P, L, 2, G, D)
        for i in range(L):
            k, v = encoder.layer(i)
            torch.testing.assert_close(k, table[:, i, 0].transpose(0, 1))
            torch.testing.assert_close(v, table[:, i, 1].transpose(0, 1))
    ids = ids_for()
    with torch.no_grad():
        before = model(ids).logits
    assert prefix.fold_prefix(model) == ["default"]
    assert not hasattr(model, "prefix_encoder")
    assert all("prefix_encoder" not in n for n in model.state_dict())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)
    with pytest.raises(ValueError, match="no reparameterized prefix adapter called 'default'"):
        prefix.fold_prefix(model, "default")


def test_gradients_reach_only_the_prefixes_and_training_lowers_the_loss(adam_steps):
    for hidden in (0, 16):
        model = tiny_model()
        apply_adapter(model, AdapterConfig(method="prefix", prefix_len=4, prefix_hidden=hidden))
        losses = adam_steps(model, ids_for(), ids_for(seed=7))
        assert losses[-1] < losses[0]
        for name, p in model.named_parameters():
            assert (p.grad is not None and p.grad.abs().max() > 0) == ("prefix_" in name), name


# --- several adapters, saving ------------------------------------------------------------------------------
def test_several_adapters_concatenate_and_switch_and_none_is_the_base_model():
    model = tiny_model()
    ids = ids_for()
    with torch.no_grad():
        base = model(ids).logits
    apply_adapter(model, AdapterConfig(method="prefix", prefix_len=3), "a")
    apply_adapter(model, AdapterConfig(method="prefix", prefix_len=2, prefix_hidden=8), "b")
    assert prefix.adapter_names(model) == ["a", "b"] and prefix.active_adapters(model) == ["b"]
    prefix.set_active(model, [])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)  # no active prefix: the plain attention path, bit for bit
    # both active = one adapter holding their prefixes one after the other
    prefix.set_active(model, ["a", "b"])
    with torch.no_grad():
        both = model(ids).logits
        joined = [tuple(torch.cat([layer.kv("a")[j], layer.kv("b")[j]], dim=1) for j in (0, 1))
                  for layer in prefix.prefix_layers(model)]
    apply_adapter(model, AdapterConfig(method="prefix", prefix_len=5), "ab")
    set_prefix(model, "ab", joined)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, both, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no prefix adapter called"):
        prefix.set_active(model, "c")
    for name in ("a", "b", "ab"):
        prefix.remove_adapter(model, name)
    assert all(block.attn.prefix is None for block in model.blocks)
    assert not hasattr(model, "prefix_encoder")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)


@pytest.mark.parametrize("hidden", [0, 8])
def test_save_and_load_round_trip(tmp_path, hidden):
    model = tiny_model()
    fresh = copy.deepcopy(model)
    cfg = AdapterConfig(method="prefix", prefix_len=4, prefix_hidden=hidden)
    apply_adapter(model, cfg, "mine")
    if hidden == 0:
        set_prefix(model, "mine", random_prefixes(model, 4))
    ids = ids_for()
    with torch.no_grad():
        expected = model(ids).logits
    save_adapter(model, tmp_path / "a", cfg, name="mine")
    assert load_adapter(fresh, tmp_path / "a", name="other") == cfg
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)
    if hidden:  # folded, it is a plain adapter: saved with prefix_hidden=0, it loads as one
        prefix.fold_prefix(model)
        plain_cfg = AdapterConfig(method="prefix", prefix_len=4)
        save_adapter(model, tmp_path / "folded", plain_cfg, name="mine")
        again = copy.deepcopy(fresh)
        prefix.remove_adapter(again, "other")
        load_adapter(again, tmp_path / "folded")
        with torch.no_grad():
            torch.testing.assert_close(again(ids).logits, expected, rtol=1e-6, atol=1e-6)


def test_user_mistakes_raise_specific_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="has no targets"):
        prefix.add_prefix(model, AdapterConfig(method="prefix", targets=["q_proj"]))
    with pytest.raises(ValueError, match="method='prefix'"):
        prefix.add_prefix(model, AdapterConfig(method="ia3"))
    with pytest.raises(TypeError, match="lmlab Transformer"):
        prefix.add_prefix(nn.Linear(2, 2), AdapterConfig(method="prefix"))
    prefix.add_prefix(model, AdapterConfig(method="prefix"), "x")
    with pytest.raises(ValueError, match="already has a prefix adapter called 'x'"):
        prefix.add_prefix(model, AdapterConfig(method="prefix"), "x")
    with pytest.raises(ValueError, match="no reparameterized prefix adapter"):
        prefix.fold_prefix(model, "x")
    assert isinstance(model.blocks[0].attn.prefix, LayerPrefix)
