"""Optimizers for the training loop: AdamW, Lion, Adafactor and Muon, over one parameter split.

`param_groups` sorts a model's parameters the way GPT-style recipes do: decoupled weight decay
(Loshchilov & Hutter 2019) on matrices, none on norms, biases and, by default, embeddings; for
Muon, the 2-D hidden matrices form a group of their own. Every group carries "base_lr", which
the loop multiplies by the schedule's factor (`schedule.lr_multiplier`) before each step.

Which code does the work, and why:
- AdamW is `torch.optim.AdamW`: it is exactly the algorithm, and well tested.
- Lion is written here (torch has none): it is four lines of math.
- Adafactor is written here, although torch has `torch.optim.Adafactor`, because lmlab needs two
  things torch's lacks: an absolute step size that follows the lr schedule (relative_step=False)
  and FSDP2 support (its row/column statistics need the whole matrix). With the paper's
  relative step it matches torch's to the bit (tests/train/test_optim.py).
- Muon is written here, although torch has `torch.optim.Muon`, because Muon's authors train the
  embeddings, the output head, norms and biases with AdamW: lmlab's `Muon` holds both kinds of
  group, so the loop sees one optimizer (one `step()`, one `state_dict()`). Its matrix update
  matches torch's to the bit; it also runs under FSDP2.

Under FSDP2 (`fully_shard`) parameters and gradients are DTensors sharded on dim 0. AdamW and
Lion are elementwise and run on the shards. Adafactor and Muon gather each gradient whole
(`full_tensor()`), compute the update as a single process would, and keep this rank's shard of
it: every rank repeats the same small computation, which keeps the code simple and the result
identical to an unsharded run. All four round-trip through torch.distributed.checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..model.norm import Norm

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed support: there are no DTensors then
    DTensor = None

OPTIMIZERS = ("adamw", "lion", "adafactor", "muon")
MUON_LR_ADJUSTS = ("original", "match_rms_adamw")
# Newton-Schulz quintic coefficients (Jordan et al. 2024): chosen to maximize the slope at zero,
# so that small singular values grow fast; the fixed point is not 1 but an interval around it.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# modules whose parameters are never decayed (_NormBase: every BatchNorm and InstanceNorm); norms of
# other libraries still escape decay through their 1-D shape
NORM_TYPES = (Norm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)


@dataclass
class OptimConfig:
    """Which optimizer, and its hyperparameters (the lr schedule is `ScheduleConfig`)."""

    name: str = "adamw"
    """"adamw" | "lion" | "adafactor" | "muon" (Muon on hidden matrices, AdamW on the rest)."""
    lr: float = 3e-4
    """Peak lr of the AdamW/Lion/Adafactor groups. Lion wants 3-10x less than AdamW (Chen et al.
    2023); Adafactor with relative_step uses it as the cap on the relative step (paper: 1e-2)."""
    weight_decay: float = 0.1
    """Decoupled weight decay lambda (Loshchilov & Hutter 2019): each step p <- p (1 - lr lambda)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """(beta1, beta2) of AdamW, of Lion (paper: (0.9, 0.99); (0.95, 0.98) for language models),
    and of the AdamW groups inside Muon. Adafactor has no beta1; its beta2 follows a schedule."""
    eps: float = 1e-8
    """AdamW's denominator epsilon (AdamW and the AdamW groups inside Muon)."""
    decay_embeddings: bool = False
    """Also decay the token/position embedding tables. Norms and biases are never decayed; the
    output head (lm_head) is a matrix and always is."""
    muon_lr: float = 0.02
    """Peak lr of Muon's matrix group (with muon_lr_adjust="original"; with "match_rms_adamw"
    the update has AdamW's RMS and Moonshot use AdamW's lr here)."""
    muon_momentum: float = 0.95
    """Muon's momentum mu: buffer B <- mu B + (1 - mu) g."""
    muon_nesterov: bool = True
    """Orthogonalize the Nesterov look-ahead (1 - mu) g + mu B instead of the buffer B."""
    muon_ns_steps: int = 5
    """Newton-Schulz iterations per update."""
    muon_weight_decay: float = 0.0
    """Decoupled weight decay of Muon's matrices, p <- p (1 - muon_lr lambda). Separate from
    weight_decay because muon_lr is ~100x AdamW's lr: the same lambda would decay 100x harder.
    Jordan et al. use 0; Liu et al. 2025 use 0.1 with "match_rms_adamw" and muon_lr = lr."""
    muon_lr_adjust: str = "original"
    """Shape-dependent scale of Muon's update of an A x B matrix: "original" (Jordan et al.)
    sqrt(max(1, A/B)); "match_rms_adamw" (Liu et al. 2025) 0.2 sqrt(max(A, B)), which gives the
    update AdamW's RMS so that AdamW's lr and weight decay carry over."""
    muon_exclude: tuple[str, ...] = ("lm_head",)
    """nn.Linear modules (a full dotted name, or its last part) kept out of Muon: the output head.
    Embeddings, norms, biases and anything not an nn.Linear weight always go to AdamW."""
    adafactor_relative_step: bool = True
    """Adafactor's step size rho_t = min(lr, 1/sqrt(t)) (Shazeer & Stern 2018, with lr as the cap,
    as torch does); False: rho_t = lr, so the lr schedule alone sets the step size."""
    adafactor_scale_parameter: bool = True
    """Scale the step by max(eps2, RMS(p)), making it relative to the parameter's size."""
    adafactor_beta2_decay: float = -0.8
    """Second-moment decay schedule beta2_t = 1 - t^beta2_decay (the paper's -0.8)."""
    adafactor_eps1: float | None = None
    """Floor of sqrt(second-moment estimate), as torch applies it (the paper's 1e-30 on G^2 is 1e-15
    here); None: the parameter dtype's machine epsilon."""
    adafactor_eps2: float = 1e-3
    """Floor of RMS(p) in the parameter scale, so zero-initialized parameters still move."""
    adafactor_clip_threshold: float = 1.0
    """Update clipping d: the update is divided by max(1, RMS(update) / d)."""

    def __post_init__(self) -> None:
        # recipes come from TOML, where tuples are lists
        self.betas = tuple(self.betas)
        exclude = self.muon_exclude
        self.muon_exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)  # one name, not its letters
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field and the fix, for any setting no optimizer can run."""

        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid optimizer config: {msg}")

        check(self.name in OPTIMIZERS, f"name={self.name!r}; choose one of {OPTIMIZERS}")
        check(self.lr > 0, f"lr must be positive, got {self.lr}")
        check(self.muon_lr > 0, f"muon_lr must be positive, got {self.muon_lr}")
        for name in ("weight_decay", "muon_weight_decay"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
              f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        check(self.eps > 0, f"eps must be positive, got {self.eps}")
        check(0 <= self.muon_momentum < 1, f"muon_momentum must be in [0, 1), got {self.muon_momentum}")
        check(self.muon_ns_steps >= 1, f"muon_ns_steps must be at least 1, got {self.muon_ns_steps}")
        check(self.muon_lr_adjust in MUON_LR_ADJUSTS,
              f"muon_lr_adjust={self.muon_lr_adjust!r}; choose one of {MUON_LR_ADJUSTS}")
        check(self.adafactor_beta2_decay < 0,
              f"adafactor_beta2_decay must be negative (beta2_t = 1 - t^decay), got {self.adafactor_beta2_decay}")
        # eps1 floors sqrt(V) (torch's convention), so eps1^2 must not underflow to 0 in float32,
        # or a zero gradient gives 0 / 0 = nan
        check(self.adafactor_eps1 is None or self.adafactor_eps1 >= 1e-19,
              f"adafactor_eps1 must be >= 1e-19 or None (the dtype's epsilon), got {self.adafactor_eps1}; it floors "
              "sqrt(V), so the paper's 1e-30 floor on G^2 corresponds to adafactor_eps1 = 1e-15")
        check(self.adafactor_eps2 >= 0, f"adafactor_eps2 must be >= 0, got {self.adafactor_eps2}")
        check(self.adafactor_clip_threshold >= 1,
              f"adafactor_clip_threshold must be >= 1, got {self.adafactor_clip_threshold}")


# --- parameter groups -------------------------------------------------------------------------
def _kinds(model: nn.Module, cfg: OptimConfig) -> dict[Tensor, tuple[str, str]]:
    """Each trainable parameter, once, -> (its first name, its kind): "embedding", "norm",
    "bias", "vector" (other < 2-D), "head", "matrix" (an nn.Linear weight: Muon's) or "other".
    A tied parameter is seen from every module that holds it; being an embedding wins."""
    seen: dict[Tensor, tuple[str, set[str]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, nn.Embedding):
                kind = "embedding"
            elif isinstance(module, NORM_TYPES):
                kind = "norm"
            elif p_name.endswith("bias"):
                kind = "bias"
            elif p.ndim < 2 or p_name in getattr(module, "no_weight_decay", ()):  # e.g. an SSM's A_log
                kind = "vector"
            elif isinstance(module, nn.Linear) and p_name == "weight":
                is_head = any(mod_name == x or mod_name.endswith("." + x) for x in cfg.muon_exclude)
                kind = "head" if is_head else "matrix"
            else:
                kind = "other"
            seen.setdefault(p, (full, set()))[1].add(kind)
    order = ("embedding", "norm", "bias", "vector", "head", "other", "matrix")  # first match wins
    return {p: (name, next(k for k in order if k in kinds)) for p, (name, kinds) in seen.items()}


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """The decay / no_decay (/ muon) split of `model`'s trainable parameters, as torch param
    groups with "name", "param_names", "weight_decay", "lr" and "base_lr" (the peak lr the loop
    scales). Works for any nn.Module: kinds come from module types and shapes. Empty groups are
    left out."""
    muon = cfg.name == "muon"
    groups = {
        "muon": dict(weight_decay=cfg.muon_weight_decay, base_lr=cfg.muon_lr, use_muon=True),
        "decay": dict(weight_decay=cfg.weight_decay, base_lr=cfg.lr, use_muon=False),
        "no_decay": dict(weight_decay=0.0, base_lr=cfg.lr, use_muon=False),
    }
    for group in groups.values():
        group.update(params=[], param_names=[])
    for p, (name, kind) in _kinds(model, cfg).items():
        if kind == "matrix" and muon and p.ndim == 2:
            target = "muon"
        elif kind in ("head", "matrix", "other") or (kind == "embedding" and cfg.decay_embeddings):
            target = "decay"
        else:
            target = "no_decay"
        groups[target]["params"].append(p)
        groups[target]["param_names"].append(name)
    if not any(g["params"] for g in groups.values()):
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    if muon and not groups["muon"]["params"]:
        raise ValueError(f"optimizer 'muon' found no nn.Linear weight outside muon_exclude={list(cfg.muon_exclude)} "
                         "to orthogonalize; use 'adamw' for this model")
    out = []
    for name, group in groups.items():
        if group["params"]:
            if not muon:
                del group["use_muon"]
            out.append(dict(name=name, lr=group["base_lr"], **group))
    return out


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer `cfg.name` over `param_groups(model, cfg)`. Build it after `fully_shard`,
    so that it holds the sharded parameters."""
    groups = param_groups(model, cfg)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.name == "lion":
        return Lion(groups, lr=cfg.lr, betas=cfg.betas)
    if cfg.name == "adafactor":
        return Adafactor(groups, lr=cfg.lr, relative_step=cfg.adafactor_relative_step,
                         scale_parameter=cfg.adafactor_scale_parameter, beta2_decay=cfg.adafactor_beta2_decay,
                         eps1=cfg.adafactor_eps1, eps2=cfg.adafactor_eps2, clip_threshold=cfg.adafactor_clip_threshold)
    return Muon(groups, lr=cfg.muon_lr, momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov,
                ns_steps=cfg.muon_ns_steps, lr_adjust=cfg.muon_lr_adjust, betas=cfg.betas, eps=cfg.eps)


# --- DTensor (FSDP2) support -----------------------------------------------------------------
def _is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _whole(t: Tensor) -> Tensor:
    """The full tensor behind a DTensor (gathered from every rank); a plain tensor as it is."""
    return t.full_tensor() if _is_dtensor(t) else t


def _shard_like(full: Tensor, ref: Tensor) -> Tensor:
    """This rank's piece of `full`, laid out as the DTensor `ref` (a plain tensor: `full` itself).
    Every rank holds the same `full`, so each keeps its own chunk and nothing is communicated."""
    if not _is_dtensor(ref):
        return full
    return distribute_tensor(full, ref.device_mesh, ref.placements, src_data_rank=None)


def _closure_loss(closure: Callable[[], Tensor] | None) -> Tensor | None:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _step_count(state: dict) -> float:
    """Increment and return the per-parameter step t (1 at the first step). Kept as a CPU tensor,
    as torch's optimizers do, so that state dicts look alike to checkpoint code."""
    if "step" not in state:
        state["step"] = torch.tensor(0.0)
    state["step"] += 1
    return state["step"].item()


def _check_params(params: Iterable[Tensor], optimizer: str) -> None:
    for p in params:
        if p.is_complex() or p.is_sparse:
            raise ValueError(f"{optimizer} supports real dense parameters only, got {p.dtype} {p.layout}")


# --- Lion -------------------------------------------------------------------------------------
class Lion(torch.optim.Optimizer):
    """Lion, "EvoLved Sign Momentum" (Chen et al. 2023, "Symbolic Discovery of Optimization
    Algorithms"), with decoupled weight decay. For each parameter p with gradient g:

        c = beta1 m + (1 - beta1) g                 interpolate momentum and gradient
        p <- p - lr (sign(c) + lambda p)            every coordinate moves by exactly lr
        m <- beta2 m + (1 - beta2) g                the momentum tracks g more slowly

    One state tensor per parameter (AdamW keeps two). The sign makes the update's RMS 1, larger
    than AdamW's, so Lion wants a 3-10x smaller lr and a 3-10x larger lambda. Elementwise: runs
    unchanged on FSDP2 shards.
    """

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        if lr < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"Lion needs lr >= 0, weight_decay >= 0 and betas in [0, 1); "
                             f"got lr={lr}, weight_decay={weight_decay}, betas={betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))
        _check_params((p for g in self.param_groups for p in g["params"]), "Lion")

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                update = m.lerp(p.grad, 1 - beta1).sign_()
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr)
                m.lerp_(p.grad, 1 - beta2)
        return loss


