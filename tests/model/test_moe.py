"""Mixture of experts: dispatch against a per-token reference, capacity dropping by hand, the balance
and z losses by hand and against transformers, gradients, bias balancing, init on the meta device,
training through the loop, checkpoints, and LoRA on an MoE model."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lmlab.model import ModelConfig, build_model, count_params, load_checkpoint, save_checkpoint
from lmlab.model import moe as moe_module
from lmlab.model.config import MoEConfig
from lmlab.model.mlp import ACTIVATION_FNS
from lmlab.model.moe import (
    MoE,
    capacity_mask,
    load_balancing_loss,
    route,
    router_metrics,
    router_z_loss,
    update_expert_biases,
)

D_MODEL, VOCAB = 32, 64


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_config(n_layers: int = 2, **moe) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, d_model=D_MODEL, n_layers=n_layers, n_heads=4, n_kv_heads=2, d_ff=48,
                       max_seq_len=64, moe={"n_experts": 8, "top_k": 2, "d_expert": 16, **moe})


def make_layer(seed: int = 0, dtype: torch.dtype = torch.float64, mlp_gated: bool = True,
               mlp_activation: str = "silu", **moe) -> MoE:
    """A standalone MoE layer with random weights, its router scaled up so routing is far from uniform."""
    cfg = model_config(**moe).replace(mlp_gated=mlp_gated, mlp_activation=mlp_activation)
    torch.manual_seed(seed)
    layer = MoE(cfg, 0).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.3)
        layer.router.weight.normal_(0.0, 1.0)
        if layer.expert_bias is not None:
            layer.expert_bias.normal_(0.0, 0.3)
    return layer


# --- a per-token reference, written from the papers' equations, one token at a time ---------------
def reference(layer: MoE, x: torch.Tensor, dropped: set[tuple[int, int]] = frozenset(),
              logits: torch.Tensor | None = None) -> torch.Tensor:
    """y_t = s * sum_{i in TopK_t} g_{t,i} E_i(x_t) (+ shared), token by token. `dropped`: the (token,
    expert) pairs whose contribution a capacity limit removed; `logits`: fixed router logits."""
    fixed = logits
    m, ex = layer.moe, layer.experts
    act = ex.act
    rows = []
    for t, xt in enumerate(x.reshape(-1, x.shape[-1])):
        logits = layer.router.weight @ xt if fixed is None else fixed
        if m.router == "softmax_topk":
            scores = torch.softmax(logits, dim=0)
        elif m.router == "sigmoid":
            scores = torch.sigmoid(logits)
        else:
            scores = logits
        choice = (scores + (layer.expert_bias if layer.expert_bias is not None else 0.0)).detach()
        eligible = list(range(m.n_experts))
        if m.n_groups > 1:
            size = m.n_experts // m.n_groups
            groups = [choice[g * size:(g + 1) * size].tolist() for g in range(m.n_groups)]
            group_score = [max(g) if m.group_score == "max" else sum(sorted(g)[-2:]) for g in groups]
            best = sorted(range(m.n_groups), key=lambda g: -group_score[g])[:m.topk_groups]
            eligible = [i for g in best for i in range(g * size, (g + 1) * size)]
        chosen = sorted(eligible, key=lambda i: -choice[i].item())[:m.top_k]
        if m.router == "topk_softmax":
            g = torch.softmax(logits[chosen], dim=0)
        else:
            g = scores[chosen]
            if m.norm_topk_prob:
                g = g / g.sum()
        y = torch.zeros_like(xt)
        for weight, i in zip(g * m.routed_scaling_factor, chosen, strict=True):
            if (t, i) in dropped:
                continue
            up = ex.up_proj.weight[i] @ xt
            h = act(ex.gate_proj.weight[i] @ xt) * up if ex.gate_proj is not None else act(up)
            y = y + weight * (ex.down_proj.weight[i] @ h)
        if layer.shared is not None:
            sh = layer.shared
            s = sh.down_proj.weight @ (act(sh.gate_proj.weight @ xt) * (sh.up_proj.weight @ xt))
            if layer.shared_gate is not None:
                s = torch.sigmoid(layer.shared_gate.weight @ xt) * s
            y = y + s
        rows.append(y)
    return torch.stack(rows).reshape(x.shape)


ROUTING_CASES = {
    "softmax_topk": {},
    "softmax_topk-unnormalized": {"norm_topk_prob": False, "routed_scaling_factor": 2.5},
    "topk_softmax": {"router": "topk_softmax"},
    "sigmoid": {"router": "sigmoid"},
    "sigmoid-bias": {"router": "sigmoid", "bias_balancing": True, "routed_scaling_factor": 1.5},
    "groups-max": {"n_groups": 4, "topk_groups": 2, "group_score": "max", "norm_topk_prob": False},
    "groups-top2": {"router": "sigmoid", "n_groups": 4, "topk_groups": 2, "group_score": "top2_sum",
                    "bias_balancing": True},
    "groups-topk_softmax": {"router": "topk_softmax", "n_groups": 2, "topk_groups": 1},
    "shared": {"n_shared_experts": 2, "d_shared": 8},
    "shared-gated": {"n_shared_experts": 1, "d_shared": 24, "shared_gate": True, "norm_topk_prob": False},
    "top1": {"top_k": 1},
    "fine-grained": {"n_experts": 16, "top_k": 6, "d_expert": 4, "n_shared_experts": 1},
}


@pytest.mark.parametrize("name", list(ROUTING_CASES))
@pytest.mark.parametrize("training", [False, True])
def test_dispatch_matches_per_token_reference(name, training):
    layer = make_layer(**ROUTING_CASES[name]).train(training)
    x = torch.randn(3, 7, D_MODEL, dtype=torch.float64)
    out = layer(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, reference(layer, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gated, activation", [(False, "gelu_tanh"), (True, "gelu"), (False, "relu")])
def test_plain_and_other_activations(gated, activation):
    layer = make_layer(mlp_gated=gated, mlp_activation=activation)
    assert (layer.experts.gate_proj is None) == (not gated)
    x = torch.randn(2, 5, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference(layer, x), rtol=1e-10, atol=1e-10)


def test_routing_is_not_trivial():
    """The reference comparison means something: tokens go to many different expert sets, and the bias
    changes the choice but not the weights' source (the unbiased scores)."""
    layer = make_layer(router="sigmoid", bias_balancing=True)
    x = torch.randn(40, D_MODEL, dtype=torch.float64)
    logits = layer.router_logits(x)
    _, experts = route(logits, layer.moe, layer.expert_bias)
    assert len({tuple(sorted(e)) for e in experts.tolist()}) > 8
    w0, e0 = route(logits, layer.moe, None)
    w1, e1 = route(logits, layer.moe, torch.tensor([5.0] + [0.0] * 7, dtype=torch.float64))
    assert (e1 == 0).any(dim=-1).all() and not (e0 == 0).any(dim=-1).all()  # the bias forces expert 0 in
    picked = torch.sigmoid(logits).gather(-1, e1)
    torch.testing.assert_close(w1, picked / picked.sum(-1, keepdim=True))  # weights from unbiased scores


