"""Next-token sampling: the parameters and pure, batched functions on logits (B, V).

Everything here is a function of tensors and parameters only (no model, no cache, no request
state), so the batched `generate` loop and a continuous-batching server share it. The filters take
a scalar or a per-row (B,) tensor for their parameter, for batches whose rows were asked for
different settings.

Order of the pipeline in `process_logits` / `sample_next`, the one Hugging Face transformers uses
(`GenerationMixin._get_logits_processor`):

    repetition penalty -> temperature -> top-k -> top-p -> min-p -> sample

vLLM (v1 sampler) applies min-p *before* top-k/top-p; the two orders agree except when top-p and
min-p are both set (top-p then measures mass over a different set). Top-k, min-p and the
penalty commute with each other up to ties, since each keeps a prefix of the sorted order.

Sampling uses the exponential race (a.k.a. the Gumbel-max trick): with E_i ~ Exp(1) independent,
argmax_i p_i / E_i is distributed as Categorical(p), because E_i / p_i ~ Exp(p_i) and the
smallest of independent exponentials is i with probability p_i / sum_j p_j. Unlike
`torch.multinomial` this draws a fixed amount of noise per row, which is what makes a seeded row's
tokens independent of the batch it is in (see `sample_next`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# A top-p set whose mass equals p up to float32 rounding counts as reaching p: otherwise
# probabilities such as 0.5 + 0.3 summing to 0.79999995 would pull in one more token at p=0.8.
TOP_P_TOLERANCE = 1e-6

_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # the range torch.Generator.manual_seed accepts


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    max_new_tokens: at most this many tokens are generated per prompt (>= 1).
    temperature: logits are divided by it; 0 means greedy (argmax), no randomness.
    top_k: keep the k most likely tokens (ties with the k-th kept); None or 0: off.
    top_p: nucleus sampling: keep the smallest set of most likely tokens whose mass >= top_p.
    min_p: drop tokens whose probability < min_p * (probability of the most likely token).
    repetition_penalty: CTRL penalty on every token already in the prompt or the output; 1: off.
    stop: strings that end a completion; the text is cut before the first one (needs `decode`).
    stop_token_ids: token ids that end a completion (e.g. EOS); the stop token is not reported.
    seed: seeds a torch.Generator so the same seed gives the same tokens; None: the global RNG.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # OpenAI's API takes one string or a list of them
            self.stop = [self.stop]
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> None:
        """Raise ValueError naming the field, its bad value and the allowed range."""

        def bad(name: str, allowed: str) -> ValueError:
            value = getattr(self, name)
            return ValueError(f"SamplingParams.{name}={value!r} is invalid; allowed: {allowed}")

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_real(x: object) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # not NaN

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "an integer >= 1")
        if not is_real(self.temperature) or not 0 <= self.temperature < float("inf"):
            raise bad("temperature", "a finite number >= 0 (0 = greedy)")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 0):
            raise bad("top_k", "None or an integer >= 0 (None or 0 = off)")
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "0 < top_p <= 1 (1 = off)")
        if not is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "0 <= min_p <= 1 (0 = off)")
        if not is_real(self.repetition_penalty) or not 0 < self.repetition_penalty < float("inf"):
            raise bad("repetition_penalty", "a finite number > 0 (1 = off, > 1 penalizes repeats)")
        if not isinstance(self.stop, (list, tuple)) or not all(
            isinstance(s, str) and s for s in self.stop
        ):
            raise bad("stop", "a list of non-empty strings")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise bad("stop_token_ids", "a list of integers >= 0")
        seed = self.seed
        if seed is not None and not (is_int(seed) and _SEED_MIN <= seed <= _SEED_MAX):
            raise bad("seed", f"None or an integer in [{_SEED_MIN}, {_SEED_MAX}]")


# --- filters: pure functions of logits (B, V) --------------------------------------------------
# Each returns new logits with removed tokens set to -inf; the input is never modified.

Param = float | torch.Tensor  # a scalar for the whole batch, or one value per row (B,)


def _per_row(value: Param, logits: torch.Tensor) -> torch.Tensor | float:
    """A per-row (B,) parameter as a (B, 1) column that broadcasts over the vocabulary."""
    if isinstance(value, torch.Tensor):
        return value.to(device=logits.device, dtype=logits.dtype).reshape(-1, 1)
    return value


def apply_repetition_penalty(logits: torch.Tensor, prev: torch.Tensor,
                             penalty: Param) -> torch.Tensor:
    """CTRL repetition penalty (Keskar et al. 2019), the rule of transformers'
    `RepetitionPenaltyLogitsProcessor`: for every token already seen,

        l_i <- l_i / penalty   if l_i > 0
        l_i <- l_i * penalty   if l_i < 0

    so penalty > 1 always lowers a seen token's logit (and < 1 raises it). Applied once per token,
    however often it occurred.

    prev: either token ids (B, L) of the prompt and the output so far, where negative ids are
    padding and ignored; or a boolean mask (B, V), True for tokens seen (the cheap form for a
    decode loop, updated with one scatter per step).
    """
    if isinstance(penalty, (int, float)) and penalty == 1.0:
        return logits
    B, V = logits.shape
    if prev.dtype == torch.bool:
        if prev.shape != logits.shape:
            raise ValueError(
                f"repetition mask has shape {tuple(prev.shape)}; expected the logits' {(B, V)}"
            )
        seen = prev
    else:
        # Padding and out-of-vocabulary ids go to an extra column that is dropped.
        ids = prev.masked_fill((prev < 0) | (prev >= V), V)
        seen = torch.zeros(B, V + 1, dtype=torch.bool, device=logits.device)
        seen.scatter_(1, ids, True)
        seen = seen[:, :V]
    penalty = _per_row(penalty, logits)
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_temperature(logits: torch.Tensor, temperature: Param) -> torch.Tensor:
    """softmax(l / T): T < 1 sharpens the distribution, T > 1 flattens it (Ackley et al. 1985's
    Boltzmann temperature). T must be > 0 here; T = 0 (greedy) is handled by the caller."""
    if isinstance(temperature, (int, float)) and temperature == 1.0:
        return logits
    return logits / _per_row(temperature, logits)


def top_k_filter(logits: torch.Tensor, k: int | torch.Tensor | None) -> torch.Tensor:
    """Top-k sampling (Fan et al. 2018): keep the k largest logits, as transformers'
    `TopKLogitsWarper` does: every token >= the k-th largest value is kept, so ties at the
    boundary may keep more than k. k None or 0 (per row: 0) means no filtering; k >= V keeps all.
    """
    V = logits.shape[-1]
    if k is None:
        return logits
    if isinstance(k, torch.Tensor):
        # per row: the k-th largest value, read from one descending sort of the whole batch
        k = k.to(device=logits.device, dtype=torch.long).reshape(-1, 1)
        k = torch.where(k <= 0, V, k).clamp(max=V)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, k - 1)
    else:
        if k <= 0 or k >= V:
            return logits
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: Param) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely tokens whose
    probability mass is >= p, and always the most likely token.

    With tokens sorted by decreasing probability, token j is kept iff the mass of the tokens before
    it is still < p:  sum_{i<j} p_(i) < p.  (transformers' `TopPLogitsWarper` writes the same rule
    as "remove when the ascending cumulative mass <= 1 - p"; computing 1 - p in floating point can
    keep one token too many at an exact boundary, which this form avoids, see TOP_P_TOLERANCE.)
    Ties at the boundary are broken by the sort order.
    """
    if isinstance(p, (int, float)) and p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # exclusive cumulative sum
    remove_sorted = mass_before >= _per_row(p, logits) - TOP_P_TOLERANCE
    remove_sorted[..., 0] = False  # the most likely token always stays
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: Param) -> torch.Tensor:
    """Min-p sampling (Nguyen et al. 2024, "Turning Up the Heat"): drop every token with
    p_i < min_p * max_j p_j, the rule of transformers' `MinPLogitsWarper`. The most likely token
    always stays (its ratio is 1 >= min_p). min_p = 0 means no filtering."""
    if isinstance(min_p, (int, float)) and min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = _per_row(min_p, logits) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams,
                   prev: torch.Tensor | None = None) -> torch.Tensor:
    """The logits that `sample_next` samples from: the filters of `params` in transformers' order
    (repetition penalty, temperature, top-k, top-p, min-p), in float32. With temperature 0 only
    the penalty applies (greedy takes the argmax of the penalized logits, as transformers does).
    prev: the seen-token ids or mask for the repetition penalty (see apply_repetition_penalty)."""
    logits = logits.float()
    if params.repetition_penalty != 1.0:
        if prev is None:
            raise ValueError("repetition_penalty != 1 needs `prev`, the ids or mask of seen tokens")
        logits = apply_repetition_penalty(logits, prev, params.repetition_penalty)
    if params.temperature == 0:
        return logits
    logits = apply_temperature(logits, params.temperature)
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


