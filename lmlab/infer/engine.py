"""The serving engine: many requests at once over a paged KV cache, with continuous batching, chunked
prefill, preemption, prefix caching and speculative decoding (requests in, tokens out).

Each `step()` is one scheduler iteration (the iteration-level scheduling of Yu et al. 2022, "Orca"):

1. Schedule, under a budget of `max_batch_tokens` fed tokens. Running requests first, oldest first: a
   decoding request feeds its newest token (plus k drafted tokens with speculative decoding), a request
   still prefilling feeds the next chunk of its prompt (chunked prefill: a long prompt is spread over
   several steps, so it never stalls the others' decoding). Each gets the KV blocks it needs; when none
   are free, the newest running request is *preempted by recompute*: its blocks are freed and it goes
   back to the front of the queue, to prefill prompt + output again later (Kwon et al. 2023, sec. 4.5).
   Then, if nothing was preempted, waiting requests join, oldest first, as long as budget, blocks and
   `max_num_seqs` allow; a joining request first takes whatever prefix of its prompt the prefix cache
   holds (paged.py), and computes only the rest.
2. One forward pass over the scheduled tokens, packed end to end into one sequence (or, for models that
   cannot run packed, rows of similar length batched together; see `_forward`), reading and writing the
   paged cache.
3. Sample the next token of every request whose fed tokens reached its end (penalties, temperature,
   top-k/p, min-p, per request; logit masks of constrained requests), or verify its drafted tokens;
   append, check stop conditions, stream the new text, and free the blocks of finished requests.

A request's randomness comes from its own generator when it carries a seed, drawn exactly as
`generate` draws it, so a seeded request gives the same tokens here as alone. Greedy requests give
the tokens of `generate(model, [prompt], params)`.

Speculative decoding (Leviathan et al. 2023; speculative.py has the acceptance rule): with a draft
model, the draft proposes k tokens autoregressively over its own paged pool (same block tables as the
target, so no extra bookkeeping), and the target scores all k + 1 positions in the same forward pass
as everyone else's tokens; with prompt lookup ("ngram"), proposals are copied from earlier text.
Rejected tokens leave garbage keys and values past the request's length, which the next step
overwrites. Requests with a repetition penalty or a constraint decode one token at a time.

Models with recurrent layers (linear attention, SSM; hybrids too): each running request also holds a
state slot (paged.py), taken when it joins and given back when it finishes or is preempted. Prefix
caching is off for them (a cached prefix holds attention keys and values, not the state after it) and
speculative decoding is refused (a rejected draft cannot be taken back out of a state).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..model import Transformer
from .generate import DETOKENIZE_CONTEXT, Completion, IncrementalDetokenizer, StreamChunk, _find_stop, _stop_prefix_len
from .paged import BlockPool, PagedKVCache, group_by_length, packable
from .sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_temperature,
    min_p_filter,
    sample_from_logits,
    top_k_filter,
    top_p_filter,
)

SPECULATIVE_KINDS = (None, "draft", "ngram")
DEFAULT_KV_BYTES = 2 * 2**30  # the pool's default ceiling when num_blocks is not given


@dataclass
class EngineConfig:
    """How the engine batches and caches.

    block_size: tokens per KV block.
    num_blocks: KV blocks in the pool; None: room for max_num_seqs full contexts, but at most 2 GiB.
    max_num_seqs: requests generated at the same time at most (the rest wait in the queue).
    max_batch_tokens: tokens fed in one step at most (decodes + prefill chunks + drafts).
    prefix_caching: share the KV blocks of common prompt prefixes between requests.
    speculative: None, "draft" (a draft model proposes; pass Engine(draft=...)) or "ngram" (prompt lookup).
    num_speculative_tokens: k, the tokens proposed per step.
    """

    block_size: int = 16
    num_blocks: int | None = None
    max_num_seqs: int = 32
    max_batch_tokens: int = 512
    prefix_caching: bool = True
    speculative: str | None = None
    num_speculative_tokens: int = 4

    def validate(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"EngineConfig.{name}={getattr(self, name)!r} is invalid; allowed: {allowed}")

        for name in ("block_size", "max_num_seqs", "max_batch_tokens", "num_speculative_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, "an integer >= 1")
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or self.num_blocks < 1):
            raise bad("num_blocks", "None or an integer >= 1")
        if self.max_batch_tokens < self.max_num_seqs:
            raise bad("max_batch_tokens", f">= max_num_seqs ({self.max_num_seqs}), so every running request can "
                                          "feed a token each step")
        if self.speculative not in SPECULATIVE_KINDS:
            raise bad("speculative", f"one of {SPECULATIVE_KINDS}")


@dataclass
class EngineStats:
    running: int
    waiting: int
    blocks_used: int
    blocks_total: int
    prompt_tokens: int
    generated_tokens: int
    finished_requests: int
    preemptions: int
    prefix_hit_tokens: int
    spec_drafted: int
    spec_accepted: int


class Request:
    """One request's state: its tokens, its place in the paged cache, its sampling state and its output."""

    def __init__(self, request_id: str, prompt: list[int], params: SamplingParams, logprobs: int | None,
                 constraint, on_chunk, decode, vocab_size: int, device):
        self.id, self.prompt, self.params = request_id, prompt, params
        self.tokens = list(prompt)  # prompt + output: what the cache must hold
        self.output: list[int] = []
        self.num_computed = 0  # tokens whose keys/values are in the cache
        self.table: list[int] = []  # KV blocks
        self.slot: int | None = None  # recurrent-state slot while running (models with linear attention / SSM)
        self.registered = 0  # leading full blocks entered into the prefix cache
        self.draft_computed = 0  # the same, in the draft model's pool
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.want_logprobs = logprobs
        self.logprobs: list[float] | None = [] if logprobs is not None else None
        self.top_logprobs: list[list[tuple[int, float]]] | None = [] if logprobs else None
        self.constraint, self.on_chunk = constraint, on_chunk
        self.stop_ids = frozenset(params.stop_token_ids)
        self.detok = IncrementalDetokenizer(decode, prompt[-DETOKENIZE_CONTEXT:]) if decode is not None else None
        self.text_end: int | None = None
        self.emitted = 0
        self.generator = None
        if params.seed is not None and not params.greedy:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.seen = None  # tokens of prompt + output, for the repetition penalty
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(prompt, device=device)] = True
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str | None:
        return None if self.detok is None else self.detok.text[: self.text_end]

    def completion(self) -> Completion:
        return Completion(token_ids=list(self.output), text=self.text, finish_reason=self.finish_reason,
                          stop_reason=self.stop_reason, logprobs=self.logprobs, top_logprobs=self.top_logprobs)

    def __repr__(self) -> str:
        return (f"Request({self.id!r}, prompt={len(self.prompt)} tokens, output={len(self.output)}, "
                f"finish_reason={self.finish_reason!r})")


