"""Autoregressive generation with a preallocated KV cache: batched `generate` and token-by-token
`stream`, which share one decode loop and so produce the same tokens and text for the same seed.

Batching: prompts of different lengths are left-padded to the longest, so that every row's next
token lands in the same cache slot; the attention mask given on prefill makes the model count
positions from each row's first real token and never attend to padding (`KVCache.valid` keeps
that for the decode steps). A row generated in a batch thus sees exactly what it sees alone.

Per step: one forward pass over the B newest tokens, `sample_next`, and bookkeeping; nothing is
rebuilt per step. Without stop conditions the loop itself never reads tokens back to the host
(they stay in a device buffer); with stop token ids or stop strings it reads the B new ids once
per step, and decodes text per step only for stop strings or streaming. Finished rows keep riding
along (their tokens are ignored) until all rows are done, rather than shrinking the batch, which
would copy the whole cache each time a row finishes.

Reporting, as OpenAI-style APIs do:
- `finish_reason` is "stop" (a stop token id or stop string) or "length" (max_new_tokens).
- A stop token id is *not* part of `token_ids` or `text`; it is reported in `stop_reason`.
- A stop string is *not* part of `text`: the text is cut right before its first occurrence. The
  tokens that produced it stay in `token_ids` (a token cannot be split), so `text` is then a
  prefix of the decoded `token_ids`. `stop_reason` is the string that matched.
- `logprobs` / `logits` are per token of `token_ids`, from the raw model distribution (before
  penalty, temperature and filters), as vLLM reports by default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ..model import Transformer
from .sampling import SamplingParams, sample_next

Decode = Callable[[list[int]], str]

# Prompt tokens decoded ahead of the completion as context, so that tokenizers whose decode
# depends on the preceding token (SentencePiece's leading space) render the first token as it
# reads after the prompt. The same offset as vLLM's incremental detokenizer.
DETOKENIZE_CONTEXT = 5

REPLACEMENT_CHAR = "\ufffd"  # what a UTF-8 decoder shows for an incomplete byte sequence


@dataclass
class Completion:
    """One prompt's output. See the module docstring for what is and is not included.

    token_ids: the generated tokens, without a stop token id.
    text: the decoded completion, cut before a stop string; None when no `decode` was given.
    finish_reason: "stop" or "length".
    stop_reason: the stop token id (int) or stop string (str) that ended it; None for "length".
    logprobs: log p(token) under the model, one per token_ids (with `logprobs=True`).
    logits: the raw logits (len(token_ids), vocab) on the CPU (with `output_logits=True`).
    top_logprobs: per token, the n most likely (token id, logprob) of that step (the engine's `logprobs=n`).
    """

    token_ids: list[int]
    text: str | None
    finish_reason: str
    stop_reason: int | str | None = None
    logprobs: list[float] | None = None
    logits: torch.Tensor | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token: the n most likely (id, logprob)


@dataclass
class StreamChunk:
    """One step of `stream`. Every token of the completion's token_ids comes in its own chunk, in
    order; the last chunk carries finish_reason. When the completion ends on a stop token id, that
    last chunk has token_id None (the stop token is not part of the output) and flushes any text
    still held back.

    text: the new text this step; "" while held back (an incomplete UTF-8 sequence, or text that
    could be the beginning of a stop string) or without `decode`. The concatenation of all chunks'
    text equals `Completion.text`.
    """

    token_id: int | None
    text: str = ""
    logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # the n most likely (id, logprob) at this step


class IncrementalDetokenizer:
    """Turns a growing token sequence into text deltas, emitting text only once it is stable.

    Each step decodes a short window (the tokens of the previous delta as context, plus the
    unread ones) and emits the part past the context's text, unless it ends in U+FFFD: with
    byte-level tokenizers a token may carry only part of a UTF-8 character, which decodes as U+FFFD
    until the rest arrives. (The scheme of vLLM's and transformers' TextStreamer detokenizers; it
    assumes decode(a) is a prefix of decode(a + b) once a decodes cleanly.)
    """

    def __init__(self, decode: Decode, context: Sequence[int] = ()):
        self.decode = decode
        self.ids: list[int] = list(context)
        self.prefix = 0  # ids[prefix:read] are the context the next delta is decoded after
        self.read = len(self.ids)  # ids before this are already text
        self._prefix_text: str | None = None  # decode(ids[prefix:read]), cached
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add a token; return the newly stable text (possibly "")."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end: return whatever is still held back, incomplete characters included."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self.decode(self.ids[self.prefix : self.read])
        new_text = self.decode(self.ids[self.prefix :])
        incomplete = not final and new_text.endswith(REPLACEMENT_CHAR)
        if len(new_text) <= len(self._prefix_text) or incomplete:
            return ""
        delta = new_text[len(self._prefix_text) :]
        self.prefix, self.read, self._prefix_text = self.read, len(self.ids), None
        self.text += delta
        return delta


def _find_stop(text: str, start: int, stops: Sequence[str]) -> tuple[int, str] | None:
    """The earliest stop string in `text` that ends at or after `start` (earlier text was
    searched already): (index, string), or None."""
    best = None
    for s in stops:
        j = text.find(s, max(0, start - len(s) + 1))
        if j != -1 and (best is None or j < best[0]):
            best = (j, s)
    return best


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string: text that
    a stream must hold back because the next tokens could complete a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


class _Row:
    """The host-side state of one prompt's completion."""

    __slots__ = ("tokens", "detok", "finish_reason", "stop_reason", "text_end", "emitted")

    def __init__(self, detok: IncrementalDetokenizer | None):
        self.tokens: list[int] = []
        self.detok = detok
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.text_end: int | None = None  # where the text is cut (a stop string starts there)
        self.emitted = 0  # characters of text a stream has yielded

    @property
    def text(self) -> str:
        return self.detok.text[: self.text_end]


class _Run:
    """One generation: validates and sets up on construction, generates when iterated (yielding
    after every step, for `stream`)."""

    def __init__(self, model: Transformer, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 decode: Decode | None, logprobs: bool, output_logits: bool, incremental: bool,
                 seeds: Sequence[int] | None = None, streaming: Sequence[int] | None = None):
        params.validate()
        if seeds is not None:
            seeds = list(seeds)
            if len(seeds) != len(prompts):
                raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; one each")
            for s in seeds:  # the same range check as SamplingParams.seed
                SamplingParams(seed=s)
        self.seeds = seeds
        if params.stop and decode is None:
            raise ValueError(
                f"stop strings {params.stop} need a `decode` function (token ids -> text) to be "
                "recognized; pass decode=tokenizer.decode, or use stop_token_ids"
            )
        cfg = model.cfg
        self.model, self.params, self.decode = model, params, decode
        self.want_logprobs, self.want_logits = logprobs, output_logits
        self.prompts = [[int(t) for t in p] for p in prompts]  # also takes tensors / numpy rows
        for i, p in enumerate(self.prompts):
            if not p:
                raise ValueError(f"prompt {i} is empty; generation needs at least one token (BOS)")
            lo, hi = min(p), max(p)
            if lo < 0 or hi >= cfg.vocab_size:
                raise ValueError(
                    f"prompt {i} has token id {lo if lo < 0 else hi} outside the model's "
                    f"vocabulary [0, {cfg.vocab_size})"
                )
        longest, M = max((len(p) for p in self.prompts), default=0), params.max_new_tokens
        # The last sampled token is never fed back, so the model sees positions < longest + M - 1.
        self.cache_len = longest + M - 1
        self.streaming = streaming_option(streaming)
        if self.streaming is not None:  # attention sinks: positions stay below the bounded cache's size
            n_sink, window, chunk = self.streaming
            self.cache_len = min(self.cache_len, n_sink + window - 1 + chunk)
        if cfg.position == "learned" and self.cache_len > cfg.max_seq_len:
            raise ValueError(
                f"a prompt of {longest} tokens + max_new_tokens={M} needs positions up to "
                f"{self.cache_len - 1}, beyond the model's learned position table "
                f"(max_seq_len={cfg.max_seq_len}); use max_new_tokens <= "
                f"{cfg.max_seq_len - longest + 1} or a shorter prompt"
            )
        self.stop_ids = frozenset(params.stop_token_ids)
        # Read tokens back every step only when something must look at them.
        self.host = bool(self.stop_ids or params.stop or incremental)
        self.incremental = decode is not None and bool(params.stop or incremental)
        self.step_logprobs: list[torch.Tensor] = []  # (B,) per step, on the device
        self.logprobs: list[list[float]] | None = None
        self.logits: torch.Tensor | None = None
        self.rows = [_Row(self._detokenizer(i) if self.incremental else None)
                     for i in range(len(self.prompts))]

    def _detokenizer(self, row: int) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self.decode, self.prompts[row][-DETOKENIZE_CONTEXT:])

    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[int] | None]:
        """Generate; after each step yield the step's sampled ids (None without host reads)."""
        model, params, rows = self.model, self.params, self.rows
        B, M, V = len(rows), params.max_new_tokens, model.cfg.vocab_size
        if B == 0:
            return
        device = next(model.parameters()).device
        lengths = [len(p) for p in self.prompts]
        L = max(lengths)
        # Left padding (token 0, never attended to) puts every row's last token in the last slot.
        ids = torch.tensor([[0] * (L - len(p)) + p for p in self.prompts]).to(device)
        mask = None
        if min(lengths) < L:
            pad = torch.tensor([L - n for n in lengths])
            mask = (torch.arange(L)[None, :] >= pad[:, None]).to(device)

        seen = None  # tokens in prompt + output, for the repetition penalty: one scatter per step
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(B, V, dtype=torch.bool, device=device)
            rows_of = torch.repeat_interleave(torch.arange(B), torch.tensor(lengths)).to(device)
            seen[rows_of, torch.tensor([t for p in self.prompts for t in p], device=device)] = True
        generator = None
        if self.seeds is not None and not params.greedy:
            generator = [torch.Generator(device=device).manual_seed(s) for s in self.seeds]
        elif params.seed is not None and not params.greedy:
            # one draw of noise shared by all rows: a row's tokens do not depend on its batch
            generator = torch.Generator(device=device).manual_seed(params.seed)

        if self.streaming is None:
            cache = model.new_cache(B, self.cache_len)
            h = model.hidden_states(ids, cache, attention_mask=mask)
        else:
            cache, h = _streaming_prefill(model, ids, mask, *self.streaming)
        logits = model.logits(h[:, -1])  # only the last position: no (B, L, V) prefill logits

        out = None if self.host else torch.empty(B, M, dtype=torch.long, device=device)
        logprobs, all_logits = self.step_logprobs, []
        active = list(range(B))
        for t in range(M):
            tok = sample_next(logits, params, generator, seen)
            if self.want_logprobs:
                logprobs.append(logits.float().log_softmax(dim=-1).gather(1, tok[:, None])[:, 0])
            if self.want_logits:
                all_logits.append(logits)
            if self.host:
                toks = tok.tolist()
                active = [i for i in active if not self._step_row(rows[i], toks[i], t + 1 == M)]
                yield toks
                if not active:
                    break
            else:
                out[:, t] = tok
                yield None
            if t + 1 == M:
                break
            if seen is not None:
                seen.scatter_(1, tok[:, None], True)
            h = model.hidden_states(tok[:, None], cache)
            logits = model.logits(h[:, -1])

        if out is not None:  # no stop conditions: every row ran max_new_tokens
            for row, ids_ in zip(rows, out.tolist(), strict=True):
                row.tokens, row.finish_reason = ids_, "length"
        self.logprobs = torch.stack(logprobs, dim=1).tolist() if logprobs else None
        self.logits = torch.stack(all_logits, dim=1).float().cpu() if all_logits else None

    def _step_row(self, row: _Row, tok: int, last: bool) -> bool:
        """Record one sampled token; return True when the row has finished."""
        if tok in self.stop_ids:
            row.finish_reason, row.stop_reason = "stop", tok
            self._flush(row)
            return True
        row.tokens.append(tok)
        if row.detok is not None:
            start = len(row.detok.text)
            if row.detok.push(tok) and self.params.stop:
                if self._check_stop(row, start):
                    return True
        if last:
            row.finish_reason = "length"
            self._flush(row)
            return True
        return False

    def _check_stop(self, row: _Row, start: int) -> bool:
        found = _find_stop(row.detok.text, start, self.params.stop)
        if found is None:
            return False
        row.text_end, row.stop_reason, row.finish_reason = found[0], found[1], "stop"
        return True

    def _flush(self, row: _Row) -> None:
        """Release held-back text at the end; a stop string completed by it still cuts the text."""
        if row.detok is not None:
            start = len(row.detok.text)
            if row.detok.flush() and self.params.stop:
                self._check_stop(row, start)

    def completions(self) -> list[Completion]:
        results = []
        for i, row in enumerate(self.rows):
            text = None
            if self.decode is not None:
                if row.detok is None:  # nothing needed the text during the loop: decode it now
                    row.detok = self._detokenizer(i)
                    for tok in row.tokens:
                        row.detok.push(tok)
                    row.detok.flush()
                text = row.text
            n = len(row.tokens)
            results.append(Completion(
                token_ids=row.tokens, text=text, finish_reason=row.finish_reason,
                stop_reason=row.stop_reason,
                logprobs=self.logprobs[i][:n] if self.logprobs is not None else None,
                logits=self.logits[i, :n] if self.logits is not None else None,
            ))
        return results


