"""The preference losses of lmlab/align/losses.py against TRL's implementations and against the papers' equations.

Parity with TRL: each TRL trainer computes its loss inside a method that also runs the model, so the tests build
the trainer with `object.__new__` and only the attributes the method reads, and stand in for the model (or for
TRL's log-probability method) with a stub that hands back the test's own per-sequence log-probabilities. The loss
arithmetic that runs is TRL's own code; the same float64 leaf tensors go into lmlab's function, and the loss and
the gradient with respect to every input log-probability must agree within 1e-6.

  lmlab                         TRL 1.16 code path driven
  bradley_terry_loss (+margin)  RewardTrainer.compute_loss (with and without inputs["margin"])
  dpo_loss                      DPOTrainer._compute_loss, loss_type "sigmoid"
  dpo_loss, label_smoothing     CPOTrainer.cpo_loss, loss_type "sigmoid" (TRL's "conservative" form), fed the
                                policy-minus-reference log-ratios; DPOTrainer's "sigmoid" no longer reads
                                label_smoothing in TRL 1.16 (its "robust" loss is a different method)
  ipo_loss                      DPOTrainer._compute_loss, loss_type "ipo" (TRL divides the summed log-ratios by
                                the completion lengths; lmlab is given the length-averaged log-probabilities)
  kto_loss + kl_estimate        KTOTrainer._compute_loss, loss_type "kto" (KL from the mismatched pairs)
  orpo_loss                     ORPOTrainer.get_batch_loss_metrics (odds_ratio_loss plus the chosen NLL)
  simpo_loss                    CPOTrainer.get_batch_loss_metrics, loss_type "simpo", cpo_alpha 0

Every loss also has hand-computed values (plain `math` on two or three examples) and the closed form of its
gradient, so the tests still check the equations when TRL is not installed, and the invariants each paper
states (DPO's log 2 at the reference, IPO's minimum at 1 / (2 beta), KTO's clamped and detached reference point).
"""

from __future__ import annotations

import importlib
import math
import os
from collections import defaultdict
from types import ModuleType, SimpleNamespace

import pytest
import torch

from lmlab.align.losses import (
    PreferenceLoss,
    bradley_terry_loss,
    dpo_loss,
    ipo_loss,
    kl_estimate,
    kto_loss,
    orpo_loss,
    simpo_loss,
)

F64 = torch.float64
# ORPO and CPO/SimPO live in trl.experimental, whose import warns that its API may change: that is known here.
pytestmark = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")


def require(module: str) -> ModuleType:
    """Import a peer library the parity tests need: skip when it is missing, except under CI (the `CI`
    environment variable set), where it is a declared test dependency and its absence is a failure."""
    if not os.environ.get("CI"):
        return pytest.importorskip(module)
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"{module} is a test dependency (pip install -e '.[dev]') and CI must have it: {e}")


def leaves(*rows: list[float]) -> list[torch.Tensor]:
    return [torch.tensor(row, dtype=F64, requires_grad=True) for row in rows]


def grads(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, inputs))


