"""The shared adapter interface (tune/adapters.py): config checks, target patterns, and one base carrying a LoRA,
an IA3 and a prefix adapter at once: each runs alone as it would on its own, they compose, rows route, and
removing them gives the base back."""

from __future__ import annotations

import pytest
import torch

from lmlab.model.config import ModelConfig
from lmlab.model.transformer import build_model
from lmlab.tune.adapters import (
    AdapterConfig,
    active_adapters,
    adapter_names,
    apply_adapter,
    count_parameters,
    load_adapter,
    matches,
    remove_adapter,
    route,
    save_adapter,
    set_active,
)


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                                   max_seq_len=32)).eval()


def _randomize(model, name: str) -> None:
    """Move an adapter away from its no-op start, so that it changes the output."""
    torch.manual_seed(hash(name) % 1000)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if f".{name}" in key or key.endswith(f".{name}"):
                p.add_(torch.randn_like(p) * 0.2)


# LoRA and IA3 on different layers: one layer takes adapters of one kind (stacking kinds on a layer is refused)
CONFIGS = {"L": AdapterConfig(method="lora", r=4, targets=["q_proj", "o_proj", "up_proj"]),
           "I": AdapterConfig(method="ia3"),
           "P": AdapterConfig(method="prefix", prefix_len=3)}


def test_config_checks_and_patterns():
    with pytest.raises(ValueError, match="adapter.method"):
        AdapterConfig(method="adalora")
    with pytest.raises(ValueError, match="needs adapter.method='lora'"):
        AdapterConfig(method="ia3", quantize="nf4")
    assert AdapterConfig(method="lora", r=4, alpha=8).scaling == 2.0
    assert AdapterConfig(method="lora", r=4, alpha=8, rslora=True).scaling == 4.0
    assert AdapterConfig(method="ia3").target_patterns == ["k_proj", "v_proj", "down_proj"]
    assert matches("blocks.3.attn.q_proj", ["q_proj"]) and matches("blocks.3.attn.q_proj", ["attn.q_proj"])
    assert not matches("blocks.3.attn.q_proj", ["mlp.q_proj"]) and not matches("blocks.3.attn.q_proj", ["proj"])
    assert matches("blocks.3.attn.v_proj", [r"blocks\.[0-3]\.attn\.(q|v)_proj"])
    assert not matches("blocks.4.attn.v_proj", [r"blocks\.[0-3]\.attn\.(q|v)_proj"])
    assert matches("blocks.0.mlp.down_proj", ["all-linear"]) and not matches("lm_head", ["all-linear"])
    with pytest.raises(ValueError, match="valid regular expression"):
        matches("blocks.0.attn.q_proj", ["q_proj("])
    with pytest.raises(ValueError, match="adapter name"):
        apply_adapter(_model(), CONFIGS["L"], name="has.dot")
    stacked = apply_adapter(_model(), AdapterConfig(method="lora"), "L")
    with pytest.raises(ValueError, match="narrow the targets"):
        apply_adapter(stacked, AdapterConfig(method="ia3"), "I")


