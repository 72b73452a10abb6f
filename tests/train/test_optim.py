"""Optimizers: single steps against the papers' equations worked out in the test, bit-for-bit
parity with torch's Adafactor and Muon, convergence on a small regression, exact resume from a
saved state, the parameter split of lmlab's Transformer and of arbitrary modules, and a
2-process FSDP2 step that equals the single-process one."""

from __future__ import annotations

import copy
import io
import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lmlab.model import ModelConfig, build_model
from lmlab.train.optim import (
    Adafactor,
    Lion,
    Muon,
    OptimConfig,
    build_optimizer,
    muon_scale,
    newton_schulz,
    param_groups,
)
from lmlab.train.schedule import ScheduleConfig, lr_multiplier

PROJECTIONS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
               "mlp.down_proj")
NS = (3.4445, -4.7750, 2.0315)


def tiny_config(**changes) -> ModelConfig:
    # vocab 37 and d_ff 24: matrices of odd and uneven shapes, so FSDP shards are uneven too
    base = dict(vocab_size=37, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24, max_seq_len=32)
    base.update(changes)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, **changes) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(tiny_config(**changes))


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 37, (2, 13), generator=torch.Generator().manual_seed(seed))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, total: int, sched: ScheduleConfig) -> None:
    """What the loop does: set each group's lr from its base_lr and the schedule, then step."""
    for step in steps:
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * lr_multiplier(step, total, sched)
        ids = batch(step)
        opt.zero_grad()
        model(ids[:, :-1], ids[:, 1:]).loss.backward()
        opt.step()


def names_of(groups: list[dict]) -> dict[str, set[str]]:
    return {g["name"]: set(g["param_names"]) for g in groups}


def assert_same_state(a, b) -> None:
    """Equal optimizer state dicts: every tensor bit for bit, every other value ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_state(x, y)
    else:
        assert a == b


# --- parameter groups ---------------------------------------------------------------------------
def test_split_of_a_llama_style_model():
    model = tiny_model()
    groups = param_groups(model, OptimConfig(lr=1e-3, weight_decay=0.1))
    matrices = {f"blocks.{i}.{p}.weight" for i in range(2) for p in PROJECTIONS}
    norms = {f"blocks.{i}.{n}.weight" for i in range(2) for n in ("attn_norm", "mlp_norm")} | {"norm.weight"}
    assert names_of(groups) == {"decay": matrices | {"lm_head.weight"}, "no_decay": norms | {"embed.weight"}}
    by_name = {g["name"]: g for g in groups}
    assert by_name["decay"]["weight_decay"] == 0.1 and by_name["no_decay"]["weight_decay"] == 0.0
    assert all(g["base_lr"] == g["lr"] == 1e-3 for g in groups)
    named = dict(model.named_parameters())
    for g in groups:  # the names point at the very tensors of the group
        assert all(named[n] is p for n, p in zip(g["param_names"], g["params"], strict=True))


def test_split_with_biases_positions_and_qk_norms():
    model = tiny_model(qkv_bias=True, attn_out_bias=True, mlp_bias=True, position="learned", norm="layernorm",
                       norm_bias=True, qk_norm=True)
    groups = names_of(param_groups(model, OptimConfig()))
    every = {n for n, _ in model.named_parameters()}
    assert groups["decay"] == {f"blocks.{i}.{p}.weight" for i in range(2) for p in PROJECTIONS} | {"lm_head.weight"}
    assert groups["no_decay"] == every - groups["decay"]
    # what landed in no_decay: biases, both norms' weight and bias (q/k norms too), both tables
    assert {"embed.weight", "pos_embed.weight", "blocks.0.attn.q_proj.bias", "blocks.1.mlp.down_proj.bias",
            "blocks.0.attn.q_norm.weight", "blocks.1.attn.k_norm.weight", "norm.bias"} <= groups["no_decay"]
    decayed = names_of(param_groups(model, OptimConfig(decay_embeddings=True)))["decay"]
    assert decayed == groups["decay"] | {"embed.weight", "pos_embed.weight"}


def test_split_for_muon():
    model = tiny_model()
    cfg = OptimConfig(name="muon", lr=1e-3, muon_lr=0.05, weight_decay=0.1, muon_weight_decay=0.01)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert set(groups["muon"]["param_names"]) == {f"blocks.{i}.{p}.weight" for i in range(2) for p in PROJECTIONS}
    assert set(groups["decay"]["param_names"]) == {"lm_head.weight"}  # the head stays on AdamW
    assert "embed.weight" in groups["no_decay"]["param_names"]
    settings = {name: (g["base_lr"], g["weight_decay"], g["use_muon"]) for name, g in groups.items()}
    assert settings == {"muon": (0.05, 0.01, True), "decay": (1e-3, 0.1, False), "no_decay": (1e-3, 0.0, False)}
    # muon_exclude matches a whole dotted name or its last parts, never a fragment of a name
    down = {f"blocks.{i}.mlp.down_proj.weight" for i in range(2)}
    moved = names_of(param_groups(model, OptimConfig(name="muon", muon_exclude=["mlp.down_proj", "lm_head"])))
    assert moved["decay"] == down | {"lm_head.weight"}
    assert names_of(param_groups(model, OptimConfig(name="muon", muon_exclude=["proj"])))["muon"] >= down


def test_tied_embeddings_appear_once():
    model = tiny_model(tie_embeddings=True)
    groups = param_groups(model, OptimConfig(name="muon"))
    listed = [n for g in groups for n in g["param_names"]]
    assert sorted(listed) == sorted(n for n, _ in model.named_parameters())
    assert "embed.weight" in names_of(groups)["no_decay"]


class Mixed(nn.Module):
    """A non-lmlab module: a head tied to an embedding (the head registered first), a frozen
    layer, a convolution, a batch norm and a free-standing gain."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(4, 10, bias=False)
        self.frozen = nn.Linear(4, 4)
        self.hidden = nn.Linear(4, 4)
        self.conv = nn.Conv1d(4, 4, 3)
        self.bn = nn.BatchNorm1d(4)
        self.gain = nn.Parameter(torch.ones(()))
        self.emb = nn.Embedding(10, 4)
        self.head.weight = self.emb.weight
        self.frozen.requires_grad_(False)


