"""State-space token mixers: Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with
Selective State Spaces", arXiv 2312.00752) and Mamba-2 (Dao & Gu 2024, "Transformers are SSMs:
Generalized Models and Efficient Algorithms Through Structured State Space Duality", arXiv 2405.21060).

Both are a gated block around a selective SSM. Per channel the state h_t (d_state numbers) evolves as

    h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t,      y_t = C_t . h_t + D x_t

(A discretized by zero-order hold, the paper's eq. 4; B by the simpler Euler step dt B, as the
reference code and transformers compute it), where
dt_t, B_t and C_t depend on the input: the "selection" that lets the model decide what to keep. Around
it: in_proj to x and a gate z, a causal depthwise convolution and SiLU on x, the gate SiLU(z), and
out_proj. Mamba has A per (channel, state) and projects dt through a rank-dt_rank bottleneck; Mamba-2
has one scalar A per head of head_dim channels, B and C shared by the heads of a group, and a gated
RMSNorm before out_proj. The past is a fixed-size state, so decoding costs the same at any length.

Two forms of the same math, chosen by the shape of the call, not by a flag:
- the chunked form (training and prefill, T > 1): within a chunk of L tokens the recurrence unrolls
  into a masked L x L "attention-like" matrix of decays exp(sum of dt A over (s, t]), built from
  cumulative sums of dt A in log space (`segsum`), so the work is cumsums and matmuls; what came
  before the chunk enters through the state carried to its start. For Mamba-2 this is the SSD
  algorithm of the paper (its Listing 1), every chunk at once with the states passed between
  chunks by the same segment-sum trick. Mamba-1's decay differs per (channel, state), so its chunk
  tensor is (L, L, d_inner, d_state), L times the size of a sequential scan's: it goes one chunk at a
  time (bounded memory), with short chunks by default (8 tokens; on a CPU that is already faster than
  stepping token by token, forward and backward together).
- the recurrent form (decoding, T = 1): one step of the recurrence above.

Design decisions:
- The names and shapes of the parameters are those of the reference code (mamba_ssm) and of
  transformers' MambaMixer / Mamba2Mixer (in_proj, conv1d, x_proj, dt_proj, A_log, D, dt_bias,
  norm, out_proj), so checkpoints convert by renaming (hub_ssm.py).
- The scan runs in float32 with autocast off (a state sums thousands of decayed terms, and bf16
  loses the small ones); the cached SSM state is float32 whatever the model's dtype, the cached
  convolution window keeps the activations' dtype.
- Cache state per layer: {"conv": (B, channels, d_conv - 1), the last inputs of the convolution,
  "ssm": (B, d_inner, d_state) (Mamba) or (B, n_heads, head_dim, d_state) (Mamba-2)}.
- Padding: a token that masks["valid"] marks invalid gets dt = 0, so exp(dt A) = 1 and dt B x = 0:
  the SSM state passes it unchanged; and the convolution runs over each row's real tokens only
  (`causal_conv1d` gathers them together first), so its window after a call holds the last real
  inputs. Left padding (the batched generator), right padding (rows with fewer new tokens: the
  serving engine) and holes in the middle all leave the state the row would have alone. The output at
  an invalid position is meaningless and ignored by the caller. (transformers instead zeroes the
  inputs at padding, which is exact only for left padding of a fresh sequence without in_proj bias.)
- `rope` and `alibi` are accepted for the common mixer signature and ignored: order enters through
  the recurrence itself; in a hybrid stack the attention layers still get their positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig

# --------------------------------------------------------------------------------------------
# The math, as pure functions
# --------------------------------------------------------------------------------------------


def segsum(a: torch.Tensor, fill: float = float("-inf")) -> torch.Tensor:
    """Segment sums of log decays: (..., L) -> (..., L, L) with

        out[..., t, s] = a[s+1] + ... + a[t]   for s <= t   (0 on the diagonal),   `fill` for s > t,

    so with a = dt A and fill = -inf, exp(out) is the lower-triangular matrix of decays from step s to
    step t (Dao & Gu 2024, Listing 1). Computed as a cumulative sum of the masked values rather than
    as a difference of two cumulative sums, which would cancel catastrophically over long segments."""
    L = a.shape[-1]
    x = a[..., :, None].expand(*a.shape, L)  # x[..., t, s] = a[t]
    strictly_lower = torch.ones(L, L, dtype=torch.bool, device=a.device).tril(-1)
    x = x.masked_fill(~strictly_lower, 0.0)
    out = x.cumsum(dim=-2)  # out[t, s] = sum_{s < r <= t} a[r]
    lower = torch.ones(L, L, dtype=torch.bool, device=a.device).tril()
    return out.masked_fill(~lower, fill)


def causal_conv1d(x: torch.Tensor, state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise convolution of width K over (B, C, T) inputs, continuing a window:

        out_t = bias + sum_{k=0}^{K-1} weight[:, 0, k] * u_{t-K+1+k}

    where u is the row's sequence of real inputs: the K - 1 held in `state` (B, C, K - 1), then the
    valid ones of x. With `valid` (B, T) some tokens are padding: each row's real inputs are gathered
    to the front first (a stable sort by validity), convolved, and the outputs put back at their
    positions, so padding never enters a window. Returns (out (B, C, T), the new state: the row's
    last K - 1 real inputs)."""
    B, C, T = x.shape
    K = weight.shape[-1]
    seq = torch.cat((state.to(x.dtype), x), dim=-1)  # (B, C, K - 1 + T)
    if valid is None:
        out = F.conv1d(seq, weight, bias, groups=C)
        return out, seq[..., seq.shape[-1] - (K - 1):]
    real = torch.cat((valid.new_ones(B, K - 1), valid), dim=1)  # the state's inputs count as real
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)  # real inputs first, in order
    packed = seq.gather(-1, order[:, None, :].expand(B, C, -1))
    out = F.conv1d(packed, weight, bias, groups=C)  # out[j] belongs to the (K - 1 + j)-th real input
    rank = real.long().cumsum(dim=1)[:, K - 1:] - K  # position t -> index of its real input in out
    out = out.gather(-1, rank.clamp(min=0)[:, None, :].expand(B, C, -1))
    last = real.sum(dim=1, keepdim=True) - (K - 1) + torch.arange(K - 1, device=x.device)
    return out, packed.gather(-1, last[:, None, :].expand(B, C, -1))