def test_three_kinds_on_one_base(tmp_path):
    x = torch.randint(0, 64, (3, 10))
    base = _model()
    with torch.no_grad():
        plain = base(x).logits
    alone = {}
    for name, cfg in CONFIGS.items():  # each adapter on a base of its own
        m = _model()
        apply_adapter(m, cfg, name)
        _randomize(m, name)
        save_adapter(m, tmp_path / name, cfg, name=name)
        with torch.no_grad():
            alone[name] = m(x).logits
        assert not torch.allclose(alone[name], plain, atol=1e-4), name

    model = _model()
    for name in CONFIGS:
        load_adapter(model, tmp_path / name, name=name)
    assert sorted(adapter_names(model)) == ["I", "L", "P"]
    trainable = count_parameters(model).trainable
    assert trainable == sum(p.numel() for k, p in model.named_parameters() if any(f".{n}" in k for n in "LIP"))
    with torch.no_grad():
        for name in CONFIGS:
            set_active(model, [name])
            assert active_adapters(model) == [name]
            torch.testing.assert_close(model(x).logits, alone[name], atol=1e-6, rtol=1e-6)
        set_active(model, None)
        torch.testing.assert_close(model(x).logits, plain, atol=1e-6, rtol=1e-6)
        set_active(model, ["L", "I"])
        both = model(x).logits
        assert not torch.allclose(both, alone["L"], atol=1e-4) and not torch.allclose(both, alone["I"], atol=1e-4)
        set_active(model, None)
        with route(model, ["L", None, "I"]):  # rows with different fine-tunes in one pass
            routed = model(x).logits
        torch.testing.assert_close(routed[0], alone["L"][0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(routed[1], plain[1], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(routed[2], alone["I"][2], atol=1e-6, rtol=1e-6)
        with pytest.raises(ValueError, match="no adapter called"):
            set_active(model, ["nope"])
        for name in CONFIGS:
            remove_adapter(model, name)
        assert adapter_names(model) == []
        torch.testing.assert_close(model(x).logits, plain, atol=1e-6, rtol=1e-6)
    assert sorted(model.state_dict()) == sorted(base.state_dict())


@pytest.mark.parametrize("tied", [True, False])
def test_trainable_token_rows(tied, tmp_path):
    """E' = E + scatter(ids, D) wherever the model reads the matrix; only D trains; save, load, merge, remove."""
    from lmlab.tune import lora
    from lmlab.tune.tokens import resolve_tokens

    torch.manual_seed(0)
    cfg_model = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=32,
                            tie_embeddings=tied)
    model = build_model(cfg_model).eval()
    weight = model.embed.weight.detach().clone()
    x = torch.randint(0, 64, (2, 12))
    x[0, 2], x[1, 5] = 7, 9
    with torch.no_grad():
        plain = model(x).logits
    cfg = AdapterConfig(method="lora", r=2, targets=["q_proj"], trainable_tokens=["x"], token_ids=[9, 7])
    apply_adapter(model, cfg, "t")
    assert [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n] == (
        ["embed.parametrizations.weight.0.token_delta.t"]
        + ([] if tied else ["lm_head.parametrizations.weight.0.token_delta.t"]))
    lora_params, row_params = 2 * 2 * (32 + 32), 2 * 32  # 2 layers x r (in + out); 2 rows x d_model
    assert count_parameters(model).trainable == lora_params + row_params * (1 if tied else 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, plain)  # a fresh delta is zero
        delta = torch.randn(2, 32)
        model.embed.parametrizations.weight[0].token_delta["t"].copy_(delta)
        expected = weight.clone()
        expected[[7, 9]] += delta  # rows sorted by id
        torch.testing.assert_close(model.embed.weight, expected)
        tuned = model(x).logits
    assert not torch.allclose(tuned, plain, atol=1e-4)
    model(x, targets=x).loss.backward()
    assert model.embed.parametrizations.weight.original.grad is None
    assert model.embed.parametrizations.weight[0].token_delta["t"].grad is not None

    save_adapter(model, tmp_path / "t", cfg, name="t")
    fresh = build_model(cfg_model)
    fresh.load_state_dict(_plain_state(model))
    load_adapter(fresh.eval(), tmp_path / "t", name="t")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, tuned)
        set_active(fresh, None)
        torch.testing.assert_close(fresh(x).logits, plain)
        set_active(fresh, ["t"])
        merged = lora.merge_and_unload(fresh)
        assert not any("parametrizations" in k for k in merged.state_dict())
        torch.testing.assert_close(merged(x).logits, tuned, atol=1e-5, rtol=1e-5)
    remove_adapter(model, "t")
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, plain)
    assert not any("parametrizations" in k for k in model.state_dict())
    with pytest.raises(ValueError, match="must be resolved to ids"):
        apply_adapter(model, AdapterConfig(method="ia3", trainable_tokens=["chat"]), "u")

    class Tok:  # resolve_tokens reads special_tokens, encode, decode and render_chat
        special_tokens = {"<|end|>": 5}

        def encode(self, text):
            return [ord(c) for c in text]

    assert resolve_tokens(Tok(), ["<|end|>", "a"]) == [5, ord("a")]
    with pytest.raises(ValueError, match="not one token"):
        resolve_tokens(Tok(), ["ab"])


def _plain_state(model):
    """The base weights of a model carrying adapters, under the plain model's names."""
    state = {}
    for k, v in model.state_dict().items():
        if any(m in k for m in ("lora_", "token_")):
            continue
        state[k.replace(".parametrizations.weight.original", ".weight").replace(".base_layer.", ".")] = v
    return state