def test_split_of_an_arbitrary_module():
    model = Mixed()
    for name in ("adamw", "muon"):
        groups = names_of(param_groups(model, OptimConfig(name=name)))
        listed = [n for names in groups.values() for n in names]
        assert len(listed) == len(set(listed)) == 8  # the tied table once, the frozen layer not at all
        assert "head.weight" in groups["no_decay"]  # tied to an embedding: treated as one
        assert "conv.weight" in groups["decay"]
        assert {"conv.bias", "bn.weight", "bn.bias", "gain"} <= groups["no_decay"]
        assert "hidden.weight" in groups.get("muon", groups["decay"])
    assert names_of(param_groups(model, OptimConfig(name="muon")))["muon"] == {"hidden.weight"}  # not the conv


def test_split_errors():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(frozen, OptimConfig())
    with pytest.raises(ValueError, match="optimizer 'muon' found no nn.Linear weight.*use 'adamw'"):
        param_groups(nn.Sequential(nn.Embedding(5, 3), nn.LayerNorm(3)), OptimConfig(name="muon"))
    with pytest.raises(ValueError, match=r"2-D matrices only, but b in a use_muon group has shape \(3,\)"):
        Muon([dict(params=[nn.Parameter(torch.zeros(3))], param_names=["b"], use_muon=True)])


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(name="adam"), "name='adam'; choose one of"),
        (dict(lr=0.0), "lr must be positive"),
        (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
        (dict(betas=[0.9, 1.0]), r"betas must be two numbers in \[0, 1\)"),
        (dict(betas=[0.9]), "betas must be two numbers"),
        (dict(muon_momentum=1.0), "muon_momentum must be in"),
        (dict(muon_ns_steps=0), "muon_ns_steps must be at least 1"),
        (dict(muon_lr_adjust="moonshot"), "muon_lr_adjust='moonshot'; choose one of"),
        (dict(adafactor_beta2_decay=0.8), "adafactor_beta2_decay must be negative"),
        (dict(adafactor_clip_threshold=0.5), "adafactor_clip_threshold must be >= 1"),
        (dict(adafactor_eps1=1e-30), "adafactor_eps1 must be >= 1e-19.*corresponds to adafactor_eps1 = 1e-15"),
    ],
)
def test_config_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        OptimConfig(**changes)


