"""Knowledge distillation: a small student learns from a larger teacher, token by token or sequence by sequence.

Token-level distillation (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network"): at every position
that has a training target, the student's next-token distribution is pulled towards the teacher's. With
temperature tau, p_T = softmax(z_T / tau) and p_S = softmax(z_S / tau) over the shared vocabulary, and one of

    forward KL   KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v))       (Hinton et al.; mass-covering)
    reverse KL   KL(p_S || p_T) = sum_v p_S(v) (log p_S(v) - log p_T(v))       (MiniLLM, Gu et al. 2024;
                                                                                 mode-seeking)
    JSD(beta)    beta KL(p_T || m) + (1 - beta) KL(p_S || m),  m = beta p_T + (1 - beta) p_S
                                                                                (GKD, Agarwal et al. 2024)

each multiplied by tau^2, because the gradient of a divergence of tempered softmaxes scales as 1/tau^2
(d KL(p_T || p_S) / d z_S = (p_S - p_T) / tau): the factor keeps the gradient's size, and so the balance with the
data loss, the same whatever the temperature. The loss is the mean over scored positions, mixed with the usual
cross-entropy on the data:  L = alpha * distill + (1 - alpha) * CE  (`distill_objective`).

Sequence-level distillation (Kim & Rush 2016, "Sequence-Level Knowledge Distillation"): the teacher answers the
prompts of the training set (greedy decoding approximates the mode of its sequence distribution), and the student
is fine-tuned on those answers with ordinary SFT (`teacher_generations`).

The divergences are written out rather than taken from `F.kl_div` because the point is to hold them against the
equations above, and because they are computed a chunk of positions at a time: the float32 log-probabilities of
both models over a 50k-token vocabulary are several times the size of the logits, so each chunk's are recomputed
in backward (activation checkpointing) instead of being kept for the whole batch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from ..atomic import atomic_file
from ..tokenizer.chat import end_of_turn_ids
from .chat_data import IGNORE, prompt_of

LOSSES = ("forward_kl", "reverse_kl", "jsd")
# Rows per chunk: one chunk's float32 (rows, vocab) tensor is at most 64 MiB (the divergence keeps a few of them).
_CHUNK_BYTES = 64 * 2**20

Objective = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, Any]]]


# --- the divergences --------------------------------------------------------------------------
def default_chunk_size(vocab_size: int) -> int:
    """Positions per chunk so that one chunk's float32 (positions, vocab) tensor is at most 64 MiB."""
    return max(16, _CHUNK_BYTES // (4 * vocab_size))


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
               temperature: float = 1.0, *, chunk_size: int | None = None) -> torch.Tensor:
    """Forward KL of Hinton et al. (2015), the teacher's distribution as the reference:

        L = tau^2 / N sum_{i scored} sum_v p_T(v|i) (log p_T(v|i) - log p_S(v|i)),
        p = softmax(z / tau),  N = number of scored positions

    Mass-covering: the student is penalized wherever the teacher puts mass that it does not.
    d L / d z_S = tau (p_S - p_T) / N at scored positions, 0 elsewhere.

    student_logits, teacher_logits: (..., V) with the same shape; mask: (...) bool, True where a position is
    scored (`targets != -100`), None for all. Computed in float32 (float64 inputs stay float64). A batch
    without a scored position gives 0 with zero gradients (not NaN), so it cannot poison an accumulated step.
    chunk_size: positions computed at once (None: `default_chunk_size`; the module docstring says why)."""
    return _divergence("forward_kl", student_logits, teacher_logits, mask, temperature, 0.5, chunk_size)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
               temperature: float = 1.0, *, chunk_size: int | None = None) -> torch.Tensor:
    """Reverse KL, as in MiniLLM (Gu et al. 2024), the student's distribution as the reference:

        L = tau^2 / N sum_{i scored} sum_v p_S(v|i) (log p_S(v|i) - log p_T(v|i))

    Mode-seeking: the student is penalized for putting mass where the teacher has little, and may ignore some of
    the teacher's modes, which suits a small student that cannot cover them all. Arguments as `forward_kl`.
    (MiniLLM optimizes the sequence-level reverse KL with policy gradients; this is its token-level form, the
    reverse KL of the next-token distributions at the data's positions.)"""
    return _divergence("reverse_kl", student_logits, teacher_logits, mask, temperature, 0.5, chunk_size)


def jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
        temperature: float = 1.0, beta: float = 0.5, *, chunk_size: int | None = None) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1), beta weighting the teacher:

        JSD(beta) = beta KL(p_T || m) + (1 - beta) KL(p_S || m),   m = beta p_T + (1 - beta) p_S
        L = tau^2 / N sum_{i scored} JSD(beta)(i)

    log m is computed as logaddexp(log beta + log p_T, log(1 - beta) + log p_S), never from probabilities.
    At beta = 0.5 it is the symmetric Jensen-Shannon divergence, at most log 2 (at tau = 1); for any beta it is
    at most the binary entropy -beta log beta - (1 - beta) log(1 - beta).

    The ends: JSD(0) = JSD(1) = 0 identically (m is then one of the two distributions and its weight is 0).
    What survives near them is the leading term, JSD(beta) = beta KL(p_T || p_S) + O(beta^2) and
    JSD(beta) = (1 - beta) KL(p_S || p_T) + O((1 - beta)^2); so, as TRL's GKD trainer does, beta = 0 is taken
    to mean the forward KL and beta = 1 the reverse KL (the limits of JSD / beta and JSD / (1 - beta)).
    Other arguments as `forward_kl`."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd needs 0 <= beta <= 1 (the teacher's weight in the mixture), got {beta}")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, mask, temperature, chunk_size=chunk_size)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, mask, temperature, chunk_size=chunk_size)
    return _divergence("jsd", student_logits, teacher_logits, mask, temperature, beta, chunk_size)


def divergence(loss: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
               mask: torch.Tensor | None = None, temperature: float = 1.0, beta: float = 0.5, *,
               chunk_size: int | None = None) -> torch.Tensor:
    """The distillation loss named `loss` ("forward_kl", "reverse_kl" or "jsd"); beta is used by "jsd" only."""
    if loss == "forward_kl":
        return forward_kl(student_logits, teacher_logits, mask, temperature, chunk_size=chunk_size)
    if loss == "reverse_kl":
        return reverse_kl(student_logits, teacher_logits, mask, temperature, chunk_size=chunk_size)
    if loss == "jsd":
        return jsd(student_logits, teacher_logits, mask, temperature, beta, chunk_size=chunk_size)
    raise ValueError(f"distillation loss {loss!r}; choose one of {LOSSES}")