def test_gradients_match_reference_and_reach_every_part():
    layer = make_layer(n_shared_experts=1, shared_gate=True, aux_loss_coef=0.1, z_loss_coef=0.01).train()
    x = torch.randn(2, 6, D_MODEL, dtype=torch.float64, requires_grad=True)
    probe = torch.randn_like(x)
    (layer(x) * probe).sum().backward()
    ours = {n: p.grad.clone() for n, p in layer.named_parameters()}
    x_grad = x.grad.clone()
    layer.zero_grad()
    x.grad = None
    (reference(layer, x) * probe).sum().backward()
    for n, p in layer.named_parameters():
        assert ours[n].abs().sum() > 0, n
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-9, atol=1e-10, msg=n)
    torch.testing.assert_close(x_grad, x.grad, rtol=1e-9, atol=1e-10)
    # the auxiliary losses alone train the router
    layer.zero_grad()
    layer(x.detach())
    layer.aux_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0


# --- capacity ---------------------------------------------------------------------------------
def test_capacity_mask_by_hand():
    """Slot-major priority: all first choices (token order), then second choices.
    Expert 0's queue: t0.s0, t1.s0, t3.s0, t2.s1 -> keeps t0.s0, t1.s0; expert 1's: t2.s0, t0.s1, t3.s1
    -> keeps t2.s0, t0.s1; expert 2's: t1.s1."""
    experts = torch.tensor([[0, 1], [0, 2], [1, 0], [0, 1]])
    keep = capacity_mask(experts, n_experts=3, capacity=2)
    assert keep.tolist() == [[True, True], [True, True], [True, False], [False, False]]
    assert capacity_mask(experts, 3, capacity=4).all()