def generate(model: Transformer, prompts: Sequence[Sequence[int]],
             params: SamplingParams | None = None, decode: Decode | None = None, *,
             logprobs: bool = False, output_logits: bool = False,
             seeds: Sequence[int] | None = None, streaming: Sequence[int] | None = None) -> list[Completion]:
    """Complete each prompt (a list of token ids), all in one left-padded batch.

    decode: token ids -> text; needed for `Completion.text` and for stop strings.
    logprobs: also report log p(token) of every generated token under the model.
    output_logits: also report the raw logits (len(token_ids), vocab) of every generated token.
    seeds: one seed per prompt, overriding params.seed (e.g. range(n) for n independent,
      reproducible samples of one prompt).
    streaming: (n_sink, window) or (n_sink, window, chunk): generate with attention sinks
      (`lmlab.model.cache.SinkCache`, StreamingLLM) instead of a full KV cache: memory stays
      constant and positions stay below n_sink + window - 1 + chunk, so a model can go on past its
      max_seq_len. The prompt is fed `chunk` tokens at a time (default window // 4, at least 1;
      1 makes every prompt token see exactly the sinks and its window, as decoding does).

    Seeding is per prompt, as a per-request seed is in vLLM: every row is sampled as if it were
    alone with that seed, so a row's tokens do not depend on the batch it is in:
    generate([a, b], params)[0] == generate([a], params)[0], and with `seeds`,
    generate(ps, params, seeds=ss)[i] == generate([ps[i]], replace(params, seed=ss[i]))[0].
    Hence with params.seed alone, identical prompts give identical completions, and different
    prompts share their random draws; pass `seeds` for independent rows.
    Stop semantics: see `Completion`.
    """
    params = params if params is not None else SamplingParams()
    run = _Run(model, prompts, params, decode, logprobs, output_logits, False, seeds, streaming)
    for _ in run:
        pass
    return run.completions()


