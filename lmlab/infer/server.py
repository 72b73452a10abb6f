"""An OpenAI-compatible HTTP server over the `Engine`: `/v1/models`, `/v1/completions`, `/v1/chat/completions`
(streamed as server-sent events), `/health`, `/metrics` (Prometheus text) and a chat page at `/`.

    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=32))
    serve(engine, model_name="tiny", port=8000)          # what `lmlab serve` runs

How the pieces meet. The engine is not thread-safe and its `step()` blocks, so one background thread owns it
(`EngineLoop`): HTTP handlers, on uvicorn's asyncio loop, hand it requests and aborts through a thread-safe queue,
and it runs `step()` while anything is unfinished, sleeping on the queue when idle. Every new token reaches the
engine's `on_chunk` callback on that thread, which passes it to the asyncio loop with `call_soon_threadsafe`, onto the
queue of the HTTP request it belongs to (`Job`). A request's handler reads its queue and either streams each chunk as
an event or collects the whole answer. A client that goes away aborts its engine requests, freeing their KV blocks.

Shutdown (SIGTERM, SIGINT): uvicorn stops accepting connections and waits for the responses in flight, streams
included; only then does the lifespan's shutdown stop the engine thread. A second SIGINT forces the exit.

The request and response shapes, tool-call parsing and the metrics text are in api.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import queue
import signal
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Any

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError("the server needs fastapi and uvicorn: pip install 'lmlab[serve]'") from e

from ..tokenizer.chat import ChatTemplateError, end_of_turn_ids
from .api import (
    MAX_SEQUENCES,
    APIError,
    ChatCompletionRequest,
    ChoiceResult,
    CompletionRequest,
    SamplingRequest,
    ToolParsing,
    chat_logprobs,
    check_chat_supported,
    check_supported,
    choice_seed,
    completion_logprobs,
    forced_tool,
    render_metrics,
    sse,
    tool_call_schema,
    usage,
    validate_request,
)
from .engine import Engine, EngineStats
from .generate import StreamChunk
from .sampling import SamplingParams

logger = logging.getLogger("lmlab.serve")

DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20
ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")


# --- the engine's thread -----------------------------------------------------------------------
@dataclass
class Event:
    """What the engine thread tells a Job about one of its engine requests."""

    choice: int
    kind: str  # "accepted", "chunk" or "error"
    chunk: StreamChunk | None = None
    error: str = ""
    status: int = 400


@dataclass
class Submission:
    """One engine request and where its events go (`sink` is called on the engine thread)."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    choice: int
    sink: Callable[[Event], None]
    logprobs: int | None = None
    constraint: Any = None