def _divergence(kind: str, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None,
                temperature: float, beta: float, chunk_size: int | None) -> torch.Tensor:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape; distillation compares the two models at "
                         "the same positions over the same vocabulary (see shared_vocab_size for padded ones)")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"the distillation temperature must be a positive number, got {temperature!r}")
    V = student_logits.shape[-1]
    student, teacher = student_logits.reshape(-1, V), teacher_logits.reshape(-1, V)
    if mask is not None:
        if mask.shape != student_logits.shape[:-1]:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit logits of shape "
                             f"{tuple(student_logits.shape)}: expected {tuple(student_logits.shape[:-1])}")
        rows = mask.reshape(-1).to(torch.bool).nonzero()[:, 0]  # only scored positions are computed at all
        student, teacher = student.index_select(0, rows), teacher.index_select(0, rows)
    n = student.shape[0]
    dtype = torch.promote_types(student.dtype, torch.float32)
    if n == 0:
        return student.to(dtype).sum() * 0.0  # keeps the graph: zero gradients, not NaN
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive (or None: automatic), got {chunk_size}")
    chunk = chunk_size or default_chunk_size(V)

    def chunk_sum(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return _token_divergences(kind, s.to(dtype) / temperature, t.to(dtype) / temperature, beta).sum()

    # With several chunks and a gradient to compute, each chunk's float32 intermediates are recomputed in backward
    # rather than stored, so memory holds one chunk's of them at a time; one chunk needs no such trade.
    recompute = n > chunk and torch.is_grad_enabled() and student.requires_grad
    total = student.new_zeros((), dtype=dtype)
    # split (not slicing in a loop): backward then assembles the chunks' gradients into one tensor once, instead of
    # adding a zero-padded full-size gradient per chunk
    for s, t in zip(student.split(chunk), teacher.split(chunk), strict=True):
        total = total + (checkpoint(chunk_sum, s, t, use_reentrant=False) if recompute else chunk_sum(s, t))
    return total * (temperature**2 / n)


def _kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per row, KL(p || q) = sum_v p (log p - log q), with 0 log 0 = 0: a token that p gives no mass adds nothing,
    even where log q is -inf too. The difference is masked rather than the product, so that no 0 * inf reaches
    the backward pass either."""
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)


def _token_divergences(kind: str, z_s: torch.Tensor, z_t: torch.Tensor, beta: float) -> torch.Tensor:
    """The divergence at each row of already tempered logits (rows, V) -> (rows,)."""
    log_s, log_t = z_s.log_softmax(-1), z_t.log_softmax(-1)
    if kind == "forward_kl":
        return _kl_terms(log_t, log_s)
    if kind == "reverse_kl":
        return _kl_terms(log_s, log_t)
    # a token neither model can produce (log p = -inf in both) would make logaddexp's gradient 0 * nan: floor the
    # log-probabilities at the dtype's lowest finite value, which changes no value that counts
    floor = torch.finfo(z_s.dtype).min
    log_m = torch.logaddexp(log_t.clamp(min=floor) + math.log(beta), log_s.clamp(min=floor) + math.log1p(-beta))
    return beta * _kl_terms(log_t, log_m) + (1 - beta) * _kl_terms(log_s, log_m)


# --- teacher and student ----------------------------------------------------------------------
def shared_vocab_size(student_vocab: int, teacher_vocab: int, tokenizer_vocab: int | None = None) -> int:
    """How many leading vocabulary entries the student and teacher are compared on.

    Distillation needs one tokenizer for both models: token v must mean the same to each. Equal vocabularies are
    compared whole. A checkpoint whose embedding is padded (to a multiple of 64, say) has rows past the
    tokenizer's ids that no text ever produces; when `tokenizer_vocab` (the shared tokenizer's size) fits in the
    smaller model, those rows are left out and both models are compared on the first min(...) entries, each
    distribution renormalized over them. Anything else is a ValueError that says what to fix."""
    if student_vocab == teacher_vocab:
        return student_vocab
    smaller = min(student_vocab, teacher_vocab)
    if tokenizer_vocab is None:
        raise ValueError(f"the teacher's vocabulary has {teacher_vocab:,} entries and the student's {student_vocab:,}:"
                         " distillation needs both models to use the same tokenizer. If they do and one embedding "
                         "is only padded, pass the tokenizer's vocabulary size (vocab_size=tokenizer.vocab_size)")
    if tokenizer_vocab > smaller:
        raise ValueError(f"the teacher's vocabulary has {teacher_vocab:,} entries and the student's {student_vocab:,},"
                         f" but the tokenizer has {tokenizer_vocab:,} tokens: the smaller model cannot represent "
                         "them all, so the two models do not share a tokenizer. Distill into a student built on "
                         "the teacher's tokenizer")
    return smaller


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two tokenizers map every id to the same bytes (bos/eos choices and chat templates may differ: a base
    model and its instruction-tuned sibling share a vocabulary but not their end-of-turn token)."""
    if int(a.vocab_size) != int(b.vocab_size):
        return False
    return all(_token_bytes(a, i) == _token_bytes(b, i) for i in range(int(a.vocab_size)))


def _token_bytes(tokenizer: Any, i: int) -> bytes | None:
    try:
        return tokenizer.token_bytes(i)
    except (ValueError, KeyError, IndexError):  # an id without a token
        return None


