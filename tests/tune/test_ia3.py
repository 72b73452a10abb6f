"""IA3 against its equations (one layer, by hand), against PEFT (same tiny Hugging Face Llama: same logits, same
gradients), and its bookkeeping: merge/unmerge, several adapters, per-row routing, parameter counts, save/load."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.model import ModelConfig, build_model
from lmlab.tune import ia3
from lmlab.tune.adapters import (
    AdapterConfig,
    apply_adapter,
    count_parameters,
    load_adapter,
    save_adapter,
)
from lmlab.tune.ia3 import IA3Linear

VOCAB = 128


def tiny_model(seed: int = 0, **changes) -> nn.Module:
    torch.manual_seed(seed)
    base = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=64,
                qkv_bias=True, mlp_bias=True)
    base.update(changes)
    model = build_model(ModelConfig(**base))
    with torch.no_grad():  # biases start at zero: make them matter, so a bias folded wrongly would show
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()


def ids_for(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize(model: nn.Module, name: str | None = None, seed: int = 2) -> None:
    """Fresh scales are all ones (the identity); parity on the identity would prove little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "ia3_" in key and (name is None or key.endswith("." + name)):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


def scale_of(model: nn.Module, layer: str, name: str = "default") -> torch.Tensor:
    return model.get_submodule(layer).ia3_scale[name]


# --- the equations, by hand -----------------------------------------------------------------------------
@pytest.mark.parametrize("feedforward", [False, True])
def test_one_layer_matches_the_equations(feedforward):
    torch.manual_seed(0)
    linear = nn.Linear(5, 3, bias=True).double()
    layer = IA3Linear(linear)
    layer.add_adapter("a", feedforward=feedforward)
    layer.active = ("a",)
    with torch.no_grad():
        layer.ia3_scale["a"].copy_(torch.randn(5 if feedforward else 3, dtype=torch.float64))
    x = torch.randn(4, 5, dtype=torch.float64)
    W, b, s = linear.weight, linear.bias, layer.ia3_scale["a"]
    expected = torch.empty(4, 3, dtype=torch.float64)
    for n in range(4):
        for j in range(3):
            if feedforward:  # y_j = sum_i W_ji (l_i x_i) + b_j
                expected[n, j] = sum(W[j, i] * s[i] * x[n, i] for i in range(5)) + b[j]
            else:  # y_j = l_j (sum_i W_ji x_i + b_j)
                expected[n, j] = s[j] * (sum(W[j, i] * x[n, i] for i in range(5)) + b[j])
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert s.shape == ((5,) if feedforward else (3,))


def test_fresh_adapter_is_the_identity_and_scales_the_right_layers():
    model = tiny_model()
    ids = ids_for()
    before = model(ids).logits
    chosen = ia3.add_ia3(model, AdapterConfig(method="ia3"), "default")
    assert chosen == [f"blocks.{i}.{m}" for i in range(2) for m in ("attn.k_proj", "attn.v_proj", "mlp.down_proj")]
    assert torch.equal(model(ids).logits, before)  # ones: bit-identical
    # keys and values are rescaled at the output, the feed-forward activation at down_proj's input
    assert scale_of(model, "blocks.0.attn.k_proj").shape == (2 * 8,)
    assert scale_of(model, "blocks.0.attn.v_proj").shape == (2 * 8,)
    assert scale_of(model, "blocks.0.mlp.down_proj").shape == (48,)
    assert model.get_submodule("blocks.1.mlp.down_proj").feedforward == {"default": True}
    assert model.get_submodule("blocks.1.attn.k_proj").feedforward == {"default": False}


def test_scaling_keys_and_values_equals_scaling_the_projection_rows():
    """At model level: IA3 on k/v/down equals the base model whose k/v rows and down columns were scaled."""
    model = tiny_model()
    reference = copy.deepcopy(model)
    apply_adapter(model, AdapterConfig(method="ia3"))
    randomize(model)
    with torch.no_grad():
        for i, block in enumerate(reference.blocks):
            for proj in (block.attn.k_proj, block.attn.v_proj):
                s = scale_of(model, f"blocks.{i}.attn.{'k' if proj is block.attn.k_proj else 'v'}_proj")
                proj.weight.mul_(s[:, None])
                proj.bias.mul_(s)
            block.mlp.down_proj.weight.mul_(scale_of(model, f"blocks.{i}.mlp.down_proj")[None, :])
    ids = ids_for()
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