class EngineLoop:
    """Runs an Engine on a thread of its own. `submit` and `abort` may be called from any thread; everything else
    the engine does happens on its thread. Keeps a snapshot of the engine's stats, a short history of the generated
    token count (for tokens/s) and the finish reasons, for /metrics."""

    def __init__(self, engine: Engine, window_s: float = 10.0):
        self.engine, self.window_s = engine, window_s
        self.error: str | None = None  # set when the engine failed in a way it cannot recover from
        self._inbox: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._live: dict[str, Submission] = {}  # engine thread only
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._stats = engine.stats()
        self._finished: Counter[str] = Counter()
        self._samples: deque[tuple[float, int]] = deque([(time.monotonic(), self._stats.generated_tokens)])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lmlab-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Abort whatever is unfinished and end the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, sub: Submission) -> None:
        self._put(partial(self._add, sub))

    def abort(self, request_id: str) -> None:
        self._put(partial(self._abort, request_id))

    def _put(self, command: Callable[[], None]) -> None:
        with self._lock:  # a command put before stop()'s None is always run (or refused) by the thread
            if self._closed:
                raise APIError(503, "the server is shutting down", code="service_unavailable")
            self._inbox.put(command)

    def snapshot(self) -> tuple[EngineStats, dict[str, int], float]:
        """(engine stats, finished requests by reason, generated tokens/s over the last window_s seconds)."""
        now = time.monotonic()
        with self._lock:
            stats, finished, samples = self._stats, dict(self._finished), list(self._samples)
        t0, n0 = samples[0]
        for t, n in samples:  # the newest sample at or before the window's start
            if t > now - self.window_s:
                break
            t0, n0 = t, n
        span = min(self.window_s, now - t0)
        rate = (samples[-1][1] - n0) / span if span > 0 else 0.0
        return stats, finished, rate

    # the thread
    def _run(self) -> None:
        while True:
            busy = self.engine.has_unfinished() and self.error is None
            commands = [] if busy else [self._inbox.get()]  # sleeps while there is nothing to do
            with contextlib.suppress(queue.Empty):
                while True:
                    commands.append(self._inbox.get_nowait())
            for command in commands:
                if command is None:
                    self._shutdown()
                    return
                command()
            if self.engine.has_unfinished() and self.error is None:
                try:
                    self.engine.step()
                except Exception as e:  # a bug or an out-of-memory: fail the requests in flight, not the server
                    self._fail(e)
            self._publish()

    def _add(self, sub: Submission) -> None:
        if self._closed or self.error is not None:
            reason = "the server is shutting down" if self._closed else f"the engine failed: {self.error}"
            sub.sink(Event(sub.choice, "error", error=reason, status=503))
            return
        try:
            self.engine.add_request(sub.prompt, sub.params, request_id=sub.request_id, logprobs=sub.logprobs,
                                    constraint=sub.constraint, on_chunk=self._on_chunk)
        except ValueError as e:
            sub.sink(Event(sub.choice, "error", error=str(e)))
            return
        self._live[sub.request_id] = sub
        sub.sink(Event(sub.choice, "accepted"))

    def _abort(self, request_id: str) -> None:
        if request_id in self._live:
            self.engine.abort(request_id)

    def _on_chunk(self, request, chunk: StreamChunk) -> None:
        sub = self._live.get(request.id)
        if sub is None:
            return
        if chunk.finish_reason is not None:
            del self._live[request.id]
            with self._lock:
                self._finished[chunk.finish_reason] += 1
        sub.sink(Event(sub.choice, "chunk", chunk))

    def _fail(self, error: Exception) -> None:
        logger.exception("the engine failed; failing the %d requests in flight", len(self._live))
        for request_id, sub in list(self._live.items()):
            sub.sink(Event(sub.choice, "error", error=f"the engine failed: {error!r}", status=500))
            self._live.pop(request_id, None)
            with contextlib.suppress(Exception):
                self.engine.abort(request_id)
        if self.engine.has_unfinished():  # the engine's state is broken: refuse new requests from now on
            self.error = repr(error)

    def _shutdown(self) -> None:
        for request_id in list(self._live):
            with contextlib.suppress(Exception):
                self.engine.abort(request_id)
        with contextlib.suppress(queue.Empty):  # commands that raced stop(): refused
            while (command := self._inbox.get_nowait()) is not None:
                command()
        self._publish()

    def _publish(self) -> None:
        stats, now = self.engine.stats(), time.monotonic()
        with self._lock:
            self._stats = stats
            if now - self._samples[-1][0] < 0.05:  # at most ~20 samples a second, however fast the steps
                self._samples[-1] = (now, stats.generated_tokens)
            else:
                self._samples.append((now, stats.generated_tokens))
            while len(self._samples) > 2 and self._samples[1][0] <= now - self.window_s:
                self._samples.popleft()