# --- Adafactor ----------------------------------------------------------------------------------
class Adafactor(torch.optim.Optimizer):
    """Adafactor (Shazeer & Stern 2018, "Adaptive Learning Rates with Sublinear Memory Cost"),
    without momentum (the paper's beta1 = 0). For a gradient G of an n x m matrix at step t:

        beta2_t = 1 - t^beta2_decay                                   (paper: decay -0.8)
        R_t = beta2_t R_{t-1} + (1 - beta2_t) mean_cols(G^2)          n x 1 row statistics
        C_t = beta2_t C_{t-1} + (1 - beta2_t) mean_rows(G^2)          1 x m column statistics
        V_t = R_t C_t / max(mean(R_t), eps1)                          rank-1 second moment
        U_t = G / sqrt(max(V_t, eps1^2))
        U_t <- U_t / max(1, RMS(U_t) / d)                             update clipping
        rho_t = min(lr, 1 / sqrt(t)) if relative_step else lr
        alpha_t = max(eps2, RMS(p_{t-1})) rho_t if scale_parameter else rho_t
        p_t = p_{t-1} (1 - lr lambda) - alpha_t U_t

    1-D parameters keep a full V_t = beta2_t V_{t-1} + (1 - beta2_t) G^2; tensors of more than
    2 dims are factored over their last two. So the state is n + m numbers per matrix instead of
    AdamW's 2nm. The epsilons and the lr (cap on rho_t, and in the decay) are applied as
    `torch.optim.Adafactor` does, so that with relative_step and scale_parameter the two agree
    exactly; relative_step=False is Adafactor as used for fine-tuning, on an lr schedule.

    Under FSDP2 the statistics need the whole gradient: each rank gathers it, computes the update,
    and keeps its shard. The factored state is small and held whole (not sharded) on every rank.
    """

    def __init__(self, params, lr: float = 1e-2, relative_step: bool = True, scale_parameter: bool = True,
                 beta2_decay: float = -0.8, eps1: float | None = None, eps2: float = 1e-3,
                 clip_threshold: float = 1.0, weight_decay: float = 0.0):
        if lr < 0 or weight_decay < 0 or beta2_decay >= 0 or clip_threshold < 1:
            raise ValueError(f"Adafactor needs lr >= 0, weight_decay >= 0, beta2_decay < 0 and clip_threshold >= 1; "
                             f"got {lr}, {weight_decay}, {beta2_decay}, {clip_threshold}")
        defaults = dict(lr=lr, relative_step=relative_step, scale_parameter=scale_parameter, beta2_decay=beta2_decay,
                        eps1=eps1, eps2=eps2, clip_threshold=clip_threshold, weight_decay=weight_decay)
        super().__init__(params, defaults)
        _check_params((p for g in self.param_groups for p in g["params"]), "Adafactor")

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = _closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: Tensor, group: dict) -> None:
        lr, state = group["lr"], self.state[p]
        grad = _whole(p.grad)
        eps1 = group["eps1"] if group["eps1"] is not None else torch.finfo(p.dtype).eps
        t = _step_count(state)
        one_minus_beta2 = t ** group["beta2_decay"]
        # the float expressions below are torch.optim.Adafactor's, so that the two agree bit for bit
        rho = min(lr, 1 / (t**0.5)) if group["relative_step"] else lr
        alpha = rho
        if group["scale_parameter"]:
            alpha *= max(group["eps2"], _whole(p).norm(2).item() / (p.numel() ** 0.5))

        if grad.ndim >= 2:
            if "row_var" not in state:
                state["row_var"] = grad.new_zeros(grad.shape[:-1] + (1,))
                state["col_var"] = grad.new_zeros(grad.shape[:-2] + (1, grad.shape[-1]))
            row, col = state["row_var"], state["col_var"]
            # norm^2 / n is mean(g^2) without materializing g^2
            row.lerp_(grad.norm(dim=-1, keepdim=True).square_().div_(grad.shape[-1]), one_minus_beta2)
            col.lerp_(grad.norm(dim=-2, keepdim=True).square_().div_(grad.shape[-2]), one_minus_beta2)
            var = (row @ col).div_(row.mean(dim=-2, keepdim=True).clamp_(min=eps1))
        else:
            if "variance" not in state:
                state["variance"] = torch.zeros_like(grad)
            state["variance"].lerp_(grad * grad, one_minus_beta2)
            var = state["variance"].clone()
        update = var.clamp_(min=eps1 * eps1).rsqrt_().mul_(grad)
        clip = max(1.0, update.norm(2).item() / ((update.numel() ** 0.5) * group["clip_threshold"]))

        if group["weight_decay"]:
            p.mul_(1 - lr * group["weight_decay"])
        p.add_(_shard_like(update, p), alpha=-alpha / clip)