def batch_inputs(batch: Any) -> tuple[dict[str, Any], torch.Tensor]:
    """(keyword arguments of `Transformer.forward`, targets) of a training batch: an SFT batch dict (ids, targets,
    positions, doc_ids; tune/chat_data.py) or a pretraining batch (x, y[, doc_ids, positions]; data/loader.py)."""
    if isinstance(batch, dict):
        from .chat_data import model_inputs

        return model_inputs(batch), batch["targets"]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        from ..data.loader import document_causal_mask

        doc_ids, positions = getattr(batch, "doc_ids", None), getattr(batch, "positions", None)
        mask = None if doc_ids is None else document_causal_mask(doc_ids)
        return {"ids": batch[0], "positions": positions, "attention_mask": mask}, batch[1]
    raise TypeError(f"a distillation batch is an SFT batch dict or an (x, y) pair of token tensors, got "
                    f"{type(batch).__name__}")


@torch.no_grad()
def teacher_logits_at(teacher: nn.Module, inputs: dict[str, Any], scored: torch.Tensor) -> torch.Tensor:
    """The teacher's logits (N, V) at the N scored positions only: the output head, the largest matrix multiply,
    is applied to those rows alone. The teacher may sit on another device than the batch."""
    device = next(teacher.parameters()).device
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    scored = scored.to(device)
    if hasattr(teacher, "hidden_states") and hasattr(teacher, "logits"):  # an lmlab Transformer
        logits = teacher.logits(teacher.hidden_states(**moved)[scored])
    else:
        logits = teacher(**moved).logits[scored]
    return logits


