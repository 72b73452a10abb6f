"""Next-token cross-entropy fused with the output projection, computed a chunk of tokens at a time.

The plain loss materializes the logits of every token, (B*T, vocab) floats, then a log-softmax of
the same size, and in backward a gradient of the same size again: at batch 8 x 256 tokens and a
vocabulary of 4096 that is 32 MiB per tensor, larger than the CPU's caches, so every pass over it
goes to main memory (and on glibc, each such allocation is a fresh mmap whose pages fault in).
Here the logits of `chunk_size` tokens at a time are computed, turned into their loss and their
gradient while they are still in cache, and dropped: the same matrix multiplies, a fraction of
the memory traffic, and peak memory that no longer grows with the vocabulary times the batch.

The gradient is computed in the forward pass (as Liger-Kernel's fused linear cross-entropy and
Wijmans et al. 2024, "Cut Your Losses in Large-Vocabulary Language Models", avoid storing the
logits), because recomputing the logits in backward would add a third of the head's matmuls,
and on a CPU those are the step. The cost: a forward that needs a gradient does the backward
work of the head even if `backward()` is never called. Without grad mode only the loss is computed.

For logits z = h W^T (optionally soft-capped, z = c tanh(z / c)), targets y and the N tokens
whose target is not `ignore_index`:
    loss = 1/N sum_i (logsumexp(z_i) - z_i[y_i])
    d loss / d z_i = (softmax(z_i) - onehot(y_i)) / N        (0 for ignored tokens)
    d loss / d h = (d loss / d z) W,   d loss / d W = (d loss / d z)^T h
This is written by hand rather than taken from a library because the point is the mechanism; the
tests hold it against `F.cross_entropy` on materialized logits (loss and both gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Tokens per chunk: as many as keep one chunk's float32 logits under 256 MiB (at least 256 tokens).
# Small chunks keep the logits in cache but re-read the whole (vocab, d) weight three times per
# chunk; on CPU the weight traffic wins: measured on 2 cores (AMD EPYC), 2048 tokens, d_model 256,
# forward + backward of the loss, milliseconds (plain = materialized logits + F.cross_entropy):
#   vocab  2048: plain 194, chunks of 64 tokens 523, 256: 366, 1024: 199, 2048 (one chunk) 192
#   vocab  8192: plain 680, chunks of 64 tokens 1666, 256: 1472, 1024: 481, 2048 (one chunk) 424
#   vocab 32000: plain 1788, chunks of 64 tokens 3320, 256: 2264, 1024: 1837, 2048 (one chunk) 1700
# so a chunk should be large; the cap bounds memory where the plain loss would not fit (GPT-2's
# 50,304 tokens x 64 x 1024 positions are 13 GB of float32 logits; chunks of 1,334 tokens, 256 MiB).
_CHUNK_BYTES = 256 * 2**20


def default_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's float32 logits are at most 256 MiB (at least 256 tokens)."""
    return max(256, _CHUNK_BYTES // (4 * vocab_size))


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         softcap: float | None = None, ignore_index: int = -100,
                         chunk_size: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of logits `h @ weight.T` (soft-capped when `softcap` is given) against
    `targets`, over the tokens whose target is not `ignore_index`, without materializing the logits.

    h: (..., d) hidden states; weight: (vocab, d) output projection; targets: (...) class ids.
    Equals `F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=...)`
    on `logits = F.linear(h, weight)` (then soft-capped), gradients included. As there, a batch
    whose targets are all ignored has loss NaN and zero gradients.
    """
    if h.shape[:-1] != targets.shape:
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match hidden states of shape "
                         f"{tuple(h.shape)}: expected targets of shape {tuple(h.shape[:-1])}")
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if not torch.compiler.is_compiling():  # the check waits for the device: kept out of compiled graphs
        _check_targets(targets, weight.shape[0], ignore_index)
    h2, t1 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h2, weight, t1, softcap, ignore_index, chunk_size)
    loss_sum, n_valid = _chunked(h2, weight, t1, softcap, ignore_index, chunk_size, None, None)
    return loss_sum / n_valid


def _check_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = ((targets < 0) & (targets != ignore_index)) | (targets >= vocab)
    if bool(bad.any()):
        raise ValueError(f"target id {int(targets[bad][0])} is outside the vocabulary [0, {vocab}) and is not the "
                         f"ignore index {ignore_index}; check that the tokenizer matches the model")


def _chunked(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None,
             ignore_index: int, chunk_size: int, grad_h: torch.Tensor | None,
             grad_w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the token losses and the number of counted tokens; with grad_h / grad_w given, also
    write d(mean loss)/dh into grad_h and accumulate d(mean loss)/dW into grad_w (float32)."""
    valid = targets != ignore_index
    n_valid = valid.sum()
    # 1/N for counted tokens, 0 for ignored ones; clamped so that all-ignored gives zero gradients
    row_scale = valid.float() / n_valid.clamp(min=1)
    safe_targets = targets.masked_fill(~valid, 0)[:, None]
    loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, h.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        z = F.linear(h[rows], weight).float()
        capped = None
        if softcap is not None:
            capped = torch.tanh(z / softcap)
            z = capped * softcap
        # log-softmax is one fused pass; its exp is the softmax the gradient needs (about half the
        # time of logsumexp followed by exp(z - lse) on a 256 x 4096 chunk)
        log_probs = torch.log_softmax(z, dim=-1)
        target_log_prob = log_probs.gather(1, safe_targets[rows])[:, 0]
        loss_sum -= (target_log_prob * valid[rows]).sum()
        if grad_h is None:
            continue
        # softmax - onehot, scaled per row, computed in place
        grad_z = log_probs.exp_()
        grad_z.scatter_add_(1, safe_targets[rows], torch.full_like(target_log_prob, -1.0)[:, None])
        grad_z.mul_(row_scale[rows, None])
        if capped is not None:  # d(c tanh(u / c))/du = 1 - tanh^2
            grad_z.mul_(1 - capped.square())
        grad_z = grad_z.to(h.dtype)
        torch.mm(grad_z, weight, out=grad_h[rows])
        if grad_w is not None:
            if grad_w.dtype == h.dtype:
                grad_w.addmm_(grad_z.t(), h[rows])
            else:  # low-precision weights: accumulate the chunks' products in float32
                grad_w.add_(grad_z.t() @ h[rows])
    return loss_sum, n_valid


class _LinearCrossEntropy(torch.autograd.Function):
    """The loss, with both gradients computed in forward and scaled by the incoming gradient in backward."""

    @staticmethod
    def forward(ctx, h, weight, targets, softcap, ignore_index, chunk_size):
        needs_h, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h)  # the chunk loop writes every row
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_w else None
        loss_sum, n_valid = _chunked(h, weight, targets, softcap, ignore_index, chunk_size, grad_h, grad_w)
        ctx.save_for_backward(grad_h if needs_h else None, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss_sum / n_valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_loss  # a 0-dim float32 factor keeps grad_h's dtype
        if grad_w is not None:
            grad_w = (grad_w * grad_loss).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None