# --- Muon -------------------------------------------------------------------------------------
def newton_schulz(g: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Approximately orthogonalize the matrix g = U S V^T to U S' V^T, S' ~ 1.

    X_0 = g / ||g||_F puts every singular value in [0, 1]; then `steps` times

        X <- a X + (b A + c A^2) X,   A = X X^T,   (a, b, c) = (3.4445, -4.7750, 2.0315)

    maps each singular value s to a s + b s^3 + c s^5 while keeping U and V. A wide X is used
    (transposed when tall) so that A is the smaller Gram matrix. Muon runs it in bfloat16, like
    the reference: the update tolerates the rounding (a few percent on each singular value), and
    it is much faster on accelerators.
    """
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = g.shape[0] > g.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def muon_scale(shape: torch.Size, lr_adjust: str) -> float:
    """The update scale of an A x B matrix: "original" (Jordan et al. 2024) sqrt(max(1, A / B));
    "match_rms_adamw" (Liu et al. 2025) 0.2 sqrt(max(A, B)), the RMS of a typical AdamW update."""
    rows, cols = shape[0], shape[1]
    if lr_adjust == "original":
        return math.sqrt(max(1.0, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))


class Muon(torch.optim.Optimizer):
    """Muon, "MomentUm Orthogonalized by Newton-Schulz" (Jordan et al. 2024), for the 2-D hidden
    matrices, and AdamW (Loshchilov & Hutter 2019) for every other parameter, in one optimizer.

    Groups with "use_muon": True (2-D parameters only) take, for a gradient G of an A x B matrix:

        B <- mu B + (1 - mu) G                                momentum buffer
        M = (1 - mu) G + mu B if nesterov else B
        O = newton_schulz(M)                                  ~ the nearest semi-orthogonal matrix
        p <- p (1 - lr lambda) - lr muon_scale(A, B) O

    This is the update of the reference implementation and of `torch.optim.Muon` (same
    coefficients, bfloat16 iteration, scale names "original" / "match_rms_adamw"). The other
    groups take torch's AdamW update, op for op:

        m <- beta1 m + (1 - beta1) g,   v <- beta2 v + (1 - beta2) g^2
        p <- p (1 - lr lambda) - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)

    Why the split: orthogonalizing equalizes the update across all directions of a matrix that
    maps one hidden space to another; an embedding is a lookup table (rows are updated only when
    their token appears) and the output head maps to the vocabulary, and for both, as for 1-D
    parameters, Jordan et al. (and Liu et al. 2025) keep AdamW.

    Under FSDP2 the momentum stays sharded; the look-ahead M is gathered whole, orthogonalized,
    and each rank keeps its shard of O.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 lr_adjust: str = "original", betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if lr_adjust not in MUON_LR_ADJUSTS:
            raise ValueError(f"Muon lr_adjust={lr_adjust!r}; choose one of {MUON_LR_ADJUSTS}")
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or ns_steps < 1:
            raise ValueError(f"Muon needs lr >= 0, weight_decay >= 0, momentum in [0, 1) and ns_steps >= 1; "
                             f"got {lr}, {weight_decay}, {momentum}, {ns_steps}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, lr_adjust=lr_adjust,
                        betas=tuple(betas), eps=eps, weight_decay=weight_decay, use_muon=False)
        super().__init__(params, defaults)
        _check_params((p for g in self.param_groups for p in g["params"]), "Muon")
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if group["use_muon"] and p.ndim != 2:
                    names = group.get("param_names")
                    name = names[i] if names else f"parameter {i}"
                    raise ValueError(f"Muon orthogonalizes 2-D matrices only, but {name} in a use_muon group has "
                                     f"shape {tuple(p.shape)}; put it in an AdamW group (use_muon=False)")

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = _closure_loss(closure)
        for group in self.param_groups:
            update = self._muon_update if group["use_muon"] else self._adamw_update
            for p in group["params"]:
                if p.grad is not None:
                    update(p, group)
        return loss

    def _muon_update(self, p: Tensor, group: dict) -> None:
        state, mu = self.state[p], group["momentum"]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - mu)
        lookahead = p.grad.lerp(buf, mu) if group["nesterov"] else buf
        ortho = newton_schulz(_whole(lookahead), group["ns_steps"]).to(p.dtype)
        lr = group["lr"]
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(_shard_like(ortho, p), alpha=-lr * muon_scale(p.shape, group["lr_adjust"]))

    def _adamw_update(self, p: Tensor, group: dict) -> None:
        state, grad = self.state[p], p.grad
        (beta1, beta2), lr = group["betas"], group["lr"]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        t = _step_count(state)
        m, v = state["exp_avg"], state["exp_avg_sq"]
        p.mul_(1 - lr * group["weight_decay"])
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v.sqrt() / (1 - beta2**t) ** 0.5).add_(group["eps"])
        p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