def assert_parity(ours: torch.Tensor, theirs: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    """Same loss value, and the same gradient with respect to every input tensor, within 1e-6."""
    ours_grads, their_grads = grads(ours, inputs), grads(theirs, inputs)
    torch.testing.assert_close(ours, theirs.to(F64), atol=1e-6, rtol=0)
    for i, (ours_grad, their_grad) in enumerate(zip(ours_grads, their_grads, strict=True)):
        torch.testing.assert_close(ours_grad, their_grad.to(F64), atol=1e-6, rtol=0,
                                   msg=lambda m, i=i: f"gradient with respect to input {i}: {m}")


def sigma(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# Per-sequence summed log-probabilities of 4 pairs, the chosen response winning some and losing others
# against the reference, so h takes both signs.
PC, PR, RC, RR = [-12.0, -30.5, -7.25, -41.0], [-15.5, -29.0, -9.0, -38.5], [-13.0, -31.0, -6.5, -40.0], \
    [-14.0, -30.25, -10.0, -39.75]
# Completion lengths (tokens) of the chosen and rejected responses, for the length-averaged losses.
LEN_C, LEN_R = [6, 15, 3, 20], [8, 14, 5, 19]


class _Accelerator:
    """The slice of accelerate.Accelerator the loss methods read: one process on the CPU."""

    device = torch.device("cpu")

    @staticmethod
    def gather(t):
        return t

    gather_for_metrics = gather


def _trainer(cls: type, **attrs) -> object:
    trainer = object.__new__(cls)
    trainer.accelerator = _Accelerator()
    trainer.model = SimpleNamespace(training=True)
    trainer._metrics = defaultdict(lambda: defaultdict(list))
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    trainer.aux_loss_enabled = False
    for key, value in attrs.items():
        setattr(trainer, key, value)
    return trainer


def _model_outputs(seq_logps: torch.Tensor, width: int) -> SimpleNamespace:
    """A causal LM's fused-head outputs whose per-token log-probabilities over `width` positions sum to
    `seq_logps` per row (the masked positions hold 0, as TRL's fused head gives at label -100)."""
    rows = seq_logps.shape[0]
    log_probs = torch.cat([torch.zeros(rows, width - 1, dtype=seq_logps.dtype), seq_logps[:, None]], dim=1)
    zeros = torch.zeros(rows, width, dtype=F64)
    return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros,
                           is_top1=torch.zeros(rows, width, dtype=torch.bool), aux_loss=None)


def _completion_mask(lengths: list[int], width: int) -> torch.Tensor:
    """Prompt tokens (0) then the completion's tokens (1), in rows `width` wide."""
    return torch.tensor([[0] * (width - n) + [1] * n for n in lengths])


def _trl_dpo(loss_type: str, beta: float, chosen, rejected, ref_chosen, ref_rejected,
             lengths: list[int] | None = None) -> tuple[torch.Tensor, dict]:
    """DPOTrainer._compute_loss on these per-sequence log-probabilities (the reference ones precomputed, as
    `precompute_ref_log_probs=True` gives them); `lengths`: the 2B completion lengths (chosen rows first)."""
    trl = require("trl")
    batch = chosen.shape[0]
    lengths = lengths or [1] * (2 * batch)
    width = max(lengths) + 2
    trainer = _trainer(trl.DPOTrainer, beta=beta, loss_types=[loss_type], loss_weights=[1.0], label_smoothing=0.0,
                       f_divergence_type="reverse_kl", ld_alpha=None, use_weighting=False, precompute_ref_logps=True)
    outputs = _model_outputs(torch.cat([chosen, rejected]), width - 1)
    inputs = {"input_ids": torch.zeros(2 * batch, width, dtype=torch.long),
              "attention_mask": torch.ones(2 * batch, width, dtype=torch.long),
              "completion_mask": _completion_mask(lengths, width),
              "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = trainer._compute_loss(lambda **kwargs: outputs, inputs, return_outputs=False)
    return loss, trainer._metrics["train"]


def _trl_cpo(loss_type: str, beta: float, chosen, rejected, label_smoothing: float = 0.0,
             simpo_gamma: float = 0.5) -> tuple[torch.Tensor, dict]:
    """CPOTrainer.get_batch_loss_metrics with its forward pass replaced by these log-probabilities and the
    SFT term off (cpo_alpha 0: SimPO, or the bare sigmoid loss)."""
    require("trl")
    from trl.experimental.cpo import CPOTrainer

    trainer = _trainer(CPOTrainer, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, alpha=0.0,
                       cpo_alpha=0.0, simpo_gamma=simpo_gamma)
    logits = torch.zeros(chosen.shape[0], 1, 4, dtype=F64)
    trainer.concatenated_forward = lambda model, batch: (chosen, rejected, logits, logits, torch.zeros((), dtype=F64))
    return trainer.get_batch_loss_metrics(None, {})


# ---------------------------------------------------------------- Bradley-Terry


@pytest.mark.parametrize("with_margin", [False, True])
def test_bradley_terry_matches_trl_reward_trainer(with_margin):
    trl = require("trl")
    chosen, rejected = leaves([1.5, -0.25, 3.0, 0.0], [0.5, 0.75, -1.0, 0.0])
    margin = torch.tensor([0.5, 0.0, 2.0, 1.0], dtype=F64) if with_margin else None
    trainer = _trainer(trl.RewardTrainer, args=SimpleNamespace(center_rewards_coefficient=None))
    inputs = {"input_ids": torch.zeros(8, 3, dtype=torch.long), "attention_mask": torch.ones(8, 3, dtype=torch.long)}
    if with_margin:
        inputs["margin"] = margin
    scores = torch.cat([chosen, rejected])[:, None]  # a sequence-classification head's (2B, 1) logits
    theirs = trainer.compute_loss(lambda **kwargs: SimpleNamespace(logits=scores), inputs)
    assert_parity(bradley_terry_loss(chosen, rejected, margin), theirs, [chosen, rejected])


def test_bradley_terry_by_hand():
    chosen, rejected = leaves([2.0, -1.0], [1.0, 0.5])
    loss = bradley_terry_loss(chosen, rejected, margin=0.5)
    # -1/2 [log sigma(2 - 1 - 0.5) + log sigma(-1 - 0.5 - 0.5)]
    assert loss.item() == pytest.approx(-(math.log(sigma(0.5)) + math.log(sigma(-2.0))) / 2, abs=1e-12)
    d_chosen, d_rejected = grads(loss, [chosen, rejected])
    expected = [-sigma(-0.5) / 2, -sigma(2.0) / 2]  # dL/dr_w = -sigma(-(diff)) / B
    torch.testing.assert_close(d_chosen, torch.tensor(expected, dtype=F64))
    torch.testing.assert_close(d_rejected, -torch.tensor(expected, dtype=F64))
    # Equal rewards and no margin: a coin flip, log 2.
    assert bradley_terry_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))


