"""Counts from the config alone: checked against hand arithmetic for published models, against the
built model's parameters for many configs, and against torch's FLOP counter on real passes."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from lmlab.model import ModelConfig, build_model
from lmlab.model.counting import (
    cache_bytes,
    cache_comparison,
    count_params,
    embedding_params,
    flops_per_token,
    forward_flops_per_token,
    kv_cache_bytes_per_token,
    matmul_params,
    state_bytes_per_sequence,
    summary,
)


def gpt2_124m() -> ModelConfig:
    return ModelConfig(
        vocab_size=50257,
        d_model=768,
        n_layers=12,
        n_heads=12,
        max_seq_len=1024,
        norm="layernorm",
        norm_bias=True,
        norm_eps=1e-5,
        position="learned",
        qkv_bias=True,
        attn_out_bias=True,
        mlp_gated=False,
        mlp_activation="gelu_tanh",
        d_ff=3072,
        mlp_bias=True,
        tie_embeddings=True,
    )


def test_gpt2_124m_by_hand():
    cfg = gpt2_124m()
    # token embedding      50257 * 768                       = 38,597,376
    # position embedding    1024 * 768                       =    786,432
    # per layer:
    #   ln_1, ln_2          2 * (768 + 768)                  =      3,072
    #   qkv                 768 * 2304 + 2304                =  1,771,776
    #   attn out            768 * 768 + 768                  =    590,592
    #   mlp up              768 * 3072 + 3072                =  2,362,368
    #   mlp down            3072 * 768 + 768                 =  2,360,064
    #   layer total                                          =  7,087,872
    # 12 layers             12 * 7,087,872                   = 85,054,464
    # final ln              768 + 768                        =      1,536
    # lm_head               tied: 0
    # non-embedding         85,054,464 + 1,536               = 85,056,000
    # total                 85,056,000 + 38,597,376 + 786,432 = 124,439,808
    assert count_params(cfg) == 124_439_808
    assert count_params(cfg, embeddings=False) == 85_056_000
    assert embedding_params(cfg) == 39_383_808
    # matmul params: non-embedding + the tied output projection 50257 * 768
    #   85,056,000 + 38,597,376 = 123,653,376
    assert matmul_params(cfg) == 123_653_376
    # training FLOPs per token at seq 1024:
    #   6 * 123,653,376             = 741,920,256
    #   12 * 12 * 12 * 64 * 1024    = 113,246,208   (12 * n_layers * n_heads * head_dim * seq)
    #   sum                         = 855,166,464
    assert flops_per_token(cfg) == 855_166_464
    assert flops_per_token(cfg, seq_len=1024) == 855_166_464
    # forward: a third = 2 * 123,653,376 + 4 * 12 * 12 * 64 * 1024 = 247,306,752 + 37,748,736
    assert forward_flops_per_token(cfg) == 285_055_488
    # at seq 2048 the attention term doubles: 741,920,256 + 226,492,416
    assert flops_per_token(cfg, seq_len=2048) == 968_412_672
    # KV cache: 2 * 12 layers * 12 heads * 64 dims * 2 bytes = 36,864 (bf16); 73,728 (fp32)
    assert kv_cache_bytes_per_token(cfg) == 36_864
    assert kv_cache_bytes_per_token(cfg, torch.float32) == 73_728
    assert kv_cache_bytes_per_token(cfg, torch.float16) == 36_864


def test_llama3_8b_gqa_by_hand():
    cfg = ModelConfig(
        vocab_size=128256,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        d_ff=14336,
        max_seq_len=8192,
        rope_theta=500000.0,
        tie_embeddings=False,
    )
    # embed / lm_head       128256 * 4096 = 525,336,576 each
    # per layer:
    #   q_proj              4096 * 4096            = 16,777,216
    #   k_proj, v_proj      2 * 4096 * (8 * 128)   =  8,388,608
    #   o_proj              4096 * 4096            = 16,777,216
    #   gate, up, down      3 * 4096 * 14336       = 176,160,768
    #   2 RMSNorms          2 * 4096               =      8,192
    #   layer total                                = 218,112,000
    # 32 layers             32 * 218,112,000       = 6,979,584,000
    # final norm            4096
    # non-embedding         6,979,584,000 + 4,096 + 525,336,576 (untied lm_head) = 7,504,924,672
    # total                 7,504,924,672 + 525,336,576 = 8,030,261,248 (Meta's published count)
    assert count_params(cfg) == 8_030_261_248
    assert count_params(cfg, embeddings=False) == 7_504_924_672
    # untied: the lm_head is already among the non-embedding params
    assert matmul_params(cfg) == 7_504_924_672
    # 6 * 7,504,924,672 = 45,029,548,032; 12 * 32 * 32 * 128 * 8192 = 12,884,901,888
    assert flops_per_token(cfg) == 57_914_449_920
    # 2 * 32 layers * 8 kv heads * 128 dims * 2 bytes = 131,072
    assert kv_cache_bytes_per_token(cfg) == 131_072


def test_qwen3_0_6b_qk_norm_independent_head_dim_by_hand():
    cfg = ModelConfig(
        vocab_size=151936,
        d_model=1024,
        n_layers=28,
        n_heads=16,
        n_kv_heads=8,
        head_dim=128,
        d_ff=3072,
        max_seq_len=40960,
        qk_norm=True,
        norm_eps=1e-6,
        tie_embeddings=True,
    )
    # embed                 151936 * 1024 = 155,582,464 (tied: no lm_head)
    # per layer:
    #   q_proj              1024 * 16 * 128    = 2,097,152
    #   k_proj, v_proj      2 * 1024 * 8 * 128 = 2,097,152
    #   o_proj              16 * 128 * 1024    = 2,097,152
    #   q_norm, k_norm      2 * 128            =       256
    #   gate, up, down      3 * 1024 * 3072    = 9,437,184
    #   2 RMSNorms          2 * 1024           =     2,048
    #   layer total                            = 15,730,944
    # 28 layers             440,466,432; + final norm 1,024 = 440,467,456 non-embedding
    # total                 440,467,456 + 155,582,464 = 596,049,920
    assert count_params(cfg) == 596_049_920
    assert count_params(cfg, embeddings=False) == 440_467_456
    # 6 * (440,467,456 + 155,582,464) = 3,576,299,520; 12 * 28 * 16 * 128 * 4096 = 2,818,572,288
    assert flops_per_token(cfg, seq_len=4096) == 6_394_871_808
    # 2 * 28 * 8 * 128 * 2 = 114,688
    assert kv_cache_bytes_per_token(cfg) == 114_688


def test_sliding_window_layers_attend_to_their_window():
    cfg = ModelConfig(
        vocab_size=100,
        d_model=64,
        n_layers=4,
        n_heads=4,
        max_seq_len=4096,
        sliding_window=1024,
        layer_types=["sliding", "full", "sliding", "full"],
    )
    # attention: 12 * 4 heads * 16 dims * (1024 + 4096 + 1024 + 4096) = 7,864,320
    assert flops_per_token(cfg) == 6 * matmul_params(cfg) + 7_864_320
    # below the window every layer sees the whole sequence: 12 * 4 * 16 * 4 * 512 = 1,572,864
    assert flops_per_token(cfg, seq_len=512) == 6 * matmul_params(cfg) + 1_572_864


def random_config(rng: random.Random) -> ModelConfig:
    n_heads = rng.choice([1, 2, 4])
    head_dim = rng.choice([None, 4, 6, 8])
    gated = rng.random() < 0.5
    n_layers = rng.randint(1, 3)
    position = rng.choice(["rope", "learned", "sinusoidal", "alibi", "none"])
    norm = rng.choice(["rmsnorm", "layernorm"])
    pre_norm = rng.random() < 0.7
    return ModelConfig(
        vocab_size=rng.randint(5, 40),
        d_model=4 * rng.randint(1, 6) * n_heads,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=rng.choice([d for d in (1, 2, 4) if n_heads % d == 0]),
        head_dim=head_dim,
        d_ff=rng.choice([None, 12, 20]),
        max_seq_len=rng.randint(4, 24),
        norm=norm,
        norm_bias=rng.random() < 0.5,
        norm_unit_offset=rng.random() < 0.3,
        pre_norm=pre_norm,
        post_norm=(not pre_norm) or rng.random() < 0.3,
        qk_norm=rng.random() < 0.4,
        position=position,
        qkv_bias=rng.random() < 0.5,
        attn_out_bias=rng.random() < 0.5,
        mlp_gated=gated,
        mlp_activation=rng.choice(["gelu", "gelu_tanh", "silu", "relu"]),
        mlp_bias=rng.random() < 0.5,
        tie_embeddings=rng.random() < 0.5,
        sliding_window=rng.choice([None, 3]),
    )


def test_count_params_matches_built_model_over_many_configs():
    rng = random.Random(1234)
    seen = set()
    for _ in range(150):
        cfg = random_config(rng)
        model = build_model(cfg)
        assert count_params(cfg) == sum(p.numel() for p in model.parameters()), cfg
        # the embedding tables, read off the built model: token embedding and learned positions
        tables = sum(m.weight.numel() for m in (model.embed, model.pos_embed) if m is not None)
        assert count_params(cfg, embeddings=False) == count_params(cfg) - tables, cfg
        seen.add(
            (
                cfg.tie_embeddings,
                cfg.mlp_gated,
                cfg.position == "learned",
                cfg.qk_norm,
                cfg.post_norm,
                cfg.norm_bias and cfg.norm == "layernorm",
            )
        )
    assert len(seen) > 30  # the sweep really covered the combinations


def test_default_config_matches_built_model():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)
    model = build_model(cfg, device="meta")
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())


def _norm_and_bias_params(model: torch.nn.Module) -> int:
    # 1-d parameters are norm weights/biases and linear biases: elementwise, not matmul FLOPs
    return sum(p.numel() for p in model.parameters() if p.dim() == 1)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("position", ["rope", "learned"])
def test_flops_match_torch_flop_counter(tie: bool, position: str):
    """The matmul FLOPs torch actually executes (reference attention materializes Q K^T and A V
    as batched matmuls) equal our count minus the norm/bias terms, which the FLOP counter does
    not see; backward costs exactly twice forward."""
    cfg = ModelConfig(
        vocab_size=37,
        d_model=16,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=6,
        d_ff=24,
        max_seq_len=12,
        qkv_bias=True,
        mlp_bias=not tie,
        mlp_gated=tie,
        position=position,
        tie_embeddings=tie,
        qk_norm=True,
    )
    model = build_model(cfg).set_attn_impl("reference")
    T = 12
    ids = torch.randint(0, cfg.vocab_size, (2, T))
    elementwise = 2 * _norm_and_bias_params(model)
    with FlopCounterMode(display=False) as fwd:
        model(ids)
    assert fwd.get_total_flops() == 2 * T * (forward_flops_per_token(cfg, T) - elementwise)
    with FlopCounterMode(display=False) as train:
        model(ids, targets=ids).loss.backward()
    assert train.get_total_flops() == 2 * T * (flops_per_token(cfg, T) - 3 * elementwise)


def test_forward_is_a_third_and_seq_len_defaults_to_max():
    cfg = gpt2_124m()
    assert flops_per_token(cfg) == 3 * forward_flops_per_token(cfg)
    assert flops_per_token(cfg) == flops_per_token(cfg, seq_len=cfg.max_seq_len)
    assert flops_per_token(cfg, seq_len=0) == 6 * matmul_params(cfg)
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(cfg, seq_len=-1)


def test_summary():
    s = summary(gpt2_124m())
    assert s["params"] == 124_439_808
    assert s["params_non_embedding"] == 85_056_000
    assert s["params_embedding"] == 39_383_808
    assert s["flops_per_token"] == 855_166_464
    assert s["forward_flops_per_token"] == 285_055_488
    assert s["kv_cache_bytes_per_token_bf16"] == 36_864
    assert s["kv_cache_bytes_per_token_fp32"] == 73_728
    assert s["kv_cache_bytes_per_sequence_bf16"] == 36_864 * 1024
    assert s["weight_bytes_bf16"] == 2 * 124_439_808
    assert all(isinstance(v, int) for v in s.values())


# --- every layer kind ---------------------------------------------------------------------------------------

BASE = dict(vocab_size=50, d_model=32, n_layers=3, n_heads=4, max_seq_len=32)
KINDS = {
    "moe": dict(moe=dict(n_experts=4, top_k=2, d_expert=24, n_shared_experts=1, d_shared=16, shared_gate=True,
                         bias_balancing=True, dense_layers=[0])),
    "moe-ungated": dict(mlp_gated=False, mlp_bias=True, moe=dict(n_experts=3, top_k=1)),
    "mla": dict(mla=dict(kv_lora_rank=16, q_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6),
                qkv_bias=True),
    "mla-full-q": dict(mla=dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)),
    "linear": dict(layer_types=["linear", "full", "linear"], n_kv_heads=2, qkv_bias=True),
    "mamba": dict(layer_types=["mamba"] * 3, position="none"),
    "mamba2": dict(layer_types=["mamba"] * 3, position="none",
                   ssm=dict(kind="mamba2", head_dim=16, n_groups=2, d_state=8, proj_bias=True)),
    "hybrid": dict(layer_pattern=["mamba", "full"], ssm=dict(mlp=True, d_state=4), sliding_window=8,
                   moe=dict(n_experts=2, top_k=1)),
}


@pytest.mark.parametrize("name", list(KINDS))
def test_counts_of_every_layer_kind_match_the_built_model(name):
    cfg = ModelConfig(**BASE, **KINDS[name])
    model = build_model(cfg)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    # the cache: per-token bytes equal the buffers' growth per slot; state bytes equal what a forward stores
    cache = model.new_cache(2, 16)
    per_slot = sum(t[0, :, 0].numel() * t.element_size() for t in (*cache.k, *cache.v) if t is not None)
    assert kv_cache_bytes_per_token(cfg, torch.float32) == per_slot
    with torch.no_grad():
        model(torch.randint(0, 50, (2, 5)), cache=cache)
    state = sum(t[0].numel() * t.element_size() for s in cache.states if s is not None for t in s.values())
    assert state_bytes_per_sequence(cfg, torch.float32) == state


def test_moe_active_parameters_by_hand():
    cfg = ModelConfig(**BASE, moe=dict(n_experts=8, top_k=2, d_expert=16))
    # per MoE layer: router 32 * 8; experts 3 matrices of 32 * 16 each: all 8 stored, 2 active
    stored, active = 32 * 8 + 8 * 3 * 32 * 16, 32 * 8 + 2 * 3 * 32 * 16
    assert count_params(cfg) - count_params(cfg, active=True) == 3 * (stored - active)
    assert matmul_params(cfg) == count_params(cfg, embeddings=False, active=True)


def test_recurrent_layers_have_constant_context_cost():
    linear = ModelConfig(**BASE, layer_types=["linear"] * 3)
    assert flops_per_token(linear, 16) == flops_per_token(linear, 4096)
    full = ModelConfig(**BASE)
    assert flops_per_token(full, 16) < flops_per_token(full, 4096)
    assert cache_bytes(linear, 4096) == cache_bytes(linear, 16) == state_bytes_per_sequence(linear, torch.bfloat16)
    windowed = ModelConfig(**BASE, sliding_window=8)
    assert cache_bytes(windowed, 4096, bounded=True) == cache_bytes(windowed, 8)


def test_cache_comparison_rows():
    cfg = ModelConfig(**BASE, n_kv_heads=2)
    rows = {r["kind"].split(" (")[0]: r for r in cache_comparison(cfg, seq_len=64, dtype=torch.bfloat16)}
    assert set(rows) == {"MHA", "GQA", "MQA", "MLA", "sliding window", "linear attention", "Mamba"}
    # 3 layers x 2 (k, v) x heads x 8 dims x 2 bytes
    assert rows["MHA"]["bytes_per_token"] == 3 * 2 * 4 * 8 * 2
    assert rows["GQA"]["bytes_per_token"] == 3 * 2 * 2 * 8 * 2
    assert rows["MQA"]["bytes_per_token"] == 3 * 2 * 1 * 8 * 2
    assert rows["MLA"]["bytes_per_token"] == 3 * (4 * 8 + 4) * 2  # latent 4 x head_dim + RoPE key head_dim / 2
    assert rows["sliding window"]["bytes_at_seq_len"] == 16 * rows["GQA"]["bytes_per_token"]  # window 64 / 4
    assert rows["linear attention"]["bytes_per_token"] == rows["Mamba"]["bytes_per_token"] == 0
    assert rows["linear attention"]["state_bytes"] == 3 * 2 * (8 * 8 + 8) * 4  # per kv head, float32
