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