def selective_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   h0: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba's selective scan (Gu & Dao 2023, Algorithm 2), chunk by chunk.

    x, dt: (b, T, d); A: (d, n), negative; B, C: (b, T, n); h0: (b, d, n). The recurrence

        h_t = exp(dt_t A) * h_{t-1} + (dt_t x_t) B_t,      y_t = h_t C_t

    unrolled over a chunk of L tokens. A is constant in time, so every decay is A times a sum of dt:
    with Delta = segsum(dt) (the dt summed over (s, t]) and Lambda_t = dt_1 + ... + dt_t,

        y_t = sum_{s<=t} sum_n C_t[n] B_s[n] exp(A[:, n] Delta[t, s]) dt_s x_s  +  C_t . (exp(A Lambda_t) * h_0)
        h_L = sum_s exp(A (Lambda_L - Lambda_s)) * B_s dt_s x_s  +  exp(A Lambda_L) * h_0

    The decays exp(A Delta) form a (L, L, d, n) tensor per chunk, so the work is L times that of a
    sequential scan, in a few large elementwise ops and contractions instead of T small steps.
    Returns (y (b, T, d) without the D skip, h_T (b, d, n))."""
    T = x.shape[1]
    ys, h = [], h0
    for start in range(0, T, chunk_size):
        xc, dtc = x[:, start:start + chunk_size], dt[:, start:start + chunk_size]
        Bc, Cc = B[:, start:start + chunk_size], C[:, start:start + chunk_size]
        L = xc.shape[1]
        u = dtc * xc  # (b, L, d)
        # 0 above the diagonal (not -inf, whose product with A would poison A's gradient); CB masks it
        delta = segsum(dtc.transpose(1, 2), fill=0.0)  # (b, d, t, s)
        decay = torch.exp(delta[..., None] * A[:, None, None, :])  # (b, d, t, s, n)
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        CB = torch.einsum("btn,bsn->btsn", Cc, Bc) * causal[..., None]  # (b, t, s, n)
        y = torch.einsum("bdts,bsd->btd", (decay * CB[:, None]).sum(-1), u)
        lam = dtc.cumsum(dim=1)[..., None] * A  # (b, L, d, n): log decay from the chunk's start
        from_start = torch.exp(lam)
        y = y + torch.einsum("btn,btdn,bdn->btd", Cc, from_start, h)
        to_end = torch.exp(lam[:, -1:] - lam)  # (b, L, d, n): decay from s to the chunk's end
        h = from_start[:, -1] * h + torch.einsum("bsdn,bsn,bsd->bdn", to_end, Bc, u)
        ys.append(y)
    return torch.cat(ys, dim=1), h


def selective_scan_step(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                        h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of Mamba's recurrence, for decoding. x, dt: (b, d); A: (d, n); B, C: (b, n); h: (b, d, n).

        h' = exp(dt A) * h + (dt x) B,      y = h' C

    Returns (y (b, d) without the D skip, h')."""
    h = torch.exp(dt[..., None] * A) * h + (dt * x)[..., None] * B[:, None, :]
    return (h @ C[..., None]).squeeze(-1), h


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                h0: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2's SSD in its chunked form (Dao & Gu 2024, Listing 1).

    x: (b, T, h, p); dt: (b, T, h); A: (h,), negative; B, C: (b, T, g, n), head i reads group
    i // (h / g); h0: (b, h, p, n). With a scalar decay a_t = dt_t A per head the recurrence

        h_t = exp(a_t) h_{t-1} + (dt_t x_t) B_t^T,      y_t = h_t C_t

    is, within a chunk, the masked "attention" y = (L o C B^T) (dt x) with L = exp(segsum(a)) (the
    diagonal blocks of the semiseparable matrix); each chunk's final state from its own inputs, passed
    from chunk to chunk by the same segment sums over the chunks' total decays (the off-diagonal
    blocks' low-rank factors); and those states read out by C with the decay from the chunk's start.
    All chunks at once. Returns (y (b, T, h, p) without the D skip, h_T (b, h, p, n))."""
    b, T, H, P = x.shape
    G = B.shape[2]
    B = B.repeat_interleave(H // G, dim=2)
    C = C.repeat_interleave(H // G, dim=2)
    L = min(chunk_size, T)
    pad = -T % L  # padded steps have dt = 0: no decay, no input, the final state is untouched
    if pad:
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    n_chunks = (T + pad) // L
    x, B, C = (t.reshape(b, n_chunks, L, *t.shape[2:]) for t in (x, B, C))
    dt = dt.reshape(b, n_chunks, L, H)
    u = x * dt[..., None]  # (b, c, l, h, p)
    a = (dt * A).permute(0, 3, 1, 2)  # (b, h, c, l)
    a_cum = a.cumsum(dim=-1)

    # 1. within each chunk: the masked quadratic form
    decay = torch.exp(segsum(a))  # (b, h, c, l, s)
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, decay, u)
    # 2. each chunk's final state from its own inputs
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, h, c, l)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, to_end, u)
    # 3. pass the states from chunk to chunk: the state at the start of chunk c, h0 included
    states = torch.cat((h0[:, None], states), dim=1)  # (b, c + 1, h, p, n)
    chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # (b, h, c + 1, c + 1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    states, final = states[:, :-1], states[:, -1]
    # 4. read the carried-in state out at every position, decayed from the chunk's start
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(a_cum))
    y = (y_diag + y_off).reshape(b, n_chunks * L, H, P)[:, :T]
    return y, final


def ssd_step(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of Mamba-2's recurrence, for decoding. x: (b, h, p); dt: (b, h); A: (h,); B, C: (b, g, n);
    h: (b, h, p, n).

        h' = exp(dt A) h + (dt x) B^T,      y = h' C

    Returns (y (b, h, p) without the D skip, h')."""
    H, G = x.shape[1], B.shape[1]
    B = B.repeat_interleave(H // G, dim=1)
    C = C.repeat_interleave(H // G, dim=1)
    h = torch.exp(dt * A)[..., None, None] * h + (dt[..., None] * x)[..., None] * B[:, :, None, :]
    return (h @ C[..., None]).squeeze(-1), h


def _inverse_softplus_dt(n: int, s, device) -> torch.Tensor:
    """Mamba's dt init: dt log-uniform in [dt_min, dt_max], clamped below at dt_floor, returned as the
    bias b with softplus(b) = dt, i.e. b = dt + log(1 - exp(-dt))."""
    u = torch.rand(n, device=device)
    dt = torch.exp(u * (math.log(s.dt_max) - math.log(s.dt_min)) + math.log(s.dt_min)).clamp(min=s.dt_floor)
    return dt + torch.log(-torch.expm1(-dt))


# --------------------------------------------------------------------------------------------
# The layers
# --------------------------------------------------------------------------------------------


class Mamba(nn.Module):
    """The token mixer of a "mamba" layer with ssm.kind "mamba" (Gu & Dao 2023, Figure 3):
    in_proj -> (x, z); x -> causal conv1d -> SiLU -> x_proj -> (dt, B, C); dt -> dt_proj -> softplus;
    y = selective_scan(x, dt, A = -exp(A_log), B, C) + D x; out_proj(y * SiLU(z)).
    Cache state: {"conv": (B, d_inner, d_conv - 1), "ssm": (B, d_inner, d_state) float32}."""

    no_weight_decay = ("A_log",)  # the decay rates are not weights to shrink (D is 1-D, never decayed)

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        s = cfg.ssm
        self.layer = layer
        self.d_inner, self.d_state, self.d_conv = s.expand * cfg.d_model, s.d_state, s.d_conv
        self.dt_rank, self.chunk_size = s.dt_rank, s.chunk_size
        self.in_proj = nn.Linear(cfg.d_model, 2 * self.d_inner, bias=s.proj_bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, s.d_conv, groups=self.d_inner, bias=s.conv_bias)
        self.x_proj = nn.Linear(self.d_inner, s.dt_rank + 2 * s.d_state, bias=False)
        self.dt_proj = nn.Linear(s.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, s.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=s.proj_bias)
        self._ssm_cfg = s

    @torch.no_grad()
    def init_weights(self, std: float, residual_std: float) -> None:
        """Mamba's init (mamba_ssm's Mamba.__init__): A = -(1, 2, ..., d_state) per channel (S4D-real),
        D = 1, dt_proj's weight uniform in +-dt_rank^-1/2 and its bias the inverse softplus of a
        log-uniform dt; conv1d as PyTorch initializes it; out_proj scaled for depth like every
        residual branch's output projection."""
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(torch.log(A).expand(self.d_inner, -1))
        self.D.fill_(1.0)
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        self.dt_proj.bias.copy_(_inverse_softplus_dt(self.d_inner, self._ssm_cfg, self.dt_proj.bias.device))
        self.conv1d.reset_parameters()
        nn.init.normal_(self.out_proj.weight, 0.0, residual_std)

    def forward(self, x: torch.Tensor, rope=None, masks: dict | None = None, cache=None,
                alibi=None) -> torch.Tensor:
        Bsz, T, _ = x.shape
        valid = (masks or {}).get("valid")
        state = cache.get_state(self.layer) if cache is not None else None
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        conv0 = state["conv"] if state is not None else xs.new_zeros(Bsz, self.d_inner, self.d_conv - 1)
        xs, conv = causal_conv1d(xs.transpose(1, 2), conv0, self.conv1d.weight, self.conv1d.bias, valid)
        xs = F.silu(xs.transpose(1, 2))  # (B, T, d_inner)
        dt, Bm, Cm = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj(dt)
        with torch.autocast(x.device.type, enabled=False):
            xs, dt, Bm, Cm = xs.float(), F.softplus(dt.float()), Bm.float(), Cm.float()
            if valid is not None:  # dt = 0: the state passes a padding token unchanged
                dt = dt * valid[..., None]
            A = -torch.exp(self.A_log.float())
            h0 = state["ssm"] if state is not None else xs.new_zeros(Bsz, self.d_inner, self.d_state)
            if T == 1:
                y, h = selective_scan_step(xs[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], h0)
                y = y[:, None]
            else:
                y, h = selective_scan(xs, dt, A, Bm, Cm, h0, self.chunk_size)
            y = (y + xs * self.D.float()) * F.silu(z.float())
        if cache is not None:
            cache.set_state(self.layer, {"conv": conv, "ssm": h})
        return self.out_proj(y.to(x.dtype))


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: RMSNorm of y * SiLU(z), over groups of `group_size` channels (one per
    B/C group, so the layer splits cleanly across tensor-parallel ranks), in float32:

        out = weight * g / sqrt(mean_group(g^2) + eps),   g = y * SiLU(z)"""

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        g = y.float() * F.silu(z.float())
        g = g.unflatten(-1, (-1, self.group_size))
        g = g * torch.rsqrt(g.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (self.weight.float() * g.flatten(-2)).to(y.dtype)


class Mamba2(nn.Module):
    """The token mixer of a "mamba" layer with ssm.kind "mamba2" (Dao & Gu 2024, the Mamba-2 block):
    in_proj -> (z, xBC, dt); xBC -> causal conv1d -> SiLU -> (x, B, C); dt -> softplus(dt + dt_bias);
    y = SSD(x, dt, A = -exp(A_log), B, C) + D x per head; out_proj(GatedRMSNorm(y, z)).
    Cache state: {"conv": (B, d_inner + 2 n_groups d_state, d_conv - 1),
    "ssm": (B, n_heads, head_dim, d_state) float32}."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        s = cfg.ssm
        self.layer = layer
        self.d_inner, self.d_state, self.d_conv = s.expand * cfg.d_model, s.d_state, s.d_conv
        self.head_dim, self.n_groups, self.chunk_size = s.head_dim, s.n_groups, s.chunk_size
        self.n_heads = self.d_inner // s.head_dim
        self.conv_dim = self.d_inner + 2 * s.n_groups * s.d_state
        self.in_proj = nn.Linear(cfg.d_model, self.d_inner + self.conv_dim + self.n_heads, bias=s.proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, s.d_conv, groups=self.conv_dim, bias=s.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // s.n_groups, cfg.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=s.proj_bias)
        self._ssm_cfg = s

    @torch.no_grad()
    def init_weights(self, std: float, residual_std: float) -> None:
        """Mamba-2's init (mamba_ssm's Mamba2.__init__): A uniform in [1, 16] per head, D = 1, dt_bias
        the inverse softplus of a log-uniform dt, the norm at identity, conv1d as PyTorch initializes
        it; out_proj scaled for depth like every residual branch's output projection."""
        self.A_log.copy_(torch.log(torch.empty_like(self.A_log, dtype=torch.float32).uniform_(1.0, 16.0)))
        self.D.fill_(1.0)
        self.dt_bias.copy_(_inverse_softplus_dt(self.n_heads, self._ssm_cfg, self.dt_bias.device))
        self.norm.weight.fill_(1.0)
        self.conv1d.reset_parameters()
        nn.init.normal_(self.out_proj.weight, 0.0, residual_std)

    def forward(self, x: torch.Tensor, rope=None, masks: dict | None = None, cache=None,
                alibi=None) -> torch.Tensor:
        Bsz, T, _ = x.shape
        valid = (masks or {}).get("valid")
        state = cache.get_state(self.layer) if cache is not None else None
        z, xBC, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        conv0 = state["conv"] if state is not None else xBC.new_zeros(Bsz, self.conv_dim, self.d_conv - 1)
        xBC, conv = causal_conv1d(xBC.transpose(1, 2), conv0, self.conv1d.weight, self.conv1d.bias, valid)
        xBC = F.silu(xBC.transpose(1, 2))
        gn = self.n_groups * self.d_state
        xs, Bm, Cm = xBC.split([self.d_inner, gn, gn], dim=-1)
        with torch.autocast(x.device.type, enabled=False):
            xs = xs.float().unflatten(-1, (self.n_heads, self.head_dim))  # (B, T, h, p)
            Bm = Bm.float().unflatten(-1, (self.n_groups, self.d_state))
            Cm = Cm.float().unflatten(-1, (self.n_groups, self.d_state))
            dt = F.softplus(dt.float() + self.dt_bias.float())  # (B, T, h)
            if valid is not None:  # dt = 0: the state passes a padding token unchanged
                dt = dt * valid[..., None]
            A = -torch.exp(self.A_log.float())
            h0 = state["ssm"] if state is not None else xs.new_zeros(Bsz, self.n_heads, self.head_dim, self.d_state)
            if T == 1:
                y, h = ssd_step(xs[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], h0)
                y = y[:, None]
            else:
                y, h = ssd_chunked(xs, dt, A, Bm, Cm, h0, self.chunk_size)
            y = (y + xs * self.D.float()[:, None]).flatten(-2)
            y = self.norm(y, z.float())
        if cache is not None:
            cache.set_state(self.layer, {"conv": conv, "ssm": h})
        return self.out_proj(y.to(x.dtype))