def test_config_from_toml_lists_and_optimizer_types():
    cfg = OptimConfig(betas=[0.8, 0.9], muon_exclude=["lm_head"])
    assert cfg.betas == (0.8, 0.9) and cfg.muon_exclude == ("lm_head",)
    assert OptimConfig(muon_exclude="out").muon_exclude == ("out",)
    model = tiny_model()
    kinds = {"adamw": torch.optim.AdamW, "lion": Lion, "adafactor": Adafactor, "muon": Muon}
    for name, kind in kinds.items():
        opt = build_optimizer(model, OptimConfig(name=name))
        assert type(opt) is kind
        assert all("base_lr" in g for g in opt.param_groups)


# --- single steps worked out by hand ----------------------------------------------------------
class Affine(nn.Module):
    """y = w x + b: one decayed matrix and one undecayed bias."""

    def __init__(self, w, b):
        super().__init__()
        self.w = nn.Linear(len(w[0]), len(w), bias=True)
        with torch.no_grad():
            self.w.weight.copy_(torch.tensor(w))
            self.w.bias.copy_(torch.tensor(b))


def step_with(opt, model, w_grad, b_grad=None):
    model.w.weight.grad = torch.tensor(w_grad)
    model.w.bias.grad = torch.tensor(b_grad if b_grad is not None else [0.0] * len(w_grad))
    opt.step()


def test_adamw_two_steps_by_hand():
    # Loshchilov & Hutter 2019, Algorithm 2, per coordinate, in Python floats
    lr, (b1, b2), eps, wd = 0.1, (0.9, 0.95), 1e-8, 0.5
    model = Affine([[1.0, -2.0]], [0.5])
    opt = build_optimizer(model, OptimConfig(lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd))
    grads = [([[0.3, -0.1]], [0.2]), ([[-0.6, 0.05]], [0.4])]
    for g_w, g_b in grads:
        step_with(opt, model, g_w, g_b)

    def reference(p, gs, decay):
        m = v = 0.0
        for t, g in enumerate(gs, 1):
            m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
            m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
            p = p - lr * decay * p - lr * m_hat / (math.sqrt(v_hat) + eps)
        return p

    expected_w = [reference(1.0, [0.3, -0.6], wd), reference(-2.0, [-0.1, 0.05], wd)]
    assert model.w.weight[0].tolist() == pytest.approx(expected_w, rel=1e-6)
    assert model.w.bias.item() == pytest.approx(reference(0.5, [0.2, 0.4], 0.0), rel=1e-6)  # no decay on biases


def test_lion_two_steps_by_hand():
    # lr 0.1, betas (0.9, 0.99), lambda 0.5. Coordinate 0, p = 1:
    #   step 1, g = 1:     c = 0.1 > 0        p = 1 - 0.1 (1 + 0.5)          = 0.85     m = 0.01
    #   step 2, g = -0.05: c = 0.009 - 0.005 = 0.004 > 0: the momentum outvotes the gradient
    #                      p = 0.85 - 0.1 (1 + 0.5 * 0.85) = 0.7075         m = 0.0099 - 0.0005 = 0.0094
    # Coordinate 1, p = -2, g = 0 then -0.5: step 1 only decays, -2 (1 - 0.05) = -1.9;
    #   step 2, c = -0.05 < 0: p = -1.9 - 0.1 (-1 + 0.5 * -1.9) = -1.705
    # The bias (no decay), p = 0.5, g = 0.2 then 0.2: 0.4, then 0.3
    model = Affine([[1.0, -2.0]], [0.5])
    opt = build_optimizer(model, OptimConfig(name="lion", lr=0.1, betas=(0.9, 0.99), weight_decay=0.5))
    step_with(opt, model, [[1.0, 0.0]], [0.2])
    assert model.w.weight[0].tolist() == pytest.approx([0.85, -1.9])
    step_with(opt, model, [[-0.05, -0.5]], [0.2])
    assert model.w.weight[0].tolist() == pytest.approx([0.7075, -1.705])
    assert model.w.bias.item() == pytest.approx(0.3)
    m = opt.state[model.w.weight]["exp_avg"][0].tolist()
    assert m == pytest.approx([0.0094, 0.99 * 0.0 + 0.01 * -0.5])


