"""4-bit NormalFloat (NF4) weights with block-wise absmax and double quantization: QLoRA's frozen base
(Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs").

The idea. Pretrained weights are close to zero-mean normal, so a 4-bit code book whose 16 values are
equally likely under N(0, 1) wastes no code on values that rarely occur. NF4 is built from quantiles of
N(0, 1), rescaled to [-1, 1], asymmetric so that zero is exactly representable (padding and zero weights
stay zero): 8 positive values, the quantiles at 9 probabilities spaced evenly from 0.5 to
delta = 0.9677083 with 0.5 itself left out (delta stands in for 1, whose quantile is infinite); 7 negative
values, minus the quantiles at 8 such probabilities from 0.5 to delta, 0.5 left out; and 0. Everything is
then divided by the largest value, so the ends are -1 and 1 (`nf4_code` derives it; `NF4_CODE` is the
published table, which the derivation reproduces to 1.1e-7, the published values having been computed
in float32).

Quantizing a weight W:
- block-wise absmax: flatten W, cut it into blocks of `block` (64) values, and store c = max |w| per
  block (in float32); each w/c lies in [-1, 1] and is rounded to the nearest NF4 value, stored as its
  4-bit index (two per byte, the first element in the high nibble, as bitsandbytes packs them).
  A tie (w/c exactly halfway between two codes) goes to the lower code. A numel that is not a multiple
  of `block` is zero-padded to whole blocks (zeros quantize to the exact 0).
- double quantization: the float32 absmaxes cost 32/64 = 0.5 bits per weight. They are quantized again,
  in blocks of 256: the mean over all blocks is subtracted (absmaxes are all positive, so centring them
  uses the signed range), and each group of 256 is stored as symmetric linear int8 codes with one
  float32 scale (max |c - mean| / 127). bitsandbytes uses its dynamic 8-bit float map here; linear int8
  costs the same 8 bits and has a simple bound: each absmax is off by at most scale / 2 = max|c - mean| / 254.

Storage per weight: 4 bits + 32/64 = 4.5 bits without double quantization, 4 + 8/64 + 32/(64 * 256)
~ 4.127 bits with it (against 16 for fp16/bf16). `NF4Tensor.nbytes` counts exactly what is stored.

`Linear4bit` keeps the packed weight in buffers and dequantizes it in each forward and backward pass
(QLoRA computes in bf16 on dequantized blocks; nothing of the full-precision weight is kept between
passes, and the weight never gets a gradient). `quantize_linears` swaps a model's projections for it.

Why by hand, when bitsandbytes exists: bitsandbytes is CUDA-first, and this file is the reference that
runs anywhere (CPU included) and shows the mechanism in a page. On a CUDA device with bitsandbytes
installed, dequantization (the part that runs every step) goes through
`bitsandbytes.functional.dequantize_4bit` on the same packed codes: the storage format is this module's
in both cases, so a quantized model means the same on every device. That path is untested on CPU-only
machines; it is taken only when the tensor is on CUDA, bitsandbytes imports, and the block size is one
bitsandbytes supports.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import is_adapter_param, matches

# The 16 NF4 values as published with QLoRA and used by bitsandbytes (index = the stored 4-bit code).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
NF4_OFFSET = 0.9677083  # delta: the highest probability whose N(0, 1) quantile is used
DQ_BLOCK = 256  # absmaxes per second-level (double quantization) block
INT8_MAX = 127
BNB_BLOCKS = (64, 128, 256, 512, 1024, 2048, 4096)  # block sizes bitsandbytes' 4-bit kernels take


def nf4_code() -> torch.Tensor:
    """NF4 derived from the normal quantiles (QLoRA, appendix E): float64, sorted, 16 values in [-1, 1]."""
    positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])  # 8 values > 0
    negative = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values < 0
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return values / values.max()


@dataclass(eq=False)  # tensors: no element-wise ==
class NF4Tensor:
    """A tensor stored in NF4. Without double quantization the block absmaxes are `absmax` (float32);
    with it they are `absmax_codes` (int8) * `absmax_scale` (float32 per 256 blocks) / 127 + `absmax_offset`."""

    codes: torch.Tensor  # uint8 (n_blocks * block / 2,): two 4-bit code indices per byte, first in the high nibble
    shape: torch.Size
    block: int
    absmax: torch.Tensor | None = None  # float32 (n_blocks,)
    absmax_codes: torch.Tensor | None = None  # int8 (n_blocks,)
    absmax_scale: torch.Tensor | None = None  # float32 (ceil(n_blocks / 256),)
    absmax_offset: torch.Tensor | None = None  # float32 (): the mean absmax

    @property
    def double_quant(self) -> bool:
        return self.absmax is None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.block)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by field name (what `Linear4bit` keeps as buffers)."""
        names = ("codes", "absmax_codes", "absmax_scale", "absmax_offset") if self.double_quant else ("codes", "absmax")
        return {name: getattr(self, name) for name in names}

    def nbytes(self) -> int:
        """Bytes actually stored."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def block_absmax(self) -> torch.Tensor:
        """The absmax of every block, float32 (n_blocks,), undoing double quantization when it was used."""
        if not self.double_quant:
            return self.absmax
        scale = self.absmax_scale.repeat_interleave(DQ_BLOCK)[: self.n_blocks] / INT8_MAX
        return self.absmax_codes.float() * scale + self.absmax_offset


def nf4_nbytes(numel: int, block: int = 64, double_quant: bool = True) -> int:
    """Bytes `quantize_nf4` stores for `numel` weights: 4 bits each (whole blocks), plus the absmaxes
    (float32 each; or int8 each, a float32 scale per 256 blocks and one float32 mean)."""
    n_blocks = -(-numel // block)
    if double_quant:
        return n_blocks * block // 2 + n_blocks + 4 * -(-n_blocks // DQ_BLOCK) + 4
    return n_blocks * block // 2 + 4 * n_blocks


def quantize_nf4(w: torch.Tensor, block: int = 64, double_quant: bool = True) -> NF4Tensor:
    """Quantize `w` (any shape, any float dtype) to NF4 with one absmax per `block` consecutive values
    (row-major order), the absmaxes double-quantized when asked. Nearest-code rounding, ties to the lower code."""
    if block < 2 or block % 2:
        raise ValueError(f"NF4 block size must be an even number >= 2 (two codes per byte), got {block}")
    if not w.is_floating_point():
        raise TypeError(f"NF4 quantizes floating-point weights, got a {w.dtype} tensor")
    if w.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    flat = w.detach().reshape(-1).float()
    if not torch.isfinite(flat).all():
        raise ValueError("the weight has inf or NaN values, which NF4 cannot represent; fix the checkpoint first")
    n_blocks = -(-flat.numel() // block)
    blocks = F.pad(flat, (0, n_blocks * block - flat.numel())).view(n_blocks, block)
    absmax = blocks.abs().amax(dim=1)
    normed = blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]  # in [-1, 1]; an all-zero block stays 0
    idx = torch.bucketize(normed, _midpoints(flat.device), out_int32=True)  # x == midpoint: the lower code
    codes = ((idx[:, 0::2] << 4) | idx[:, 1::2]).to(torch.uint8).reshape(-1)
    if not double_quant:
        return NF4Tensor(codes, w.shape, block, absmax=absmax)
    absmax_codes, absmax_scale, absmax_offset = _quantize_absmax(absmax)
    return NF4Tensor(codes, w.shape, block, absmax_codes=absmax_codes, absmax_scale=absmax_scale,
                     absmax_offset=absmax_offset)


def _quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: (int8 codes, float32 scale per 256, float32 mean) of the block absmaxes."""
    offset = absmax.mean()
    centred = absmax - offset
    n_groups = -(-absmax.numel() // DQ_BLOCK)
    groups = F.pad(centred, (0, n_groups * DQ_BLOCK - absmax.numel())).view(n_groups, DQ_BLOCK)
    scale = groups.abs().amax(dim=1)  # a group of equal absmaxes has scale 0: stored exactly as the mean
    q = torch.round(groups / torch.where(scale > 0, scale, 1.0)[:, None] * INT8_MAX)
    codes = q.clamp(-INT8_MAX, INT8_MAX).to(torch.int8).reshape(-1)[: absmax.numel()]
    return codes, scale, offset


def _zeros_nf4(shape: torch.Size, block: int, double_quant: bool, device=None) -> NF4Tensor:
    """The layout `quantize_nf4` gives a tensor of `shape`, filled with zeros (which stand for all-zero weights)."""
    if block < 2 or block % 2:
        raise ValueError(f"NF4 block size must be an even number >= 2 (two codes per byte), got {block}")
    n_blocks = -(-math.prod(shape) // block)
    codes = torch.full((n_blocks * block // 2,), 0x77, dtype=torch.uint8, device=device)  # code 7 is 0.0
    if not double_quant:
        return NF4Tensor(codes, shape, block, absmax=torch.zeros(n_blocks, device=device))
    return NF4Tensor(codes, shape, block, absmax_codes=torch.zeros(n_blocks, dtype=torch.int8, device=device),
                     absmax_scale=torch.zeros(-(-n_blocks // DQ_BLOCK), device=device),
                     absmax_offset=torch.zeros((), device=device))


def dequantize_nf4(q: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor `q` stands for, of shape `q.shape`, in `dtype` (computed in float32, rounded once)."""
    absmax = q.block_absmax()
    if _use_bitsandbytes(q, dtype):
        import bitsandbytes.functional as bnbf

        out = torch.empty(q.shape, dtype=dtype, device=q.codes.device)
        return bnbf.dequantize_4bit(q.codes, absmax=absmax.contiguous(), out=out, blocksize=q.block, quant_type="nf4")
    # one row lookup per byte (index_select: far faster than advanced indexing on CPU);
    # row b of the pair table is (code[b >> 4], code[b & 15])
    values = _pair_table(q.codes.device).index_select(0, q.codes.int()).view(q.n_blocks, q.block)
    values.mul_(absmax[:, None])  # in place: a fresh tensor, and one full-size allocation fewer
    return values.reshape(-1)[: q.numel].view(q.shape).to(dtype)


@functools.cache
def _bitsandbytes_installed() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def _use_bitsandbytes(q: NF4Tensor, dtype: torch.dtype) -> bool:
    """bitsandbytes' CUDA kernel reads this module's packed format; used only where it certainly applies."""
    return (q.codes.is_cuda and q.block in BNB_BLOCKS and q.numel % q.block == 0
            and dtype in (torch.float32, torch.float16, torch.bfloat16) and _bitsandbytes_installed())


def _code(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def _midpoints(device: torch.device) -> torch.Tensor:
    code = _code(device)
    return (code[:-1] + code[1:]) / 2


def _pair_table(device: torch.device) -> torch.Tensor:
    code, byte = _code(device), torch.arange(256, device=device)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1)  # (256, 2)


# --- the layer ----------------------------------------------------------------------------------
class _NF4Matmul(torch.autograd.Function):
    """x @ W^T with W dequantized on the fly, forward and backward: only the packed weight is kept for the
    backward pass (saving the dequantized W would hold a full-precision copy of every layer until then),
    and W gets no gradient; x gets W^T-weighted gradients as through any linear layer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: Linear4bit) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantize(grad.dtype), None


class Linear4bit(nn.Module):
    """A frozen linear layer whose weight is stored in NF4: y = x W^T + b, computed in `compute_dtype`.

    The weight lives in buffers (`weight_codes`, and `weight_absmax` or `weight_absmax_codes`,
    `weight_absmax_scale`, `weight_absmax_offset`), so it is saved, loaded and moved with the model but is
    never a parameter. `model.to(dtype)` moves these buffers between devices but keeps their dtypes: rounding
    the float32 absmax constants to 16 bits would degrade every weight; set `compute_dtype` to change the
    precision of the matrix multiply. Inputs of another dtype are cast to it and the output cast back."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, block: int = 64,
                 double_quant: bool = True, compute_dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        """An all-zero quantized weight of the right layout, to be filled by `load_state_dict`; use
        `from_linear` to quantize an existing layer."""
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block, self.double_quant, self.compute_dtype = block, double_quant, compute_dtype
        self._store(_zeros_nf4(torch.Size((out_features, in_features)), block, double_quant, device))
        self.bias = None if not bias else nn.Parameter(
            torch.zeros(out_features, dtype=compute_dtype, device=device), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> Linear4bit:
        """Quantize `linear`'s weight; the bias is kept as is (frozen). The compute dtype defaults to the
        weight's own dtype, so a bf16 model keeps computing in bf16."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=False, block=block, double_quant=double_quant,
                    compute_dtype=compute_dtype or weight.dtype, device="meta")  # the layout only, no memory
        layer._store(quantize_nf4(weight, block, double_quant))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def _store(self, q: NF4Tensor) -> None:
        for name, t in q.tensors().items():
            self.register_buffer(f"weight_{name}", t)

    @property
    def quantized(self) -> NF4Tensor:
        """The stored weight as an `NF4Tensor` (views of this layer's buffers)."""
        shape = torch.Size((self.out_features, self.in_features))
        if self.double_quant:
            return NF4Tensor(self.weight_codes, shape, self.block, absmax_codes=self.weight_absmax_codes,
                             absmax_scale=self.weight_absmax_scale, absmax_offset=self.weight_absmax_offset)
        return NF4Tensor(self.weight_codes, shape, self.block, absmax=self.weight_absmax)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight (out_features, in_features) in `dtype` (default: the compute dtype)."""
        return dequantize_nf4(self.quantized, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4Matmul.apply(x.to(self.compute_dtype), self)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)

    def logical_numel(self) -> int:
        """Weights this layer stands for (the unquantized count; the bias is a parameter, counted as such)."""
        return self.out_features * self.in_features

    def nbytes(self) -> int:
        """Bytes stored: the packed weight with its absmax constants, plus the bias."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.quantized.nbytes() + bias

    def _apply(self, fn, recurse: bool = True):
        # `.to(dtype)` / `.half()` would also round the float32 absmax constants: keep their dtype, follow the device
        floats = {k: b for k, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for name, old in floats.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block={self.block}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")


def quantize_linears(model: nn.Module, patterns: Iterable[str], block: int = 64,
                     double_quant: bool = True) -> list[str]:
    """Replace, in place, every `nn.Linear` of `model` whose name `matches(name, patterns)` by a `Linear4bit`
    (QLoRA passes ["all-linear"]: every attention and MLP projection; embeddings and the output head stay).
    Returns the replaced names; layers already quantized are left alone, so calling it twice is harmless."""
    patterns = list(patterns)
    chosen = [(name, m) for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and matches(name, patterns) and not is_adapter_param(name)]  # not LoRA's A/B
    for name, linear in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Linear4bit.from_linear(linear, block, double_quant))
    return [name for name, _ in chosen]


def model_nbytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers of `model` (a tied weight counted once)."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())