class ia3_disabled:
    """Run the base model alone inside the block, then reactivate what was active."""

    def __init__(self, model):
        self.model, self.active = model, ia3.active_adapters(model)

    def __enter__(self):
        ia3.set_active(self.model, [])

    def __exit__(self, *exc):
        ia3.set_active(self.model, self.active)


# --- parity with PEFT ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, attention_bias=True,
        initializer_range=0.1,  # larger than the default 0.02: attention far from uniform, gradients far from 0
    )
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # norms start at 1 and biases at 0: make every tensor distinctive
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("tiny-llama-ia3")
    model.save_pretrained(path)
    return path


def to_lmlab_name(peft_name: str) -> str:
    """PEFT's name of an IA3 vector -> lmlab's (written out here, independent of ia3.py)."""
    name = peft_name.removeprefix("base_model.model.model.")
    name = re.sub(r"^layers\.(\d+)\.self_attn\.", r"blocks.\1.attn.", name)
    name = re.sub(r"^layers\.(\d+)\.mlp\.", r"blocks.\1.mlp.", name)
    return name.replace(".ia3_l.", ".ia3_scale.")


def test_peft_parity_logits_and_gradients(hf_dir):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lmlab.model.hub import load_hf

    ours = load_hf(hf_dir, dtype=torch.float64)
    apply_adapter(ours, AdapterConfig(method="ia3", targets=["k_proj", "v_proj", "down_proj"],
                                      feedforward=["down_proj"]))
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float64, attn_implementation="eager")
    theirs = peft.get_peft_model(hf, peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj",
                                                                                           "down_proj"],
                                                    feedforward_modules=["down_proj"]))
    peft_params = {n: p for n, p in theirs.named_parameters() if "ia3_l" in n}
    our_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert len(peft_params) == len(our_params) == 6
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_params.items():
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            our_params[to_lmlab_name(name)].copy_(p.flatten())
    assert count_parameters(ours).trainable == sum(p.numel() for p in peft_params.values())

    ids = ids_for(2, 10)
    targets = ids_for(2, 10, seed=9)
    out_theirs = theirs(input_ids=ids).logits
    out_ours = ours(ids).logits
    with ia3_disabled(ours):
        assert (ours(ids).logits - out_ours).abs().max() > 1e-2  # the adapter matters: parity is not vacuous
    # float64 throughout; both compute the RoPE angles in float32 (rounded differently), which alone leaves
    # ~5e-8 between the base models, so the tolerance is 1e-6 rather than float64's rounding
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-6, atol=1e-6)
    F.cross_entropy(out_theirs.flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(out_ours.flatten(0, 1), targets.flatten()).backward()
    for name, p in peft_params.items():
        mine = our_params[to_lmlab_name(name)]
        assert mine.grad is not None and mine.grad.abs().max() > 1e-3
        torch.testing.assert_close(mine.grad, p.grad.flatten(), rtol=1e-6, atol=1e-6 * p.grad.abs().max().item())
    assert all(p.grad is None for n, p in ours.named_parameters() if "ia3_" not in n)


# --- merge -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_merge_folds_rows_columns_and_bias_and_unmerge_restores(dtype, tol):
    model = tiny_model().to(dtype)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_adapter(model, AdapterConfig(method="ia3"))
    randomize(model)
    ids = ids_for()
    adapted = model(ids).logits
    ia3.merge(model)
    k, down = model.get_submodule("blocks.0.attn.k_proj"), model.get_submodule("blocks.0.mlp.down_proj")
    s_k, s_ff = k.ia3_scale["default"], down.ia3_scale["default"]
    torch.testing.assert_close(k.base_layer.weight, s_k[:, None] * base["blocks.0.attn.k_proj.weight"])
    torch.testing.assert_close(k.base_layer.bias, s_k * base["blocks.0.attn.k_proj.bias"])
    torch.testing.assert_close(down.base_layer.weight, base["blocks.0.mlp.down_proj.weight"] * s_ff[None, :])
    assert torch.equal(down.base_layer.bias, base["blocks.0.mlp.down_proj.bias"])  # an input scale leaves b alone
    torch.testing.assert_close(model(ids).logits, adapted, rtol=tol, atol=tol)  # not applied twice
    with pytest.raises(ValueError, match="merged"):
        ia3.set_active(model, [])
    with pytest.raises(ValueError, match="merged already|merge again"):
        ia3.merge(model)
    with torch.no_grad():  # a stray update of a merged scale: unmerge divides by what was merged, not by this
        s_k.mul_(3.0)
    ia3.unmerge(model)
    with torch.no_grad():
        s_k.div_(3.0)
    for key, tensor in model.state_dict().items():
        if "ia3_" not in key:
            original = base[key.replace(".base_layer", "")]
            # multiply then divide: within the dtype's rounding (2 ulp), not exactly
            torch.testing.assert_close(tensor, original, rtol=2 * torch.finfo(dtype).eps, atol=0)
    torch.testing.assert_close(model(ids).logits, adapted, rtol=tol, atol=tol)


def test_unmerge_refuses_a_zero_scale_and_changes_nothing():
    model = tiny_model()
    apply_adapter(model, AdapterConfig(method="ia3"))
    randomize(model)
    with torch.no_grad():
        scale_of(model, "blocks.1.attn.v_proj")[3] = 0.0
    ia3.merge(model)
    merged = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"blocks.1.attn.v_proj.*zero entries"):
        ia3.unmerge(model)
    assert all(torch.equal(v, merged[k]) for k, v in model.state_dict().items())