def stream(model: Transformer, prompt: Sequence[int], params: SamplingParams | None = None,
           decode: Decode | None = None, *, logprobs: bool = False,
           streaming: Sequence[int] | None = None) -> Iterator[StreamChunk]:
    """Generate for one prompt, yielding a `StreamChunk` per token as soon as it is sampled.

    Text is released only when it is final: never a trailing incomplete UTF-8 character, never
    text that could still turn out to start a stop string. Tokens, text, finish and stop reasons
    are exactly those of `generate(model, [prompt], params, decode)` for the same seed.
    Arguments are checked here, before the first chunk is asked for. streaming: as in `generate`.
    """
    params = params if params is not None else SamplingParams()
    run = _Run(model, [prompt], params, decode, logprobs, False, incremental=True, streaming=streaming)
    return _stream_chunks(run)


def _stream_chunks(run: _Run) -> Iterator[StreamChunk]:
    row, stops = run.rows[0], run.params.stop
    n_tokens = 0
    for _ in run:
        new_token = len(row.tokens) > n_tokens
        n_tokens = len(row.tokens)
        text = ""
        if row.detok is not None:
            full = row.detok.text
            if row.text_end is not None:  # cut at a stop string
                end = row.text_end
            elif row.finish_reason is not None:  # finished: everything was flushed
                end = len(full)
            else:  # hold back what a later token could turn into a stop string
                end = len(full) - _stop_prefix_len(full, stops)
            if end > row.emitted:
                text, row.emitted = full[row.emitted : end], end
        logprob = float(run.step_logprobs[-1][0]) if run.want_logprobs and new_token else None
        yield StreamChunk(
            token_id=row.tokens[-1] if new_token else None, text=text, logprob=logprob,
            finish_reason=row.finish_reason, stop_reason=row.stop_reason,
        )


