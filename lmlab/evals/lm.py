"""What an evaluation asks of a model: log-likelihoods of continuations, of whole texts, and generations.

Two kinds of model answer these questions:

- `LM`: an lmlab model (any `--model DIR`, lmlab or Hugging Face format) with its tokenizer. It scores
  continuations in batched forward passes and generates through `lmlab.infer.Engine` (continuous batching,
  prefix caching: the k samples of one prompt share its KV blocks).
- `OpenAIEndpoint`: any OpenAI-compatible HTTP server (`lmlab serve`, a hosted model); generation only.
  Judges and red-team attackers are often such endpoints.

Both implement `Generator.generate(prompts, params) -> list[Completion]`, where a prompt is a string, a list
of token ids, or a chat (a list of {"role", "content"} messages), and `params` are lmlab's SamplingParams.

Log-likelihoods follow lm-evaluation-harness exactly, so that accuracies match it number for number:

- `(context, continuation)` pairs are tokenized as a whole, `context + continuation`, and split at the length
  of the tokenized context; trailing spaces of the context move to the continuation first (a word's leading
  space belongs to its token in byte-level BPE). An empty context is replaced by the prefix token (BOS, else
  EOS), so the first continuation token is still predicted from something.
- Texts are encoded with the tokenizer's own special-token policy (`add_special_tokens=True`: BOS for Llama
  tokenizers, nothing for GPT-2's), as Hugging Face tokenizers do by default.
- Inputs longer than the model's context keep their last `max_length + 1` tokens.
- A continuation is "greedy" when every one of its tokens is the argmax at its position.
- Rolling log-likelihoods (perplexity, bits per byte) cut the text into disjoint windows of `max_length`
  predicted tokens, each conditioned only on the token before it (the first on the prefix token).
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..infer.engine import Engine, EngineConfig
from ..infer.generate import Completion
from ..infer.sampling import SamplingParams

Prompt = str | Sequence[int] | Sequence[dict]  # text, token ids, or a chat
Params = SamplingParams | Sequence[SamplingParams]


class Generator(Protocol):
    """Anything that completes prompts: an lmlab model through the engine, or an HTTP endpoint."""

    name: str

    def generate(self, prompts: Sequence[Prompt], params: Params) -> list[Completion]: ...


def is_chat(prompt: Prompt) -> bool:
    return not isinstance(prompt, str) and len(prompt) > 0 and isinstance(prompt[0], dict)


def per_prompt(params: Params, n: int) -> list[SamplingParams]:
    """One SamplingParams per prompt: the same object for all, or a sequence of exactly n."""
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts; give one for all or one each")
    return params


class LM:
    """An lmlab model and its tokenizer, as the evaluations use them.

    batch_size: rows per scoring forward pass. max_length: the context the model is scored with (default:
    the model's max_seq_len). engine_config: how `generate` batches (default: EngineConfig())."""

    def __init__(self, model, tokenizer, *, name: str = "model", batch_size: int = 16, max_length: int | None = None,
                 engine_config: EngineConfig | None = None, progress: bool = False) -> None:
        if tokenizer is None:
            raise ValueError("evaluation needs the model's tokenizer: the checkpoint directory has none; "
                             "save one beside the weights (tokenizer.json) or pass it explicitly")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.batch_size, self.progress = batch_size, progress
        self.max_length = max_length or model.cfg.max_seq_len
        self.device = next(model.parameters()).device
        self._engine_config = engine_config
        self._engine: Engine | None = None
        self.tokens_processed = 0  # prompt, scored and generated tokens, for tokens/s in the results

    @classmethod
    def from_dir(cls, path: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None,
                 **kwargs: Any) -> LM:
        from ..model.loading import load
        from ..tokenizer.loading import load_tokenizer

        return cls(load(path, device=device, dtype=dtype), load_tokenizer(path), name=Path(path).name, **kwargs)

    # --- tokens ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is replaced by: BOS when the tokenizer has one, else EOS."""
        for name in ("bos_id", "eos_id"):
            value = getattr(self.tokenizer, name, None)
            if value is not None:
                return value
        ids = getattr(self.tokenizer, "eos_ids", None)
        if ids:
            return ids[0]
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to condition an empty context on")

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if not context:
            return [self.prefix_token_id], self.tokenizer.encode(continuation, add_special_tokens=False)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    # --- scoring --------------------------------------------------------------------------------
    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[tuple[str, str]], *, desc: str = "loglikelihood"
                      ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation tokens | context), whether they are all greedy) per (context, continuation)."""
        pairs = [self.encode_pair(c, x) for c, x in requests]
        return self.loglikelihood_tokens(pairs, desc=desc)

    @torch.inference_mode()
    def loglikelihood_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                             desc: str = "loglikelihood") -> list[tuple[float, bool]]:
        for ctx, cont in pairs:
            if not cont:
                raise ValueError("a continuation tokenized to nothing: give every choice some text")
            if not ctx:
                raise ValueError("a context tokenized to nothing: use the prefix token for an empty context")
        # the last max_length + 1 tokens; the input is all but the last, the targets all but the first
        rows = [(list(ctx) + list(cont))[-(self.max_length + 1):] for ctx, cont in pairs]
        n_cont = [min(len(cont), len(r) - 1) for (_, cont), r in zip(pairs, rows, strict=True)]
        # rows with the same input share one forward pass: the choices " A", " B", " C", " D" of a question
        # are one pass, not four
        inputs: dict[tuple[int, ...], int] = {}
        row_input = [inputs.setdefault(tuple(r[:-1]), len(inputs)) for r in rows]
        unique = list(inputs)
        readers: list[list[int]] = [[] for _ in unique]
        for i, u in enumerate(row_input):
            readers[u].append(i)
        order = sorted(range(len(unique)), key=lambda u: -len(unique[u]))  # similar lengths share a batch
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        self.tokens_processed += sum(len(u) for u in unique)
        batches = range(0, len(order), self.batch_size)
        for start in tqdm(batches, desc=desc, unit="batch", disable=not self.progress or len(batches) < 2):
            group = order[start:start + self.batch_size]
            ids = torch.zeros(len(group), max(len(unique[u]) for u in group), dtype=torch.long)
            for b, u in enumerate(group):  # right padding: causal attention never lets a token see it
                ids[b, :len(unique[u])] = torch.tensor(unique[u])
            logits = self.model(ids.to(self.device)).logits.float()
            for b, u in enumerate(group):
                end = len(unique[u])
                for i in readers[u]:
                    n = n_cont[i]
                    logp = F.log_softmax(logits[b, end - n:end], dim=-1)
                    target = torch.tensor(rows[i][-n:], device=logp.device)
                    ll = logp.gather(-1, target[:, None]).sum().item()
                    out[i] = (ll, bool((logp.argmax(-1) == target).all()))
        return out

    def rolling_windows(self, ids: Sequence[int]) -> list[tuple[list[int], int]]:
        """Disjoint windows over [prefix] + ids: (input tokens, number of predicted tokens at their end)."""
        seq = [self.prefix_token_id, *ids]
        windows = []
        for start in range(1, len(seq), self.max_length):
            end = min(start + self.max_length, len(seq))
            windows.append((seq[start - 1:end], end - start))
        return windows

    @torch.inference_mode()
    def loglikelihood_rolling(self, texts: Sequence[str], *, desc: str = "perplexity") -> list[float]:
        """log p(text) of whole texts (the sum over every token), for perplexity and bits per byte."""
        spans, pairs = [], []
        for text in texts:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if not ids:
                raise ValueError("cannot score an empty text")
            windows = self.rolling_windows(ids)
            spans.append(len(windows))
            pairs += [(w[:-n], w[-n:]) for w, n in windows]
        # the windows are scored as (context, continuation) pairs whose continuation is the predicted part
        lls = self.loglikelihood_tokens(pairs, desc=desc)
        out, at = [], 0
        for n in spans:
            out.append(sum(ll for ll, _ in lls[at:at + n]))
            at += n
        return out

    # --- generation -----------------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.model, self.tokenizer, self._engine_config)
        return self._engine

    def stop_ids(self, chat: bool) -> list[int]:
        from ..tokenizer.chat import end_of_turn_ids

        if chat:
            return end_of_turn_ids(self.tokenizer)
        return list(getattr(self.tokenizer, "eos_ids", None) or [])

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.encode(prompt)
        if is_chat(prompt):
            return self.tokenizer.render_chat(list(prompt), add_generation_prompt=True)[0]
        return list(prompt)

    def fit(self, ids: list[int], max_new_tokens: int) -> tuple[list[int], int]:
        """Prompt and budget within the model's context: the prompt keeps its last tokens, at least half the
        context's worth (a task's generous budget must not erase the question), and the budget gets the rest."""
        context = self.model.cfg.max_seq_len
        keep = max(context - max_new_tokens, context // 2)
        ids = ids[-keep:]
        return ids, min(max_new_tokens, context - len(ids))

    def generate(self, prompts: Sequence[Prompt], params: Params) -> list[Completion]:
        """Completions in the order of `prompts`, generated together by the engine. Each prompt also stops at
        the tokenizer's end-of-text (and, for chats, end-of-turn) tokens; prompt and budget are fitted to the
        model's context (`fit`)."""
        params = per_prompt(params, len(prompts))
        own = []
        for prompt, p in zip(prompts, params, strict=True):
            stops = [i for i in self.stop_ids(is_chat(prompt)) if i not in p.stop_token_ids]
            own.append(replace(p, stop_token_ids=[*p.stop_token_ids, *stops]))
        ids = []
        for k, (prompt, p) in enumerate(zip(prompts, own, strict=True)):
            prompt_ids, budget = self.fit(self.prompt_ids(prompt), p.max_new_tokens)
            ids.append(prompt_ids)
            if budget != p.max_new_tokens:
                own[k] = replace(p, max_new_tokens=budget)
        engine = self.engine
        reqs = [engine.add_request(i, p) for i, p in zip(ids, own, strict=True)]
        with tqdm(total=len(reqs), desc="generate", unit="req", disable=not self.progress or len(reqs) < 2) as bar:
            done = 0
            while any(not r.finished for r in reqs):
                engine.step()
                now = sum(r.finished for r in reqs)
                bar.update(now - done)
                done = now
        self.tokens_processed += sum(len(r.tokens) for r in reqs)
        return [r.completion() for r in reqs]