def test_adafactor_first_step_by_hand():
    # Shazeer & Stern 2018 at t = 1: beta2_1 = 1 - 1^-0.8 = 0, so the statistics are this step's
    # G = [[2, 0], [0, 1]]: row means of G^2 R = [2, 0.5], column means C = [2, 0.5], mean(R) = 1.25
    # V = R C / 1.25 = [[3.2, 0.8], [0.8, 0.2]], U = G / sqrt(V) = [[2 / sqrt(3.2), 0], [0, 1 / sqrt(0.2)]]
    # RMS(U) = sqrt((1.25 + 5) / 4) = 1.25 > d = 1: U / 1.25
    # alpha = max(1e-3, RMS(p)) min(lr, 1 / sqrt(1)), RMS(p) = sqrt(30 / 4); weight decay 1 - lr * 0.5
    lr = 0.01
    model = Affine([[1.0, 2.0], [3.0, 4.0]], [0.5, -0.5])
    opt = build_optimizer(model, OptimConfig(name="adafactor", lr=lr, weight_decay=0.5))
    step_with(opt, model, [[2.0, 0.0], [0.0, 1.0]], [0.1, -0.3])
    alpha = math.sqrt(7.5) * lr
    u = [[2 / math.sqrt(3.2) / 1.25, 0.0], [0.0, 1 / math.sqrt(0.2) / 1.25]]
    expected = [[p * (1 - lr * 0.5) - alpha * u[i][j] for j, p in enumerate(row)]
                for i, row in enumerate([[1.0, 2.0], [3.0, 4.0]])]
    assert model.w.weight.tolist() == [pytest.approx(r, rel=1e-6) for r in expected]
    # the bias is 1-D: V = G^2, U = sign(G), RMS(U) = 1 (no clipping), alpha = 0.5 lr, no decay
    assert model.w.bias.tolist() == pytest.approx([0.495, -0.495], rel=1e-6)
    assert opt.state[model.w.weight]["row_var"].flatten().tolist() == pytest.approx([2.0, 0.5])
    assert opt.state[model.w.weight]["col_var"].flatten().tolist() == pytest.approx([2.0, 0.5])


@pytest.mark.parametrize(
    "relative_step, scale_parameter, lr",
    # lr 1.0 with the relative step: the step size is 1 / sqrt(t) (the cap does not bind), lr 0.01: it is lr
    [(True, True, 1.0), (True, True, 0.01), (False, False, 0.01), (False, True, 0.01), (True, False, 1.0)],
)
def test_adafactor_second_step_of_a_vector_by_hand(relative_step, scale_parameter, lr):
    # bias p = [0.5, -0.5], gradients [0.1, -0.3] then [0.4, 0.1]
    # step 2: beta2_2 = 1 - 2^-0.8, V = beta2_2 g1^2 + (1 - beta2_2) g2^2, U = g2 / sqrt(V), clipped
    model = Affine([[0.0], [0.0]], [0.5, -0.5])
    cfg = OptimConfig(name="adafactor", lr=lr, adafactor_relative_step=relative_step,
                      adafactor_scale_parameter=scale_parameter)
    opt = build_optimizer(model, cfg)
    g1, g2 = [0.1, -0.3], [0.4, 0.1]
    step_with(opt, model, [[0.0], [0.0]], g1)
    p1 = model.w.bias.tolist()
    step_with(opt, model, [[0.0], [0.0]], g2)

    beta2 = 1 - 2**-0.8
    u = [g / math.sqrt(beta2 * a * a + (1 - beta2) * g * g) for a, g in zip(g1, g2, strict=True)]
    rms_u = math.sqrt(sum(x * x for x in u) / 2)
    u = [x / max(1.0, rms_u) for x in u]
    rho = min(lr, 1 / math.sqrt(2)) if relative_step else lr
    alpha = rho * (max(1e-3, math.sqrt(sum(p * p for p in p1) / 2)) if scale_parameter else 1.0)
    assert model.w.bias.tolist() == pytest.approx([p - alpha * x for p, x in zip(p1, u, strict=True)], rel=1e-6)
    # the weight (zero gradient, zero value) moves not at all: eps1 guards the division by zero
    assert model.w.weight.abs().max() == 0


