"""LoRA, rsLoRA and DoRA against PEFT on the same tiny Hugging Face Llama: same outputs, same gradients for every
adapter tensor, and adapters that move between the two formats with the same logits."""

from __future__ import annotations

import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lmlab.model.hub import load_hf  # noqa: E402
from lmlab.tune.adapters import AdapterConfig, apply_adapter, count_parameters  # noqa: E402
from lmlab.tune.lora import export_peft, load_peft_adapter  # noqa: E402

VOCAB = 128


@pytest.fixture(scope="module")
def hf_dir(save_tiny_llama):
    return save_tiny_llama(
        "tiny-llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        dtype="float32",
    )


def hf_model(path):
    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)


def to_lmlab_name(peft_name: str) -> str:
    """PEFT's parameter name of an adapter tensor -> lmlab's (written out here, independent of lora.py)."""
    name = peft_name.removeprefix("base_model.model.model.")
    name = re.sub(r"^layers\.(\d+)\.self_attn\.", r"blocks.\1.attn.", name)
    name = re.sub(r"^layers\.(\d+)\.mlp\.", r"blocks.\1.mlp.", name)
    # PEFT keeps DoRA's magnitude as a module with a .weight; lmlab as a parameter
    return re.sub(r"lora_magnitude_vector\.(\w+)\.weight$", r"lora_magnitude_vector.\1", name)