class EndpointError(RuntimeError):
    """The endpoint answered with an error or not at all."""


class OpenAIEndpoint:
    """A model behind an OpenAI-compatible HTTP API (`lmlab serve`, vLLM, a hosted model).

    Text and token-id prompts go to /v1/completions, chats to /v1/chat/completions; `workers` requests run
    concurrently. Only the text comes back (Completion.token_ids is empty)."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout: float = 120.0,
                 workers: int = 8) -> None:
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.name, self.api_key, self.timeout, self.workers = model, api_key, timeout, workers

    def _post(self, path: str, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base_url + path, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise EndpointError(f"{self.base_url}{path} answered HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            raise EndpointError(f"cannot reach {self.base_url}{path}: {e}; is the server running?") from None

    def _one(self, prompt: Prompt, p: SamplingParams) -> Completion:
        body: dict[str, Any] = {"model": self.name, "max_tokens": p.max_new_tokens, "temperature": p.temperature,
                                "top_p": p.top_p}
        if p.seed is not None:
            body["seed"] = p.seed
        if p.stop:
            body["stop"] = list(p.stop)
        if is_chat(prompt):
            data = self._post("/chat/completions", {**body, "messages": list(prompt)})
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        else:
            data = self._post("/completions", {**body, "prompt": prompt if isinstance(prompt, str) else list(prompt)})
            choice = data["choices"][0]
            text = choice["text"]
        reason = choice.get("finish_reason") or "stop"
        return Completion(token_ids=[], text=text, finish_reason="length" if reason == "length" else "stop")

    def generate(self, prompts: Sequence[Prompt], params: Params) -> list[Completion]:
        params = per_prompt(params, len(prompts))
        with ThreadPoolExecutor(max(1, min(self.workers, len(prompts)))) as pool:
            return list(pool.map(self._one, prompts, params))


def bits_per_byte(loglikelihood: float, n_bytes: int) -> float:
    """-log2 p(text) / bytes: the model's compression rate, comparable across tokenizers."""
    return -loglikelihood / (n_bytes * math.log(2))
