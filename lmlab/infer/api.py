"""The OpenAI API's wire format, as the server speaks it: request bodies checked into typed models, errors in
OpenAI's shape, the model's tool calls found in its text, and the pieces of responses (logprobs, usage, server-sent
events, and /metrics' Prometheus text, written by hand: a dozen lines do not justify a client library).

Requests are checked strictly (pydantic's strict mode: no "2" for 2, no true for 1) and unknown fields are refused,
as OpenAI refuses them, rather than silently ignored. Fields OpenAI defines that lmlab cannot honour (penalties,
logit_bias, audio, ...) are accepted at their neutral value and refused otherwise, each with a message naming the
field. lmlab adds vLLM's sampling extensions (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`), which the openai
client sends through `extra_body`.

Tool calls. A chat template shows the tools to the model and teaches it a format for calling them; the server turns
what the model wrote back into OpenAI's `tool_calls`. Three formats are read:
- lmlab's template: the reply's text, then one JSON object per line, `{"name": ..., "arguments": {...}}`
  (`lmlab.tokenizer.chat.LMLAB_CHAT_TEMPLATE`);
- `<tool_call>{...}</tool_call>` blocks, the format of many Hugging Face templates (Hermes, Qwen);
- a reply that is nothing but one such JSON object, or a JSON list of them ("parameters" is read as "arguments").
Only calls to the tools the request defined count; anything else stays text. `ToolCallStream` does the same
incrementally: it streams the text but holds back whatever could still turn out to be a call.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .generate import StreamChunk
from .sampling import _SEED_MAX, _SEED_MIN

if TYPE_CHECKING:
    from .engine import EngineStats

MAX_N = 128  # choices per prompt (OpenAI's limit)
MAX_LOGPROBS = 20  # alternatives per token (OpenAI's top_logprobs limit; its completions endpoint allows 5)
MAX_STOP = 16  # stop strings per request
MAX_SEQUENCES = 256  # prompts x n in one completions request


# --- errors ------------------------------------------------------------------------------------
class APIError(Exception):
    """An error the client caused (or, with status >= 500, the server): sent as OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _param_path(loc: tuple) -> str | None:
    """pydantic's error location as a field path: ('messages', 0, 'content') -> 'messages[0].content'."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path or None


def validate_request(model: type[BaseModel], data: Any) -> Any:
    """`model` checked from a parsed JSON body; an APIError (400) naming the first bad field otherwise."""
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = _param_path(err["loc"])
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"unrecognized request argument supplied: {param}", param=param) from None
        if err["type"] == "missing":
            raise APIError(400, f"missing required parameter: {param}", param=param) from None
        got = err.get("input")
        got = "" if isinstance(got, (dict, list)) else f" (got {json.dumps(got) if _jsonable(got) else got!r})"
        message = err["msg"].removeprefix("Value error, ")
        raise APIError(400, f"invalid value for {param}: {message}{got}", param=param) from None


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError):
        return False


# --- request bodies ----------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Lenient(BaseModel):
    """Parts that clients echo back with extra keys (an assistant message from a previous response)."""

    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # OpenAI's padding against side channels: nothing to pad here


def _stop_list(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ValueError("give a string or a list of strings")
    if any(not s for s in stops):
        raise ValueError("stop strings must not be empty")
    if len(stops) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings")
    return stops


class SamplingRequest(_Strict):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: list[str] = []
    seed: int | None = Field(None, ge=_SEED_MIN, le=_SEED_MAX)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for abuse monitoring: recorded nowhere here
    # OpenAI's fields that lmlab does not implement: accepted at their neutral value (see check_supported)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)  # -1 or 0: off
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=100)
    ignore_eos: bool | None = None

    _stop = field_validator("stop", mode="before")(_stop_list)


def _positive_zero_or_none(name: str, value: Any, hint: str) -> None:
    if value not in (None, 0, 0.0):
        raise APIError(400, f"{name} is not supported by this server; {hint}", param=name,
                       code="unsupported_parameter")


def check_supported(req: SamplingRequest) -> None:
    """Refuse OpenAI fields set to something lmlab cannot do, naming the field and what to use instead."""
    hint = "leave it at 0 (repetition_penalty, a vLLM extension, discourages repeats)"
    _positive_zero_or_none("presence_penalty", req.presence_penalty, hint)
    _positive_zero_or_none("frequency_penalty", req.frequency_penalty, hint)
    if req.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", param="logit_bias",
                       code="unsupported_parameter")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")


# completions
def _prompt_list(value: Any) -> list[str] | list[list[int]]:
    """OpenAI's four prompt forms as a list of strings or a list of token-id lists."""

    def ids(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return value
        if ids(value):
            return [value]
        if all(ids(p) for p in value):
            return value
    if isinstance(value, list) and (not value or any(isinstance(p, list) and not p for p in value)):
        raise ValueError("the prompt is empty")
    raise ValueError("give a string, a list of strings, a list of token ids or a list of token-id lists")


class CompletionRequest(SamplingRequest):
    prompt: list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)
    suffix: str | None = None

    _prompt = field_validator("prompt", mode="before")(_prompt_list)


