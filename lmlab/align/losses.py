"""The preference losses, as pure functions of log-probabilities: Bradley-Terry for reward models, and DPO and its
family (IPO, conservative DPO, KTO, ORPO, SimPO) for the policy.

Every function takes the summed (or, where the method says so, length-averaged) log-probabilities of whole
responses, log pi(y|x) = sum_t log pi(y_t | x, y_<t), as 1-D tensors with one entry per example, and returns a
`PreferenceLoss`: the scalar loss (a mean over the batch) and the implicit rewards that the method's logs show.
How the log-probabilities are computed (padding, the prompt's tokens left out, the reference model run once and
cached) is the caller's (align/preference.py, align/offline.py); here is only the equation of each paper, so a
reader can hold the code against it line by line. tests/align/test_losses.py checks each one against TRL's
implementation where the installed TRL has it, and against values computed by hand from the equation otherwise.

Notation: y_w the chosen (preferred) response, y_l the rejected one, pi the policy, pi_ref the frozen reference
(the SFT model), sigma the logistic function, beta the strength of the implicit KL constraint.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


class PreferenceLoss(NamedTuple):
    loss: torch.Tensor  # scalar: the mean over the batch
    chosen_rewards: torch.Tensor  # (B,) the method's implicit reward of y_w (detached), for the logs
    rejected_rewards: torch.Tensor  # (B,) the same for y_l


def _check(*tensors: torch.Tensor) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"preference losses take 1-D tensors of one value per example, all of one length; got "
                         f"shapes {sorted(shapes)}")


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | float | None = None) -> torch.Tensor:
    """The reward model's loss (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1), optionally with a margin
    (Touvron et al. 2023, Llama 2, eq. 2: the margin m grows with how much better the chosen response was rated):

        P(y_w > y_l | x) = sigma(r(x, y_w) - r(x, y_l))
        L = -1/B sum log sigma(r(x, y_w) - r(x, y_l) - m)

    chosen_rewards, rejected_rewards: (B,) scalar rewards; margin: None (0), a number, or (B,) per pair."""
    _check(chosen_rewards, rejected_rewards)
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0) -> PreferenceLoss:
    """Direct Preference Optimization (Rafailov et al. 2023, eq. 7), with conservative DPO's label smoothing
    (Mitchell 2023, "A note on DPO with noisy preferences"):

        h = beta [ (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x)) ]
        L_DPO  = -log sigma(h)
        L_cDPO = -(1 - eps) log sigma(h) - eps log sigma(-h)

    eps (label_smoothing) is the assumed probability that a preference label is flipped: the loss then stops
    pushing once sigma(h) = 1 - eps instead of driving h to infinity. The implicit rewards are
    r(y) = beta (log pi(y|x) - log pi_ref(y|x)) (eq. 5, up to the partition function that cancels)."""
    _check(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing is the probability a label is wrong, in [0, 0.5); got {label_smoothing}")
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    h = beta * (chosen - rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return PreferenceLoss(losses.mean(), (beta * chosen).detach(), (beta * rejected).detach())


def ipo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1) -> PreferenceLoss:
    """Identity Preference Optimization (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning
    from Human Preferences", eq. 17), beta playing the paper's tau:

        h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))
        L = (h - 1 / (2 beta))^2

    A squared loss regresses the log-ratio gap to a finite target, so unlike DPO it does not overfit
    deterministic preferences (h -> infinity). As TRL does, the callers pass length-averaged log-probabilities
    (align/offline.py: `length_normalize`), which keeps 1/(2 beta) on the scale of one token's log-ratio."""
    _check(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    if beta <= 0:
        raise ValueError(f"IPO's beta (tau) must be positive, got {beta}")
    chosen = policy_chosen_logps - ref_chosen_logps
    rejected = policy_rejected_logps - ref_rejected_logps
    losses = (chosen - rejected - 1 / (2 * beta)) ** 2
    return PreferenceLoss(losses.mean(), (beta * chosen).detach(), (beta * rejected).detach())


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor | float,
             beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> PreferenceLoss:
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024, eq. 8): single responses, each marked desirable or
    undesirable, no pairs needed.

        r(x, y) = log pi(y|x) - log pi_ref(y|x)
        z_0     = max(0, KL(pi(y'|x) || pi_ref(y'|x)))     estimated on mismatched (x, y') pairs, no gradient
        v(x, y) = lambda_D sigma(beta (r - z_0))    if y is desirable
                  lambda_U sigma(beta (z_0 - r))    if y is undesirable
        L = 1/B sum (lambda_y - v(x, y))

    z_0 is the reference point of prospect theory: a response's reward counts only by how far it is above (or
    below) what the policy's drift from the reference already gives. The weights balance the two kinds:
    the paper keeps lambda_D n_D / (lambda_U n_U) in [1, 4/3].

    policy_logps, ref_logps: (B,) summed log-probabilities of each response; desirable: (B,) bool;
    kl: the batch's KL estimate (a scalar; it is detached and clamped at 0 here).
    chosen_rewards / rejected_rewards of the result hold beta r of the desirable / undesirable examples."""
    _check(policy_logps, ref_logps, desirable)
    desirable = desirable.to(torch.bool)
    z0 = torch.as_tensor(kl, dtype=policy_logps.dtype, device=policy_logps.device).detach().clamp(min=0)
    r = policy_logps - ref_logps
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    rewards = (beta * r).detach()
    return PreferenceLoss(losses.mean(), rewards[desirable], rewards[~desirable])


def kl_estimate(policy_mismatched_logps: torch.Tensor, ref_mismatched_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point before clamping: the batch mean of log pi(y'|x) - log pi_ref(y'|x) over mismatched
    pairs (each prompt with another example's response), a Monte Carlo estimate of KL(pi || pi_ref)."""
    return (policy_mismatched_logps - ref_mismatched_logps).mean().detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate over the whole range (Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))"): log1p(-exp(x)) loses every digit as x -> 0 (exp(x) rounds to 1; in float32 an averaged
    log-probability of -1e-7 is already 19% off and -1e-8 gives -inf), log(-expm1(x)) loses them as x -> -inf;
    the switch at -log 2 keeps each where it is exact. Each branch sees only its own side of the switch (the
    clamps), so the branch torch.where discards cannot send a 0 * inf = NaN back into the gradient."""
    cut = -math.log(2)
    return torch.where(x < cut, torch.log1p(-torch.exp(x.clamp(max=cut))), torch.log(-torch.expm1(x.clamp(min=cut))))


def orpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, chosen_nll: torch.Tensor,
              beta: float = 0.1) -> PreferenceLoss:
    """Odds Ratio Preference Optimization (Hong et al. 2024, eqs. 6-7): no reference model; the SFT loss on the
    chosen response plus an odds-ratio term that pushes the rejected one down in the same step.

        odds(y|x) = P(y|x) / (1 - P(y|x)),   log P(y|x) = 1/|y| sum_t log pi(y_t | x, y_<t)   (length-averaged)
        L_OR = -log sigma( log odds(y_w|x) - log odds(y_l|x) )
        L    = L_SFT + lambda L_OR

    policy_chosen_logps, policy_rejected_logps: (B,) length-averaged log-probabilities (so P < 1 and the odds
    are finite); chosen_nll: the SFT loss, the mean negative log-likelihood per chosen token; beta: lambda.
    The log-odds are computed as log P - log(1 - P), with log(1 - P) by `_log1mexp`, accurate for P near 0 and 1.
    The rewards logged (as TRL logs them) are beta log P."""
    _check(policy_chosen_logps, policy_rejected_logps)
    if (policy_chosen_logps >= 0).any() or (policy_rejected_logps >= 0).any():
        raise ValueError("ORPO needs length-averaged log-probabilities < 0 (a probability below 1) for its odds")
    log_odds = ((policy_chosen_logps - policy_rejected_logps)
                - (_log1mexp(policy_chosen_logps) - _log1mexp(policy_rejected_logps)))
    ratio_loss = -F.logsigmoid(log_odds)
    loss = chosen_nll + beta * ratio_loss.mean()
    return PreferenceLoss(loss, (beta * policy_chosen_logps).detach(), (beta * policy_rejected_logps).detach())


def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, beta: float = 2.0,
               gamma: float = 1.0, label_smoothing: float = 0.0) -> PreferenceLoss:
    """Simple Preference Optimization (Meng et al. 2024, eq. 6): no reference model; the reward is the
    length-averaged log-probability, and the chosen response must win by a target margin gamma.

        r(x, y) = beta / |y| log pi(y|x)
        L = -log sigma( r(x, y_w) - r(x, y_l) - gamma )

    policy_chosen_logps, policy_rejected_logps: (B,) length-averaged log-probabilities (1/|y| log pi(y|x)).
    label_smoothing as in `dpo_loss` (0 in the paper). Defaults: the paper's base-model setting (beta 2.0,
    gamma 1.0, Table 7's Llama-3-Base)."""
    _check(policy_chosen_logps, policy_rejected_logps)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing is the probability a label is wrong, in [0, 0.5); got {label_smoothing}")
    h = beta * (policy_chosen_logps - policy_rejected_logps) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return PreferenceLoss(losses.mean(), (beta * policy_chosen_logps).detach(), (beta * policy_rejected_logps).detach())


__all__ = ["PreferenceLoss", "bradley_terry_loss", "dpo_loss", "ipo_loss", "kl_estimate", "kto_loss", "orpo_loss",
           "simpo_loss"]