# ---------------------------------------------------------------- DPO and conservative DPO


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_trl_sigmoid(beta):
    inputs = leaves(PC, PR, RC, RR)
    ours = dpo_loss(*inputs, beta=beta)
    theirs, metrics = _trl_dpo("sigmoid", beta, *inputs)
    assert_parity(ours.loss, theirs, inputs)
    # The implicit rewards beta (log pi - log pi_ref) that TRL logs (their batch means).
    assert ours.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][0], abs=1e-12)
    assert ours.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][0], abs=1e-12)


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_conservative_dpo_matches_trl_label_smoothed_sigmoid(eps):
    """TRL's conservative sigmoid loss (CPOTrainer, loss_type "sigmoid") applied to the log-ratios against the
    reference is conservative DPO: the same -(1 - eps) log sigma(h) - eps log sigma(-h) of the same h."""
    inputs = leaves(PC, PR, RC, RR)
    pc, pr, rc, rr = inputs
    ours = dpo_loss(*inputs, beta=0.2, label_smoothing=eps)
    theirs, metrics = _trl_cpo("sigmoid", 0.2, pc - rc, pr - rr, label_smoothing=eps)
    assert_parity(ours.loss, theirs, inputs)
    assert ours.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_dpo_by_hand(eps):
    """beta 0.1 on two pairs, from eq. 7 and Mitchell's cDPO; dL/dh = -(1 - eps) sigma(-h) + eps sigma(h)."""
    beta = 0.1
    pc, pr, rc, rr = inputs = leaves([-10.0, -8.0], [-12.0, -7.0], [-11.0, -8.5], [-11.5, -7.2])
    # h = beta [(pc - rc) - (pr - rr)]: beta [1 - (-0.5)] = 0.15 and beta [0.5 - 0.2] = 0.03
    hs = [0.15, 0.03]
    out = dpo_loss(*inputs, beta=beta, label_smoothing=eps)
    expected = sum(-(1 - eps) * math.log(sigma(h)) - eps * math.log(sigma(-h)) for h in hs) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    d_h = torch.tensor([(-(1 - eps) * sigma(-h) + eps * sigma(h)) * beta / 2 for h in hs], dtype=F64)
    d_pc, d_pr, d_rc, d_rr = grads(out.loss, inputs)
    for got, sign in [(d_pc, 1), (d_pr, -1), (d_rc, -1), (d_rr, 1)]:
        torch.testing.assert_close(got, sign * d_h)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.1, 0.05], dtype=F64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.05, 0.02], dtype=F64))
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2)])
def test_dpo_is_log2_at_the_reference(beta, eps):
    """When the policy is the reference, h = 0 and the loss is -log sigma(0) = log 2 whatever beta and eps."""
    logps = torch.tensor([-3.0, -50.0, -7.5], dtype=F64)
    policy_chosen, policy_rejected = logps.clone().requires_grad_(), (logps - 2).requires_grad_()
    out = dpo_loss(policy_chosen, policy_rejected, logps, logps - 2, beta=beta, label_smoothing=eps)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert torch.equal(out.chosen_rewards, torch.zeros(3, dtype=F64))
    # ... and the first step raises the chosen response: dL/dh(0) = -(1 - 2 eps) / 2 < 0.
    d_chosen, = grads(out.loss, [policy_chosen])
    torch.testing.assert_close(d_chosen, torch.full((3,), -(1 - 2 * eps) / 2 * beta / 3, dtype=F64))