def distill_objective(teacher: nn.Module, loss: str = "forward_kl", temperature: float = 1.0, alpha: float = 0.5,
                      beta: float = 0.5, *, vocab_size: int | None = None,
                      chunk_size: int | None = None) -> Objective:
    """An objective for the training loop (train/loop.py) that distills `teacher` into the model being trained:

        L = alpha * D(p_T, p_S; tau) + (1 - alpha) * CE(student, data)

    D is `loss` ("forward_kl", "reverse_kl", "jsd" with `beta`) at temperature tau, CE the mean cross-entropy on
    the batch's targets (tau = 1); both are means over the positions with a target, the same positions.
    alpha = 1 is pure distillation, alpha = 0 plain fine-tuning (the teacher is then not run).

    The teacher is put in eval mode with gradients off and runs under no_grad on the same batch (SFT dicts or
    pretraining (x, y) batches, see `batch_inputs`). vocab_size: the shared tokenizer's size, needed only when
    one model's embedding is padded (see `shared_vocab_size`). Metrics: distill_loss and ce_loss (detached)."""
    if loss not in LOSSES:
        raise ValueError(f"distillation loss {loss!r}; choose one of {LOSSES}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"the distillation temperature must be a positive number, got {temperature!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha weighs distillation against the data loss and must be in [0, 1], got {alpha}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta (jsd's teacher weight) must be in [0, 1], got {beta}")
    teacher.eval().requires_grad_(False)

    def objective(model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        inputs, targets = batch_inputs(batch)
        scored = targets != IGNORE
        student = model(**inputs).logits[scored]  # (N, V_s): the positions with a target
        n = student.shape[0]
        ce = F.cross_entropy(student.float(), targets[scored], reduction="sum") / max(n, 1)
        metrics: dict[str, Any] = {"ce_loss": ce.detach()}
        if alpha == 0.0:
            return ce, metrics
        teacher_logits = teacher_logits_at(teacher, inputs, scored).to(student.device)
        V = shared_vocab_size(student.shape[-1], teacher_logits.shape[-1], vocab_size)
        distill = divergence(loss, student[:, :V], teacher_logits[:, :V], None, temperature, beta,
                             chunk_size=chunk_size)
        metrics["distill_loss"] = distill.detach()
        total = distill if alpha == 1.0 else alpha * distill + (1 - alpha) * ce
        return total, metrics

    return objective


# --- sequence-level distillation ------------------------------------------------------------
@dataclass
class Generations:
    """What `teacher_generations` wrote."""

    path: Path
    written: int  # conversations written
    truncated: int  # answers cut by max_new_tokens (or by the teacher's context length)
    empty: int  # answers the teacher ended at once (written all the same: they are its answer)
    skipped: int  # prompts longer than the teacher's context, left out


def teacher_generations(teacher: nn.Module, tokenizer: Any, conversations: Sequence[Any], out_file: str | Path,
                        max_new_tokens: int = 256, temperature: float = 0.0, batch_size: int = 8, *,
                        seed: int = 0, progress: bool = True) -> Generations:
    """Sequence-level distillation data (Kim & Rush 2016): the teacher's own answer to every conversation's prompt.

    For each conversation (a list of messages, or a record {"messages": [...], "tools": [...]}), the prompt is
    everything before its last assistant turn (`prompt_of`), rendered by the chat template with the generation
    prompt; the teacher completes it (greedy at temperature 0, else sampled with the seed `seed` + index, so the
    output does not depend on batch_size) until an end-of-turn token (`end_of_turn_ids`) or max_new_tokens.
    Written atomically to `out_file` as JSON lines {"messages": [...prompt, {"role": "assistant", "content":
    answer}]} (plus the record's "tools"), in the input order: data for `lmlab sft --data FILE`.

    Prompts are batched by length; a batch never runs past the teacher's max_seq_len (its answers are cut there
    and counted as truncated), and a prompt that alone fills the context is skipped and counted."""
    from ..infer.generate import generate
    from ..infer.sampling import SamplingParams

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)  # validates both
    records = [_as_record(c, i) for i, c in enumerate(conversations)]
    prompts = [prompt_of(r["messages"]) for r in records]
    ids = [tokenizer.render_chat(p, add_generation_prompt=True, tools=r.get("tools"))[0]
           for p, r in zip(prompts, records, strict=True)]
    context = int(getattr(getattr(teacher, "cfg", None), "max_seq_len", 0)) or None
    todo = [i for i in range(len(ids)) if context is None or len(ids[i]) < context]
    todo.sort(key=lambda i: -len(ids[i]))  # longest first: a batch that does not fit fails at once
    stops = end_of_turn_ids(tokenizer)
    answers: dict[int, str] = {}
    truncated = empty = 0
    was_training = teacher.training
    teacher.eval()
    bar = tqdm(total=len(todo), desc="teacher generations", unit="conv", disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            room = max_new_tokens if context is None else min(max_new_tokens, context - len(ids[batch[0]]) + 1)
            params = SamplingParams(max_new_tokens=room, temperature=temperature, stop_token_ids=stops)
            seeds = None if temperature == 0 else [seed + i for i in batch]
            for i, completion in zip(batch, generate(teacher, [ids[i] for i in batch], params, tokenizer.decode,
                                                     seeds=seeds), strict=True):
                answers[i] = completion.text
                truncated += completion.finish_reason == "length"
                empty += not completion.text
            bar.update(len(batch))
    finally:
        bar.close()
        teacher.train(was_training)
    with atomic_file(out_file, "w") as f:
        for i, (record, prompt) in enumerate(zip(records, prompts, strict=True)):
            if i not in answers:
                continue
            out = {"messages": [*prompt, {"role": "assistant", "content": answers[i]}]}
            if record.get("tools"):
                out["tools"] = record["tools"]
            f.write(json.dumps(out, ensure_ascii=False) + "\n")
    return Generations(Path(out_file), len(answers), truncated, empty, len(ids) - len(todo))


def _as_record(conversation: Any, index: int) -> dict:
    if isinstance(conversation, dict):
        if not isinstance(conversation.get("messages"), list):
            raise ValueError(f"conversation {index}: a record needs a 'messages' list, got keys {sorted(conversation)}")
        return conversation
    if isinstance(conversation, (list, tuple)) and all(isinstance(m, dict) for m in conversation):
        return {"messages": list(conversation)}
    raise ValueError(f"conversation {index} is neither a list of messages nor a {{'messages': [...]}} record")