def test_merge_and_unload_gives_the_plain_model_with_the_same_outputs():
    model = tiny_model()
    names = set(model.state_dict())
    apply_adapter(model, AdapterConfig(method="ia3"))
    randomize(model)
    ids = ids_for()
    adapted = model(ids).logits
    plain = ia3.merge_and_unload(model)
    assert set(plain.state_dict()) == names
    assert not ia3.ia3_layers(plain)
    torch.testing.assert_close(plain(ids).logits, adapted, rtol=1e-5, atol=1e-5)


# --- several adapters ---------------------------------------------------------------------------------
def test_several_adapters_switch_multiply_and_route_per_row():
    model = tiny_model()
    ids = ids_for(3)
    base = model(ids).logits
    apply_adapter(model, AdapterConfig(method="ia3"), "a")
    apply_adapter(model, AdapterConfig(method="ia3"), "b")
    randomize(model, "a", seed=4)
    randomize(model, "b", seed=5)
    assert ia3.adapter_names(model) == ["a", "b"] and ia3.active_adapters(model) == ["b"]  # the newest runs
    ia3.set_active(model, "a")
    only_a = model(ids).logits
    ia3.set_active(model, "b")
    only_b = model(ids).logits
    assert (only_a - only_b).abs().max() > 1e-3
    ia3.set_active(model, None)
    assert torch.equal(model(ids).logits, base)

    # both active: their scales multiply, as one adapter "ab" holding the products
    apply_adapter(model, AdapterConfig(method="ia3"), "ab")
    with torch.no_grad():
        for layer in ia3.ia3_layers(model).values():
            layer.ia3_scale["ab"].copy_(layer.ia3_scale["a"] * layer.ia3_scale["b"])
    product = model(ids).logits
    ia3.set_active(model, ["a", "b"])
    torch.testing.assert_close(model(ids).logits, product, rtol=1e-5, atol=1e-6)

    # per-row routing: each row computes what it computes with its adapter alone
    with ia3.route(model, ["a", None, "b"]):
        routed = model(ids).logits
    torch.testing.assert_close(routed[0], only_a[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routed[1], base[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routed[2], only_b[2], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="3 rows"), ia3.route(model, ["a", "b", "a"]):
        model(ids[:2])
    with pytest.raises(ValueError, match="no IA3 adapter called"):
        ia3.set_active(model, ["c"])

    ia3.remove_adapter(model, "ab")
    ia3.remove_adapter(model, "a")
    ia3.remove_adapter(model, "b")
    assert not ia3.ia3_layers(model)
    assert torch.equal(model(ids).logits, base)


# --- counting, training, saving ---------------------------------------------------------------------
@pytest.mark.parametrize("targets,feedforward", [([], ["down_proj"]),
                                                 (["q_proj", "up_proj", "down_proj"], ["up_proj"])])
def test_trainable_count_is_the_sum_of_the_vector_lengths(targets, feedforward):
    model = tiny_model()
    total = count_parameters(model).total
    apply_adapter(model, AdapterConfig(method="ia3", targets=targets, feedforward=feedforward))
    cfg = model.cfg
    kv = cfg.n_kv_heads * cfg.head_dim
    if not targets:  # l_k (kv) + l_v (kv) + l_ff (d_ff) per block
        expected = cfg.n_layers * (2 * kv + cfg.d_ff)
    else:  # q_proj: its output (n_heads * head_dim); up_proj: its input (d_model); down_proj: its output (d_model)
        expected = cfg.n_layers * (cfg.n_heads * cfg.head_dim + cfg.d_model + cfg.d_model)
    count = count_parameters(model)
    assert count.trainable == expected
    assert count.total == total + expected
    print(f"IA3 {targets or 'default'}: {count}")


def test_gradients_reach_only_the_scales_and_a_step_learns(adam_steps):
    model = tiny_model()
    apply_adapter(model, AdapterConfig(method="ia3"))
    losses = adam_steps(model, ids_for(), ids_for(seed=7))
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("ia3_" in name), name


def test_low_precision_base_keeps_float32_scales():
    model = tiny_model().to(torch.bfloat16)
    apply_adapter(model, AdapterConfig(method="ia3"))
    assert {p.dtype for n, p in model.named_parameters() if "ia3_" in n} == {torch.float32}
    logits = model(ids_for()).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_save_and_load_round_trip(tmp_path):
    model = tiny_model()
    fresh = copy.deepcopy(model)
    cfg = AdapterConfig(method="ia3", targets=["k_proj", "v_proj", "up_proj", "down_proj"],
                        feedforward=["up_proj", "down_proj"])
    apply_adapter(model, cfg, "mine")
    randomize(model)
    ids = ids_for()
    expected = model(ids).logits
    save_adapter(model, tmp_path / "adapter", cfg, name="mine")
    loaded_cfg = load_adapter(fresh, tmp_path / "adapter", name="other")
    assert loaded_cfg == cfg
    assert torch.equal(fresh(ids).logits, expected)
    assert ia3.active_adapters(fresh) == ["other"]
    # a second copy on the same base, under another name: both live side by side
    load_adapter(fresh, tmp_path / "adapter", name="again")
    ia3.set_active(fresh, "again")
    assert torch.equal(fresh(ids).logits, expected)


# --- mistakes ---------------------------------------------------------------------------------------
def test_user_mistakes_raise_specific_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="match no layer.*blocks.0.attn.q_proj"):
        ia3.add_ia3(model, AdapterConfig(method="ia3", targets=["nonexistent"]))
    with pytest.raises(ValueError, match="rescales linear layers.*Attention"):
        ia3.add_ia3(model, AdapterConfig(method="ia3", targets=[r"blocks\.0\.attn(\.k_proj)?"]))
    assert not ia3.ia3_layers(model)  # the bad target changed nothing
    with pytest.raises(ValueError, match="method='ia3'"):
        ia3.add_ia3(model, AdapterConfig(method="lora"))
    ia3.add_ia3(model, AdapterConfig(method="ia3"), "x")
    with pytest.raises(ValueError, match="already has an IA3 adapter called 'x'"):
        ia3.add_ia3(model, AdapterConfig(method="ia3"), "x")
    with pytest.raises(ValueError, match="nothing to merge"):
        ia3.set_active(model, [])
        ia3.merge(model)