class Job:
    """The engine requests behind one HTTP request (n choices of each prompt), whose events arrive, in order per
    choice, on one asyncio queue. Create it on the event loop."""

    def __init__(self, engine_loop: EngineLoop, prefix: str):
        self.engine_loop = engine_loop
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.prefix = prefix
        self.request_ids: list[str] = []
        self._early: deque[Event] = deque()  # chunks that came while start() waited for the other choices
        self.finished = False

    def sink(self, event: Event) -> None:  # called on the engine thread
        with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def start(self, specs: Sequence[tuple[list[int], SamplingParams, int | None, Any]]) -> None:
        """Submit (prompt, params, logprobs, constraint) per choice; return once the engine accepted them all, or
        raise the first refusal (a 400) after aborting the others."""
        for choice, (prompt, params, logprobs, constraint) in enumerate(specs):
            request_id = f"{self.prefix}-{choice}"
            self.request_ids.append(request_id)
            self.engine_loop.submit(Submission(request_id, prompt, params, choice, self.sink, logprobs, constraint))
        pending, error = set(range(len(specs))), None
        while pending:
            event = await self.queue.get()
            if event.kind == "chunk":
                self._early.append(event)
                continue
            pending.discard(event.choice)
            if event.kind == "error" and error is None:
                error = APIError(event.status, event.error)
        if error is not None:
            self.abort()
            raise error

    async def events(self) -> AsyncIterator[tuple[int, StreamChunk]]:
        """(choice, chunk) for every new token of every choice, until all have finished."""
        running = len(self.request_ids)
        while running:
            event = self._early.popleft() if self._early else await self.queue.get()
            if event.kind == "error":
                self.abort()
                raise APIError(event.status, event.error)
            if event.chunk.finish_reason is not None:
                running -= 1
            yield event.choice, event.chunk
        self.finished = True

    def abort(self) -> None:
        if not self.finished:
            for request_id in self.request_ids:
                with contextlib.suppress(APIError):
                    self.engine_loop.abort(request_id)


