"""LoRA / rsLoRA / DoRA on lmlab models: the equations by hand, target selection, merge and unmerge, several adapters
on one base (switching and per-row routing), save/load, the 4-bit base contract, and the `lmlab adapter` CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

from lmlab.cli import main
from lmlab.model import ModelConfig, build_model, load, save_checkpoint
from lmlab.tune.adapters import (
    AdapterConfig,
    apply_adapter,
    count_parameters,
    load_adapter,
    save_adapter,
)
from lmlab.tune.lora import (
    LoRALinear,
    active_adapters,
    adapter_names,
    export_peft,
    lora_layers,
    merge,
    merge_and_unload,
    remove_adapter,
    route,
    set_active,
    unmerge,
)

VOCAB = 300


def tiny_model(seed: int = 0, **changes) -> nn.Module:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32,
               qkv_bias=True, tie_embeddings=False)
    cfg.update(changes)
    model = build_model(ModelConfig(**cfg))
    with torch.no_grad():  # norms start at 1 and biases at 0: make every tensor distinctive
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def randomize(model: nn.Module, name: str | None = None, seed: int = 1) -> None:
    """Fresh adapters are no-ops (B = 0): give B (and DoRA's magnitude) values so tests see the update."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if name is not None and f".{name}" not in key:
                continue
            if "lora_magnitude_vector" in key:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "lora_" in key:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def ids(B: int = 2, T: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() > 1e-3


# --- the equations ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True])
def test_fresh_adapter_changes_nothing(dora):
    model = tiny_model()
    x = ids()
    before = logits(model, x)
    apply_adapter(model, AdapterConfig(r=4, dora=dora))
    assert torch.equal(logits(model, x), before)  # exactly: B = 0 and, for DoRA, m = ||W||_row


def test_init_is_peft_default():
    layer = LoRALinear(nn.Linear(64, 48))
    torch.manual_seed(0)
    layer.add_adapter("a", r=8, scaling=2.0)
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    assert torch.count_nonzero(B) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert A.abs().max() <= bound and A.abs().max() > 0.9 * bound
    assert A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


@pytest.mark.parametrize("rslora, expected", [(False, 8 / 4), (True, 8 / 2)])
def test_lora_output_by_hand(rslora, expected):
    """h = W x + b + s B A x, s = alpha / r (alpha / sqrt(r) with rsLoRA)."""
    model = tiny_model()
    apply_adapter(model, AdapterConfig(r=4, alpha=8, rslora=rslora, targets=["q_proj"]))
    randomize(model)
    layer = model.blocks[0].attn.q_proj
    assert layer.scaling["default"] == expected
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(3, 5, 32)
    close(layer(x), x @ W.T + b + expected * (x @ A.T @ B.T))


def test_dora_output_by_hand():
    """W' = m (W + s B A) / ||W + s B A||_row, the norm over each output unit's weights; bias untouched."""
    model = tiny_model()
    apply_adapter(model, AdapterConfig(r=4, alpha=8, dora=True, targets=["k_proj"]))
    randomize(model)
    layer = model.blocks[1].attn.k_proj
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"]
    adapted = W + 2.0 * B @ A
    W_dora = m[:, None] * adapted / adapted.norm(dim=1, keepdim=True)
    x = torch.randn(2, 7, 32)
    close(layer(x), x @ W_dora.T + b)
    # the magnitude is literally the row norm of the merged weight
    merge(model)
    close(layer.base_layer.weight.norm(dim=1), m.detach())


def test_dora_norm_is_detached():
    """DoRA sec. 4.3: n gets no gradient, so dL/dm = sum over tokens of g * (W + s B A) x / n."""
    layer = LoRALinear(nn.Linear(16, 8, bias=False))
    layer.add_adapter("a", r=2, scaling=1.0, dora=True)
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_()
    x = torch.randn(5, 16)
    layer(x).sum().backward()
    adapted = layer.base_layer.weight + layer.lora_B["a"].weight @ layer.lora_A["a"].weight
    expected = (x @ adapted.T).sum(0) / adapted.norm(dim=1)
    close(layer.lora_magnitude_vector["a"].grad, expected.detach())


def test_dropout_only_on_the_adapter_input():
    layer = LoRALinear(nn.Linear(16, 8))
    layer.add_adapter("a", r=4, scaling=0.5, dropout=0.5)
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_()
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    x = torch.randn(4, 16)
    layer.train()
    torch.manual_seed(7)
    got = layer(x)
    torch.manual_seed(7)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    close(got, layer.base_layer(x) + 0.5 * dropped @ A.T @ B.T)
    layer.eval()  # no dropout at inference
    close(layer(x), layer.base_layer(x) + 0.5 * x @ A.T @ B.T)


# --- targets and errors ---------------------------------------------------------------------------------
def adapted(model) -> list[str]:
    return sorted(lora_layers(model))


def test_targets_by_name_suffix_regex_and_never_the_head():
    assert adapted(apply_adapter(tiny_model(), AdapterConfig(targets=["attn.q_proj"]))) == [
        "blocks.0.attn.q_proj", "blocks.1.attn.q_proj"]
    assert adapted(apply_adapter(tiny_model(), AdapterConfig(targets=[r"blocks\.1\.mlp\.(gate|up)_proj"]))) == [
        "blocks.1.mlp.gate_proj", "blocks.1.mlp.up_proj"]
    assert len(adapted(apply_adapter(tiny_model(), AdapterConfig()))) == 2 * 7  # the default: every projection
    everything = apply_adapter(tiny_model(), AdapterConfig(targets=[".*"]))
    assert len(adapted(everything)) == 2 * 7
    assert type(everything.lm_head) is nn.Linear  # the output head is never adapted


def test_errors_say_what_to_do():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"match no linear layer.*'all-linear'.*blocks\.0\.attn\.q_proj"):
        apply_adapter(model, AdapterConfig(targets=["qproj"]))
    apply_adapter(model, AdapterConfig(targets=["q_proj"]), name="a")
    with pytest.raises(ValueError, match="already has a LoRA adapter called 'a'"):
        apply_adapter(model, AdapterConfig(targets=["v_proj"]), name="a")
    with pytest.raises(ValueError, match=r"no LoRA adapter called \['zzz'\].*\['a'\]"):
        set_active(model, "zzz")
    with pytest.raises(ValueError, match="route\\(\\) was given 3 rows, but the batch has 2"):
        with route(model, ["a", None, "a"]):
            model(ids(B=2))
    merge(model)
    with pytest.raises(ValueError, match=r"merged into the base weights; call unmerge\(model\) before you switch"):
        set_active(model, None)
    with pytest.raises(ValueError, match="merge again"):
        merge(model)
    unmerge(model)
    set_active(model, None)
    with pytest.raises(ValueError, match="nothing to merge"):
        merge(model)


# --- merge --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True])
def test_merge_unmerge_round_trip(dora):
    model = tiny_model()
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    x = ids()
    base = logits(model, x)
    apply_adapter(model, AdapterConfig(r=4, alpha=8, dora=dora), name="a")
    apply_adapter(model, AdapterConfig(r=2, alpha=4, targets=["q_proj", "down_proj"]), name="b")
    randomize(model)
    set_active(model, ["a", "b"])  # both at once: merge must fold the same sum forward computes
    unmerged = logits(model, x)
    assert differ(unmerged, base)
    merge(model)
    for layer in lora_layers(model).values():  # merged, the adapters no longer run: the weights do the work
        layer.delta = None
    close(logits(model, x), unmerged)
    for layer in lora_layers(model).values():
        del layer.delta
    unmerge(model)
    close(logits(model, x), unmerged)
    for key, value in base_weights.items():  # the base weights are back
        want = key.replace("_proj.weight", "_proj.base_layer.weight").replace("_proj.bias", "_proj.base_layer.bias")
        torch.testing.assert_close(model.state_dict()[want], value, atol=2e-6, rtol=0)


def test_merge_and_unload_is_a_plain_checkpoint(tmp_path):
    model = tiny_model()
    plain_keys = set(model.state_dict())
    apply_adapter(model, AdapterConfig(r=4, dora=True, targets=["q_proj", "o_proj", "up_proj"]))
    randomize(model)
    x = ids()
    want = logits(model, x)
    merged = merge_and_unload(model)
    assert set(merged.state_dict()) == plain_keys
    assert not lora_layers(merged) and all(p.requires_grad for p in merged.parameters())
    assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith("_proj"))
    save_checkpoint(merged, tmp_path / "merged")
    close(logits(load(tmp_path / "merged").eval(), x), want)