def test_adafactor_smallest_eps1_keeps_zero_gradients_finite():
    model = Affine([[1.0, 2.0], [3.0, 4.0]], [0.5, -0.5])
    opt = build_optimizer(model, OptimConfig(name="adafactor", weight_decay=0.0, adafactor_eps1=1e-19))
    step_with(opt, model, [[1.0, 0.0], [0.0, 0.0]], [0.0, 1.0])
    assert torch.isfinite(model.w.weight).all() and torch.isfinite(model.w.bias).all()
    assert model.w.weight[1].tolist() == [3.0, 4.0] and model.w.bias[0].item() == 0.5


def phi(s: float, steps: int = 5) -> float:
    """What `steps` Newton-Schulz iterations do to one singular value."""
    a, b, c = NS
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s


@pytest.mark.parametrize("shape", [(6, 9), (9, 6), (5, 5)])
def test_newton_schulz_maps_singular_values_through_the_polynomial(shape):
    # NS(G) = U phi(S / ||G||_F) V^T: the singular vectors stay, each singular value goes through phi
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    expected = u @ torch.diag(torch.tensor([phi(x) for x in (s / g.norm()).tolist()], dtype=torch.float64)) @ vh
    assert torch.allclose(newton_schulz(g, dtype=torch.float64), expected, atol=1e-12)
    # the bfloat16 iteration Muon uses lands within a few percent of it
    assert (newton_schulz(g).double() - expected).abs().max() < 0.06


def test_muon_two_steps_by_hand():
    # Weight of a Linear(3, 2): a 2 x 3 matrix, scale sqrt(max(1, 2/3)) = 1. lr 0.1, mu 0.95, lambda 0.5.
    # Step 1, G1 = [[3, 0, 0], [0, -4, 0]]: B = 0.05 G1 and the look-ahead is a multiple of G1, whose
    #   singular values over ||G1||_F = 5 are 0.6 and 0.8: O = [[phi(0.6), 0, 0], [0, -phi(0.8), 0]]
    lr, mu, wd, tol = 0.1, 0.95, 0.5, 0.04  # tol: the bfloat16 iteration (see the test above)
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    cfg = OptimConfig(name="muon", muon_lr=lr, muon_momentum=mu, muon_weight_decay=wd)
    opt = build_optimizer(model, cfg)
    w = model[0].weight
    w.grad = torch.tensor([[3.0, 0.0, 0.0], [0.0, -4.0, 0.0]])
    opt.step()
    o1 = torch.tensor([[phi(0.6), 0, 0], [0, -phi(0.8), 0]])
    w1 = torch.ones(2, 3) * (1 - lr * wd) - lr * o1
    assert torch.allclose(w, w1, atol=lr * tol)
    assert torch.allclose(opt.state[w]["momentum_buffer"], 0.05 * w.grad)
    # Step 2, G2 = 5 e_{1,2}: B2 = 0.95 * 0.05 G1 + 0.05 G2, M = 0.05 G2 + 0.95 B2. Its rows are
    #   orthogonal, so its singular values are the row norms; O keeps each row's direction.
    w_before = w.detach().clone()
    w.grad = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    opt.step()
    m00, m11, m12 = mu * mu * 0.05 * 3, mu * mu * 0.05 * -4, 0.05 * 5 + mu * 0.05 * 5
    r1 = math.hypot(m11, m12)
    f = math.sqrt(m00**2 + r1**2)
    o2 = torch.tensor([[phi(m00 / f), 0, 0], [0, phi(r1 / f) * m11 / r1, phi(r1 / f) * m12 / r1]])
    assert torch.allclose(w, w_before * (1 - lr * wd) - lr * o2, atol=lr * tol)