# chat
class TextPart(_Lenient):
    type: Literal["text"]
    text: str


def _content(value: Any) -> str | None:
    """A message's content: a string, or OpenAI's list of parts (text only), joined by newlines."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                what = f"a part of type {kind!r}" if isinstance(kind, str) else f"part {i}"
                raise ValueError(f"this model reads text only; {what} cannot be given "
                                 "(content is a string or a list of {'type': 'text', 'text': ...} parts)")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ValueError("content is a string or a list of {'type': 'text', 'text': ...} parts")


class FunctionCallIn(_Lenient):
    name: str
    arguments: str | dict

    @field_validator("arguments", mode="before")
    @classmethod
    def _arguments(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                parsed = json.loads(value)
            except ValueError:
                raise ValueError("arguments must be a JSON object (as a string or an object)") from None
            if not isinstance(parsed, dict):
                raise ValueError("arguments must be a JSON object (as a string or an object)")
        return value


class ToolCallIn(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    _content = field_validator("content", mode="before")(_content)

    def for_template(self) -> dict:
        """The message as chat templates read it ("developer" is OpenAI's newer name for "system")."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role}
        if self.content is not None:
            out["content"] = self.content
        for key in ("name", "tool_call_id"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump(exclude_none=True) for c in self.tool_calls]
        return out


FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function names


class FunctionDef(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ToolDef(_Strict):
    type: Literal["function"]
    function: FunctionDef


class JSONSchemaFormat(_Strict):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


def _tool_choice(value: Any) -> str | dict | None:
    if value is None or value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function" and set(value) == {"type", "function"}:
        fn = value["function"]
        if isinstance(fn, dict) and set(fn) == {"name"} and isinstance(fn["name"], str):
            return value
    raise ValueError('give "none", "auto", "required" or {"type": "function", "function": {"name": ...}}')


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ToolDef] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # accepted and without effect here: bookkeeping for OpenAI's platform, or knobs of its reasoning models
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    # OpenAI's fields this server cannot honour (refused unless neutral, see check_chat_supported)
    modalities: list[str] | None = None
    audio: dict | None = None
    prediction: dict | None = None
    web_search_options: dict | None = None
    functions: list | None = None
    function_call: Any = None

    _tool_choice = field_validator("tool_choice", mode="before")(_tool_choice)


def check_chat_supported(req: ChatCompletionRequest) -> None:
    check_supported(req)
    if req.modalities not in (None, ["text"]):
        raise APIError(400, "this model writes text only: modalities must be [\"text\"]", param="modalities",
                       code="unsupported_parameter")
    for name in ("audio", "prediction", "web_search_options"):
        if getattr(req, name) is not None:
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")
    for name in ("functions", "function_call"):
        if getattr(req, name) is not None:
            raise APIError(400, f"{name} is OpenAI's deprecated form of tools; send tools and tool_choice instead",
                           param=name, code="unsupported_parameter")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens disagree; give one (max_tokens is the older name)",
                       param="max_tokens")
    names = [t.function.name for t in req.tools or []]
    if len(set(names)) < len(names):
        raise APIError(400, "two tools share a name; each function needs its own", param="tools")
    if req.tool_choice is not None and req.tool_choice != "none" and not req.tools:
        raise APIError(400, "tool_choice needs tools to choose from", param="tool_choice")
    if isinstance(req.tool_choice, dict) and req.tool_choice["function"]["name"] not in names:
        raise APIError(400, f"tool_choice names the function {req.tool_choice['function']['name']!r}, which is not "
                            f"among the tools ({', '.join(names)})", param="tool_choice")
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_schema" and (fmt.json_schema is None or fmt.json_schema.schema_ is None):
        raise APIError(400, "response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}",
                       param="response_format.json_schema")
    if req.ignore_eos and ((fmt is not None and fmt.type != "text") or forced_tool(req) is not None):
        raise APIError(400, "ignore_eos cannot be combined with constrained output (response_format or a forced "
                            "tool call), which ends exactly where the JSON is complete", param="ignore_eos")
    if fmt is not None and fmt.type != "text" and forced_tool(req) is not None:
        raise APIError(400, "response_format and a forced tool call (tool_choice required or a function) both "
                            "constrain the reply; give one", param="response_format")