# ---------------------------------------------------------------- IPO


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_ipo_matches_trl(beta):
    """TRL sums the log-probabilities and divides the log-ratios by the completion lengths; lmlab is handed the
    length-averaged log-probabilities. The leaves are the averaged ones; TRL gets them times the lengths."""
    inputs = leaves(*[[lp / n for lp, n in zip(row, lens, strict=True)] for row, lens in
                      [(PC, LEN_C), (PR, LEN_R), (RC, LEN_C), (RR, LEN_R)]])
    pc, pr, rc, rr = inputs
    len_c, len_r = torch.tensor(LEN_C, dtype=F64), torch.tensor(LEN_R, dtype=F64)
    theirs, metrics = _trl_dpo("ipo", beta, pc * len_c, pr * len_r, rc * len_c, rr * len_r, lengths=LEN_C + LEN_R)
    assert_parity(ipo_loss(*inputs, beta=beta).loss, theirs, inputs)


def test_ipo_by_hand_and_its_minimum():
    beta = 0.5  # target gap 1 / (2 beta) = 1
    pc, pr, rc, rr = inputs = leaves([-1.0, -2.0], [-1.5, -1.0], [-1.25, -2.0], [-1.25, -1.5])
    # h = (pc - rc) - (pr - rr) = 0.25 - (-0.25) = 0.5 and 0 - 0.5 = -0.5
    out = ipo_loss(*inputs, beta=beta)
    assert out.loss.item() == pytest.approx(((0.5 - 1) ** 2 + (-0.5 - 1) ** 2) / 2, abs=1e-12)
    d_pc, d_rr = grads(out.loss, [pc, rr])
    torch.testing.assert_close(d_pc, torch.tensor([2 * (0.5 - 1) / 2, 2 * (-0.5 - 1) / 2], dtype=F64))
    torch.testing.assert_close(d_rr, d_pc)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.125, 0.0], dtype=F64))
    # At h = 1 / (2 beta) the loss and its gradient are zero: IPO stops there instead of pushing h to infinity.
    for beta in (0.1, 0.25, 2.0):
        policy_chosen = torch.tensor([1 / (2 * beta) - 3.0], dtype=F64, requires_grad=True)
        zero = torch.tensor([-3.0], dtype=F64)
        at_min = ipo_loss(policy_chosen, zero, zero, zero, beta=beta).loss
        assert at_min.item() == pytest.approx(0.0, abs=1e-20)
        assert grads(at_min, [policy_chosen])[0].abs().item() < 1e-12
    with pytest.raises(ValueError, match="positive"):
        ipo_loss(*inputs, beta=0.0)


# ---------------------------------------------------------------- KTO