def test_capacity_drops_in_training_only():
    """E=4, k=2, 6 tokens, capacity_factor 1.0: C = ceil(1.0 * 6 * 2 / 4) = 3. With router logits fixed at
    (3, 2, 0, -1) for every token, each token's first choice is expert 0 and its second expert 1; each of
    those queues holds tokens 0, 1, 2 and drops 3, 4, 5, which get nothing (no shared expert)."""
    layer = make_layer(n_experts=4, capacity_factor=1.0)
    fixed = torch.tensor([3.0, 2.0, 0.0, -1.0], dtype=torch.float64)
    layer.router_logits = lambda h: fixed.expand(h.shape[0], 4)
    x = torch.randn(1, 6, D_MODEL, dtype=torch.float64)
    layer.train()
    out = layer(x)
    dropped = {(t, e) for t in (3, 4, 5) for e in (0, 1)}
    torch.testing.assert_close(out, reference(layer, x, dropped, logits=fixed), rtol=1e-10, atol=1e-10)
    assert out[0, :3].abs().min() > 0 and out[0, 3:].abs().max() == 0
    assert layer.stats["dropped"].item() == pytest.approx(0.5)
    layer.eval()  # evaluation routes every token
    torch.testing.assert_close(layer(x), reference(layer, x, logits=fixed), rtol=1e-10, atol=1e-10)
    assert layer.stats["dropped"].item() == 0


# --- losses -----------------------------------------------------------------------------------
def test_balance_and_z_loss_by_hand():
    """Two tokens, two experts, top-1. Router probabilities (1/4, 3/4) and (1/3, 2/3): both tokens go to
    expert 1, so f = (0, 1), P = (7/24, 17/24), L_bal = 2 * 17/24 = 17/12. The log-partition functions
    are ln 4 and ln 3: L_z = (ln^2 4 + ln^2 3) / 2. Through the layer, with the logits equal to the input
    (router weight = identity), aux_loss = 0.1 L_bal + 0.01 L_z."""
    logits = torch.tensor([[0.0, math.log(3)], [0.0, math.log(2)]], dtype=torch.float64)
    probs = torch.softmax(logits, -1)
    experts = torch.tensor([[1], [1]])
    assert load_balancing_loss(probs, experts, 2).item() == pytest.approx(17 / 12)
    z = (math.log(4) ** 2 + math.log(3) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(z)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=2, n_layers=1, n_heads=1, d_ff=4,
                      moe={"n_experts": 2, "top_k": 1, "aux_loss_coef": 0.1, "z_loss_coef": 0.01})
    layer = MoE(cfg, 0).double()
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))
    layer.train()
    layer(logits[None])
    assert layer.aux_loss.item() == pytest.approx(0.1 * 17 / 12 + 0.01 * z)
    assert layer.stats["load"].tolist() == [0.0, 1.0]
    layer.eval()
    layer(logits[None])
    assert layer.aux_loss is None  # evaluation adds nothing to the loss
    cfg0 = cfg.replace(moe=MoEConfig(n_experts=2, top_k=1))
    layer0 = MoE(cfg0, 0).train()
    layer0(torch.randn(1, 3, 2))
    assert layer0.aux_loss is None  # both coefficients 0


def test_balance_loss_matches_transformers():
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    torch.manual_seed(0)
    logits = torch.randn(50, 8) * 2
    for k in (1, 2, 3):
        _, experts = torch.topk(torch.softmax(logits, -1), k)
        ours = load_balancing_loss(torch.softmax(logits, -1), experts, 8)
        theirs = mixtral.load_balancing_loss_func((logits,), num_experts=8, top_k=k)
        torch.testing.assert_close(ours, theirs)