def forced_tool(req: ChatCompletionRequest) -> str | None:
    """"*" when tool_choice is "required", the function's name when it names one, None otherwise."""
    if req.tool_choice == "required":
        return "*"
    if isinstance(req.tool_choice, dict):
        return req.tool_choice["function"]["name"]
    return None


def tool_call_schema(tools: list[ToolDef], name: str = "*") -> dict:
    """The JSON schema of one call, {"name": ..., "arguments": {...}}, to the tool `name` or ("*") to any of them:
    what a forced call is constrained to. The key order is the template's, so the model writes what it learned."""

    def one(fn: FunctionDef) -> dict:
        args = fn.parameters if fn.parameters else {"type": "object"}
        return {"type": "object", "properties": {"name": {"enum": [fn.name]}, "arguments": args},
                "required": ["name", "arguments"], "additionalProperties": False}

    chosen = [one(t.function) for t in tools if name in ("*", t.function.name)]
    return chosen[0] if len(chosen) == 1 else {"anyOf": chosen}


# --- tool calls in the model's text ------------------------------------------------------------
@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI sends arguments as a string)
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            self.id = "call_" + secrets.token_hex(12)

    def to_dict(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(TOOL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CLOSE) + r"|\Z)", re.DOTALL)


def _as_call(obj: Any, names: set[str]) -> ToolCall | None:
    """A decoded JSON value as a call to one of the tools `names`, or None."""
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters"))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _json_calls(text: str, names: set[str]) -> list[ToolCall] | None:
    """The calls in `text` when it is one JSON call or a JSON list of calls (surrounding whitespace allowed)."""
    text = text.strip()
    if not text.startswith(("{", "[")):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    values = value if isinstance(value, list) else [value]
    calls = [_as_call(v, names) for v in values]
    return calls if calls and all(calls) else None