async def _abort_on_disconnect(receive: Callable, job: Job) -> None:
    """Wait until the client is gone, then abort its job (uvicorn reports a disconnect on the request's receive)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    job.abort()


class EventStream(StreamingResponse):
    """Server-sent events from an async generator, aborting the job when the client disconnects. (Starlette's own
    streaming response notices a departed client only at its next write, or not at all under uvicorn's h11.)"""

    def __init__(self, events: AsyncIterator[str], job: Job):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        watcher = asyncio.create_task(_abort_on_disconnect(receive, self.job))
        try:
            async for data in self.body_iterator:
                await send({"type": "http.response.body", "body": data.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the connection broke while writing
            pass
        finally:
            watcher.cancel()
            self.job.abort()  # nothing when it finished; stops generating when the stream ended early
            await self.body_iterator.aclose()


class _CountRequests:
    """ASGI middleware: counts answered requests by endpoint (known routes; anything else is "other") and status."""

    def __init__(self, app, counts: Counter):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counting_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            path = scope["path"]
            path = "/v1/models" if path.startswith("/v1/models/") else path
            self.counts[(path if path in ENDPOINTS else "other", status)] += 1


# --- the OpenAI API ----------------------------------------------------------------------------
class OpenAIServer:
    """The handlers of the HTTP API over one EngineLoop; `create_app` wires them into FastAPI."""

    def __init__(self, engine: Engine, model_name: str, api_key: str | None, max_request_bytes: int,
                 metrics_window_s: float):
        if engine.tokenizer is None:
            raise ValueError("the server needs the engine to have a tokenizer: Engine(model, tokenizer, ...)")
        if not model_name:
            raise ValueError("model_name must be a non-empty string: the name clients ask for")
        if max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
        self.engine, self.tokenizer = engine, engine.tokenizer
        self.model_name, self.api_key, self.max_request_bytes = model_name, api_key, max_request_bytes
        self.loop = EngineLoop(engine, metrics_window_s)
        self.request_counts: Counter[tuple[str, int]] = Counter()
        self.created = int(time.time())
        self.chat_stop_ids = end_of_turn_ids(self.tokenizer)
        self._compiler = None
        self._compiler_lock = threading.Lock()
        self._token_text: dict[int, tuple[str, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self.loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(self.loop.stop)

    # request plumbing
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            given = "no API key was given" if not key else "the API key is not valid"
            raise APIError(401, f"{given}; send the header 'Authorization: Bearer <key>' with the server's key",
                           code="invalid_api_key")

    async def read_json(self, request: Request) -> Any:
        limit = self.max_request_bytes
        too_large = APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                             code="request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_large
        body = bytearray()
        try:
            async for part in request.stream():
                body += part
                if len(body) > limit:
                    raise too_large
        except ClientDisconnect:
            raise APIError(400, "the client disconnected while sending the request") from None
        if not body.strip():
            raise APIError(400, "the request has no body; send a JSON object")
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist here; this server serves {self.model_name!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")

    def max_tokens(self, prompt_len: int, asked: int | None, param: str, prompt_param: str) -> int:
        """The output limit: as asked, or (None) the rest of the context; 400 when it cannot fit."""
        context = self.engine.max_model_len
        room = context - prompt_len
        if room < 1:
            raise APIError(400, f"the prompt has {prompt_len} tokens, but this model's context is {context} tokens "
                                "for the prompt and the completion together; shorten the prompt",
                           param=prompt_param, code="context_length_exceeded")
        if asked is None:
            return room
        if asked > room:
            raise APIError(400, f"{param}={asked} does not fit: the prompt has {prompt_len} tokens and this model's "
                                f"context is {context}, so at most {room} more; lower {param}",
                           param=param, code="context_length_exceeded")
        return asked

    def sampling_params(self, req: SamplingRequest, max_tokens: int, stop_ids: list[int],
                        seed: int | None) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=None if req.top_k in (None, -1) else req.top_k,
            min_p=req.min_p or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            stop=list(req.stop),
            stop_token_ids=[] if req.ignore_eos else list(stop_ids),
            seed=seed,
        )

    async def run(self, specs: list, prefix: str) -> Job:
        job = Job(self.loop, f"{prefix}-{uuid.uuid4().hex[:12]}")
        await job.start(specs)
        return job

    async def collect(self, request: Request, job: Job) -> list[ChoiceResult]:
        """Every choice's whole answer; the client leaving aborts the job."""
        choices = [ChoiceResult() for _ in job.request_ids]
        watcher = asyncio.create_task(_abort_on_disconnect(request.receive, job))
        try:
            async for choice, chunk in job.events():
                choices[choice].add(chunk)
        finally:
            watcher.cancel()
        if any(c.finish_reason == "abort" for c in choices):
            raise APIError(503, "the request was cancelled before it finished", code="cancelled")
        return choices

    def token_text(self, token_id: int) -> tuple[str, list[int]]:
        """A token as OpenAI's logprobs show it: its text and its bytes (a token may hold part of a character)."""
        found = self._token_text.get(token_id)
        if found is None:
            raw = self.tokenizer.token_bytes(token_id)
            found = self._token_text[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return found

    def compiler(self):
        """The constraint compiler, built on first use (it indexes the vocabulary)."""
        with self._compiler_lock:
            if self._compiler is None:
                try:
                    from .constrained import ConstraintCompiler

                    self._compiler = ConstraintCompiler(self.tokenizer, self.engine.vocab_size, self.chat_stop_ids)
                except ImportError as e:
                    raise APIError(400, f"this server cannot constrain output ({e}); install lmlab[serve]",
                                   code="unsupported_parameter") from None
            return self._compiler

    async def constraints(self, make: Callable[[Any], Any], n: int, param: str) -> list:
        """n fresh Constraint states from `make(compiler)`, compiled off the event loop (the compiler is
        thread-safe and caches what it compiled); a schema it cannot compile is a 400."""

        def build() -> list:
            compiler = self.compiler()
            return [make(compiler) for _ in range(n)]

        try:
            return await asyncio.to_thread(build)
        except ValueError as e:
            raise APIError(400, f"{param}: {e}", param=param) from None

    # endpoints (all coroutines: they run on the event loop, which alone touches the request counts)
    async def models(self, request: Request) -> dict:
        self.authorize(request)
        return {"object": "list", "data": [self.model_card()]}

    async def model(self, request: Request, model_id: str) -> dict:
        self.authorize(request)
        self.check_model(model_id)
        return self.model_card()

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "lmlab",
                "max_model_len": self.engine.max_model_len}

    async def health(self) -> JSONResponse:
        if self.loop.error is not None:
            return JSONResponse({"status": "error", "error": self.loop.error}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(self) -> PlainTextResponse:
        stats, finished, rate = self.loop.snapshot()
        text = render_metrics(stats, finished, rate, dict(self.request_counts), self.model_name,
                              self.engine.max_model_len)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def completions(self, request: Request):
        self.authorize(request)
        req = validate_request(CompletionRequest, await self.read_json(request))
        check_supported(req)
        self.check_model(req.model)
        n = req.n or 1
        if req.best_of not in (None, n):
            raise APIError(400, "best_of is not supported by this server (only best_of == n)", param="best_of",
                           code="unsupported_parameter")
        if req.suffix:
            raise APIError(400, "suffix (insertion) is not supported by this server", param="suffix",
                           code="unsupported_parameter")
        if req.echo and req.logprobs is not None:
            raise APIError(400, "echo with logprobs would need the prompt's logprobs, which this server does not "
                                "compute; drop one of them", param="echo", code="unsupported_parameter")
        if len(req.prompt) * n > MAX_SEQUENCES:
            raise APIError(400, f"{len(req.prompt)} prompts x n={n} is more than the {MAX_SEQUENCES} sequences one "
                                "request may ask for; split it", param="prompt")
        prompts, texts = [], []
        for p in req.prompt:
            ids = self.tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else p
            if not ids:
                raise APIError(400, "the prompt is empty (it encodes to no tokens)", param="prompt")
            bad = [t for t in ids if not 0 <= t < self.engine.vocab_size]
            if bad:
                raise APIError(400, f"the prompt has token id {bad[0]} outside the vocabulary "
                                    f"[0, {self.engine.vocab_size})", param="prompt")
            prompts.append(ids)
            texts.append(p if isinstance(p, str) else self.tokenizer.decode(p))
        specs = []
        for ids in prompts:
            limit = self.max_tokens(len(ids), req.max_tokens, "max_tokens", "prompt")
            for j in range(n):
                params = self.sampling_params(req, limit, self.tokenizer.eos_ids, choice_seed(req.seed, j))
                specs.append((ids, params, req.logprobs, None))
        job = await self.run(specs, "cmpl")
        meta = {"id": job.prefix, "object": "text_completion", "created": int(time.time()), "model": self.model_name}
        echoes = [texts[i // n] if req.echo else "" for i in range(len(specs))]
        prompt_tokens = sum(len(p) for p in prompts)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self.completion_events(job, meta, echoes, req.logprobs, prompt_tokens, include_usage)
            return EventStream(events, job)
        choices = await self.collect(request, job)
        return JSONResponse({**meta,
                "choices": [{"index": i, "text": echoes[i] + c.text,
                             "logprobs": completion_logprobs(c, req.logprobs, len(echoes[i]), self.token_text),
                             "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                            for i, c in enumerate(choices)],
                "usage": usage(prompt_tokens, sum(len(c.token_ids) for c in choices))})

    async def completion_events(self, job: Job, meta: dict, echoes: list[str], logprobs: int | None,
                                prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
        def chunk(i: int, text: str, lp: dict | None = None, finish: str | None = None, stop=None) -> str:
            body = {**meta, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish,
                                         "stop_reason": stop}]}
            return sse({**body, "usage": None} if include_usage else body)

        generated = 0
        offsets = [len(e) for e in echoes]
        try:
            for i, echo in enumerate(echoes):
                if echo:
                    yield chunk(i, echo)
            async for i, c in job.events():
                if c.finish_reason == "abort":
                    raise APIError(503, "the request was cancelled before it finished", code="cancelled")
                lp = None
                if c.token_id is not None:
                    generated += 1
                    if logprobs is not None:
                        lp = completion_logprobs(ChoiceResult.of(c), logprobs, offsets[i], self.token_text)
                if c.text or lp is not None or c.finish_reason is not None:
                    yield chunk(i, c.text, lp, c.finish_reason, c.stop_reason)
                offsets[i] += len(c.text)
            if include_usage:
                yield sse({**meta, "choices": [], "usage": usage(prompt_tokens, generated)})
        except APIError as e:
            yield sse(e.body())
        yield sse("[DONE]")

    async def chat_completions(self, request: Request):
        self.authorize(request)
        req = validate_request(ChatCompletionRequest, await self.read_json(request))
        check_chat_supported(req)
        self.check_model(req.model)
        n = req.n or 1
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        try:
            prompt = self.tokenizer.render_chat([m.for_template() for m in req.messages], add_generation_prompt=True,
                                                tools=tools)[0]
        except (ChatTemplateError, TypeError, KeyError, IndexError) as e:  # a Jinja template may fail in any way
            raise APIError(400, f"the chat template cannot render these messages: {e}", param="messages") from None
        asked, param = ((req.max_completion_tokens, "max_completion_tokens") if req.max_completion_tokens
                        else (req.max_tokens, "max_tokens"))
        limit = self.max_tokens(len(prompt), asked, param, "messages")
        constraints = [None] * n
        forced = forced_tool(req)
        fmt = req.response_format
        if forced is not None:
            schema = tool_call_schema(req.tools, forced)
            constraints = await self.constraints(lambda c: c.json_schema(schema), n, "tools")
        elif fmt is not None and fmt.type == "json_object":
            constraints = await self.constraints(lambda c: c.json_object(), n, "response_format")
        elif fmt is not None and fmt.type == "json_schema":
            schema = fmt.json_schema.schema_
            constraints = await self.constraints(lambda c: c.json_schema(schema), n, "response_format.json_schema")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        specs = [(prompt, self.sampling_params(req, limit, self.chat_stop_ids, choice_seed(req.seed, j)), logprobs,
                  constraints[j]) for j in range(n)]
        calls = ToolParsing.of(req)
        job = await self.run(specs, "chatcmpl")
        meta = {"id": job.prefix, "object": "chat.completion", "created": int(time.time()), "model": self.model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self.chat_events(job, {**meta, "object": "chat.completion.chunk"}, n, calls, req.logprobs,
                                      len(prompt), include_usage)
            return EventStream(events, job)
        choices = await self.collect(request, job)
        out = []
        for i, c in enumerate(choices):
            content, made = calls.parse(c.text) if calls else (c.text, [])
            message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
            if made:
                message["tool_calls"] = [call.to_dict() for call in made]
            out.append({"index": i, "message": message,
                        "logprobs": {"content": chat_logprobs(c, self.token_text)} if req.logprobs else None,
                        "finish_reason": "tool_calls" if made else c.finish_reason, "stop_reason": c.stop_reason})
        return JSONResponse({**meta, "choices": out,
                             "usage": usage(len(prompt), sum(len(c.token_ids) for c in choices))})

    async def chat_events(self, job: Job, meta: dict, n: int, calls: ToolParsing | None, logprobs: bool | None,
                          prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
        def chunk(i: int, delta: dict, lp: list | None = None, finish: str | None = None, stop=None) -> str:
            choice = {"index": i, "delta": delta, "logprobs": {"content": lp} if lp is not None else None,
                      "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = stop
            body = {**meta, "choices": [choice]}
            return sse({**body, "usage": None} if include_usage else body)

        parsers = [calls.stream() if calls else None for _ in range(n)]
        generated = 0
        try:
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": ""})
            async for i, c in job.events():
                if c.finish_reason == "abort":
                    raise APIError(503, "the request was cancelled before it finished", code="cancelled")
                parser = parsers[i]
                text = parser.feed(c.text) if parser is not None else c.text
                lp = None
                if c.token_id is not None:
                    generated += 1
                    if logprobs:
                        lp = chat_logprobs(ChoiceResult.of(c), self.token_text)
                if text or lp:
                    yield chunk(i, {"content": text}, lp)
                if c.finish_reason is None:
                    continue
                finish = c.finish_reason
                if parser is not None:
                    rest, made = parser.finish()
                    if rest:
                        yield chunk(i, {"content": rest})
                    if made:
                        finish = "tool_calls"
                        yield chunk(i, {"tool_calls": [{"index": k, **call.to_dict()} for k, call in enumerate(made)]})
                yield chunk(i, {}, finish=finish, stop=c.stop_reason)
            if include_usage:
                yield sse({**meta, "choices": [], "usage": usage(prompt_tokens, generated)})
        except APIError as e:
            yield sse(e.body())
        yield sse("[DONE]")


def _error_response(error: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def chat_page() -> str:
    return resources.files("lmlab.infer").joinpath("static/chat.html").read_text(encoding="utf-8")


# --- the application ---------------------------------------------------------------------------
def create_app(engine: Engine, *, model_name: str, api_key: str | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, metrics_window_s: float = 10.0) -> FastAPI:
    """The FastAPI application serving `engine` under `model_name` (what clients put in "model").

    api_key: when set, /v1/* needs the header `Authorization: Bearer <api_key>` (/, /health and /metrics stay open).
    max_request_bytes: larger request bodies are refused with 413.
    metrics_window_s: the window of /metrics' tokens-per-second gauge.
    The engine's thread starts and stops with the application's lifespan (uvicorn runs it).
    """
    server = OpenAIServer(engine, model_name, api_key, max_request_bytes, metrics_window_s)
    page = chat_page()
    app = FastAPI(title="lmlab", lifespan=server.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(_CountRequests, counts=server.request_counts)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path} is not a route of this server" if exc.status_code in (
            404, 405) else str(exc.detail)
        return _error_response(APIError(exc.status_code, message, code="not_found" if exc.status_code == 404
                                        else None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(APIError(400, str(exc)))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:  # a bug: uvicorn logs the traceback
        return _error_response(APIError(500, f"internal server error ({type(exc).__name__}); see the server's log"))

    app.get("/", include_in_schema=False)(lambda: HTMLResponse(page))
    app.get("/health")(server.health)
    app.get("/metrics")(server.metrics)
    app.get("/v1/models")(server.models)
    app.get("/v1/models/{model_id:path}")(server.model)
    app.post("/v1/completions")(server.completions)
    app.post("/v1/chat/completions")(server.chat_completions)
    return app


@dataclass
class RunningServer:
    """A server started by `serve_in_thread`."""

    url: str  # http://host:port
    server: uvicorn.Server
    thread: threading.Thread

    def shutdown(self, timeout: float | None = None) -> None:
        """Graceful: stop accepting, let the requests in flight finish, stop the engine."""
        self.server.should_exit = True
        self.thread.join(timeout)


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, **uvicorn_options) -> Iterator[RunningServer]:
    """Run `app` with uvicorn on a background thread (port 0: a free port), for notebooks and tests; shut down
    gracefully on leaving the block. Signals are not handled (only the main thread can); `shutdown()` does it."""
    config = uvicorn.Config(app, host=host, port=port, lifespan="on", **{"log_level": "warning", **uvicorn_options})
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="lmlab-uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port} (see the log above)")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    running = RunningServer(f"http://{host}:{bound}", server, thread)
    try:
        yield running
    finally:
        running.shutdown()


def serve(engine: Engine, *, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, graceful_timeout: float | None = None,
          log_level: str = "info") -> None:
    """Serve `engine` over HTTP until SIGINT or SIGTERM, then shut down gracefully: stop accepting connections,
    finish the requests in flight (at most graceful_timeout seconds, None: however long they take), stop the
    engine. Blocks; see `create_app` for the other arguments."""
    app = create_app(engine, model_name=model_name, api_key=api_key, max_request_bytes=max_request_bytes)
    config = uvicorn.Config(app, host=host, port=port, lifespan="on", log_level=log_level,
                            timeout_graceful_shutdown=graceful_timeout)
    server = uvicorn.Server(config)
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return
    # uvicorn re-raises the signal that stopped it once it has shut down; a SIGTERM that was handled gracefully
    # should end the process normally, not kill it
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    except KeyboardInterrupt:  # the re-raised SIGINT
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