def test_model_loss_includes_aux_only_in_training():
    torch.manual_seed(0)
    model = build_model(model_config(aux_loss_coef=0.01, z_loss_coef=0.001))
    ids = torch.randint(0, VOCAB, (2, 12))
    model.train()
    out = model(ids, targets=ids)
    aux = sum(block.mlp.aux_loss for block in model.blocks)
    torch.testing.assert_close(out.aux_loss, aux)
    model.eval()
    plain = model(ids, targets=ids)
    assert plain.aux_loss is None
    torch.testing.assert_close(out.loss, plain.loss + aux)


# --- bias balancing ---------------------------------------------------------------------------
def test_bias_balancing_evens_out_a_skewed_router():
    """Inputs share a common direction the router favours for experts 0 and 1, so they take most tokens.
    Updating only the bias (no gradient step) brings the load back towards even."""
    layer = make_layer(dtype=torch.float32, router="sigmoid", bias_balancing=True, bias_update_rate=0.02)
    with torch.no_grad():
        layer.expert_bias.zero_()
        layer.router.weight.normal_(0.0, 0.1)
    torch.manual_seed(1)
    common = torch.randn(D_MODEL)
    with torch.no_grad():
        layer.router.weight[:2] += common / common.norm() * 1.5
    x = torch.randn(8, 16, D_MODEL) * 0.5 + common / common.norm() * 2
    layer.train()
    layer(x)
    before = router_metrics(layer)
    for _ in range(150):
        layer(x)
        update_expert_biases(layer)
    layer(x)
    after = router_metrics(layer)
    assert before["moe/load_max"] > 3.0 and before["moe/load_cv"] > 1.0  # two experts take everything
    # sign updates of a fixed size settle into a small oscillation around even load, not exactly on it
    assert after["moe/load_max"] < 1.5 and after["moe/load_cv"] < 0.35
    assert layer.expert_bias[:2].max() < 0 < layer.expert_bias[2:].min()  # overloaded down, the rest up
    assert layer._load_counts is not None  # the last training forward counted ...
    update_expert_biases(layer)
    assert layer._load_counts is None  # ... and the update consumed the counts
    bias = layer.expert_bias.clone()
    update_expert_biases(layer)  # nothing counted since: no change
    torch.testing.assert_close(layer.expert_bias, bias)
    layer.eval()
    layer(x)
    update_expert_biases(layer)  # evaluation forwards do not count
    torch.testing.assert_close(layer.expert_bias, bias)


def test_update_expert_biases_is_a_no_op_without_bias_layers():
    model = build_model(model_config())
    update_expert_biases(model)
    update_expert_biases(torch.nn.Linear(2, 2))


# --- metrics ----------------------------------------------------------------------------------
def test_router_metrics_by_hand():
    layer = make_layer(n_experts=4)
    layer(torch.randn(1, 3, D_MODEL, dtype=torch.float64))
    layer.stats["load"] = torch.tensor([0.5, 0.5, 0.0, 0.0])
    metrics = router_metrics(layer)
    assert metrics["moe/load_max"] == pytest.approx(2.0)
    assert metrics["moe/load_cv"] == pytest.approx(1.0)  # std (0.25) / mean (0.25)
    assert metrics["moe/load_entropy"] == pytest.approx(0.5)  # ln 2 / ln 4
    assert "moe/aux_loss" not in metrics  # eval mode, no coefficients
    assert router_metrics(torch.nn.Linear(2, 2)) == {}


# --- build, init, counting, caching -------------------------------------------------------------
def test_meta_build_and_init():
    cfg = model_config(n_layers=4, n_experts=16, d_expert=64, n_shared_experts=1, shared_gate=True,
                       router="sigmoid", bias_balancing=True, dense_layers=[0])
    torch.manual_seed(0)
    model = build_model(cfg)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    assert type(model.blocks[0].mlp).__name__ == "MLP" and isinstance(model.blocks[1].mlp, MoE)
    layer = model.blocks[1].mlp
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    assert layer.experts.up_proj.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert layer.experts.gate_proj.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)
    assert layer.experts.down_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert layer.router.weight.std().item() == pytest.approx(cfg.init_std, rel=0.1)
    assert layer.shared.down_proj.weight.std().item() == pytest.approx(residual_std, rel=0.1)
    assert torch.equal(layer.expert_bias, torch.zeros(16))
    assert "blocks.1.mlp.expert_bias" in model.state_dict()
    model(torch.randint(0, VOCAB, (1, 8)))