def parse_tool_calls(text: str, names: set[str] | list[str]) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a reply: the calls to the tools `names` it makes in any of the formats of the module
    docstring, and the text around them with trailing whitespace removed (None when there is none). A reply without
    a complete, valid call comes back whole as content."""
    names = set(names)
    if TOOL_OPEN in text:
        calls = []
        for block in _BLOCK.findall(text):
            found = _json_calls(block, names)
            if found is None:
                return text, []
            calls += found
        return _content_or_none(_BLOCK.sub("", text)), calls
    whole = _json_calls(text, names)
    if whole is not None:
        return None, whole
    lines = text.split("\n")  # lmlab's format: the trailing lines that are calls
    calls, k = [], len(lines)
    while k > 0:
        if lines[k - 1].strip():
            found = _json_calls(lines[k - 1], names)
            if found is None:
                break
            calls = found + calls
        k -= 1
    if not calls:
        return text, []
    return _content_or_none("\n".join(lines[:k])), calls


def _content_or_none(text: str) -> str | None:
    text = text.rstrip()
    return text if text.strip() else None


class ToolCallStream:
    """`parse_tool_calls` for a streamed reply: `feed` returns the text that is certainly content, holding back
    anything that could still be part of a call; `finish` returns the rest of the content and the calls. The content
    streamed equals the content `parse_tool_calls` gives for the whole reply. forced: the whole reply is a call
    (tool_choice required or a named function), so nothing is streamed as content. max_calls: keep the first ones."""

    def __init__(self, names: set[str] | list[str], forced: bool = False, max_calls: int | None = None):
        self.names, self.forced, self.max_calls = set(names), forced, max_calls
        self.text = ""
        self.sent = 0  # text[:sent] went out as content

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.forced:
            return ""
        hold = self._hold_from()
        if hold <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : hold], hold
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        content, calls = parse_tool_calls(self.text, self.names)
        if not calls:
            return self.text[self.sent :], []
        content = content or ""
        return content[self.sent :] if content.startswith(self.text[: self.sent]) else "", calls[: self.max_calls]

    def _may_be_call(self, line: str, complete: bool) -> bool:
        """Whether a line of the reply is (complete) or may still become (incomplete) a call line."""
        s = line.strip()
        if not s:
            return True  # whitespace is held while it may separate the content from calls
        return _json_calls(s, self.names) is not None if complete else s.startswith(("{", "["))

    def _hold_from(self) -> int:
        """Where the held-back tail of the text starts (never before `sent`)."""
        text, sent = self.text, self.sent
        if sent == 0 and text.lstrip().startswith(("{", "[")):
            return 0  # the whole reply may be one JSON call, or a list of them, over several lines
        hold = text.find(TOOL_OPEN, sent)
        if hold == -1:
            hold = len(text) - _partial_suffix(text[sent:], TOOL_OPEN)
            # lmlab's format: the last line, and the complete lines before it, while they may be calls
            line = text.rfind("\n", 0, hold) + 1
            if self._may_be_call(text[line:hold], complete=False):
                hold = line
                while hold > sent and hold > 0:
                    prev = text.rfind("\n", 0, hold - 1) + 1
                    if prev < sent or not self._may_be_call(text[prev : hold - 1], complete=True):
                        break
                    hold = prev
        hold = max(hold, sent)
        while hold > sent and text[hold - 1].isspace():  # the content's trailing whitespace is not part of it
            hold -= 1
        return hold


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest proper prefix of `tag` that `text` ends with."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


@dataclass
class ToolParsing:
    """How a chat request's replies are read for tool calls: the tools' names, whether the reply is a forced call,
    and at most how many calls to keep (1 with parallel_tool_calls false)."""

    names: list[str]
    forced: bool = False
    max_calls: int | None = None

    @classmethod
    def of(cls, req: ChatCompletionRequest) -> ToolParsing | None:
        """None when no calls are looked for: no tools, or tool_choice "none" (the tools are still shown)."""
        if not req.tools or req.tool_choice == "none":
            return None
        return cls([t.function.name for t in req.tools], forced_tool(req) is not None,
                   1 if req.parallel_tool_calls is False else None)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        content, calls = parse_tool_calls(text, self.names)
        return content, calls[: self.max_calls]

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self.names, self.forced, self.max_calls)

# --- responses ---------------------------------------------------------------------------------
MIN_LOGPROB = -9999.0  # what OpenAI reports for a token of probability 0 (JSON has no -Infinity)
TokenText = Callable[[int], tuple[str, list[int]]]  # token id -> (its text, its bytes)


def choice_seed(seed: int | None, j: int) -> int | None:
    """The seed of choice j of a request seeded with `seed`: the seed itself for the first choice (so n=1 and the
    first of n agree), splitmix64 of (seed, j) for the others, so that the n samples are independent."""
    if seed is None or j == 0:
        return seed
    mask = 2**64 - 1
    x = (seed + j * 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


@dataclass
class ChoiceResult:
    """One choice's answer, gathered from its chunks."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @classmethod
    def of(cls, chunk: StreamChunk) -> ChoiceResult:
        """The result of one chunk alone (a streamed chunk's logprobs are formatted from it)."""
        result = cls()
        result.add(chunk)
        return result

    def add(self, chunk: StreamChunk) -> None:
        self.text += chunk.text
        if chunk.token_id is not None:
            self.token_ids.append(chunk.token_id)
            if chunk.logprob is not None:
                self.logprobs.append(chunk.logprob)
                self.top_logprobs.append(chunk.top_logprobs or [])
        if chunk.finish_reason is not None:
            self.finish_reason, self.stop_reason = chunk.finish_reason, chunk.stop_reason


