"""Position information: RoPE and its context-extension scalings, ALiBi, sinusoidal tables.

- RoPE (Su et al. 2021, "RoFormer"): rotate pairs of query/key dims by angle position * freq_i,
  freq_i = theta^(-2i/d). lmlab uses the "rotate half" pairing (dim i with dim i + d/2), the
  layout of the Hugging Face checkpoints, so their weights load without permutation.
  Scalings: linear / position interpolation (Chen et al. 2023), static NTK-aware and dynamic NTK
  (bloc97 2023), YaRN (Peng et al. 2023), Llama 3.1's wavelength-banded interpolation.
  Linear interpolation squeezes every frequency by the factor s, which crowds the high frequencies
  that resolve nearby tokens; NTK-aware scaling instead raises the base, b' = b * s^(d/(d-2)): the
  highest frequency (i = 0) is untouched and the lowest (i = d/2 - 1) is divided by exactly s, so
  long wavelengths are interpolated and short ones extrapolated, without fine-tuning.
- ALiBi (Press et al. 2022): no embedding, a per-head linear penalty on attention distance.
- Sinusoidal (Vaswani et al. 2017): fixed sin/cos table added to the token embeddings.

Everything here is computed from the config on the fly (no buffers), so a model built on the
meta device needs nothing re-initialized, and dynamic NTK can depend on the current length.
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig


def rope_frequencies(cfg: ModelConfig, seq_len: int, device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (rotary_dim / 2,) in float32 and the cos/sin scale (YaRN's temperature).

    RoPE: theta_i = b^(-2i/d), i = 0 .. d/2 - 1 (d = rotary_dim, b = rope_theta).
    linear: theta_i / s.  ntk: theta_i = b'^(-2i/d) with b' = b * s^(d/(d-2)), so theta_0 is kept
    and theta_{d/2-1} = b^(-(d-2)/d) / s.  dynamic: the ntk base with s replaced by
    s * L / L_orig - (s - 1) once the length L passes L_orig.
    `seq_len` (max position + 1 in the current call) only matters for dynamic NTK.
    """
    dim, base = cfg.rotary_dim, cfg.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0 / base**exponents, 1.0
    if rs.kind == "linear":
        return 1.0 / base**exponents / rs.factor, 1.0
    if rs.kind == "ntk":
        if dim < 4:
            raise ValueError(f"rope_scaling.kind='ntk' needs at least 4 rotary dims to stretch, got rotary_dim={dim} "
                             "(its one frequency is 1 whatever the base); use kind='linear'")
        return 1.0 / (base * rs.factor ** (dim / (dim - 2)))**exponents, 1.0
    if rs.kind == "dynamic":
        # NTK-aware: grow the base so the lowest frequency spans the current length.
        seq_len = max(seq_len, rs.original_max_seq_len)
        base = base * ((rs.factor * seq_len / rs.original_max_seq_len) - (rs.factor - 1)) ** (dim / (dim - 2))
        return 1.0 / base**exponents, 1.0
    if rs.kind == "llama3":
        inv_freq = 1.0 / base**exponents
        low_wavelen = rs.original_max_seq_len / rs.low_freq_factor
        high_wavelen = rs.original_max_seq_len / rs.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # long wavelengths (low frequencies) are interpolated, short ones kept, a smooth ramp between.
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
        smooth = (rs.original_max_seq_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if rs.kind == "yarn":
        return _yarn_frequencies(cfg, exponents)
    raise ValueError(f"unknown rope scaling {rs.kind!r}")


def _yarn_frequencies(cfg: ModelConfig, exponents: torch.Tensor) -> tuple[torch.Tensor, float]:
    """YaRN "NTK-by-parts": dims that rotate fewer than beta_slow times over the original context
    are interpolated (divided by s), dims that rotate more than beta_fast times are kept, with a
    linear ramp between; cos/sin are scaled by 0.1 ln(s) + 1 (the paper's sqrt(1/t))."""
    rs, dim, base = cfg.rope_scaling, cfg.rotary_dim, cfg.rope_theta
    pos_freqs = base**exponents
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (rs.factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rs.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=exponents.device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 where the dim is extrapolated (kept), 0 where interpolated
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    attention_factor = rs.attention_factor
    if attention_factor is None:
        attention_factor = 0.1 * math.log(rs.factor) + 1.0 if rs.factor > 1 else 1.0
    return inv_freq, attention_factor


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (B, 1, T, rotary_dim) for integer positions (B, T), in float32 math."""
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "dynamic":
        # the length is taken per row, so a sequence's rotation never depends on its batch-mates
        lengths = (positions.amax(dim=1) + 1).tolist()
        inv_freq = torch.stack([rope_frequencies(cfg, n, positions.device)[0] for n in lengths])[:, None]
        scale = 1.0
    else:  # the length matters only to dynamic NTK: no device sync for the others
        inv_freq, scale = rope_frequencies(cfg, 0, positions.device)
    angles = positions.float()[..., None] * inv_freq  # (B, T, rotary_dim / 2)
    angles = torch.cat((angles, angles), dim=-1)
    return (angles.cos() * scale).to(dtype)[:, None], (angles.sin() * scale).to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the leading rotary_dim dims of x (B, H, T, head_dim); the rest pass through."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return torch.cat((rotated, x_pass), dim=-1) if x_pass.shape[-1] else rotated


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Per-head slopes: the geometric sequence 2^(-8/n), 2^(-16/n), ... for n a power of two; for
    other n, the slopes of the nearest lower power of two, then every other slope of the next."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start**(i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two(closest)
    if closest < n_heads:
        slopes += power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def sinusoidal_embedding(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(p / base^(2i/d)); shape (*positions, dim)."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, device=positions.device).float() / dim)
    angles = positions.float()[..., None] * inv_freq
    pe = torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)
    return pe[..., :dim]