# --- several adapters on one base ---------------------------------------------------------------------------
def two_adapters(seed: int = 0):
    model = tiny_model(seed)
    apply_adapter(model, AdapterConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]), name="a")
    apply_adapter(model, AdapterConfig(r=2, alpha=2, dora=True, rslora=True), name="b")
    randomize(model, seed=3)
    return model


def test_save_load_two_adapters_and_switch(tmp_path):
    model = two_adapters()
    x = ids()
    out = {}
    for name in ("a", "b"):
        set_active(model, name)
        out[name] = logits(model, x)
    set_active(model, ["a", "b"])
    out["ab"] = logits(model, x)
    set_active(model, None)
    out[None] = logits(model, x)
    assert differ(out["a"], out[None]) and differ(out["b"], out[None]) and differ(out["a"], out["b"])
    save_adapter(model, tmp_path / "a", AdapterConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]), name="a")
    save_adapter(model, tmp_path / "b", AdapterConfig(r=2, alpha=2, dora=True, rslora=True), name="b")

    fresh = tiny_model()  # the same base weights
    close(logits(fresh, x), out[None])
    load_adapter(fresh, tmp_path / "a", name="a")
    load_adapter(fresh, tmp_path / "b", name="b")
    assert adapter_names(fresh) == ["a", "b"] and active_adapters(fresh) == ["b"]  # the one loaded last runs
    for name in ("a", "b", None):
        set_active(fresh, name)
        close(logits(fresh, x), out[name])
    set_active(fresh, ["a", "b"])
    close(logits(fresh, x), out["ab"])
    # layer by hand: two active adapters add their updates
    layer = fresh.blocks[0].attn.q_proj
    h = torch.randn(3, 32)
    with torch.no_grad():
        base = layer.base_layer(h)
        close(layer(h), base + layer.delta("a", h, base) + layer.delta("b", h, base))
    remove_adapter(fresh, "b")
    assert adapter_names(fresh) == ["a"] and type(fresh.blocks[0].attn.k_proj) is nn.Linear
    set_active(fresh, "a")
    close(logits(fresh, x), out["a"])