# --- streaming (attention sinks) -------------------------------------------------------------------

def streaming_option(streaming: Sequence[int] | None) -> tuple[int, int, int] | None:
    """(n_sink, window[, chunk]) -> (n_sink, window, chunk), checked; None stays None."""
    if streaming is None:
        return None
    values = tuple(streaming)
    if len(values) not in (2, 3) or not all(isinstance(x, int) and not isinstance(x, bool) for x in values):
        raise ValueError(f"streaming={streaming!r}: give (n_sink, window) or (n_sink, window, chunk) as integers, "
                         "e.g. (4, 1020)")
    n_sink, window = values[:2]
    chunk = values[2] if len(values) == 3 else max(1, window // 4)
    if n_sink < 0 or window < 1 or chunk < 1:
        raise ValueError(f"streaming={streaming!r}: n_sink must be >= 0, window and chunk >= 1")
    return n_sink, window, chunk


def _streaming_prefill(model: Transformer, ids: torch.Tensor, mask: torch.Tensor | None, n_sink: int, window: int,
                       chunk: int):
    """Feed the (left-padded) prompts through a SinkCache, `chunk` tokens per call; returns the cache
    and the last call's hidden states. Chunks are counted back from the end, where left padding
    aligns every row's last token, so a row meets the same chunks in a batch as alone."""
    from itertools import pairwise

    from ..model.cache import SinkCache

    p = next(model.parameters())
    cache = SinkCache(model.cfg, ids.shape[0], n_sink, window, p.device, p.dtype, chunk=chunk)
    L = ids.shape[1]
    bounds = [0, *range(L % chunk or chunk, L + 1, chunk)]  # the first chunk takes the remainder
    for start, end in pairwise(bounds):
        h = model.hidden_states(ids[:, start:end], cache,
                                attention_mask=None if mask is None else mask[:, start:end])
    return cache, h
