"""Mixture of experts: a sparse MLP in which each token runs through top_k of n_experts experts.

    y(x) = s * sum_{i in TopK(x)} g_i(x) E_i(x)  +  [sigmoid(x . w_shared)] * Shared(x)

E_i are small MLPs (gated like model/mlp.py's MLP, per cfg.mlp_gated and cfg.mlp_activation), g_i(x)
the router's weights and s the routed_scaling_factor. The ideas, and where they come from:

- Sparsely-gated MoE with top-k routing: Shazeer et al. 2017; GShard (Lepikhin et al. 2020), Switch
  Transformer (Fedus et al. 2021), Mixtral (Jiang et al. 2024).
- Routers (`route`): "softmax_topk" (softmax over all experts, keep the k largest: Mixtral, Qwen-MoE,
  DeepSeek-V2), "topk_softmax" (keep the k largest logits, softmax over those k), "sigmoid" (DeepSeek-V3:
  independent sigmoid affinities, optionally renormalized over the chosen k).
- Group-limited routing (DeepSeek-V2/V3, `limit_to_groups`): experts are split into groups, each group
  scored by its best expert ("max", V2) or the sum of its two best ("top2_sum", V3); only the
  topk_groups best groups may be chosen, which bounds how many devices a token is sent to.
- Load balancing: the Switch/GShard auxiliary loss (`load_balancing_loss`), the ST-MoE router z-loss
  (Zoph et al. 2022, `router_z_loss`), and DeepSeek-V3's auxiliary-loss-free balancing (Wang et al.
  2024): a per-expert bias added to the scores used to *choose* experts (never to the weights), moved
  after every optimizer step by bias_update_rate * sign(mean load - load) (`update_expert_biases`).
- Capacity (GShard, Switch): each expert takes at most C = ceil(capacity_factor * tokens * k / E)
  assignments per training forward; the rest are dropped (that expert contributes zero to that token),
  first choices before second choices, earlier tokens first (`capacity_mask`). Evaluation and generation
  route every token, so a sequence's output never depends on what else is in its batch.
- Shared experts (DeepSeekMoE, Dai et al. 2024; Qwen2-MoE with a sigmoid gate): always-on experts, held
  as one MLP n_shared_experts * d_shared wide. Fine-grained experts are just many small experts.

Dispatch (`Experts.forward`), with no loop over tokens: the (token, slot) assignments are flattened and
sorted by expert, so each expert's tokens form one contiguous segment; the experts run on their segments;
the outputs are scaled by their routing weights and summed back per token with `index_add_`. The segment
matmuls are one `torch.nn.functional.grouped_mm` per projection when the kernel exists for the inputs
(bfloat16, on CPU or CUDA, widths that are multiples of 8: what torch 2.13's grouped GEMM and its
torch.compile meta function accept), and otherwise a loop over experts, one batched matmul per expert
and projection (float32 on CPU: measured as fast as grouped_mm there, and it runs everywhere). Capacity
uses the same path: dropped assignments are sorted behind every expert's segment and never computed,
which is cheaper than GShard's padded (E, C, d) dispatch tensor and gives the same outputs.

Statistics: after every forward a layer keeps `stats` (detached): the load fraction of each expert, the
mean entropy of the router's distribution, the fraction of dropped assignments, and the unweighted
balance and z losses; `router_metrics(model)` averages them over layers for the training log.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, MoEConfig
from .mlp import ACTIVATION_FNS, MLP

# transformers and DeepSeek add this to the denominator of renormalized top-k weights
RENORM_EPS = 1e-20
_GROUPED_MM = getattr(F, "grouped_mm", None)  # torch >= 2.9


# ============================================================================================
# Routing: pure functions of the router logits
# ============================================================================================


def router_scores(logits: torch.Tensor, router: str) -> torch.Tensor:
    """The scores experts are chosen by and weighted with, (N, E), from logits x W_r^T (N, E):

        softmax_topk:  s_{t,i} = softmax_i(x_t W_r^T)
        topk_softmax:  s_{t,i} = x_t W_r^T          (the softmax comes after the choice)
        sigmoid:       s_{t,i} = sigmoid(x_t W_r^T)  (DeepSeek-V3 eq. 15)
    """
    if router == "softmax_topk":
        return torch.softmax(logits, dim=-1)
    if router == "sigmoid":
        return torch.sigmoid(logits)
    return logits


def router_probs(logits: torch.Tensor, router: str) -> torch.Tensor:
    """The router's probability distribution over all experts, p_{t,i} (N, E), which the balance loss
    and the entropy statistic read: softmax(logits) for both softmax routers, and for the sigmoid
    router its scores normalized to sum to 1 (DeepSeek-V3's sequence-wise balance loss, eq. 19)."""
    if router == "sigmoid":
        s = torch.sigmoid(logits)
        return s / s.sum(dim=-1, keepdim=True)
    return torch.softmax(logits, dim=-1)


def limit_to_groups(scores: torch.Tensor, n_groups: int, topk_groups: int, group_score: str) -> torch.Tensor:
    """DeepSeek's group-limited routing (V2 sec. 2.1.3, V3 eq. 16 with node-limited routing): the E
    experts form n_groups equal groups; a group's score is its best expert's score ("max", V2) or the
    sum of its two best ("top2_sum", V3); experts outside the topk_groups best groups get -inf, so the
    top-k that follows can only pick inside them."""
    N, E = scores.shape
    grouped = scores.view(N, n_groups, E // n_groups)
    if group_score == "max":
        group = grouped.amax(dim=-1)
    else:
        group = grouped.topk(2, dim=-1).values.sum(dim=-1)
    chosen = group.topk(topk_groups, dim=-1).indices
    allowed = torch.zeros_like(group, dtype=torch.bool).scatter_(1, chosen, True)
    return grouped.masked_fill(~allowed[..., None], float("-inf")).view(N, E)


def route(logits: torch.Tensor, m: MoEConfig, bias: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k routing. logits (N, E) -> (weights (N, k), experts (N, k)), slot 0 the strongest choice.

        s = router_scores(logits)
        TopK_t = the k largest of (s_t + b), within the eligible groups     (b: expert_bias, V3 eq. 16)
        g_{t,i} = s_{t,i} for i in TopK_t                                   (unbiased: the bias only chooses)
        g_{t,i} = g_{t,i} / sum_{j in TopK_t} g_{t,j}                       (norm_topk_prob)
        g_{t,i} = softmax over TopK_t of the logits                         (topk_softmax instead)
        weights = routed_scaling_factor * g
    """
    scores = router_scores(logits, m.router)
    choice = scores if bias is None else scores + bias
    if m.n_groups > 1:
        choice = limit_to_groups(choice, m.n_groups, m.topk_groups, m.group_score)
    experts = torch.topk(choice, m.top_k, dim=-1).indices
    picked = scores.gather(-1, experts)
    if m.router == "topk_softmax":
        weights = torch.softmax(picked, dim=-1)
    elif m.norm_topk_prob:
        weights = picked / (picked.sum(dim=-1, keepdim=True) + RENORM_EPS)
    else:
        weights = picked
    return weights * m.routed_scaling_factor, experts


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """The Switch Transformer / GShard auxiliary loss (Switch eq. 4-6), in its top-k form (as Mixtral's
    and transformers' `load_balancing_loss_func` compute it for one layer):

        L_bal = E * sum_i f_i * P_i
        f_i = (1/T) sum_t 1[i in TopK_t]     (the fraction of tokens sent to i; sum_i f_i = k)
        P_i = (1/T) sum_t p_{t,i}            (the mean router probability of i)

    f is a count and carries no gradient; the router learns through P. Even routing with uniform
    probabilities gives L_bal = k; everything on one expert gives E * k at worst. (DeepSeek's alpha
    * sum f_i' P_i uses f_i' = E f_i / k, i.e. this loss divided by k.)"""
    T = probs.shape[0]
    f = torch.bincount(experts.reshape(-1), minlength=n_experts).to(probs.dtype) / T
    return n_experts * (f * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """The ST-MoE router z-loss (Zoph et al. 2022, eq. 5), which keeps router logits small so the
    softmax stays in a numerically safe range:

        L_z = (1/T) sum_t (log sum_i exp x_{t,i})^2
    """
    return torch.logsumexp(logits, dim=-1).square().mean()


def expert_capacity(n_tokens: int, m: MoEConfig) -> int:
    """GShard / Switch capacity: C = ceil(capacity_factor * tokens * top_k / n_experts)."""
    return math.ceil(m.capacity_factor * n_tokens * m.top_k / m.n_experts)


def capacity_mask(experts: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """Which assignments (N, k) an expert of the given capacity accepts (True) and which it drops.

    Priority as in GShard and Switch: every token's first choice before any token's second choice,
    and within one slot, earlier tokens first. Each assignment's place in its expert's queue is its rank
    in a stable sort by expert of the slot-major list (slot 0 of every token, then slot 1, ...)."""
    N, k = experts.shape
    flat = experts.t().reshape(-1)  # slot-major: the priority order
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
    return (rank < capacity).view(k, N).t()


# ============================================================================================
# Experts: stacked weights, grouped dispatch
# ============================================================================================


class ExpertLinear(nn.Module):
    """n_experts linear maps without bias, stacked: `weight` is (n_experts, out, in), nn.Linear's layout per
    expert (so `experts.up_proj.weight[e]` is expert e's up_proj.weight in a Hugging Face checkpoint)."""

    def __init__(self, n_experts: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, d_out, d_in))

    def extra_repr(self) -> str:
        n, d_out, d_in = self.weight.shape
        return f"n_experts={n}, in_features={d_in}, out_features={d_out}"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype inside an autocast region, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _grouped_mm_ok(x: torch.Tensor, dtype: torch.dtype, widths: tuple[int, ...]) -> bool:
    """Whether torch's grouped GEMM takes these inputs: bfloat16 (its CUDA kernel, SM >= 80, and its
    meta function under torch.compile accept nothing else), rows 16-byte aligned."""
    if _GROUPED_MM is None or dtype != torch.bfloat16 or any(w % 8 for w in widths):
        return False
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device) >= (8, 0)
    return x.device.type == "cpu"


class Experts(nn.Module):
    """The routed experts: `gate_proj` (absent when not gated), `up_proj`, `down_proj`, each stacked."""

    def __init__(self, cfg: ModelConfig, n_experts: int, d_expert: int):
        super().__init__()
        self.act = ACTIVATION_FNS[cfg.mlp_activation]
        self.gate_proj = ExpertLinear(n_experts, cfg.d_model, d_expert) if cfg.mlp_gated else None
        self.up_proj = ExpertLinear(n_experts, cfg.d_model, d_expert)
        self.down_proj = ExpertLinear(n_experts, d_expert, cfg.d_model)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x (M, d_model), rows sorted by expert; counts (E,): how many rows each expert takes, in order.
        Rows past sum(counts) (dropped assignments) are not computed; their output rows are unspecified.

            E_i(x) = down_i(act(x gate_i^T) * (x up_i^T))      (gated; down_i(act(x up_i^T)) otherwise)
        """
        d_model, d_expert = self.down_proj.weight.shape[1:]
        dtype = _compute_dtype(x)
        if _grouped_mm_ok(x, dtype, (d_model, d_expert)):
            offsets = torch.cumsum(counts, 0).to(torch.int32)
            x = x.to(dtype)

            def linear(a: torch.Tensor, proj: ExpertLinear) -> torch.Tensor:
                return _GROUPED_MM(a, proj.weight.to(dtype).transpose(-2, -1), offs=offsets)

            up = linear(x, self.up_proj)
            h = self.act(linear(x, self.gate_proj)) * up if self.gate_proj is not None else self.act(up)
            return linear(h, self.down_proj)
        # One batched matmul per expert on its segment; needs the segment sizes on the host.
        sizes = counts.tolist()
        segments = x.split([*sizes, x.shape[0] - sum(sizes)])
        outs = []
        for e, seg in enumerate(segments[:-1]):
            up = F.linear(seg, self.up_proj.weight[e])
            if self.gate_proj is not None:
                h = self.act(F.linear(seg, self.gate_proj.weight[e])) * up
            else:
                h = self.act(up)
            outs.append(F.linear(h, self.down_proj.weight[e]))
        outs.append(outs[0].new_zeros(segments[-1].shape[0], d_model))  # the dropped rows
        return torch.cat(outs)


# ============================================================================================
# The layer
# ============================================================================================


class MoE(nn.Module):
    """A mixture-of-experts feed-forward sublayer, (B, T, d_model) -> (B, T, d_model).

    Parameters: `router.weight` (E, d_model); `experts.{gate,up,down}_proj.weight` (stacked, nn.Linear's
    layout per expert); `shared.{gate,up,down}_proj` (an MLP n_shared_experts * d_shared wide) and
    `shared_gate.weight` (1, d_model) when configured; the persistent buffer `expert_bias` (E,) with
    bias_balancing (DeepSeek-V3's e_score_correction_bias).

    After every forward: `aux_loss` (the weighted balance + z losses, a 0-dim tensor, or None outside
    training or when both coefficients are 0) and `stats` (detached router statistics)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        m = cfg.moe
        if m is None:
            raise ValueError("MoE needs cfg.moe (a MoEConfig); set ModelConfig(moe=MoEConfig(...))")
        self.moe = m
        self.layer = layer
        self.router = nn.Linear(cfg.d_model, m.n_experts, bias=False)
        self.experts = Experts(cfg, m.n_experts, m.d_expert)
        self.shared = MLP(cfg.replace(d_ff=m.n_shared_experts * m.d_shared)) if m.n_shared_experts else None
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False) if m.shared_gate else None
        self.expert_bias: torch.Tensor | None
        if m.bias_balancing:
            self.register_buffer("expert_bias", torch.zeros(m.n_experts))
        else:
            self.expert_bias = None
        self.aux_loss: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}
        # Expert counts of the training forwards since the last bias update. A plain attribute, not a
        # buffer: DDP broadcasts buffers from rank 0 before every forward, which would erase each other
        # rank's counts; and it is transient (zero at every optimizer step), so it has no place in a checkpoint.
        self._load_counts: torch.Tensor | None = None

    @torch.no_grad()
    def init_weights(self, std: float, residual_std: float) -> None:
        """Expert matrices normal(0, std), their down projections normal(0, residual_std) like every
        residual branch's output; the balancing bias at zero. (The router and the shared experts are
        nn.Linear and get the model's generic init.)"""
        for proj in (self.experts.gate_proj, self.experts.up_proj):
            if proj is not None:
                nn.init.normal_(proj.weight, 0.0, std)
        nn.init.normal_(self.experts.down_proj.weight, 0.0, residual_std)
        if self.expert_bias is not None:
            self.expert_bias.zero_()
        self._load_counts = None

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, d_model) -> logits (N, E), at least float32. Outside autocast (Switch's selective
        precision): with float32 weights the routing decisions are taken in float32 even in a bf16 run."""
        dtype = next(self.router.parameters()).dtype
        with torch.autocast(x.device.type, enabled=False):
            return self.router(x.to(dtype)).to(torch.promote_types(dtype, torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.moe
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        N = x.shape[0]
        logits = self.router_logits(x)
        bias = None if self.expert_bias is None else self.expert_bias.to(logits.dtype)
        weights, experts = route(logits, m, bias)
        keep = None
        if self.training and m.capacity_factor is not None:
            keep = capacity_mask(experts, m.n_experts, expert_capacity(N, m))

        # Dispatch: (token, slot) pairs sorted by expert; dropped ones get the key E and sort last.
        flat_experts = experts.reshape(-1)
        key = flat_experts if keep is None else flat_experts.masked_fill(~keep.reshape(-1), m.n_experts)
        order = torch.argsort(key, stable=True)
        tokens = order // m.top_k
        counts = torch.bincount(key, minlength=m.n_experts + 1)[: m.n_experts]
        rows = x[tokens]
        if keep is None:
            y = self.experts(rows, counts)
        else:
            # The rows of dropped assignments are never computed: what the experts leave in them (and the
            # gradient they would send back through them) is unspecified, so both ends are masked.
            kept = keep.reshape(-1)[order, None]
            y = torch.where(kept, self.experts(torch.where(kept, rows, 0.0), counts), 0.0)
        y = y * weights.reshape(-1)[order].to(y.dtype)[:, None]
        out = torch.zeros(N, shape[-1], dtype=y.dtype, device=x.device).index_add_(0, tokens, y)

        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            out = out + shared
        self._account(logits, experts, keep)
        return out.reshape(*shape[:-1], out.shape[-1])

    def _account(self, logits: torch.Tensor, experts: torch.Tensor, keep: torch.Tensor | None) -> None:
        """Set aux_loss and stats; during training, add this forward's expert counts for bias balancing."""
        m = self.moe
        probs = router_probs(logits, m.router)
        balance = load_balancing_loss(probs, experts, m.n_experts)
        z = router_z_loss(logits)
        self.aux_loss = None
        if self.training and (m.aux_loss_coef > 0 or m.z_loss_coef > 0):
            self.aux_loss = m.aux_loss_coef * balance + m.z_loss_coef * z
        with torch.no_grad():
            counts = torch.bincount(experts.reshape(-1), minlength=m.n_experts).float()
            entropy = -(probs * probs.clamp_min(1e-20).log()).sum(dim=-1).mean()
            dropped = (~keep).float().mean() if keep is not None else torch.zeros((), device=logits.device)
            self.stats = {"load": counts / counts.sum(), "entropy": entropy, "dropped": dropped,
                          "balance_loss": balance.detach(), "z_loss": z.detach()}
            if self.training and self.expert_bias is not None:
                if self._load_counts is None or self._load_counts.device != counts.device:
                    self._load_counts = torch.zeros_like(counts)
                self._load_counts += counts

    def take_load_counts(self) -> torch.Tensor:
        """The expert counts accumulated since the last call (zeros if none), and reset them."""
        counts = self._load_counts
        self._load_counts = None
        if counts is None:
            return torch.zeros(self.moe.n_experts, device=self.router_device())
        return counts

    def router_device(self) -> torch.device:
        return next(self.router.parameters()).device


# ============================================================================================
# Model-level helpers: metrics and bias balancing
# ============================================================================================


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every MoE layer of `model` (through DDP / FSDP / compile wrappers, which keep the modules)."""
    return [module for module in model.modules() if isinstance(module, MoE)]


def router_metric_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """`router_metrics` as 0-dim tensors on the model's device: no host synchronization, so the training
    loop can sum them over steps and read them once per log line. Empty for a model without MoE layers.

        moe/load_max      max_i load_i / mean_i load_i   (1 = even; E/k = one expert in every token's top-k)
        moe/load_cv       std_i load_i / mean_i load_i   (coefficient of variation; 0 = even)
        moe/load_entropy  H(load) / ln E                 (1 = even; 0 = one expert)
        moe/entropy       mean over tokens of H(p_t)     (the router's own uncertainty, nats)
        moe/dropped       fraction of assignments dropped by the capacity limit
        moe/balance_loss  L_bal, unweighted (k when even); moe/z_loss: L_z, unweighted
        moe/aux_loss      the weighted auxiliary loss a layer adds to the training loss (when any)
    each averaged over the MoE layers of the last forward pass."""
    layers = [layer for layer in moe_layers(model) if layer.stats]
    if not layers:
        return {}
    load = torch.stack([layer.stats["load"] for layer in layers])  # (L, E)
    E = load.shape[-1]
    if E > 1:
        load_entropy = -(load * load.clamp_min(1e-20).log()).sum(dim=-1) / math.log(E)
    else:
        load_entropy = torch.ones_like(load[:, 0])

    def mean_of(name: str) -> torch.Tensor:
        return torch.stack([layer.stats[name] for layer in layers]).mean()

    out = {
        "moe/load_max": (load.amax(dim=-1) * E).mean(),
        "moe/load_cv": (load.std(dim=-1, unbiased=False) * E).mean(),
        "moe/load_entropy": load_entropy.mean(),
        "moe/entropy": mean_of("entropy"),
        "moe/dropped": mean_of("dropped"),
        "moe/balance_loss": mean_of("balance_loss"),
        "moe/z_loss": mean_of("z_loss"),
    }
    aux = [layer.aux_loss.detach() for layer in layers if layer.aux_loss is not None]
    if aux:
        out["moe/aux_loss"] = torch.stack(aux).mean()
    return out


def router_metrics(model: nn.Module) -> dict[str, float]:
    """The router statistics of the last forward pass, averaged over MoE layers, as floats (see
    `router_metric_tensors` for each one). One host synchronization for all of them."""
    tensors = router_metric_tensors(model)
    if not tensors:
        return {}
    values = torch.stack([t.float().reshape(()) for t in tensors.values()]).tolist()
    return dict(zip(tensors, values, strict=True))


@torch.no_grad()
def update_expert_biases(model: nn.Module) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing step (Wang et al. 2024; V3 sec. 2.1.2), for every
    layer with bias_balancing, from the expert counts its training forwards accumulated since the last
    call (summed over processes when torch.distributed is initialized, so every process applies the
    same update):

        b_i <- b_i + u * sign(mean_j c_j - c_i)       (u: bias_update_rate, c: the counts)

    An overloaded expert's bias falls and an underloaded one's rises; exactly even load leaves it. The
    counts are reset. Call it once after each optimizer step (the training loop does); a no-op for
    models without such layers. Under activation checkpointing the recomputed forwards count twice,
    which scales every count alike and leaves the sign unchanged."""
    layers = [layer for layer in moe_layers(model) if layer.expert_bias is not None]
    if not layers:
        return
    counts = torch.stack([layer.take_load_counts().to(layer.expert_bias.device) for layer in layers])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    step = torch.sign(counts.mean(dim=-1, keepdim=True) - counts)
    for layer, s in zip(layers, step, strict=True):
        layer.expert_bias += layer.moe.bias_update_rate * s.to(layer.expert_bias.dtype)