def randomize_adapter(model) -> None:
    """PEFT initializes B to zero (the adapter is a no-op); parity on a no-op would prove little."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
            elif "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)


def adapter_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


CASES = {
    "lora-qv": dict(targets=["q_proj", "v_proj"]),
    "lora-all": dict(targets=["all-linear"]),
    "rslora-all": dict(targets=["all-linear"], rslora=True),
    "dora-qv": dict(targets=["q_proj", "v_proj"], dora=True),
    "dora-rslora-mlp": dict(targets=["gate_proj", "up_proj", "down_proj", "o_proj"], dora=True, rslora=True),
    "lora-dropout": dict(targets=["all-linear"], dropout=0.2),
    "dora-dropout": dict(targets=["k_proj", "down_proj"], dora=True, dropout=0.2),
}


def pair(hf_dir, case: dict, r: int = 4, alpha: float = 12.0):
    """The same adapted model twice: PEFT on transformers, lmlab on the converted checkpoint, same weights."""
    cfg = AdapterConfig(r=r, alpha=alpha, **case)
    targets = "all-linear" if cfg.targets == ["all-linear"] else cfg.targets
    torch.manual_seed(1)
    reference = peft.get_peft_model(hf_model(hf_dir), peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=cfg.dropout, use_rslora=cfg.rslora,
        use_dora=cfg.dora, task_type="CAUSAL_LM"))
    randomize_adapter(reference)
    ours = apply_adapter(load_hf(hf_dir), cfg)
    theirs = {to_lmlab_name(n): p for n, p in adapter_params(reference).items()}
    mine = adapter_params(ours)
    assert set(theirs) == set(mine)  # the same layers adapted, the same tensors
    with torch.no_grad():
        for n, p in mine.items():
            assert p.shape == theirs[n].shape, n
            p.copy_(theirs[n])
    return reference, ours, cfg


def batch(seed: int = 2, B: int = 2, T: int = 12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T), generator=g), torch.randint(0, VOCAB, (B, T), generator=g)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_outputs_and_gradients_match_peft(hf_dir, case):
    reference, ours, _ = pair(hf_dir, CASES[case])
    ids, targets = batch()
    # trainable parameters: the same count, and only the adapters
    trainable, total = reference.get_nb_trainable_parameters()
    assert count_parameters(ours) == (trainable, total)
    assert all("lora_" in n for n, p in ours.named_parameters() if p.requires_grad)

    # Train mode: with dropout the masks are drawn in the same order (q, k, v, o, gate, up, down per layer, one
    # draw per adapted layer in both libraries), so even the dropped paths agree under one seed.
    for mode in ("eval", "train"):
        reference.train(mode == "train")
        ours.train(mode == "train")
        for p in [*reference.parameters(), *ours.parameters()]:
            p.grad = None
        torch.manual_seed(3)
        want = reference(input_ids=ids).logits
        torch.manual_seed(3)
        got = ours(ids).logits
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
        if mode == "train" and CASES[case].get("dropout"):
            with torch.no_grad():  # the dropout did act
                assert (got - ours.eval()(ids).logits).abs().max() > 1e-3
            ours.train()

        loss_fn = torch.nn.functional.cross_entropy
        loss_fn(want.flatten(0, 1), targets.flatten()).backward()
        loss_fn(got.flatten(0, 1), targets.flatten()).backward()
        theirs = {to_lmlab_name(n): p.grad for n, p in adapter_params(reference).items()}
        for n, p in adapter_params(ours).items():
            assert p.grad is not None and theirs[n] is not None, n
            assert p.grad.abs().max() > 0, f"{n}: zero gradient proves nothing"
            torch.testing.assert_close(p.grad, theirs[n], atol=1e-6, rtol=1e-4, msg=f"{mode} gradient of {n}")
        # the frozen base gets no gradient
        assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("case", ["lora-qv", "dora-rslora-mlp"])
def test_export_loads_in_peft(hf_dir, tmp_path, case):
    reference, ours, cfg = pair(hf_dir, CASES[case])
    # perturb ours so the check cannot pass by loading the reference's weights by accident
    with torch.no_grad():
        for p in adapter_params(ours).values():
            p.add_(torch.randn_like(p) * 0.05)
    out = export_peft(ours, tmp_path / "peft", cfg, base_model_name_or_path="tiny-llama")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == cfg.r and config["use_dora"] == cfg.dora
    loaded = peft.PeftModel.from_pretrained(hf_model(hf_dir), out).eval()
    ids, _ = batch(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours.eval()(ids).logits, atol=2e-5, rtol=1e-4)
        # and it is not the base model
        assert (loaded(input_ids=ids).logits - hf_model(hf_dir)(input_ids=ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["lora-all", "dora-qv"])
def test_peft_saved_adapter_loads_in_lmlab(hf_dir, tmp_path, case):
    reference, _, cfg = pair(hf_dir, CASES[case])
    reference.save_pretrained(tmp_path / "peft")
    ours = load_hf(hf_dir)
    got_cfg = load_peft_adapter(ours, tmp_path / "peft")
    assert (got_cfg.r, got_cfg.alpha, got_cfg.dora, got_cfg.rslora) == (cfg.r, cfg.alpha, cfg.dora, cfg.rslora)
    ids, _ = batch(seed=6)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, reference.eval()(input_ids=ids).logits,
                                   atol=2e-5, rtol=1e-4)
    # and its targets select the same layers again
    again = apply_adapter(load_hf(hf_dir), got_cfg)
    assert set(adapter_params(again)) == set(adapter_params(ours))


def test_peft_adapter_on_some_layers_only(hf_dir, tmp_path):
    """layers_to_transform: PEFT adapts v_proj of layer 1 only; the lmlab config names that layer exactly."""
    torch.manual_seed(4)
    reference = peft.get_peft_model(hf_model(hf_dir), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["v_proj"], layers_to_transform=[1], task_type="CAUSAL_LM"))
    randomize_adapter(reference)
    reference.save_pretrained(tmp_path / "peft")
    ours = load_hf(hf_dir)
    cfg = load_peft_adapter(ours, tmp_path / "peft", name="one-layer")
    assert cfg.targets == ["blocks.1.attn.v_proj"]
    ids, _ = batch(seed=7)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, reference.eval()(input_ids=ids).logits,
                                   atol=2e-5, rtol=1e-4)


def test_peft_settings_lmlab_cannot_reproduce_are_refused(hf_dir, tmp_path):
    reference = peft.get_peft_model(hf_model(hf_dir), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], bias="lora_only", task_type="CAUSAL_LM"))
    reference.save_pretrained(tmp_path / "bias")
    with pytest.raises(ValueError, match="bias='lora_only'"):
        load_peft_adapter(load_hf(hf_dir), tmp_path / "bias")
    ia3 = peft.get_peft_model(hf_model(hf_dir), peft.IA3Config(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"], task_type="CAUSAL_LM"))
    ia3.save_pretrained(tmp_path / "ia3")
    with pytest.raises(ValueError, match="PEFT IA3 adapter; lmlab reads PEFT LoRA adapters only"):
        load_peft_adapter(load_hf(hf_dir), tmp_path / "ia3")


def gpt2_dir(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    path = tmp_path / "tiny-gpt2"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def test_gpt2_conv1d_exports_and_fused_qkv_is_refused(tmp_path):
    """GPT-2 keeps W transposed (Conv1D) and q|k|v fused in c_attn: the separate layers export (PEFT handles
    Conv1D as fan_in_fan_out), the fused ones raise a clear error."""
    path = gpt2_dir(tmp_path)
    cfg = AdapterConfig(r=4, alpha=8, targets=["o_proj", "up_proj", "down_proj"])
    ours = apply_adapter(load_hf(path), cfg)
    with torch.no_grad():
        for p in adapter_params(ours).values():
            p.copy_(torch.randn_like(p) * 0.2)
    out = export_peft(ours, tmp_path / "peft", cfg)
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["c_fc", "c_proj"]
    loaded = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(path), out).eval()
    ids, _ = batch(seed=8, T=10)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ours.eval()(ids).logits, atol=2e-5, rtol=1e-4)

    fused = apply_adapter(load_hf(path), AdapterConfig(r=4, targets=["q_proj"]))
    with pytest.raises(ValueError, match=r"part of transformer\.h\.0\.attn\.c_attn.*fused"):
        export_peft(fused, tmp_path / "fused", AdapterConfig(r=4, targets=["q_proj"]))
    assert not (tmp_path / "fused").exists()