def _trl_kto(beta, desirable_weight, undesirable_weight, policy, ref, desirable, policy_kl, ref_kl):
    """KTOTrainer._compute_loss on these log-probabilities: the first model call is the mismatched (KL) batch,
    told apart from the matched one by its width."""
    trl = require("trl")
    batch, width, kl_width = policy.shape[0], 4, 3
    trainer = _trainer(trl.KTOTrainer, beta=beta, desirable_weight=desirable_weight,
                       undesirable_weight=undesirable_weight, loss_type="kto", calculate_KL=True,
                       precompute_ref_logps=True)
    outputs = {width: _model_outputs(policy, width - 1), kl_width: _model_outputs(policy_kl, kl_width - 1)}
    inputs = {"input_ids": torch.zeros(batch, width, dtype=torch.long),
              "attention_mask": torch.ones(batch, width, dtype=torch.long),
              "completion_mask": _completion_mask([2] * batch, width),
              "KL_input_ids": torch.zeros(batch, kl_width, dtype=torch.long),
              "KL_attention_mask": torch.ones(batch, kl_width, dtype=torch.long),
              "KL_completion_mask": _completion_mask([1] * batch, kl_width),
              "label": desirable, "ref_logps": ref, "ref_KL_logps": ref_kl}
    loss = trainer._compute_loss(lambda input_ids, **kwargs: outputs[input_ids.shape[1]], inputs,
                                 return_outputs=False)
    return loss, trainer._metrics["train"]


@pytest.mark.parametrize("kl_shift", [0.75, -2.0])  # a positive KL estimate, and a negative one (clamped to 0)
def test_kto_matches_trl(kl_shift):
    policy, ref = leaves([-12.0, -30.5, -7.25, -41.0, -9.0], [-13.0, -29.0, -6.5, -40.0, -9.5])
    desirable = torch.tensor([True, False, True, False, False])
    ref_kl = torch.tensor([-20.0, -11.0, -35.0, -8.0, -16.0], dtype=F64)
    policy_kl = (ref_kl + torch.tensor([1.0, -0.5, 2.0, 0.0, 1.25], dtype=F64) + kl_shift - 0.75).requires_grad_()
    kl = kl_estimate(policy_kl, ref_kl)
    assert kl.item() == pytest.approx(kl_shift, abs=1e-12)
    ours = kto_loss(policy, ref, desirable, kl, beta=0.2, desirable_weight=1.0, undesirable_weight=4 / 3)
    theirs, metrics = _trl_kto(0.2, 1.0, 4 / 3, policy, ref, desirable, policy_kl, ref_kl)
    assert_parity(ours.loss, theirs, [policy, ref])
    assert metrics["kl"] == [pytest.approx(max(kl_shift, 0.0), abs=1e-12)]
    assert ours.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][0], abs=1e-12)
    assert ours.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][0], abs=1e-12)


def test_kto_by_hand():
    """beta 0.1, z0 0.3, lambda_D 1, lambda_U 1.5 on r = (2, -1, 0.5), the middle one undesirable (eq. 8)."""
    beta, z0, lam_d, lam_u = 0.1, 0.3, 1.0, 1.5
    policy, ref = leaves([-8.0, -11.0, -4.5], [-10.0, -10.0, -5.0])
    desirable = torch.tensor([True, False, True])
    out = kto_loss(policy, ref, desirable, torch.tensor(z0, dtype=F64), beta=beta, desirable_weight=lam_d,
                   undesirable_weight=lam_u)
    s = [sigma(beta * (2 - z0)), sigma(beta * (z0 + 1)), sigma(beta * (0.5 - z0))]
    assert out.loss.item() == pytest.approx((lam_d * (1 - s[0]) + lam_u * (1 - s[1]) + lam_d * (1 - s[2])) / 3,
                                            abs=1e-12)
    # d/dr lambda_D (1 - sigma(beta (r - z0))) = -lambda_D beta sigma (1 - sigma); the undesirable one rises with r.
    expected = torch.tensor([-lam_d * beta * s[0] * (1 - s[0]), lam_u * beta * s[1] * (1 - s[1]),
                             -lam_d * beta * s[2] * (1 - s[2])], dtype=F64) / 3
    d_policy, d_ref = grads(out.loss, [policy, ref])
    torch.testing.assert_close(d_policy, expected)
    torch.testing.assert_close(d_ref, -expected)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.2, 0.05], dtype=F64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.1], dtype=F64))