def test_route_gives_each_row_its_adapter():
    model = two_adapters()
    x = ids(B=5, seed=4)
    rows = ["a", "b", None, "b", "a"]
    single = {}
    for name in ("a", "b", None):
        set_active(model, name)
        single[name] = logits(model, x)
    set_active(model, "a")
    with route(model, rows):
        got = logits(model, x)
    for i, name in enumerate(rows):
        close(got[i], single[name][i])
    assert active_adapters(model) == ["a"]
    close(logits(model, x), single["a"])  # routing ended with the block
    with route(model, ["b"] * 5):  # one adapter for all rows takes the gather-free path
        close(logits(model, x), single["b"])


def test_route_backward_reaches_each_rows_adapter():
    model = two_adapters()
    with route(model, ["a", None]):
        model(ids(B=2)).logits[0].sum().backward()
    grads = {k: p.grad for k, p in model.named_parameters() if "lora_B" in k}
    assert all(g is not None and g.abs().max() > 0 for k, g in grads.items() if ".a." in k)
    assert all(g is None for k, g in grads.items() if ".b." in k)


# --- training -----------------------------------------------------------------------------------------------
def test_only_adapters_train():
    model = tiny_model()
    total = sum(p.numel() for p in model.parameters())
    apply_adapter(model, AdapterConfig(r=4, targets=["q_proj", "v_proj"]))
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in k for k in trainable)
    # q: 32 -> 32, v: 32 -> 16 (2 KV heads of 8); per layer r (in + out) each
    n = 2 * (4 * (32 + 32) + 4 * (32 + 16))
    assert count_parameters(model) == (n, total + n)
    model.train()
    model(ids(), targets=ids(seed=1)).loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    assert all(g is None for k, g in grads.items() if k not in trainable)
    assert all(grads[k].abs().max() > 0 for k in trainable if "lora_B" in k)  # A's gradient is 0 while B is 0


def test_adapter_file_is_small(tmp_path):
    model = tiny_model()
    cfg = AdapterConfig(r=4, targets=["q_proj", "v_proj"], dora=True)
    apply_adapter(model, cfg)
    n = count_parameters(model).trainable
    path = save_adapter(model, tmp_path / "adapter", cfg)
    size = (path / "adapter_model.safetensors").stat().st_size
    assert 4 * n <= size <= 4 * n + 4096  # float32 values plus a small header
    assert size < 0.1 * 4 * count_parameters(model).total