def test_muon_shape_scale():
    assert muon_scale(torch.Size([3, 2]), "original") == math.sqrt(1.5)
    assert muon_scale(torch.Size([2, 3]), "original") == 1.0
    assert muon_scale(torch.Size([64, 16]), "match_rms_adamw") == pytest.approx(0.2 * 8)
    # a tall 3 x 2 weight (Linear(2, 3)), one step from zero with G = [[3, 0], [0, 4], [0, 0]]
    model = nn.Sequential(nn.Linear(2, 3, bias=False))
    with torch.no_grad():
        model[0].weight.zero_()
    opt = build_optimizer(model, OptimConfig(name="muon", muon_lr=0.1))
    model[0].weight.grad = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0]])
    opt.step()
    expected = -0.1 * math.sqrt(1.5) * torch.tensor([[phi(0.6), 0], [0, phi(0.8)], [0, 0]])
    assert torch.allclose(model[0].weight, expected, atol=0.1 * 0.04)


# --- parity with torch ---------------------------------------------------------------------------
def run_steps(model: nn.Module, opt, steps: int = 4, start: int = 0) -> None:
    for step in range(start, start + steps):
        ids = batch(step)
        opt.zero_grad()
        model(ids[:, :-1], ids[:, 1:]).loss.backward()
        opt.step()


@pytest.mark.parametrize("lr", [0.02, 0.7])  # 0.7: the relative step 1 / sqrt(t) is below lr from step 3 on
def test_adafactor_matches_torch_bit_for_bit(lr):
    model = tiny_model(qkv_bias=True)
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    cfg = OptimConfig(name="adafactor", lr=lr, weight_decay=0.1)
    opt = build_optimizer(ours, cfg)
    ref = torch.optim.Adafactor(param_groups(theirs, cfg), lr=lr)  # the same groups, weight decay included
    run_steps(ours, opt)
    run_steps(theirs, ref)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert not torch.equal(next(ours.parameters()), next(model.parameters()))  # it did train


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
@pytest.mark.parametrize("lr_adjust, nesterov", [("original", True), ("match_rms_adamw", True), ("original", False)])
def test_muon_matches_torch_muon_and_adamw_bit_for_bit(lr_adjust, nesterov):
    model = tiny_model(qkv_bias=True)
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    cfg = OptimConfig(name="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.1, muon_weight_decay=0.05,
                      muon_lr_adjust=lr_adjust, muon_nesterov=nesterov)
    opt = build_optimizer(ours, cfg)
    groups = {g["name"]: g["params"] for g in param_groups(theirs, cfg)}
    torch_muon = torch.optim.Muon(groups["muon"], lr=0.02, weight_decay=0.05, momentum=0.95, nesterov=nesterov,
                                  adjust_lr_fn=lr_adjust)
    torch_adamw = torch.optim.AdamW([dict(params=groups["decay"], weight_decay=0.1),
                                     dict(params=groups["no_decay"], weight_decay=0.0)], lr=1e-3, betas=(0.9, 0.95))

    class Both:
        def zero_grad(self):
            torch_muon.zero_grad()
            torch_adamw.zero_grad()

        def step(self):
            torch_muon.step()
            torch_adamw.step()

    run_steps(ours, opt)
    run_steps(theirs, Both())
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q), name


# --- convergence -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg",
    [
        OptimConfig(name="adamw", lr=1e-2, weight_decay=0.0),
        OptimConfig(name="lion", lr=5e-3, weight_decay=0.0),
        OptimConfig(name="adafactor", lr=0.1, weight_decay=0.0),  # lr caps the relative step
        OptimConfig(name="adafactor", lr=1e-2, weight_decay=0.0, adafactor_relative_step=False,
                    adafactor_scale_parameter=False),
        OptimConfig(name="muon", lr=1e-2, muon_lr=0.02, weight_decay=0.0),
    ],
    ids=["adamw", "lion", "adafactor", "adafactor-absolute", "muon"],
)
def test_fits_a_small_regression(cfg):
    # a 8-32-4 tanh MLP fitting y = tanh(x W) on 256 points: the mean squared error starts at 0.80
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = torch.tanh(x @ torch.randn(8, 4, generator=g))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = build_optimizer(model, cfg)
    first = nn.functional.mse_loss(model(x), y).item()
    for _ in range(200):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    assert first > 0.5
    assert loss.item() < 0.02


