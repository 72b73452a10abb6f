"""The OpenAI-compatible server, through the official `openai` client (and raw HTTP where the client would refuse
to send a bad request) against a live uvicorn server on loopback, serving a real Engine and a tiny pretrained model.

Checked: completions and chat equal plain `generate` (greedy and seeded), streaming concatenates to the whole
answer, n / seed / logprobs / stop strings / usage, forced tool calls and JSON mode (valid under the schema), the
tool-call parser on hand-written replies, every 4xx case in OpenAI's error shape, auth, /metrics and /health,
client disconnects aborting the engine request, graceful shutdown finishing a stream (in-process and via SIGTERM to
`lmlab serve`), and a bounded load test.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from lmlab.infer import SamplingParams, generate  # noqa: E402
from lmlab.infer.api import ToolCallStream, ToolParsing, parse_tool_calls  # noqa: E402
from lmlab.infer.engine import Engine, EngineConfig  # noqa: E402
from lmlab.infer.server import create_app, serve_in_thread  # noqa: E402
from lmlab.model import load  # noqa: E402
from lmlab.tokenizer import load_tokenizer  # noqa: E402
from lmlab.tokenizer.chat import end_of_turn_ids  # noqa: E402

KEY = "sk-test-key"
MODEL = "tiny"
CONTEXT = 1024  # the tiny model's context, lengthened: tool definitions alone take a few hundred of its tokens
LIMIT = 256 * 1024  # the request-size limit of the test server
HELLO = [{"role": "user", "content": "Hello there, how are you?"}]


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tiny_base, tmp_path_factory) -> Path:
    """tiny_base with a 1024-token context (RoPE has no position table, so only the config changes)."""
    out = tmp_path_factory.mktemp("server") / "tiny"
    shutil.copytree(tiny_base, out, ignore=shutil.ignore_patterns("train_state.pt"))
    config = json.loads((out / "config.json").read_text())
    config["max_seq_len"] = CONTEXT
    (out / "config.json").write_text(json.dumps(config))
    return out


@dataclass
class Served:
    url: str
    port: int
    model: object
    tokenizer: object
    engine: Engine
    server: object  # the OpenAIServer behind the app


def _engine(checkpoint: Path, **config) -> Engine:
    model, tokenizer = load(checkpoint).eval(), load_tokenizer(checkpoint)
    return Engine(model, tokenizer, EngineConfig(**{"max_num_seqs": 32, "max_batch_tokens": 256, **config}))


@pytest.fixture(scope="module")
def served(checkpoint):
    engine = _engine(checkpoint)
    app = create_app(engine, model_name=MODEL, api_key=KEY, max_request_bytes=LIMIT)
    with serve_in_thread(app) as running:
        port = int(running.url.rsplit(":", 1)[1])
        yield Served(running.url, port, engine.model, engine.tokenizer, engine, app.state.server)


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def call(served: Served, method: str, path: str, body=None, key: str | None = KEY, headers: dict | None = None):
    """Raw HTTP: (status, parsed JSON or text, headers)."""
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    conn.request(method, path, body=data, headers=h)
    response = conn.getresponse()
    raw = response.read().decode()
    conn.close()
    try:
        return response.status, json.loads(raw), dict(response.getheaders())
    except ValueError:
        return response.status, raw, dict(response.getheaders())


def reference(served: Served, prompt: list[int], max_tokens: int, stops: list[int], **params):
    """What plain single-request generation gives for this prompt."""
    sp = SamplingParams(max_new_tokens=max_tokens, stop_token_ids=stops, **{"temperature": 0.0, **params})
    return generate(served.model, [prompt], sp, decode=served.tokenizer.decode, logprobs=True)[0]


def chat_prompt(served: Served, messages=HELLO) -> list[int]:
    return served.tokenizer.render_chat(messages, add_generation_prompt=True)[0]


def metric_values(text: str) -> dict[str, float]:
    """`name{labels}` -> value, checking that every line is a comment or a sample of the text format."""
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(\\.|[^"\\])*",?)*\})? (\S+)$')
    values = {}
    for line in text.strip().split("\n"):
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        m = sample.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        values[line.rsplit(" ", 1)[0]] = float(m.group(5))
    return values


def idle(served: Served) -> bool:
    """Nothing running or queued and no KV block in use (as the engine thread last published)."""
    stats = served.server.loop.snapshot()[0]
    return stats.running == 0 and stats.waiting == 0 and stats.blocks_used == 0


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --- completions and chat against plain generation ------------------------------------------------
def test_models_health_and_page(served, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    status, body, _ = call(served, "GET", "/health", key=None)
    assert (status, body) == (200, {"status": "ok"})
    status, page, headers = call(served, "GET", "/", key=None)
    assert status == 200 and headers["content-type"].startswith("text/html") and "/v1/chat/completions" in page


def test_completion_equals_generate(served, client):
    text = "Once upon a time"
    ids = served.tokenizer.encode(text, add_special_tokens=True)
    want = reference(served, ids, 12, served.tokenizer.eos_ids)
    got = client.completions.create(model=MODEL, prompt=text, max_tokens=12, temperature=0)
    assert got.choices[0].text == want.text and len(want.text) > 5
    assert got.choices[0].finish_reason == want.finish_reason
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), len(want.token_ids))
    assert got.usage.total_tokens == len(ids) + len(want.token_ids)
    assert got.id.startswith("cmpl-") and got.object == "text_completion" and got.model == MODEL

    # the other prompt forms: token ids, and a batch of them (choices in prompt order)
    other = served.tokenizer.encode("The dog", add_special_tokens=True)
    single = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert single.choices[0].text == want.text
    batch = client.completions.create(model=MODEL, prompt=[other, ids], max_tokens=12, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[1].text == want.text
    assert batch.choices[0].text == reference(served, other, 12, served.tokenizer.eos_ids).text
    assert batch.usage.prompt_tokens == len(ids) + len(other)
    strings = client.completions.create(model=MODEL, prompt=["The dog", text], max_tokens=12, temperature=0)
    assert [c.text for c in strings.choices] == [c.text for c in batch.choices]
    echoed = client.completions.create(model=MODEL, prompt=text, max_tokens=12, temperature=0, echo=True)
    assert echoed.choices[0].text == text + want.text


def test_chat_and_stream_equal_generate(served, client):
    prompt = chat_prompt(served)
    want = reference(served, prompt, 16, end_of_turn_ids(served.tokenizer))
    got = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0)
    assert got.choices[0].message.content == want.text and len(want.text) > 5
    assert got.choices[0].message.role == "assistant" and not got.choices[0].message.tool_calls
    assert got.choices[0].finish_reason == want.finish_reason
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(prompt), len(want.token_ids))

    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_completion_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == want.text
    assert len(pieces) > 1  # streamed, not sent at once
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        want.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1

    # a streamed completion, too
    ids = served.tokenizer.encode("The cat", add_special_tokens=True)
    pieces = [c.choices[0].text for c in client.completions.create(model=MODEL, prompt=ids, max_tokens=10,
                                                                   temperature=0, stream=True)]
    assert "".join(pieces) == reference(served, ids, 10, served.tokenizer.eos_ids).text


def test_default_max_tokens_is_the_rest_of_the_context(served, client):
    ids = served.tokenizer.encode("A", add_special_tokens=True)
    got = client.completions.create(model=MODEL, prompt=ids, temperature=0, extra_body={"ignore_eos": True})
    assert got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == CONTEXT - len(ids)


def test_n_and_seed(served, client):
    kw = dict(model=MODEL, messages=HELLO, max_tokens=8, temperature=1.0, seed=7, n=3)
    a, b = client.chat.completions.create(**kw, logprobs=True), client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]  # the same seed, the same samples
    assert len(set(texts)) == 3  # n independent samples, not one sample three times
    assert a.usage.completion_tokens == sum(len(c.logprobs.content) for c in a.choices)  # summed over choices
    assert a.usage.prompt_tokens == len(chat_prompt(served))  # the prompt counted once
    want = reference(served, chat_prompt(served), 8, end_of_turn_ids(served.tokenizer), temperature=1.0, seed=7)
    assert texts[0] == want.text  # the first choice is seeded with `seed` itself, as generate seeds it
    one = client.chat.completions.create(**{**kw, "n": 1})
    assert one.choices[0].message.content == texts[0]
    other = client.chat.completions.create(**{**kw, "seed": 8})
    assert [c.message.content for c in other.choices] != texts
    unseeded = client.completions.create(model=MODEL, prompt="The", max_tokens=8, temperature=1.0, n=2)
    assert unseeded.choices[0].text != unseeded.choices[1].text
    lengths = client.completions.create(model=MODEL, prompt="The", max_tokens=5, temperature=1.0, n=4, seed=1,
                                        extra_body={"ignore_eos": True})
    assert lengths.usage.completion_tokens == 4 * 5


def test_logprobs(served, client):
    prompt = chat_prompt(served)
    want = reference(served, prompt, 10, end_of_turn_ids(served.tokenizer))
    got = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=10, temperature=0, logprobs=True,
                                         top_logprobs=3)
    entries = got.choices[0].logprobs.content
    assert len(entries) == len(want.token_ids)
    for entry, token, logprob in zip(entries, want.token_ids, want.logprobs, strict=True):
        assert entry.bytes == list(served.tokenizer.token_bytes(token))
        assert entry.logprob == pytest.approx(logprob, abs=1e-4)
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert tops[0] == pytest.approx(entry.logprob, abs=1e-6)  # greedy takes the most likely token
    assert b"".join(bytes(e.bytes) for e in entries) == served.tokenizer.decode_bytes(want.token_ids)
    plain = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, temperature=0, logprobs=True)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4).choices[0].logprobs is None

    ids = served.tokenizer.encode("Once upon a time", add_special_tokens=True)
    want = reference(served, ids, 10, served.tokenizer.eos_ids)
    got = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0, logprobs=2).choices[0]
    assert got.logprobs.token_logprobs == pytest.approx(want.logprobs, abs=1e-4)
    assert "".join(got.logprobs.tokens) == got.text  # byte-level tokens that are whole characters here
    assert got.logprobs.text_offset == [sum(len(t) for t in got.logprobs.tokens[:i]) for i in range(10)]
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(lp, abs=1e-6)
               for top, lp in zip(got.logprobs.top_logprobs, got.logprobs.token_logprobs, strict=True))
    streamed = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0, logprobs=0,
                                         stream=True)
    lps = [lp for c in streamed if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert lps == pytest.approx(want.logprobs, abs=1e-4)


def test_stop_strings(served, client):
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0)
    text = whole.choices[0].message.content
    stop = text[3:5]  # a string the greedy answer contains, perhaps spanning two tokens
    cut = text[: text.find(stop)]
    got = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0, stop=[stop, "zzz"])
    assert got.choices[0].message.content == cut
    assert got.choices[0].finish_reason == "stop" and got.choices[0].model_extra["stop_reason"] == stop
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, temperature=0, stop=stop,
                                            stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"
    ids = served.tokenizer.encode("Once upon a time", add_special_tokens=True)
    full = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0).choices[0].text
    got = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0, stop=full[2:4])
    assert got.choices[0].text == full[: full.find(full[2:4])] and got.choices[0].finish_reason == "stop"


def test_speculative_engine_behind_the_server(checkpoint):
    """Prompt-lookup speculation: the same greedy answers, and /metrics shows the drafted and accepted tokens."""
    engine = _engine(checkpoint, speculative="ngram")
    with serve_in_thread(create_app(engine, model_name=MODEL)) as running:
        served = Served(running.url, int(running.url.rsplit(":", 1)[1]), engine.model, engine.tokenizer, engine,
                        None)
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="none", max_retries=0)
        ids = served.tokenizer.encode("Once upon a time", add_special_tokens=True)
        got = client.completions.create(model=MODEL, prompt=ids, max_tokens=40, temperature=0)
        assert got.choices[0].text == reference(served, ids, 40, served.tokenizer.eos_ids).text
        values = metric_values(call(served, "GET", "/metrics", key=None)[1])
    assert values["lmlab_spec_draft_tokens_total"] > 0 and values["lmlab_spec_accepted_tokens_total"] > 0
    assert 0 < values["lmlab_spec_acceptance_rate"] <= 1


# --- tools and JSON mode -------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def need_outlines_core() -> None:
    """Constrained output (forced tool calls, JSON mode) needs outlines-core, part of the serve extra: skip without
    it, but fail under CI, which installs it."""
    try:
        import outlines_core  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("outlines-core is missing; CI installs lmlab[serve], which has it")
        pytest.skip("constrained output needs outlines-core (pip install 'lmlab[serve]')")


def check_call(call, allowed=("get_weather", "add")) -> dict:
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) > 10
    assert call.function.name in allowed
    args = json.loads(call.function.arguments)  # a JSON string, as OpenAI sends it
    if call.function.name == "get_weather":
        assert set(args) == {"city", "unit"} and args["city"] in ("Paris", "Tokyo") and args["unit"] in ("c", "f")
    else:
        assert set(args) == {"a", "b"} and all(isinstance(v, int) and 0 <= v <= 99 for v in args.values())
    return args


def test_forced_tool_calls(served, client):
    need_outlines_core()
    named = {"type": "function", "function": {"name": "get_weather"}}
    got = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, ADD], tool_choice=named,
                                         temperature=0)
    choice = got.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    check_call(choice.message.tool_calls[0], allowed=("get_weather",))
    # "required": any of the tools, sampled; a weak model still writes valid calls
    names = set()
    for seed in range(4):
        got = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, ADD], tool_choice="required",
                                             temperature=1.0, seed=seed, n=16)
        for c in got.choices:
            assert c.finish_reason == "tool_calls"
            names.add(c.message.tool_calls[0].function.name)
            check_call(c.message.tool_calls[0])
    assert names == {"get_weather", "add"}
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, ADD], tool_choice=named,
                                            temperature=0, stream=True)
    chunks = list(stream)
    calls = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == json.loads(choice.message.tool_calls[0].function.arguments)
    assert not any(c.choices[0].delta.content for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the call goes back into the conversation, and a tool answers it
    call = choice.message.tool_calls[0]
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"}]
    follow = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=4)
    assert follow.choices[0].finish_reason in ("stop", "length")


def test_tool_call_parser_on_hand_written_replies():
    names = {"get_weather", "add"}
    lmlab = 'Let me check.\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n' \
            '{"name": "add", "arguments": {"a": 1, "b": 2}}'
    content, calls = parse_tool_calls(lmlab, names)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "c"}), ("add", {"a": 1, "b": 2})]
    assert calls[0].id != calls[1].id and calls[0].id.startswith("call_")
    assert len(ToolParsing(sorted(names), max_calls=1).parse(lmlab)[1]) == 1  # parallel_tool_calls: false
    hermes = 'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>'
    content, calls = parse_tool_calls(hermes, names)
    assert content == "Sure." and [(c.name, c.arguments) for c in calls] == [("add", '{"a": 3, "b": 4}')]
    # arguments given as a JSON string, "parameters" for "arguments", a bare JSON list of calls
    assert parse_tool_calls('{"name": "add", "arguments": "{\\"a\\": 1}"}', names)[1][0].arguments == '{"a": 1}'
    assert parse_tool_calls('[{"name": "add", "parameters": {"a": 1}}, {"name": "add", "arguments": {}}]',
                            names)[0] is None
    # not calls: unknown tool, broken JSON, a JSON line followed by more text, arguments that are not an object
    for text in ['{"name": "rm", "arguments": {}}', '{"name": "add", "arguments": {"a": 1}',
                 '{"name": "add", "arguments": {}}\nand more', '{"name": "add", "arguments": [1]}',
                 "<tool_call>{not json}</tool_call>", "just text", ""]:
        assert parse_tool_calls(text, names) == (text, []), text


def test_tool_call_stream_equals_whole_reply_parse():
    """Streamed in random pieces, the content and calls equal parse_tool_calls on the whole reply."""
    names = {"add"}
    call = '{"name": "add", "arguments": {"a": 1}}'
    parts = ["Hello", " world", "\n", "  ", call, "<tool_call>", "</tool_call>", "{", "[", "<tool", "x", "\n\n"]
    rng = random.Random(0)
    for _ in range(600):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(0, 7)))
        content, calls = parse_tool_calls(text, names)
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        stream, streamed = ToolCallStream(names), ""
        for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True):
            streamed += stream.feed(text[a:b])
        rest, got = stream.finish()
        assert streamed + rest == (content or ""), repr(text)
        assert [(c.name, c.arguments) for c in got] == [(c.name, c.arguments) for c in calls], repr(text)
    # content comes out before the reply ends, and a call line is held back until it is known
    stream = ToolCallStream(names)
    assert stream.feed("Let me add ") == "Let me add"  # trailing whitespace waits for what follows it
    assert stream.feed("that.\n" + call[:10]) == " that."
    assert stream.feed(call[10:]) == ""
    rest, calls = stream.finish()
    assert rest == "" and [c.name for c in calls] == ["add"]
    stream = ToolCallStream(names)
    assert stream.feed("Not a call:\n{x}\nsee") == "Not a call:\n{x}\nsee"  # a line that is no call is text


def test_json_mode(served, client):
    need_outlines_core()
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                               "n": {"type": "integer", "minimum": 1, "maximum": 20},
                                               "color": {"enum": ["red", "green"]}},
              "required": ["ok", "n", "color"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    for seed in range(3):
        got = client.chat.completions.create(model=MODEL, messages=HELLO, response_format=fmt, temperature=1.0,
                                             seed=seed, max_tokens=60)
        assert got.choices[0].finish_reason == "stop"
        value = json.loads(got.choices[0].message.content)
        assert set(value) == {"ok", "n", "color"} and isinstance(value["ok"], bool)
        assert isinstance(value["n"], int) and 1 <= value["n"] <= 20 and value["color"] in ("red", "green")
    got = client.chat.completions.create(model=MODEL, messages=HELLO, response_format={"type": "json_object"},
                                         temperature=0, max_tokens=60)
    assert got.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(got.choices[0].message.content), dict)
    status, body, _ = call(served, "POST", "/v1/chat/completions", {
        "model": MODEL, "messages": HELLO,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"oneOf": [{}]}}}})
    assert status == 400 and body["error"]["param"] == "response_format.json_schema"
    assert "oneOf" in body["error"]["message"]


# --- bad requests --------------------------------------------------------------------------------
CHAT = {"model": MODEL, "messages": HELLO, "max_tokens": 4}
COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 4}
TOO_LONG = [{"role": "user", "content": "word " * 1200}]
BAD = [  # (path, body, status, param, code)
    ("/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, None, "invalid_json"),
    ("/v1/chat/completions", b"", 400, None, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None, None),
    ("/v1/chat/completions", b"\xff\xfe{}", 400, None, "invalid_json"),
    ("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, 400, None, "invalid_json"),
    ("/v1/chat/completions", {**CHAT, "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("/v1/completions", {**COMPLETION, "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {**CHAT, "messages": TOO_LONG}, 400, "messages", "context_length_exceeded"),
    ("/v1/completions", {**COMPLETION, "prompt": [1] * CONTEXT}, 400, "prompt", "context_length_exceeded"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": CONTEXT}, 400, "max_tokens", "context_length_exceeded"),
    ("/v1/chat/completions", {"model": MODEL, "messages": HELLO, "max_completion_tokens": 5000}, 400,
     "max_completion_tokens", "context_length_exceeded"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 5}, 400, "max_tokens", None),
    ("/v1/chat/completions", {k: v for k, v in CHAT.items() if k != "model"}, 400, "model", None),
    ("/v1/chat/completions", {**CHAT, "temperature": 2.5}, 400, "temperature", None),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400, "temperature", None),
    ("/v1/chat/completions", {**CHAT, "top_p": 0}, 400, "top_p", None),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/chat/completions", {**CHAT, "n": 0}, 400, "n", None),
    ("/v1/chat/completions", {**CHAT, "n": 1.5}, 400, "n", None),
    ("/v1/chat/completions", {**CHAT, "seed": 2**64}, 400, "seed", None),
    ("/v1/chat/completions", {**CHAT, "stop": [""]}, 400, "stop", None),
    ("/v1/chat/completions", {**CHAT, "stop": ["a"] * 17}, 400, "stop", None),
    ("/v1/chat/completions", {**CHAT, "stop": 3}, 400, "stop", None),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 3}, 400, "top_logprobs", None),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", None),
    ("/v1/completions", {**COMPLETION, "logprobs": 21}, 400, "logprobs", None),
    ("/v1/chat/completions", {**CHAT, "messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {**CHAT, "messages": "hi"}, 400, "messages", None),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role",
     None),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content",
     None),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content", None),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user"}]}, 400, "messages", None),
    ("/v1/chat/completions", {**CHAT, "frobnicate": 1}, 400, "frobnicate", None),
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, 400, "stream_options", None),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 0.5}, 400, "presence_penalty", "unsupported_parameter"),
    ("/v1/chat/completions", {**CHAT, "logit_bias": {"1": 5}}, 400, "logit_bias", "unsupported_parameter"),
    ("/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}]}, 400, "functions", "unsupported_parameter"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, 400, "tool_choice", None),
    ("/v1/chat/completions", {**CHAT, "tools": [WEATHER], "tool_choice": "maybe"}, 400, "tool_choice", None),
    ("/v1/chat/completions", {**CHAT, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {
        "name": "add"}}}, 400, "tool_choice", None),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "bad name"}}]}, 400,
     "tools[0].function.name", None),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "xml"}}, 400, "response_format.type", None),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, 400,
     "response_format.json_schema", None),
    ("/v1/chat/completions", {**CHAT, "ignore_eos": True, "response_format": {"type": "json_object"}}, 400,
     "ignore_eos", None),
    ("/v1/completions", {**COMPLETION, "prompt": []}, 400, "prompt", None),
    ("/v1/completions", {**COMPLETION, "prompt": [[]]}, 400, "prompt", None),
    ("/v1/completions", {**COMPLETION, "prompt": [1, "a"]}, 400, "prompt", None),
    ("/v1/completions", {**COMPLETION, "prompt": [5, 100_000]}, 400, "prompt", None),
    ("/v1/completions", {**COMPLETION, "prompt": [-1]}, 400, "prompt", None),
    ("/v1/completions", {**COMPLETION, "prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {**COMPLETION, "prompt": ["a"] * 20, "n": 20}, 400, "prompt", None),
    ("/v1/completions", {**COMPLETION, "best_of": 3}, 400, "best_of", "unsupported_parameter"),
    ("/v1/completions", {**COMPLETION, "suffix": "end"}, 400, "suffix", "unsupported_parameter"),
    ("/v1/completions", {**COMPLETION, "echo": True, "logprobs": 1}, 400, "echo", "unsupported_parameter"),
]


@pytest.mark.parametrize("path,body,status,param,code", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_requests_get_clear_4xx(served, path, body, status, param, code):
    got, error, _ = call(served, "POST", path, body)
    assert got == status, error
    assert set(error) == {"error"} and set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["param"] == param and error["error"]["code"] == code
    assert len(error["error"]["message"]) > 15


def test_request_size_limit_and_routes(served, client):
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * LIMIT}]}
    status, error, _ = call(served, "POST", "/v1/chat/completions", big)
    assert status == 413 and error["error"]["code"] == "request_too_large" and str(LIMIT) in error["error"]["message"]
    # without a Content-Length (chunked), the limit is counted while reading
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=iter([b" " * 65536] * 5), encode_chunked=True,
                 headers={"Authorization": f"Bearer {KEY}"})
    response = conn.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    conn.close()
    for method, path, want in [("GET", "/v1/nothing", 404), ("POST", "/v2/chat/completions", 404),
                               ("GET", "/v1/chat/completions", 405)]:
        status, error, _ = call(served, method, path)
        assert status == want and path in error["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=HELLO)


def test_no_server_error_for_any_field_of_any_type(served):
    """Every top-level field set to values of every JSON type: a 200 or a 4xx, never a 5xx."""
    values = [None, True, 0, -1, 2.5, 10**30, "", "x", [], [1], ["a"], {}, {"a": 1}]
    fields = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream",
              "stream_options", "logprobs", "top_logprobs", "tools", "tool_choice", "response_format", "echo",
              "user", "top_k", "min_p", "repetition_penalty", "ignore_eos", "presence_penalty", "logit_bias"]
    for path, base in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)):
        for name in fields:
            for value in values:
                status, body, _ = call(served, "POST", path, {**base, "max_tokens": 2, name: value})
                assert status < 500, (path, name, value, body)
    nested = [  # and inside messages, tools, tool_choice and response_format
        lambda v: {"messages": [v]},
        lambda v: {"messages": [{"role": "user", "content": v}]},
        lambda v: {"messages": [{"role": "user", "content": [v]}]},
        lambda v: {"messages": [{"role": "user", "content": [{"type": "text", "text": v}]}]},
        lambda v: {"messages": [{"role": v, "content": "x"}]},
        lambda v: {"messages": [{"role": "user", "content": "x", "name": v}]},
        lambda v: {"messages": [*HELLO, {"role": "assistant", "tool_calls": v}]},
        lambda v: {"messages": [*HELLO, {"role": "assistant", "tool_calls": [{"function": v}]}]},
        lambda v: {"messages": [*HELLO, {"role": "assistant", "tool_calls": [
            {"function": {"name": "f", "arguments": v}}]}]},
        lambda v: {"messages": [*HELLO, {"role": "tool", "content": "x", "tool_call_id": v}]},
        lambda v: {"tools": [v]},
        lambda v: {"tools": [{"type": "function", "function": v}]},
        lambda v: {"tools": [{"type": "function", "function": {"name": "f", "parameters": v}}]},
        lambda v: {"tools": [ADD], "tool_choice": {"type": "function", "function": v}},
        lambda v: {"response_format": {"type": "json_schema", "json_schema": v}},
        lambda v: {"stream": True, "stream_options": {"include_usage": v}},
    ]
    for make in nested:
        for value in values:
            status, body, _ = call(served, "POST", "/v1/chat/completions", {**CHAT, "max_tokens": 2, **make(value)})
            assert status < 500, (make(value), body)
    for schema in ({"type": v} for v in values):  # schemas the compiler must refuse or compile, never crash on
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        status, body, _ = call(served, "POST", "/v1/chat/completions", {**CHAT, "response_format": fmt})
        assert status < 500, (schema, body)


def test_auth(served, client):
    for key in (None, "wrong", KEY + "x"):
        status, error, headers = call(served, "POST", "/v1/chat/completions", CHAT, key=key)
        assert status == 401 and error["error"]["code"] == "invalid_api_key" and headers["www-authenticate"] == "Bearer"
        assert call(served, "GET", "/v1/models", key=key)[0] == 401
    assert call(served, "POST", "/v1/chat/completions", CHAT, key=KEY)[0] == 200
    for open_path in ("/health", "/metrics", "/"):
        assert call(served, "GET", open_path, key=None)[0] == 200
    wrong = openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL, messages=HELLO)


def test_metrics(served, client):
    def scrape() -> dict[str, float]:
        status, text, headers = call(served, "GET", "/metrics", key=None)
        assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
        return metric_values(text)

    ok = 'lmlab_http_requests_total{endpoint="/v1/chat/completions",status="200"}'
    bad = 'lmlab_http_requests_total{endpoint="/v1/chat/completions",status="400"}'
    wait_for(lambda: idle(served))
    before = scrape()
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, extra_body={"ignore_eos": True})
    call(served, "POST", "/v1/chat/completions", {**CHAT, "temperature": 9})
    call(served, "GET", "/nope", key=None)
    # a request is counted once its response is sent, and the engine's numbers once its thread publishes them
    wait_for(lambda: idle(served) and scrape().get(ok) == before.get(ok, 0) + 1)
    after = scrape()
    assert after[bad] == before.get(bad, 0) + 1
    assert after['lmlab_http_requests_total{endpoint="other",status="404"}'] >= 1
    assert after["lmlab_generation_tokens_total"] == before["lmlab_generation_tokens_total"] + 5
    assert after["lmlab_prompt_tokens_total"] == before["lmlab_prompt_tokens_total"] + len(chat_prompt(served))
    assert after["lmlab_generation_tokens_per_second"] > 0
    assert after['lmlab_requests_finished_total{reason="length"}'] >= 1
    assert after["lmlab_kv_blocks_total"] == served.server.loop.snapshot()[0].blocks_total > 0
    assert after["lmlab_requests_running"] == after["lmlab_kv_blocks_used"] == 0
    assert after['lmlab_model_info{model="tiny",max_model_len="1024"}'] == 1
    for name in ("lmlab_requests_waiting", "lmlab_preemptions_total", "lmlab_prefix_cache_hit_tokens_total",
                 "lmlab_spec_draft_tokens_total", "lmlab_spec_accepted_tokens_total", "lmlab_spec_acceptance_rate",
                 "lmlab_kv_cache_usage_ratio"):
        assert name in after


# --- cancellation, shutdown, load ----------------------------------------------------------------
def slow_steps(monkeypatch, engine: Engine, seconds: float) -> None:
    """Make each engine step take a while, so that a request is surely still running when the test acts."""
    step = engine.step

    def slow():
        time.sleep(seconds)
        return step()

    monkeypatch.setattr(engine, "step", slow)


def _request_bytes(body: dict, port: int) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_request(served, monkeypatch, stream):
    slow_steps(monkeypatch, served.engine, 0.01)
    aborted = served.server.loop.snapshot()[1].get("abort", 0)
    generated = served.server.loop.snapshot()[0].generated_tokens
    body = {**CHAT, "max_tokens": 500, "stream": stream, "ignore_eos": True}
    sock = socket.create_connection(("127.0.0.1", served.port))
    sock.sendall(_request_bytes(body, served.port))
    wait_for(lambda: served.server.loop.snapshot()[0].running == 1)
    if stream:
        assert b"data: " in sock.recv(4096)  # the stream has begun
    sock.close()
    wait_for(lambda: served.server.loop.snapshot()[1].get("abort", 0) == aborted + 1)
    wait_for(lambda: idle(served))  # its KV blocks are free again
    assert served.server.loop.snapshot()[0].generated_tokens - generated < 500  # stopped early


def test_an_engine_failure_fails_the_requests_in_flight_not_the_server(served, client, monkeypatch):
    step = served.engine.step

    def broken():
        monkeypatch.setattr(served.engine, "step", step)  # fails once
        raise RuntimeError("out of memory")

    monkeypatch.setattr(served.engine, "step", broken)
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4)
    assert "out of memory" in e.value.body["message"] and e.value.body["type"] == "server_error"
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4).choices[0].finish_reason
    assert call(served, "GET", "/health", key=None)[:2] == (200, {"status": "ok"})
    wait_for(lambda: idle(served))


def _read_stream(url: str, body: dict, out: dict) -> None:
    """Read a streamed chat completion into out: the text, the finish reason, the token count, [DONE]."""
    try:
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        out["text"], out["finish"], out["tokens"] = "", None, 0
        for chunk in c.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}):
            if chunk.usage is not None:
                out["tokens"] = chunk.usage.completion_tokens
            if chunk.choices:
                out["text"] += chunk.choices[0].delta.content or ""
                out["finish"] = chunk.choices[0].finish_reason or out["finish"]
                out.setdefault("first", time.monotonic())
                out["last"] = time.monotonic()
        out["done"] = True
    except Exception as e:  # reported by the test
        out["error"] = e


def test_graceful_shutdown_finishes_the_stream_in_flight(checkpoint, monkeypatch):
    engine = _engine(checkpoint)
    slow_steps(monkeypatch, engine, 0.01)
    app = create_app(engine, model_name=MODEL, api_key=KEY)
    out: dict = {}
    with serve_in_thread(app) as running:
        reader = threading.Thread(target=_read_stream, args=(running.url, {**CHAT, "max_tokens": 60,
                                                                           "extra_body": {"ignore_eos": True}}, out))
        reader.start()
        wait_for(lambda: "first" in out or "error" in out)
        signalled = time.monotonic()
        running.shutdown()  # returns once the server has stopped
        assert not running.thread.is_alive()
        reader.join(10)
        port = int(running.url.rsplit(":", 1)[1])
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
    assert "error" not in out, out.get("error")
    assert out["done"] and out["finish"] == "length" and out["tokens"] == 60
    assert out["last"] > signalled  # the stream was still running when shutdown began
    assert not engine.has_unfinished()


def test_lmlab_serve_sigterm_finishes_the_stream(checkpoint, tmp_path):
    """`lmlab serve` on a free port; SIGTERM while a stream is in flight: the stream completes, exit status 0."""
    env = {**os.environ, "LMLAB_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "lmlab", "serve", "--model", str(checkpoint), "--port", "0",
                             "--served-model-name", MODEL, "--max-num-seqs", "4"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            m = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            if m:
                url = m.group(1)
                break
        assert url, "".join(lines)
        threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep the pipe drained
        out: dict = {}
        reader = threading.Thread(target=_read_stream, args=(url, {**CHAT, "max_tokens": 400,
                                                                   "extra_body": {"ignore_eos": True}}, out))
        reader.start()
        wait_for(lambda: "first" in out or "error" in out)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        reader.join(30)
        assert proc.wait(30) == 0
        assert "error" not in out, out.get("error")
        assert out["done"] and out["finish"] == "length" and out["tokens"] == 400
        assert out["last"] > signalled  # the stream was still running when the signal came
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_lmlab_serve_usage_errors(checkpoint, tmp_path, capsys):
    from lmlab.cli import main

    bare = tmp_path / "bare"  # a checkpoint without its tokenizer
    shutil.copytree(checkpoint, bare, ignore=shutil.ignore_patterns("tokenizer*"))
    for argv, message in [(["--model", str(checkpoint), "--port", "70000"], "--port must be in 0..65535"),
                          (["--model", str(checkpoint), "--draft", str(checkpoint), "--speculative", "ngram"],
                           "give one"),
                          (["--model", str(checkpoint), "--max-num-seqs", "0"], "max_num_seqs"),
                          (["--model", str(bare)], "holds no tokenizer")]:
        assert main(["serve", *argv]) == 1, argv
        assert message in capsys.readouterr().err, argv


def test_load_64_clients(served):
    """64 concurrent clients x 8 requests each (chat and completions, half streamed): no errors, every answer
    complete."""
    clients, per_client, max_tokens = 64, 8, 8
    latencies: list[float] = []
    errors: list[Exception] = []

    async def one(c, i: int) -> None:
        kind = i % 4
        start = time.perf_counter()
        extra = {"ignore_eos": True}
        if kind == 0:
            r = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Hi {i}"}],
                                                max_tokens=max_tokens, temperature=0.8, extra_body=extra)
            assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == max_tokens
        elif kind == 1:
            r = await c.completions.create(model=MODEL, prompt=f"Story {i}:", max_tokens=max_tokens, extra_body=extra)
            assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == max_tokens
        else:
            stream = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"Yo {i}"}],
                                                     max_tokens=max_tokens, stream=True, extra_body=extra,
                                                     stream_options={"include_usage": True})
            finish, usage = None, None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                usage = chunk.usage or usage
            assert finish == "length" and usage.completion_tokens == max_tokens
        latencies.append(time.perf_counter() - start)

    async def worker(c, w: int) -> None:
        for k in range(per_client):
            try:
                await one(c, w * per_client + k)
            except Exception as e:  # counted, reported below
                errors.append(e)

    async def main() -> float:
        c = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        start = time.perf_counter()
        await asyncio.gather(*(worker(c, w) for w in range(clients)))
        elapsed = time.perf_counter() - start
        await c.close()
        return elapsed

    elapsed = asyncio.run(main())
    total = clients * per_client
    assert not errors, f"{len(errors)} errors, first: {errors[0]!r}"
    assert len(latencies) == total
    q = statistics.quantiles(latencies, n=100)
    print(f"\nload: {total} requests from {clients} clients in {elapsed:.1f} s: {total / elapsed:.0f} req/s, "
          f"{total * max_tokens / elapsed:.0f} generated tokens/s; latency p50 {q[49] * 1000:.0f} ms, "
          f"p99 {q[98] * 1000:.0f} ms")
    wait_for(lambda: idle(served))