# --- a 4-bit base ------------------------------------------------------------------------------------------
class Fake4bit(nn.Module):
    """Stands in for tune/nf4.Linear4bit: weights rounded to a coarse grid, handed out by dequantize()."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("codes", torch.round(linear.weight.detach() * 64).to(torch.int8))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() / 64

    def forward(self, x):
        return nn.functional.linear(x, self.dequantize(), self.bias)

    def logical_numel(self) -> int:
        return self.codes.numel()


def test_quantized_base_merges_into_float_and_unmerges_exactly():
    model = tiny_model()
    for i in range(2):  # quantize every projection, as QLoRA does
        for parent, leaf in ((model.blocks[i].attn, "q_proj"), (model.blocks[i].mlp, "up_proj")):
            setattr(parent, leaf, Fake4bit(getattr(parent, leaf)))
    apply_adapter(model, AdapterConfig(r=4, dora=True, targets=["q_proj"]))
    layer = model.blocks[0].attn.q_proj
    quantized = layer.base_layer
    assert isinstance(quantized, Fake4bit) and layer.lora_A["default"].weight.dtype == torch.float32
    randomize(model)
    x = ids()
    want = logits(model, x)
    merge(model)
    assert type(layer.base_layer) is nn.Linear  # dequantized, not requantized
    close(logits(model, x), want)
    unmerge(model)
    assert layer.base_layer is quantized
    close(logits(model, x), want)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, Fake4bit) for m in plain.modules())  # the unadapted up_proj too
    close(logits(plain, x), want)


def test_real_nf4_base():
    pytest.importorskip("lmlab.tune.nf4")
    model = tiny_model()
    x = ids()
    apply_adapter(model, AdapterConfig(r=4, quantize="nf4", quant_block=32))
    quantized = logits(model, x)
    randomize(model)
    want = logits(model, x)
    assert differ(want, quantized)
    merge(model)
    close(logits(model, x), want)
    unmerge(model)
    close(logits(model, x), want)
    close(logits(merge_and_unload(model), x), want)


# --- PEFT-format errors (the parity itself is in test_lora_peft.py) ------------------------------------------
def test_export_peft_checks_the_config(tmp_path):
    model = tiny_model(meta={"hf_model_type": "llama"})
    apply_adapter(model, AdapterConfig(r=4, targets=["q_proj"]))
    with pytest.raises(ValueError, match="does not describe adapter 'default'.*rank 4.*rank 8"):
        export_peft(model, tmp_path / "peft", AdapterConfig(r=8, targets=["q_proj"]))
    with pytest.raises(ValueError, match=r"no LoRA adapter called 'other'"):
        export_peft(model, tmp_path / "peft", AdapterConfig(r=4), name="other")
    path = export_peft(model, tmp_path / "peft", AdapterConfig(r=4, targets=["q_proj"]))
    with safe_open(path / "adapter_model.safetensors", "pt") as f:
        assert sorted(f.keys())[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert json.loads((path / "adapter_config.json").read_text())["target_modules"] == ["q_proj"]


# --- CLI ----------------------------------------------------------------------------------------------------
@pytest.fixture
def base_dir(tmp_path):
    from lmlab.tokenizer import Tokenizer

    texts = ["the cat sat on the mat", "a dog ran in the park"] * 20
    tok = Tokenizer.train(texts, vocab_size=VOCAB - 10, progress=False)
    path = tmp_path / "base"
    save_checkpoint(tiny_model(), path)
    tok.save(tmp_path / "tok")
    for f in (tmp_path / "tok").iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    return path


def test_cli_info_merge_export(base_dir, tmp_path, capsys):
    model = load(base_dir).eval()
    cfg = AdapterConfig(r=4, alpha=8, dora=True, targets=["v_proj", "down_proj"])
    apply_adapter(model, cfg)
    randomize(model)
    x = ids()
    want = logits(model, x)
    save_adapter(model, tmp_path / "adapter", cfg, base=str(base_dir))
    capsys.readouterr()

    assert main(["adapter", "info", str(tmp_path / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    n = count_parameters(model).trainable
    assert info["method"] == "dora" and info["r"] == 4 and info["scaling"] == 2.0 and info["parameters"] == n
    assert info["targets"] == ["v_proj", "down_proj"] and info["base"] == str(base_dir)
    assert main(["adapter", "info", str(tmp_path / "adapter")]) == 0
    assert f"{n:,}" in capsys.readouterr().out

    out = tmp_path / "merged"
    assert main(["adapter", "merge", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(out)]) == 0
    close(logits(load(out).eval(), x), want)
    assert (out / "tokenizer.json").read_bytes() == (base_dir / "tokenizer.json").read_bytes()

    peft_out = tmp_path / "peft"
    assert main(["adapter", "export-peft", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"),
                 "--out", str(peft_out), "--base-name", "tiny"]) == 0
    config = json.loads((peft_out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["use_dora"], config["base_model_name_or_path"]) == ("LORA", True, "tiny")
    assert config["target_modules"] == ["down_proj", "v_proj"]
    # a PEFT adapter merges too, to the same model
    assert main(["adapter", "merge", "--model", str(base_dir), "--adapter", str(peft_out),
                 "--out", str(tmp_path / "merged-peft")]) == 0
    close(logits(load(tmp_path / "merged-peft").eval(), x), want)
    capsys.readouterr()
    assert main(["adapter", "info", str(peft_out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["method"], info["parameters"]) == ("peft", "dora", n)


def test_cli_errors(base_dir, tmp_path, capsys):
    assert main(["adapter", "merge", "--model", str(base_dir), "--adapter", str(tmp_path), "--out",
                 str(tmp_path / "o")]) == 1
    assert "is not an adapter directory" in capsys.readouterr().err
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps(
        {"format": "lmlab-adapter", "version": 1, "adapter": {"method": "ia3"}, "base_model": None, "metadata": {}}))
    assert main(["adapter", "merge", "--model", str(base_dir), "--adapter", str(ia3), "--out",
                 str(tmp_path / "o")]) == 1
    assert "is a ia3 adapter; adapter merge works on LoRA adapters only" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