# --- exact resume --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["adamw", "lion", "adafactor", "muon"])
def test_resume_is_bit_exact(name, tmp_path):
    cfg = OptimConfig(name=name, lr=1e-3, muon_weight_decay=0.01)
    sched, total, split = ScheduleConfig("cosine", warmup_steps=2), 6, 3
    model_cfg = dict(qkv_bias=True, position="learned")

    straight = tiny_model(**model_cfg)
    opt = build_optimizer(straight, cfg)
    train(straight, opt, range(total), total, sched)

    first = tiny_model(**model_cfg)
    opt1 = build_optimizer(first, cfg)
    train(first, opt1, range(split), total, sched)
    torch.save({"model": first.state_dict(), "optim": opt1.state_dict()}, tmp_path / "state.pt")

    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed = build_model(tiny_config(**model_cfg), init=False)
    resumed.load_state_dict(saved["model"])
    fresh_copy = copy.deepcopy(resumed)
    opt2 = build_optimizer(resumed, cfg)
    opt2.load_state_dict(saved["optim"])
    train(resumed, opt2, range(split, total), total, sched)

    for (n, p), q in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), n
    buf = io.BytesIO()  # the resumed optimizer state is the uninterrupted one, after a save/load round trip
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    assert_same_state(torch.load(buf, weights_only=True), opt2.state_dict())
    # the optimizer state matters: continuing with a fresh optimizer does not give the same weights
    opt3 = build_optimizer(fresh_copy, cfg)
    train(fresh_copy, opt3, range(split, total), total, sched)
    assert not all(torch.equal(p, q) for p, q in zip(straight.parameters(), fresh_copy.parameters(), strict=True))


# --- FSDP2 ------------------------------------------------------------------------------------------
def _fsdp_worker(rank: int, tmp: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    def sharded_model(seed: int) -> nn.Module:
        model = tiny_model(seed, qkv_bias=True)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    def assert_matches(sharded, opt_sharded, ref, opt_ref, what: str) -> None:
        for (n, p), q in zip(sharded.named_parameters(), ref.parameters(), strict=True):
            assert isinstance(p, DTensor)
            assert torch.equal(p.full_tensor(), q), f"{what}: {n} differs from the single-process run"
        for p, q in zip(sharded.parameters(), ref.parameters(), strict=True):
            for key, value in opt_sharded.state[p].items():
                whole = value.full_tensor() if isinstance(value, DTensor) else value
                assert torch.equal(whole, opt_ref.state[q][key]), f"{what}: state {key} differs"

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    try:
        mesh = init_device_mesh("cpu", (2,))
        for name in ("adamw", "lion", "adafactor", "muon"):
            cfg = OptimConfig(name=name, lr=1e-2, muon_weight_decay=0.05)
            ref, sharded = tiny_model(qkv_bias=True), sharded_model(0)
            opt_ref, opt_sharded = build_optimizer(ref, cfg), build_optimizer(sharded, cfg)
            # the same batch on both ranks: the averaged sharded gradient equals the single-process one exactly
            run_steps(ref, opt_ref, 2)
            run_steps(sharded, opt_sharded, 2)
            assert_matches(sharded, opt_sharded, ref, opt_ref, f"{name}, sharded steps")
            # resume through torch.distributed.checkpoint into a differently initialized sharded model
            model_sd, optim_sd = get_state_dict(sharded, opt_sharded)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=f"{tmp}/{name}")
            resumed = sharded_model(1)
            opt_resumed = build_optimizer(resumed, cfg)
            model_sd, optim_sd = get_state_dict(resumed, opt_resumed)
            loaded = {"model": model_sd, "optim": optim_sd}
            dcp.load(loaded, checkpoint_id=f"{tmp}/{name}")
            set_state_dict(resumed, opt_resumed, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
            run_steps(ref, opt_ref, 2, start=2)
            run_steps(resumed, opt_resumed, 2, start=2)
            assert_matches(resumed, opt_resumed, ref, opt_ref, f"{name}, resumed from a sharded checkpoint")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="this torch has no torch.distributed")
def test_fsdp2_sharded_step_equals_single_process_step(tmp_path):
    """Two gloo processes on CPU, every optimizer: FSDP2 steps equal single-process steps bit for bit
    (Adafactor and Muon gather what they need), and so does a run resumed from a DCP checkpoint."""
    mp.spawn(_fsdp_worker, args=(str(tmp_path),), nprocs=2, join=True)