def test_config_resolves_widths_and_validates():
    cfg = model_config(d_expert=None, dense_layers=[1, 0, 1])
    assert cfg.moe.d_expert == cfg.d_ff and cfg.moe.d_shared == cfg.d_ff and cfg.moe.dense_layers == [0, 1]
    bad = [({"router": "softmax"}, "moe.router"), ({"n_groups": 3}, "divide n_experts"),
           ({"n_groups": 4, "topk_groups": 5}, "topk_groups"),
           ({"n_groups": 4, "topk_groups": 1, "top_k": 3}, "cannot be chosen"),
           ({"n_groups": 8, "topk_groups": 2, "group_score": "top2_sum"}, "at least 2 experts per group"),
           ({"shared_gate": True}, "n_shared_experts"), ({"capacity_factor": 0.0}, "capacity_factor"),
           ({"dense_layers": [2]}, "dense_layers"), ({"top_k": 9}, "top_k"), ({"group_score": "sum"}, "group_score")]
    for moe, match in bad:
        with pytest.raises(ValueError, match=match):
            model_config(**moe)


def test_cached_decoding_matches_full_forward():
    torch.manual_seed(0)
    model = build_model(model_config(n_shared_experts=1, capacity_factor=1.0)).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.router.weight.normal_(0.0, 1.0)
        ids = torch.randint(0, VOCAB, (2, 10))
        full = model(ids).logits
        cache = model.new_cache(2, 10)
        steps = [model(ids[:, :4], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                            for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


# --- grouped GEMM path ----------------------------------------------------------------------------
@pytest.mark.skipif(moe_module._GROUPED_MM is None, reason="this torch has no grouped_mm")
def test_grouped_mm_path_matches_expert_loop(monkeypatch):
    """bfloat16 takes torch's grouped GEMM, float32 the loop over experts: same function (to bf16
    rounding), same gradients, with dropped rows. grouped_mm leaves the rows past the last offset (the
    dropped assignments) unspecified, in its output and in its input gradient; here they are NaN, so
    anything of them that leaked into the result or the gradients would show."""
    layer = make_layer(dtype=torch.float32, capacity_factor=0.75, n_shared_experts=1).train()
    x = torch.randn(2, 16, D_MODEL)
    calls = []
    real = moe_module._GROUPED_MM

    class Poisoned(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, offs):
            ctx.save_for_backward(a, b, offs)
            out = real(a, b, offs=offs)
            out[int(offs[-1]):] = float("nan")
            return out

        @staticmethod
        def backward(ctx, grad):
            a, b, offs = ctx.saved_tensors
            with torch.enable_grad():
                a_, b_ = a.detach().requires_grad_(), b.detach().requires_grad_()
                ga, gb = torch.autograd.grad(real(a_, b_, offs=offs), (a_, b_), grad)
            ga = ga.clone()
            ga[int(offs[-1]):] = float("nan")
            return ga, gb, None

    monkeypatch.setattr(moe_module, "_GROUPED_MM", lambda a, b, offs: calls.append(1) or Poisoned.apply(a, b, offs))

    def run(model_dtype):
        layer.zero_grad()
        layer.to(model_dtype)
        xi = x.detach().to(model_dtype).requires_grad_()
        out = layer(xi)
        out.float().square().sum().backward()
        grads = {n: p.grad.float().clone() for n, p in layer.named_parameters()}
        grads["input"] = xi.grad.float()
        assert all(torch.isfinite(g).all() for g in grads.values())
        return out.float().detach(), grads

    out_loop, g_loop = run(torch.float32)
    assert not calls
    out_grouped, g_grouped = run(torch.bfloat16)
    assert len(calls) == 3  # gate, up, down
    assert layer.stats["dropped"] > 0
    scale = out_loop.abs().max()
    assert (out_grouped - out_loop).abs().max() < 0.03 * scale
    for n in g_loop:
        assert (g_grouped[n] - g_loop[n]).abs().max() < 0.05 * g_loop[n].abs().max() + 1e-6, n
    # under autocast with float32 weights the experts run in bf16 through the grouped GEMM as well
    calls.clear()
    layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_auto = layer(x)
    assert len(calls) == 3 and (out_auto.float() - out_loop).abs().max() < 0.03 * scale


# --- through the training loop, checkpoints, LoRA -------------------------------------------------
def test_moe_model_trains_through_the_loop_and_logs_router_metrics(tiny_recipe, tmp_path):
    from lmlab.train.config import resolve
    from lmlab.train.metrics import read_metrics
    from lmlab.train.pretrain import pretrain

    recipe = tiny_recipe(tmp_path / "run", steps=12, eval_every=0, save_every=12, sample_tokens=0)
    overrides = ["model.moe.n_experts=4", "model.moe.top_k=2", "model.moe.d_expert=32",
                 "model.moe.router='sigmoid'", "model.moe.bias_balancing=true", "model.moe.bias_update_rate=0.01",
                 "model.moe.z_loss_coef=0.001", "model.moe.capacity_factor=2.0"]
    result = pretrain(resolve(recipe, overrides), progress=False)
    records = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"]
    assert len(records) == 12
    for key in ("moe/load_max", "moe/load_cv", "moe/entropy", "moe/load_entropy", "moe/dropped", "moe/aux_loss"):
        assert all(math.isfinite(r[key]) for r in records), key
    assert all(1.0 <= r["moe/load_max"] <= 4.0 for r in records)
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    model = load_checkpoint(result.checkpoint)
    assert isinstance(model.blocks[0].mlp, MoE) and model.cfg.moe.router == "sigmoid"
    bias = model.blocks[0].mlp.expert_bias
    assert bias.abs().sum() > 0  # the loop applied the bias updates
    assert torch.allclose(bias / 0.01, (bias / 0.01).round(), atol=1e-3)  # in steps of the update rate


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model(model_config(router="sigmoid", bias_balancing=True, n_shared_experts=1,
                                     shared_gate=True, dense_layers=[1]))
    with torch.no_grad():
        model.blocks[0].mlp.expert_bias.normal_()
    save_checkpoint(model, tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt/config.json").read_text())
    assert json.dumps(saved).count("bias_balancing") >= 1
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.cfg == model.cfg
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ids = torch.randint(0, VOCAB, (2, 9))
    model.eval(), loaded.eval()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_lora_on_the_attention_of_an_moe_model():
    from lmlab.tune.adapters import AdapterConfig, apply_adapter
    from lmlab.tune.lora import lora_layers, merge_and_unload

    torch.manual_seed(0)
    model = build_model(model_config(n_shared_experts=1)).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    before = model(ids).logits.detach()
    apply_adapter(model, AdapterConfig(targets=["q_proj", "v_proj"]))
    names = sorted(lora_layers(model))
    assert names == [f"blocks.{i}.attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    torch.testing.assert_close(model(ids).logits, before)  # a fresh adapter changes nothing
    model.train()
    out = model(ids, targets=ids)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    # the default targets (every Llama projection) reach attention and the shared expert, never the
    # stacked experts, which are not nn.Linear
    model2 = build_model(model_config(n_shared_experts=1))
    apply_adapter(model2, AdapterConfig())
    adapted = lora_layers(model2)
    assert "blocks.0.mlp.shared.up_proj" in adapted and not any("experts" in n for n in adapted)
    assert isinstance(merge_and_unload(model2).blocks[0].mlp, MoE)


def test_shared_mlp_follows_mlp_bias_like_counting():
    cfg = model_config(n_shared_experts=2, d_shared=8).replace(mlp_bias=True)
    layer = MoE(cfg, 0)
    assert layer.shared.up_proj.bias is not None and layer.shared.up_proj.out_features == 16
    assert count_params(cfg) == sum(p.numel() for p in build_model(cfg).parameters())


def test_routing_weights_float32_under_autocast():
    layer = make_layer(dtype=torch.float32)
    x = torch.randn(1, 4, D_MODEL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.router_logits(x.reshape(-1, D_MODEL)).dtype == torch.float32
        assert torch.isfinite(layer(x)).all()
    ref = F.linear(x.reshape(-1, D_MODEL), layer.router.weight)
    torch.testing.assert_close(layer.router_logits(x.reshape(-1, D_MODEL)), ref)
    assert ACTIVATION_FNS  # the experts use the dense MLP's activations