def finite_logprob(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(c: ChoiceResult, k: int | None, offset: int, token_text: TokenText) -> dict | None:
    """OpenAI's legacy logprobs object: tokens, their logprobs, the top k alternatives, character offsets."""
    if k is None:
        return None
    tokens = [token_text(t)[0] for t in c.token_ids]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    top = [{token_text(t)[0]: finite_logprob(lp) for t, lp in alts} for alts in c.top_logprobs] if k else None
    return {"tokens": tokens, "token_logprobs": [finite_logprob(lp) for lp in c.logprobs], "top_logprobs": top,
            "text_offset": offsets}


def chat_logprobs(c: ChoiceResult, token_text: TokenText) -> list[dict]:
    """The chat API's logprobs content: per token its text, logprob, bytes and top alternatives."""

    def entry(token_id: int, logprob: float) -> dict:
        text, raw = token_text(token_id)
        return {"token": text, "logprob": finite_logprob(logprob), "bytes": raw}

    return [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in alts]}
            for t, lp, alts in zip(c.token_ids, c.logprobs, c.top_logprobs, strict=True)]


def sse(data: dict | str) -> str:
    """One server-sent event carrying JSON (or a literal such as [DONE])."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_metrics(stats: EngineStats, finished: dict[str, int], tokens_per_s: float,
                   requests: dict[tuple[str, int], int], model_name: str, max_model_len: int) -> str:
    """The Prometheus text exposition format (version 0.0.4): per metric a HELP and a TYPE line, then one
    `name{labels} value` line per series."""
    out: list[str] = []

    def metric(name: str, kind: str, help: str, series: Sequence[tuple[dict[str, Any], float]]) -> None:
        out.append(f"# HELP {name} {help}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in series:
            text = ",".join(f'{k}="{_label_value(str(v))}"' for k, v in labels.items())
            number = str(int(value)) if float(value).is_integer() else repr(float(value))
            out.append(f"{name}{{{text}}} {number}" if text else f"{name} {number}")

    drafted = stats.spec_drafted
    metric("lmlab_model_info", "gauge", "The served model (always 1).",
           [({"model": model_name, "max_model_len": max_model_len}, 1)])
    metric("lmlab_http_requests_total", "counter", "HTTP requests answered, by endpoint and status code.",
           [({"endpoint": e, "status": s}, n) for (e, s), n in sorted(requests.items())])
    metric("lmlab_requests_finished_total", "counter", "Engine requests finished, by reason (stop, length, abort).",
           [({"reason": r}, finished.get(r, 0)) for r in sorted({"stop", "length", "abort", *finished})])
    metric("lmlab_prompt_tokens_total", "counter", "Prompt tokens received.", [({}, stats.prompt_tokens)])
    metric("lmlab_generation_tokens_total", "counter", "Tokens generated.", [({}, stats.generated_tokens)])
    metric("lmlab_generation_tokens_per_second", "gauge", "Tokens generated per second over the recent window.",
           [({}, tokens_per_s)])
    metric("lmlab_requests_running", "gauge", "Requests being generated.", [({}, stats.running)])
    metric("lmlab_requests_waiting", "gauge", "Requests queued (preempted ones included).", [({}, stats.waiting)])
    metric("lmlab_kv_blocks_used", "gauge", "KV-cache blocks in use.", [({}, stats.blocks_used)])
    metric("lmlab_kv_blocks_total", "gauge", "KV-cache blocks in the pool.", [({}, stats.blocks_total)])
    metric("lmlab_kv_cache_usage_ratio", "gauge", "Fraction of the KV-cache blocks in use.",
           [({}, stats.blocks_used / max(stats.blocks_total, 1))])
    metric("lmlab_preemptions_total", "counter", "Requests preempted (to be recomputed) for lack of KV blocks.",
           [({}, stats.preemptions)])
    metric("lmlab_prefix_cache_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
           [({}, stats.prefix_hit_tokens)])
    metric("lmlab_spec_draft_tokens_total", "counter", "Speculative tokens proposed.", [({}, drafted)])
    metric("lmlab_spec_accepted_tokens_total", "counter", "Speculative tokens accepted.",
           [({}, stats.spec_accepted)])
    metric("lmlab_spec_acceptance_rate", "gauge", "Accepted / proposed speculative tokens (0 when none).",
           [({}, stats.spec_accepted / drafted if drafted else 0.0)])
    return "\n".join(out) + "\n"