Generators = torch.Generator | Sequence[torch.Generator | None] | None


def exponential_noise(shape: tuple[int, int], generator: Generators,
                      device: torch.device) -> torch.Tensor:
    """E ~ Exp(1) noise (float32) for the exponential race, drawn in one of three ways:

    - generator None: independent (B, V) noise from torch's global RNG.
    - one torch.Generator: a single (1, V) draw shared by every row. A row's token then depends only
      on its own logits and the generator's state, not on how many rows it is batched with, so a
      seed gives the same tokens alone or in a batch (rows with equal logits sample alike, as two
      requests with the same seed do in vLLM).
    - a sequence of B generators (or None entries for the global RNG): row i draws its own (V,)
      noise from generators[i], for batches of requests that each carry a seed. Row i draws the
      same numbers as a batch of one would from the same generator.

    E = -ln U with U ~ Uniform[0, 1) in float64 (inverse-CDF sampling): U < 1 makes E > 0, so no
    token wins by a zero divisor, and 53-bit U makes E = inf (token never drawn) a 2^-53 event.
    (float32 U would hit 0 about once per 2^24 draws, i.e. every few steps at a 100k vocabulary;
    it is also faster on the CPU than `Tensor.exponential_`.)
    """
    B, V = shape
    shared = isinstance(generator, torch.Generator)
    u = torch.empty(1 if shared else B, V, dtype=torch.float64, device=device)
    if generator is None or shared:
        u.uniform_(generator=generator)
    else:
        if len(generator) != B:
            raise ValueError(f"got {len(generator)} generators for a batch of {B} rows")
        for row, g in zip(u, generator, strict=True):
            row.uniform_(generator=g)
    return u.log_().neg_().float()


def sample_from_logits(logits: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """One token per row from Categorical(softmax(logits)) (B,), by the exponential race
    argmax_i p_i / E_i (see the module docstring); tokens at -inf are never chosen."""
    probs = logits.float().softmax(dim=-1)
    noise = exponential_noise(tuple(probs.shape), generator, probs.device)
    return probs.div_(noise).argmax(dim=-1)  # p / inf = 0: a token with E = inf is not drawn


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: Generators = None,
                prev: torch.Tensor | None = None) -> torch.Tensor:
    """The next token (B,) for each row of logits (B, V): the argmax of the penalized logits when
    params.temperature == 0, otherwise a sample from `process_logits(logits, params, prev)`.

    generator: where the randomness comes from (see exponential_noise); a torch.Generator seeded
    with params.seed makes the tokens reproducible. Greedy rows draw no noise.
    prev: seen-token ids or mask, needed when params.repetition_penalty != 1.
    """
    logits = process_logits(logits, params, prev)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    return sample_from_logits(logits, generator)