def test_kto_reference_point_is_clamped_and_detached():
    policy, ref = leaves([-8.0, -11.0], [-10.0, -10.0])
    desirable = torch.tensor([True, False])
    kl = torch.tensor(-0.7, dtype=F64, requires_grad=True)  # a negative estimate, and one that carries a graph
    out = kto_loss(policy, ref, desirable, kl, beta=0.1)
    out.loss.backward()
    assert kl.grad is None  # z0 is a constant of the step (the paper does not backpropagate through it)
    at_zero = kto_loss(policy.detach(), ref, desirable, 0.0, beta=0.1).loss
    assert out.loss.item() == pytest.approx(at_zero.item(), abs=1e-15)  # max(0, KL)
    mismatched = torch.tensor([-3.0, -5.0], dtype=F64, requires_grad=True)
    estimate = kl_estimate(mismatched, torch.tensor([-4.0, -4.5], dtype=F64))
    assert estimate.item() == pytest.approx(0.25) and not estimate.requires_grad


# ---------------------------------------------------------------- ORPO


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_matches_trl(beta):
    """TRL's full ORPO loss, NLL - mean(beta log sigma(log odds ratio)), on length-averaged log-probabilities on
    both sides of -log 2 (both branches of its log1mexp). TRL computes the ratio in float32, hence 1e-6, not 1e-12,
    and no log-probability closer to 0 than -0.05: the gradient grows as 1 / (1 - P), and float32's error with it."""
    require("trl")
    from trl.experimental.orpo import ORPOTrainer

    chosen, rejected, nll = leaves([-0.05, -1.5, -0.4, -2.75], [-0.6, -0.9, -3.0, -0.2], 1.25)
    trainer = _trainer(ORPOTrainer, beta=beta)
    logits = torch.zeros(4, 1, 4, dtype=F64)
    trainer.concatenated_forward = lambda model, batch: (chosen, rejected, logits, logits, nll)
    theirs, metrics = trainer.get_batch_loss_metrics(None, {})
    ours = orpo_loss(chosen, rejected, nll, beta=beta)
    assert_parity(ours.loss, theirs, [chosen, rejected, nll])
    assert ours.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-6)
    assert ours.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"], abs=1e-6)


def test_orpo_by_hand():
    """Eqs. 6-7: odds = P / (1 - P); d log odds / d log P = 1 / (1 - P)."""
    beta = 0.1
    chosen, rejected, nll = leaves([-0.5, -1.0], [-1.2, -0.25], 2.0)
    out = orpo_loss(chosen, rejected, nll, beta=beta)

    def log_odds(lp: float) -> float:
        return math.log(math.exp(lp) / (1 - math.exp(lp)))

    ratios = [log_odds(-0.5) - log_odds(-1.2), log_odds(-1.0) - log_odds(-0.25)]
    assert out.loss.item() == pytest.approx(2.0 + beta * sum(-math.log(sigma(x)) for x in ratios) / 2, abs=1e-12)
    d_chosen, d_rejected, d_nll = grads(out.loss, [chosen, rejected, nll])
    assert d_nll.item() == pytest.approx(1.0)
    torch.testing.assert_close(d_chosen, torch.tensor(
        [-beta / 2 * sigma(-x) / (1 - math.exp(lp)) for x, lp in zip(ratios, [-0.5, -1.0], strict=True)], dtype=F64))
    torch.testing.assert_close(d_rejected, torch.tensor(
        [beta / 2 * sigma(-x) / (1 - math.exp(lp)) for x, lp in zip(ratios, [-1.2, -0.25], strict=True)], dtype=F64))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([-0.05, -0.1], dtype=F64))


def test_orpo_is_accurate_for_probabilities_near_one_in_float32():
    """A chosen response the policy has learned by heart has an averaged log-probability near 0, where
    log(1 - exp(x)) computed as log1p(-exp(x)) in float32 is far off (or -inf with a NaN gradient)."""
    for x in (-1e-3, -1e-5, -1e-7, -1e-8):
        chosen32 = torch.tensor([x], requires_grad=True)
        chosen64 = torch.tensor([x], dtype=F64, requires_grad=True)
        loss32 = orpo_loss(chosen32, torch.tensor([-1.0]), torch.tensor(0.0), beta=1.0).loss
        loss64 = orpo_loss(chosen64, torch.tensor([-1.0], dtype=F64), torch.tensor(0.0, dtype=F64), beta=1.0).loss
        assert loss32.item() == pytest.approx(loss64.item(), rel=1e-4)
        g32, = grads(loss32, [chosen32])
        g64, = grads(loss64, [chosen64])
        assert g32.item() == pytest.approx(g64.item(), rel=1e-4)