@dataclass
class _Row:
    """One request's part of a step: the tokens it feeds and what it does with the logits."""

    req: Request
    feed: list[int]
    drafts: list[int]  # speculative proposals (the tail of feed)
    draft_probs: torch.Tensor | None = None  # (k, V) the draft model's distributions, None for prompt lookup
    sample: bool = True  # False while prefilling a prompt chunk that does not reach its end


class Engine:
    """Requests in, tokens out. See the module docstring; not thread-safe (one thread owns it)."""

    def __init__(self, model: Transformer, tokenizer=None, config: EngineConfig | None = None,
                 draft: Transformer | None = None):
        self.config = config = config if config is not None else EngineConfig()
        config.validate()
        if config.speculative == "draft" and draft is None:
            raise ValueError("EngineConfig.speculative='draft' needs a draft model: Engine(model, draft=...)")
        if draft is not None:
            if config.speculative is None:
                config.speculative = "draft"
            if config.speculative != "draft":
                raise ValueError(f"a draft model was given but EngineConfig.speculative={config.speculative!r}")
            if draft.cfg.vocab_size > model.cfg.vocab_size:
                raise ValueError(f"the draft model's vocabulary ({draft.cfg.vocab_size}) is larger than the target's "
                                 f"({model.cfg.vocab_size}): they cannot share a tokenizer")
        self.model, self.draft, self.tokenizer = model.eval(), None if draft is None else draft.eval(), tokenizer
        cfg = model.cfg
        if (cfg.recurrent or (draft is not None and draft.cfg.recurrent)) and config.speculative is not None:
            raise ValueError("speculative decoding rolls rejected tokens back out of the cache, which a recurrent "
                             "state (linear attention, SSM) cannot do; serve this model without speculation")
        self.max_model_len = cfg.max_seq_len
        self.vocab_size = cfg.vocab_size
        param = next(model.parameters())
        self.device, dtype = param.device, param.dtype
        bs = config.block_size
        per_seq = -(-self.max_model_len // bs) + 1  # + 1: room for speculative tokens past the end
        num_blocks = config.num_blocks
        if num_blocks is None:
            per_block = PagedKVCache.bytes_per_block(cfg, bs, dtype)
            if draft is not None:
                per_block += PagedKVCache.bytes_per_block(draft.cfg, bs, dtype)
            num_blocks = max(per_seq, min(config.max_num_seqs * per_seq, DEFAULT_KV_BYTES // max(per_block, 1)))
        if num_blocks < per_seq:
            raise ValueError(f"num_blocks={num_blocks} cannot hold one full context of max_model_len="
                             f"{self.max_model_len} tokens in blocks of {bs}; use num_blocks >= {per_seq}")
        # A cached prefix gives back attention keys and values, not the recurrent state after that prefix.
        self.blocks = BlockPool(num_blocks, bs, config.prefix_caching and not cfg.recurrent)
        self.kv = PagedKVCache(cfg, num_blocks, bs, self.device, dtype, num_slots=config.max_num_seqs)
        self._free_slots = list(range(config.max_num_seqs - 1, -1, -1)) if cfg.recurrent else []
        self.draft_kv = None
        if self.draft is not None:
            dparam = next(self.draft.parameters())
            self.draft_kv = PagedKVCache(self.draft.cfg, num_blocks, bs, dparam.device, dparam.dtype)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # unfinished, by id
        self._ids = itertools.count()
        self._stats = dict(prompt_tokens=0, generated_tokens=0, finished_requests=0, preemptions=0,
                           prefix_hit_tokens=0, spec_drafted=0, spec_accepted=0)

    # --- requests ------------------------------------------------------------------------------
    def add_request(self, prompt: Sequence[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None, logprobs: int | None = None, constraint=None,
                    on_chunk: Callable[[Request, StreamChunk], None] | None = None) -> Request:
        """Queue a prompt (token ids). logprobs: None for none, 0 for the chosen token's, n > 0 for the n most
        likely alternatives too. on_chunk(request, chunk) is called from step() for every new token and once
        more at the end. Raises ValueError for a request that can never be served."""
        params = params if params is not None else SamplingParams()
        params.validate()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty; generation needs at least one token (BOS)")
        lo, hi = min(prompt), max(prompt)
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"the prompt has token id {lo if lo < 0 else hi} outside the model's vocabulary "
                             f"[0, {self.vocab_size})")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt)} tokens; this model's context is {self.max_model_len}, "
                             "which must hold the prompt and at least one generated token")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop strings {params.stop} need a tokenizer; give Engine(tokenizer=...) or use "
                             "stop_token_ids")
        if logprobs is not None and (not isinstance(logprobs, int) or logprobs < 0 or logprobs > self.vocab_size):
            raise ValueError(f"logprobs={logprobs!r}: give None, 0 (the chosen token) or a number of alternatives "
                             f"up to the vocabulary size {self.vocab_size}")
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
            while request_id in self.requests:
                request_id = f"req-{next(self._ids)}"
        elif request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use by an unfinished request")
        decode = self.tokenizer.decode if self.tokenizer is not None else None
        req = Request(request_id, prompt, params, logprobs, constraint, on_chunk, decode, self.vocab_size,
                      self.device)
        self.requests[request_id] = req
        self.waiting.append(req)
        self._stats["prompt_tokens"] += len(prompt)
        return req

    def abort(self, request_id: str) -> bool:
        """Cancel an unfinished request: its blocks are freed now, and it finishes with reason "abort"."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        if req in self.running:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._finish(req, "abort", None)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def run(self) -> None:
        while self.requests:
            self.step()

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 logprobs: int | None = None) -> list[Completion]:
        """Add every prompt (one params for all, or one each), run until all are done, return in order."""
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        reqs = [self.add_request(p, sp, logprobs=logprobs) for p, sp in zip(prompts, params, strict=True)]
        while any(not r.finished for r in reqs):
            self.step()
        return [r.completion() for r in reqs]

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.running), waiting=len(self.waiting), blocks_used=self.blocks.num_used,
                           blocks_total=self.blocks.num_blocks, **self._stats)

    # --- one iteration -------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Schedule, run one forward pass, sample, and return the requests that finished in this step."""
        rows = self._schedule()
        if not rows:
            return []
        if self.config.speculative == "draft":
            self._draft_proposals([r for r in rows if r.drafts])
        logits = self._forward(self.model, self.kv, rows, [r.req.num_computed for r in rows])
        finished = []
        plain = []
        for row, lg in zip(rows, logits, strict=True):
            req = row.req
            if row.drafts:
                if self._verify(row, lg):
                    finished.append(req)
                continue
            req.num_computed += len(row.feed)
            self._register(req)
            if row.sample:
                plain.append((req, lg[-1]))
        if plain:
            finished += self._sample([r for r, _ in plain], torch.stack([lg for _, lg in plain]))
        return finished

    def _schedule(self) -> list[_Row]:
        budget = self.config.max_batch_tokens
        rows: list[_Row] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            todo = len(req.tokens) - req.num_computed
            n = min(todo, budget)
            drafts = self._propose(req, budget - 1) if todo == 1 else []
            while not self._reserve(req, req.num_computed + n + len(drafts)):
                if drafts:  # first give up the speculation, then preempt
                    drafts = []
                    continue
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                rows.append(_Row(req, req.tokens[req.num_computed : req.num_computed + n] + drafts, drafts,
                                 sample=n == todo))
                budget -= n + len(drafts)
                i += 1
        while (self.waiting and not preempted and budget > 0
               and len(self.running) < self.config.max_num_seqs):
            req = self.waiting[0]
            if req.num_computed == 0 and not req.table:  # look up cached prefix blocks (never the last token)
                req.table = self.blocks.lookup(req.tokens, (len(req.tokens) - 1) // self.config.block_size)
                req.num_computed = req.registered = len(req.table) * self.config.block_size
                self._stats["prefix_hit_tokens"] += req.num_computed
            todo = len(req.tokens) - req.num_computed
            n = min(todo, budget)
            if not self._reserve(req, req.num_computed + n):
                # a waiting request holds no blocks: running ones may need them before it gets its turn
                self.blocks.release(req.table)
                req.table, req.num_computed, req.registered = [], 0, 0
                break
            self.waiting.popleft()
            self.running.append(req)
            if self.kv.recurrent:
                req.slot = self._free_slots.pop()
            rows.append(_Row(req, req.tokens[req.num_computed : req.num_computed + n], [], sample=n == todo))
            budget -= n
        return rows

    def _reserve(self, req: Request, n_tokens: int) -> bool:
        """Grow req's block table to hold n_tokens; False when the pool has too few free blocks."""
        need = -(-n_tokens // self.config.block_size) - len(req.table)
        if need <= 0:
            return True
        if need > self.blocks.num_free:
            return False
        req.table += self.blocks.allocate(need)
        return True

    def _preempt(self, req: Request) -> None:
        """Recompute later: free the blocks, keep the tokens, requeue at the front."""
        self.blocks.release(req.table)
        req.table, req.num_computed, req.registered, req.draft_computed = [], 0, 0, 0
        self._release_slot(req)
        self.waiting.appendleft(req)
        self._stats["preemptions"] += 1

    def _release_slot(self, req: Request) -> None:
        if req.slot is not None:
            self._free_slots.append(req.slot)
            req.slot = None

    def _register(self, req: Request) -> None:
        full = min(req.num_computed, len(req.tokens)) // self.config.block_size
        if full > req.registered:
            self.blocks.register(req.table, req.tokens, req.registered, full)
            req.registered = full

    # --- the model -----------------------------------------------------------------------------
    def _forward(self, model: Transformer, kv: PagedKVCache, rows: Sequence[_Row],
                 context: Sequence[int]) -> list[torch.Tensor]:
        """Feed each row's tokens after its context (tokens already cached); return each row's logits at the
        positions it needs: all fed positions for speculative rows, the last one otherwise.

        Models of plain attention layers run one packed pass: every row's tokens end to end in one sequence,
        so the matrix products see only real tokens (paged.PackedStep). Others (recurrent layers, MLA, ALiBi)
        pad rows to a common length within a pass; rows of very different lengths (a prefill chunk and many
        single-token decodes) go into separate passes (paged.group_by_length)."""
        picks = [list(range(len(r.feed))) if r.drafts else [len(r.feed) - 1] for r in rows]
        if packable(model):
            step = kv.packed_step([r.req.table for r in rows], context, [len(r.feed) for r in rows])
            ids = torch.tensor([t for r in rows for t in r.feed], device=self.device)[None]
            h = model.hidden_states(ids, step, positions=step.positions)[0]
            offsets = itertools.accumulate((len(r.feed) for r in rows), initial=0)
            idx = torch.tensor([o + p for o, ps in zip(offsets, picks, strict=False) for p in ps], device=h.device)
            return list(model.logits(h[idx]).float().split([len(ps) for ps in picks]))
        out: list[torch.Tensor | None] = [None] * len(rows)
        for group in group_by_length([len(r.feed) for r in rows]):
            T = len(rows[group[0]].feed)
            ids = torch.zeros(len(group), T, dtype=torch.long)
            for g, i in enumerate(group):
                ids[g, : len(rows[i].feed)] = torch.tensor(rows[i].feed)
            step = kv.step([rows[i].req.table for i in group], [context[i] for i in group],
                           [len(rows[i].feed) for i in group],
                           [rows[i].req.slot for i in group] if kv.recurrent else None)
            h = model.hidden_states(ids.to(self.device), step, positions=step.positions)
            r_idx = torch.tensor([g for g, i in enumerate(group) for _ in picks[i]], device=h.device)
            p_idx = torch.tensor([p for i in group for p in picks[i]], device=h.device)
            logits = model.logits(h[r_idx, p_idx]).float()
            for i, chunk in zip(group, logits.split([len(picks[i]) for i in group]), strict=True):
                out[i] = chunk
        return out

    # --- sampling ------------------------------------------------------------------------------
    def _processed(self, reqs: Sequence[Request], logits: torch.Tensor) -> torch.Tensor:
        """Each row's logits through its request's constraint mask, penalty, temperature and filters, the
        pipeline of sampling.process_logits with one parameter per row (float32)."""
        logits = logits.float()
        for i, req in enumerate(reqs):
            if req.constraint is not None:
                logits[i] = logits[i].masked_fill(~req.constraint.allowed().to(logits.device), float("-inf"))
        ps = [r.params for r in reqs]
        if any(p.repetition_penalty != 1.0 for p in ps):
            seen = torch.stack([r.seen if r.seen is not None else torch.zeros_like(logits[0], dtype=torch.bool)
                                for r in reqs])
            penalty = torch.tensor([p.repetition_penalty for p in ps])
            logits = apply_repetition_penalty(logits, seen, penalty)
        if all(p.greedy for p in ps):
            return logits
        logits = apply_temperature(logits, torch.tensor([p.temperature if not p.greedy else 1.0 for p in ps]))
        if any(p.top_k for p in ps):
            V = logits.shape[-1]  # top_k >= V keeps everything (and a huge k must not overflow a tensor)
            logits = top_k_filter(logits, torch.tensor([min(p.top_k or 0, V) for p in ps]))
        if any(p.top_p < 1.0 for p in ps):
            logits = top_p_filter(logits, torch.tensor([p.top_p for p in ps]))
        if any(p.min_p > 0.0 for p in ps):
            logits = min_p_filter(logits, torch.tensor([p.min_p for p in ps]))
        return logits

    @staticmethod
    def _pick(reqs: Sequence[Request], logits: torch.Tensor) -> torch.Tensor:
        """One token per row of processed logits: the argmax for greedy requests, a draw from each sampled
        request's own generator (or the global RNG) otherwise; greedy rows draw no noise."""
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, r in enumerate(reqs) if not r.params.greedy]
        if sampled:
            idx = torch.tensor(sampled, device=logits.device)
            tokens[idx] = sample_from_logits(logits[idx], [reqs[i].generator for i in sampled])
        return tokens

    def _sample(self, reqs: list[Request], raw: torch.Tensor) -> list[Request]:
        """The next token of each request from its raw logits (R, V); returns the requests that finished."""
        tokens = self._pick(reqs, self._processed(reqs, raw))
        logprobs = raw.float().log_softmax(dim=-1) if any(r.want_logprobs is not None for r in reqs) else None
        finished = []
        for i, (req, tok) in enumerate(zip(reqs, tokens.tolist(), strict=True)):
            if self._append(req, tok, None if logprobs is None else logprobs[i]):
                finished.append(req)
        return finished

    def _append(self, req: Request, tok: int, logprobs: torch.Tensor | None) -> bool:
        """Record one new token of req (logprobs: its step's log-softmax over the raw logits, or None), check
        the stop conditions, stream it; return True when req has finished."""
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        if tok in req.stop_ids:
            self._finish(req, "stop", tok)
            return True
        lp = top = None
        if req.want_logprobs is not None:
            lp = float(logprobs[tok])
            req.logprobs.append(lp)
            if req.want_logprobs > 0:
                values, ids = logprobs.topk(req.want_logprobs)
                top = list(zip(ids.tolist(), values.tolist(), strict=True))
                req.top_logprobs.append(top)
        req.output.append(tok)
        req.tokens.append(tok)
        self._stats["generated_tokens"] += 1
        if req.seen is not None:
            req.seen[tok] = True
        if req.constraint is not None:
            req.constraint.advance(tok)
        reason = stop = None
        if req.detok is not None:
            start = len(req.detok.text)
            if req.detok.push(tok) and req.params.stop:
                found = _find_stop(req.detok.text, start, req.params.stop)
                if found is not None:
                    req.text_end, stop, reason = found[0], found[1], "stop"
        if reason is None:
            if len(req.output) >= req.params.max_new_tokens or len(req.tokens) >= self.max_model_len:
                reason = "length"
            elif req.constraint is not None and req.constraint.finished:
                reason = "stop"
        if reason is not None:
            self._finish(req, reason, stop, last_token=(tok, lp, top))
            return True
        if req.on_chunk is not None:
            req.on_chunk(req, StreamChunk(tok, self._new_text(req), lp, top_logprobs=top))
        return False

    def _new_text(self, req: Request) -> str:
        """The stable text since the last chunk: held back while it could still begin a stop string."""
        if req.detok is None:
            return ""
        full = req.detok.text
        if req.text_end is not None:
            end = req.text_end
        elif req.finished:
            end = len(full)
        else:
            end = len(full) - _stop_prefix_len(full, req.params.stop)
        if end <= req.emitted:
            return ""
        text, req.emitted = full[req.emitted : end], end
        return text

    def _finish(self, req: Request, reason: str, stop: int | str | None, last_token=None) -> None:
        if req.detok is not None and reason != "abort":
            start = len(req.detok.text)
            if req.detok.flush() and req.params.stop and req.text_end is None:
                found = _find_stop(req.detok.text, start, req.params.stop)
                if found is not None:
                    req.text_end, stop, reason = found[0], found[1], "stop"
        req.finish_reason, req.stop_reason, req.finish_time = reason, stop, time.monotonic()
        if req in self.running:
            self.running.remove(req)
        self.blocks.release(req.table)
        req.table = []
        self._release_slot(req)
        self.requests.pop(req.id, None)
        self._stats["finished_requests"] += 1
        if req.on_chunk is not None:
            tok, lp, top = last_token if last_token is not None else (None, None, None)
            req.on_chunk(req, StreamChunk(tok, self._new_text(req), lp, reason, req.stop_reason, top))

    # --- speculative decoding ------------------------------------------------------------------
    def _propose(self, req: Request, budget: int) -> list[int]:
        """Up to k tokens to verify after req's newest token (none for requests that cannot use them)."""
        kind = self.config.speculative
        if kind is None or req.constraint is not None or req.seen is not None:
            return []
        # a draft past the output limit or the context would be thrown away
        k = min(self.config.num_speculative_tokens, budget,
                req.params.max_new_tokens - len(req.output) - 1, self.max_model_len - len(req.tokens) - 1)
        if kind == "draft":
            k = min(k, self.draft.cfg.max_seq_len - len(req.tokens))
            return [0] * k if k > 0 else []  # placeholders: the draft model fills them in _draft_proposals
        if k <= 0:
            return []
        from .speculative import ngram_propose

        return ngram_propose(req.tokens, k)

    def _draft_proposals(self, rows: list[_Row]) -> None:
        """Run the draft model k steps for the speculative rows, writing its proposals into each row's feed
        (where _propose left placeholders) and its distributions into row.draft_probs."""
        if not rows:
            return
        V = self.vocab_size
        reqs = [r.req for r in rows]
        feeds = [_Row(r.req, r.req.tokens[r.req.draft_computed :], []) for r in rows]
        context = [r.req.draft_computed for r in rows]
        probs: list[list[torch.Tensor]] = [[] for _ in rows]
        for j in range(max(len(r.drafts) for r in rows)):
            live = [i for i, r in enumerate(rows) if j < len(r.drafts)]
            step_rows = [feeds[i] for i in live]
            logits = self._forward(self.draft, self.draft_kv, step_rows, [context[i] for i in live])
            raw = torch.stack([lg[-1] for lg in logits])
            if raw.shape[-1] < V:  # a smaller draft vocabulary: the rest has probability 0
                raw = torch.nn.functional.pad(raw, (0, V - raw.shape[-1]), value=float("-inf"))
            sub = [reqs[i] for i in live]
            processed = self._processed(sub, raw)
            tokens = self._pick(sub, processed)
            q = processed.softmax(dim=-1)
            for n, i in enumerate(live):
                tok = int(tokens[n])
                rows[i].drafts[j] = tok
                probs[i].append(q[n])
                context[i] += len(feeds[i].feed)
                feeds[i] = _Row(reqs[i], [tok], [])
        for i, row in enumerate(rows):
            row.feed[-len(row.drafts) :] = row.drafts
            row.draft_probs = torch.stack(probs[i])
            row.req.draft_computed = context[i]  # the last proposal was never fed

    def _verify(self, row: _Row, logits: torch.Tensor) -> bool:
        """Accept a prefix of row's drafts by the target's logits (k + 1, V) and append the accepted tokens and
        one more; return True when the request finished."""
        from .speculative import verify_greedy, verify_sampled

        req, drafts = row.req, row.drafts
        k = len(drafts)
        processed = self._processed([req] * (k + 1), logits)
        if req.params.greedy:
            tokens = verify_greedy(drafts, processed)
        else:
            tokens = verify_sampled(drafts, row.draft_probs, processed.softmax(dim=-1), req.generator)
        accepted = len(tokens) - 1
        self._stats["spec_drafted"] += k
        self._stats["spec_accepted"] += accepted
        # keys/values of the rejected drafts are garbage: the request's length ends after the accepted ones
        before = len(req.tokens)
        req.num_computed = before + accepted
        if self.draft is not None:
            req.draft_computed = min(req.draft_computed, before + accepted)
        self._register(req)
        logprobs = logits.log_softmax(dim=-1) if req.want_logprobs is not None else None
        for j, tok in enumerate(tokens):
            if self._append(req, tok, None if logprobs is None else logprobs[j]):
                return True
        return False