def test_orpo_rejects_probabilities_of_one():
    for bad in ([0.0, -1.0], [-0.5, 0.25]):
        with pytest.raises(ValueError, match="< 0"):
            orpo_loss(torch.tensor(bad), torch.tensor([-1.0, -1.0]), torch.tensor(1.0))
        with pytest.raises(ValueError, match="< 0"):
            orpo_loss(torch.tensor([-1.0, -1.0]), torch.tensor(bad), torch.tensor(1.0))


# ---------------------------------------------------------------- SimPO


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 1.0, 0.0), (2.5, 0.5, 0.0), (10.0, 3.0, 0.15)])
def test_simpo_matches_trl(beta, gamma, eps):
    """TRL's CPO trainer with loss_type "simpo" (cpo_alpha 0): logits - gamma / beta, scaled by beta, is the same
    margin beta (avg_w - avg_l) - gamma as the paper's eq. 6."""
    chosen, rejected = leaves([-0.75, -1.5, -0.4, -2.0], [-1.0, -0.9, -1.75, -2.1])
    ours = simpo_loss(chosen, rejected, beta=beta, gamma=gamma, label_smoothing=eps)
    theirs, metrics = _trl_cpo("simpo", beta, chosen, rejected, label_smoothing=eps, simpo_gamma=gamma)
    assert_parity(ours.loss, theirs, [chosen, rejected])
    assert ours.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], abs=1e-12)
    assert ours.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"], abs=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_by_hand(eps):
    beta, gamma = 2.0, 1.0
    chosen, rejected = leaves([-0.5, -1.25], [-1.5, -1.0])
    hs = [beta * 1.0 - gamma, beta * -0.25 - gamma]  # 1.0 and -1.5
    out = simpo_loss(chosen, rejected, beta=beta, gamma=gamma, label_smoothing=eps)
    expected = sum(-(1 - eps) * math.log(sigma(h)) - eps * math.log(sigma(-h)) for h in hs) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    d_h = torch.tensor([(-(1 - eps) * sigma(-h) + eps * sigma(h)) * beta / 2 for h in hs], dtype=F64)
    d_chosen, d_rejected = grads(out.loss, [chosen, rejected])
    torch.testing.assert_close(d_chosen, d_h)
    torch.testing.assert_close(d_rejected, -d_h)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([-1.0, -2.5], dtype=F64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-3.0, -2.0], dtype=F64))


# ---------------------------------------------------------------- bad input


def _calls(a: torch.Tensor, b: torch.Tensor) -> list:
    """Every loss called with one argument of shape `a` and the others of shape `b`."""
    neg_a, neg_b = -a.abs() - 1, -b.abs() - 1
    return [lambda: bradley_terry_loss(a, b), lambda: dpo_loss(a, b, b, b), lambda: ipo_loss(b, b, b, a),
            lambda: kto_loss(a, b, b > 0, 0.0), lambda: orpo_loss(neg_a, neg_b, torch.tensor(1.0)),
            lambda: simpo_loss(a, b)]


@pytest.mark.parametrize("shapes", [((3,), (4,)), ((2, 3), (2, 3)), ((), ())])
def test_shape_mismatch_raises(shapes):
    a, b = torch.full(shapes[0], -1.0), torch.full(shapes[1], -1.0)
    for call in _calls(a, b):
        with pytest.raises(ValueError, match="1-D tensors"):
            call()


@pytest.mark.parametrize("eps", [0.5, -0.1, 0.9])
def test_label_smoothing_outside_its_range_raises(eps):
    x = torch.tensor([-1.0, -2.0])
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        dpo_loss(x, x, x, x, label_smoothing=eps)
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        simpo_loss(x, x, label_smoothing=eps)


def test_every_policy_loss_returns_a_preference_loss():
    x = torch.tensor([-1.0, -2.0])
    for out in (dpo_loss(x, x, x, x), ipo_loss(x, x, x, x), kto_loss(x, x, torch.tensor([True, False]), 0.0),
                orpo_loss(x, x, torch.tensor(1.0)), simpo_loss(x, x)):
        assert isinstance(out, PreferenceLoss) and out.loss.dim() == 0
