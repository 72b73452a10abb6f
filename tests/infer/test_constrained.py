"""Constrained decoding: regex translation against Python's re, integer ranges, JSON-schema outputs
validated by an independent validator, token masks against an exact oracle (the `regex` module's
partial matching over the token bytes), no dead ends, multi-byte characters split across tokens,
stop ids exactly in accepting states, sampling with a random model, and the errors."""

from __future__ import annotations

import datetime
import functools
import itertools
import json
import random
import re
import uuid
from decimal import Decimal

import pytest
import regex as regex_module
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lmlab.infer.constrained import (
    ConstraintCompiler,
    RegexConstraint,
    integer_range_regex,
    number_range_regex,
    schema_to_regex,
    translate_regex,
)
from lmlab.model import ModelConfig, build_model
from lmlab.tokenizer import Tokenizer

pytest.importorskip("outlines_core")

# --- tokenizers -----------------------------------------------------------------------------------


def corpus() -> list[str]:
    """JSON-ish and multilingual text, so the BPE learns tokens such as '": ', '"},' and pieces of
    multi-byte characters."""
    rng = random.Random(0)
    words = ["name", "age", "tags", "café", "naïve", "€uro", "日本", "über", "true", "false", "null", "id"]
    docs = []
    for _ in range(300):
        record = {rng.choice(words): rng.choice([rng.randint(-99, 999), rng.choice(words), rng.random() < 0.5,
                                                 None, [rng.randint(0, 9), rng.choice(words)]])
                  for _ in range(rng.randint(1, 4))}
        docs.append(json.dumps(record, ensure_ascii=False, indent=rng.choice([None, 2])))
        docs.append(" ".join(rng.choice(words) for _ in range(8)) + ". 2024-01-15 12:30:00Z")
    return docs


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train(corpus(), vocab_size=360, progress=False)


@pytest.fixture(scope="module")
def compiler(bpe) -> ConstraintCompiler:
    return ConstraintCompiler(bpe, bpe.vocab_size + 3, bpe.eos_ids)  # 3 model ids beyond the tokenizer's


def byte_tokenizer() -> Tokenizer:
    """256 single-byte tokens and one stop token: constraint acceptance equals string acceptance."""
    return Tokenizer({bytes([b]): b for b in range(256)}, "gpt2", {"<|eos|>": 256}, eos_token="<|eos|>")


@pytest.fixture(scope="module")
def bytes_compiler() -> ConstraintCompiler:
    tok = byte_tokenizer()
    return ConstraintCompiler(tok, 257, tok.eos_ids, cache_size=512)


def accepts(compiler: ConstraintCompiler, regex_text: str, text: str) -> bool:
    """Whether the byte-level guide of `regex_text` accepts `text` (fed one byte per token)."""
    guide = compiler.compile(regex_text)
    state = guide.initial_state
    for b in text.encode("utf-8"):
        if not guide.mask(state)[b]:
            return False
        state = guide.next_state(state, b)
    return guide.is_accepting(state)


# --- an independent JSON schema validator (the subset the tests use) -------------------------------


def resolve(root: dict, ref: str):
    node = root
    for part in ref[2:].split("/") if ref != "#" else []:
        node = node[part]
    return node


def type_ok(x, t: str) -> bool:
    return {"string": isinstance(x, str), "boolean": isinstance(x, bool), "null": x is None,
            "integer": isinstance(x, int) and not isinstance(x, bool),
            "number": isinstance(x, int | float) and not isinstance(x, bool),
            "array": isinstance(x, list), "object": isinstance(x, dict)}[t]


def same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def validate(x, schema, root=None) -> None:
    """Raise AssertionError unless `x` is valid under `schema`."""
    root = schema if root is None else root
    if schema is True or schema == {}:
        return
    assert schema is not False
    if "$ref" in schema:
        validate(x, resolve(root, schema["$ref"]), root)
    for sub in schema.get("allOf", []):
        validate(x, sub, root)
    if "anyOf" in schema:
        assert any(valid(x, sub, root) for sub in schema["anyOf"]), (x, schema)
    if "const" in schema:
        assert same(x, schema["const"]), (x, schema)
    if "enum" in schema:
        assert any(same(x, v) for v in schema["enum"]), (x, schema)
    if "type" in schema:
        types = [schema["type"]] if isinstance(schema["type"], str) else schema["type"]
        assert any(type_ok(x, t) for t in types), (x, schema)
    if isinstance(x, str):
        assert len(x) >= schema.get("minLength", 0) and len(x) <= schema.get("maxLength", len(x)), (x, schema)
        if "pattern" in schema:
            assert re.search(schema["pattern"], x, re.ASCII), (x, schema)
        fmt = schema.get("format")
        if fmt == "date":
            datetime.date.fromisoformat(x)
        elif fmt == "time":
            datetime.time.fromisoformat(x)
        elif fmt == "date-time":
            datetime.datetime.fromisoformat(x)
        elif fmt == "uuid":
            assert str(uuid.UUID(x)) == x
    if type_ok(x, "number"):
        assert x >= schema.get("minimum", x) and x <= schema.get("maximum", x), (x, schema)
        assert "exclusiveMinimum" not in schema or x > schema["exclusiveMinimum"], (x, schema)
        assert "exclusiveMaximum" not in schema or x < schema["exclusiveMaximum"], (x, schema)
    if isinstance(x, list):
        assert schema.get("minItems", 0) <= len(x) <= schema.get("maxItems", len(x)), (x, schema)
        for item in x:
            validate(item, schema.get("items", True), root)
    if isinstance(x, dict):
        props = schema.get("properties", {})
        assert set(schema.get("required", [])) <= set(x), (x, schema)
        for key, value in x.items():
            if key in props:
                validate(value, props[key], root)
            else:
                extra = schema.get("additionalProperties", True)
                assert extra is not False, (x, schema)
                validate(value, extra, root)


def valid(x, schema, root) -> bool:
    try:
        validate(x, schema, root)
        return True
    except (AssertionError, ValueError):
        return False


def nesting(x) -> int:
    if isinstance(x, dict):
        return 1 + max((nesting(v) for v in x.values()), default=0)
    if isinstance(x, list):
        return 1 + max((nesting(v) for v in x), default=0)
    return 0


# --- random walks through a constraint ------------------------------------------------------------


def walk(constraint: RegexConstraint, tok, stop_ids, rng: random.Random, max_steps: int = 400,
         check=None) -> tuple[bytes, str]:
    """Take uniformly random allowed tokens (a stop id with probability 1/2 when allowed); returns
    the output bytes and how it ended ("stop", "finished" or "length"). `check(data, mask)` sees
    every step's mask."""
    data = b""
    for _ in range(max_steps):
        if constraint.finished:
            return data, "finished"
        mask = constraint.allowed()
        allowed = mask.nonzero().flatten().tolist()
        assert allowed, f"no token is allowed after {data!r}, and the constraint is not finished"
        if check is not None:
            check(data, mask)
        stops = [i for i in allowed if i in stop_ids]
        text = [i for i in allowed if i not in stop_ids]
        if stops and (not text or rng.random() < 0.5):
            constraint.advance(stops[0])
            assert constraint.finished
            return data, "stop"
        t = rng.choice(text)
        constraint.advance(t)
        data += tok.token_bytes(t)
    return data, "length"


SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string", "pattern": r"^[a-z]{1,8}@[a-z]{1,8}\.(com|org)$"},
            "tags": {"type": "array", "items": {"enum": ["a", "b", "café"]}, "maxItems": 3},
        },
        "required": ["name", "age"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                                         "city": {"type": "string", "maxLength": 8}},
                        "required": ["zip"]},
            "scores": {"type": "array", "items": {"type": "number", "minimum": -1, "exclusiveMaximum": 2},
                       "minItems": 1, "maxItems": 4},
            "active": {"type": "boolean"},
            "note": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]},
        },
        "required": ["address", "scores"],
    },
    "recursive": {
        "$defs": {"node": {"type": "object", "properties": {
            "value": {"type": "integer", "exclusiveMinimum": -3, "exclusiveMaximum": 3},
            "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
            "required": ["value"]}},
        "$ref": "#/$defs/node",
    },
    "shapes": {
        "type": "object",
        "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}, "unit": {"enum": ["cm", "µm", 3]},
                       'naïve "key"': {"type": "boolean"}},
        "required": ["kind", "r", "unit", 'naïve "key"'],
    },
    "types": {"type": ["string", "integer", "null"], "maxLength": 4, "minimum": 10},
    "formats": {"type": "array", "minItems": 3, "maxItems": 3, "items": {"anyOf": [
        {"type": "string", "format": "date"}, {"type": "string", "format": "date-time"},
        {"type": "string", "format": "uuid"}, {"type": "string", "format": "time"}]}},
    "escapes": {"type": "array", "items": {"type": "string", "pattern": r'^[^@]{1,6}@\s?"$'}, "maxItems": 2},
    "unanchored": {"type": "string", "pattern": "é|[0-9]"},
    "map": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 5, "maximum": 500}},
    "open": {},
    "optional_only": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "null"},
                                                       "c": {"type": "boolean"}},
                      "additionalProperties": False},
    "open_array": {"type": "array", "uniqueItems": False},
    "tool_call": {"anyOf": [  # a forced call to one of two tools, as a server builds it (pydantic-style parts)
        {"type": "object", "properties": {"name": {"enum": ["get_weather"]}, "arguments": {
            "type": "object", "title": "Args", "additionalProperties": False, "required": ["city"],
            "properties": {"city": {"type": "string", "description": "City name", "maxLength": 10},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
                           "days": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 14}, {"type": "null"}]}}}},
         "required": ["name", "arguments"], "additionalProperties": False},
        {"type": "object", "properties": {"name": {"const": "add"}, "arguments": {"$ref": "#/$defs/pair"}},
         "required": ["name", "arguments"], "additionalProperties": False}],
        "$defs": {"pair": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                           "required": ["a", "b"]}}},
}


@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_walks_are_valid(compiler, bpe, name):
    """Random walks through the mask (uniform over allowed tokens): every completed output parses as
    JSON valid under the schema, and at every step the stop ids are allowed iff the text so far
    fullmatches the schema's regex (checked with Python's re)."""
    schema = SCHEMAS[name]
    pattern = re.compile(schema_to_regex(schema))
    stops = set(bpe.eos_ids)

    def check(data: bytes, mask: torch.Tensor) -> None:
        try:
            complete = pattern.fullmatch(data.decode("utf-8")) is not None
        except UnicodeDecodeError:
            complete = False
        assert all(bool(mask[s]) == complete for s in stops), data

    rng, done = random.Random(name), 0
    for _ in range(40):
        data, how = walk(compiler.json_schema(schema), bpe, stops, rng, check=check)
        if how == "length":
            continue
        done += 1
        value = json.loads(data.decode("utf-8"))
        validate(value, schema)
        if name in ("open", "open_array"):
            assert nesting(value) <= compiler.max_depth
    assert done >= 20, f"only {done} of 40 walks completed"


def test_json_object_walks(compiler, bpe):
    rng, done = random.Random(1), 0
    for _ in range(30):
        data, how = walk(compiler.json_object(), bpe, set(bpe.eos_ids), rng)
        if how != "length":
            value = json.loads(data.decode("utf-8"))
            assert isinstance(value, dict) and nesting(value) <= compiler.max_depth
            done += 1
    assert done >= 15


def test_whitespace_is_bounded(compiler, bpe):
    """No run of more than two spaces, no newline: a model cannot stall in whitespace."""
    rng = random.Random(2)
    for _ in range(30):
        data, how = walk(compiler.json_schema(SCHEMAS["nested"]), bpe, set(bpe.eos_ids), rng)
        text = data.decode("utf-8") if how != "length" else ""
        outside = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)  # whitespace inside strings is content
        assert "   " not in outside and "\n" not in outside and "\t" not in outside


# --- masks against an exact oracle -----------------------------------------------------------------


@functools.cache
def char_range(tail: bytes) -> tuple[int, int] | None:
    """Smallest and largest code point whose UTF-8 encoding starts with `tail` (an incomplete character)."""
    lead = tail[0]
    n = 2 if 0xC2 <= lead <= 0xDF else 3 if 0xE0 <= lead <= 0xEF else 4 if 0xF0 <= lead <= 0xF4 else 0
    if len(tail) >= n:
        return None
    codes = []
    for rest in itertools.product(range(0x80, 0xC0), repeat=n - len(tail)):
        try:
            codes.append(ord((tail + bytes(rest)).decode("utf-8")))
        except UnicodeDecodeError:
            pass
    return (min(codes), max(codes)) if codes else None


def viable(pattern: str, data: bytes) -> bool:
    """Whether some continuation of `data` fullmatches `pattern` (Python re semantics, re.ASCII).
    An incomplete last character is completed with every code point that behaves differently from
    its neighbours under the pattern's classes: the range ends and the pattern's own characters +-1.
    NUL is never generated (it marks the end of the text to the automaton)."""
    if b"\x00" in data:
        return False
    for k in range(min(4, len(data)) + 1):
        try:
            text = data[: len(data) - k].decode("utf-8")
        except UnicodeDecodeError:
            continue
        tail = data[len(data) - k :]
        if not tail:
            return regex_module.fullmatch(pattern, text, regex_module.ASCII, partial=True) is not None
        span = char_range(tail)
        if span is None:
            return False
        lo, hi = span
        points = {lo, hi} | {p + d for p in map(ord, pattern) for d in (-1, 0, 1) if lo <= p + d <= hi}
        return any(regex_module.fullmatch(pattern, text + chr(p), regex_module.ASCII, partial=True)
                   for p in points if chr(p).encode("utf-8").startswith(tail) and not 0xD800 <= p <= 0xDFFF)
    return False


ORACLE_PATTERNS = [
    r"(é|€|日本)+",
    r"[a-zé]{2,5}( [0-9]+)?",
    r'"[^"\\]{0,4}"',
    r"(café|caf|über|na)*\.",
    r"[^a-z€]{1,3}x",
    r"(true|false|null|-?[0-9]+(\.[0-9]+)?)",
    r"\w+\s\d\D",
]


@pytest.mark.parametrize("pattern", ORACLE_PATTERNS)
def test_masks_equal_the_oracle(compiler, bpe, pattern):
    """At every step of random walks, token t is allowed iff output + bytes(t) can still be completed to
    a match (so the mask never leads to a dead end and never forbids a way out), the stop ids are
    allowed iff the output is a complete match, and no other special token is ever allowed."""
    stops = set(bpe.eos_ids)
    specials = set(bpe.special_tokens.values()) - stops
    V = compiler.vocab_size
    token_bytes = [bpe.token_bytes(i) if i < bpe.vocab_size and i not in specials | stops else None
                   for i in range(V)]

    def check(data: bytes, mask: torch.Tensor) -> None:
        expected = [b is not None and viable(pattern, data + b) for b in token_bytes]
        got = mask.tolist()
        wrong = [i for i in range(V) if i not in stops and got[i] != expected[i]]
        assert not wrong, (data, [(i, token_bytes[i], got[i]) for i in wrong[:5]])
        try:
            complete = re.fullmatch(pattern, data.decode("utf-8"), re.ASCII) is not None
        except UnicodeDecodeError:
            complete = False
        assert all(got[s] == complete for s in stops)

    rng = random.Random(pattern)
    for _ in range(4):
        data, how = walk(compiler.regex(pattern), bpe, stops, rng, max_steps=40, check=check)
        if how != "length":
            assert re.fullmatch(pattern, data.decode("utf-8"), re.ASCII)


def reachable_states(guide, max_states: int = 5000) -> set[int]:
    seen, todo = {guide.initial_state}, [guide.initial_state]
    while todo:
        state = todo.pop()
        for t in guide.mask(state).nonzero().flatten().tolist():
            if t in set(guide.stop_ids.tolist()):
                continue
            nxt = guide.next_state(state, t)
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
        assert len(seen) < max_states
    return seen


def assert_no_dead_ends(guide) -> None:
    """Every state the mask can lead to can still reach an accepting state; a state whose mask holds
    no text token is accepting and finished."""
    states = reachable_states(guide)
    stops = set(guide.stop_ids.tolist())
    edges = {s: {guide.next_state(s, t) for t in guide.mask(s).nonzero().flatten().tolist() if t not in stops}
             for s in states}
    live = {s for s in states if guide.is_accepting(s)}
    changed = True
    while changed:
        new = {s for s in states if s not in live and edges[s] & live}
        live |= new
        changed = bool(new)
    assert live == states, f"{len(states - live)} reachable states cannot complete a match"
    for s in states:
        if not edges[s]:
            assert guide.is_accepting(s) and guide.is_finished(s)


@pytest.mark.parametrize("what", ["regex", "person", "recursive", "shapes"])
def test_no_dead_ends(compiler, what):
    guide = (compiler.regex(ORACLE_PATTERNS[3]) if what == "regex" else compiler.json_schema(SCHEMAS[what])).guide
    assert_no_dead_ends(guide)


# --- multi-byte characters, finishing, stop ids ----------------------------------------------------


def test_multibyte_character_split_across_tokens(bpe):
    """'é' is b'\\xc3\\xa9': after the single-byte token b'\\xc3' only tokens that start with its
    continuation byte are allowed, the stop id is not (the character is incomplete), and after
    b'\\xa9' the output is complete and decodes."""
    compiler = ConstraintCompiler(bpe, bpe.vocab_size, bpe.eos_ids)
    lead = bpe.mergeable_ranks[b"\xc3"]
    cont = bpe.mergeable_ranks[b"\xa9"]
    c = compiler.regex("é{1,3}")
    assert c.allowed()[lead] and not c.allowed()[cont]
    c.advance(lead)
    mask = c.allowed()
    allowed = {bpe.token_bytes(i) for i in mask.nonzero().flatten().tolist()}
    assert b"\xa9" in allowed and all(b.startswith(b"\xa9") for b in allowed)
    assert not mask[bpe.eos_ids].any() and not c.accepting
    c.advance(cont)
    assert c.accepting and c.allowed()[bpe.eos_ids].all() and not c.finished
    whole = [i for i in range(bpe.vocab_size) if bpe.token_bytes(i) == "é".encode()]
    assert not whole or c.allowed()[whole[0]]  # a token holding the whole character is allowed too


def test_tokens_may_continue_a_complete_match(compiler, bpe):
    """After a complete match, a token that continues it without completing it again is allowed
    (outlines-core's own index forbids it: see END_BYTE in the module)."""
    a, b = bpe.encode_ordinary("a")[0], bpe.encode_ordinary("b")[0]
    c = compiler.regex("(ab)+")
    c.advance(a)
    c.advance(b)
    assert c.accepting and c.allowed()[a]
    d = compiler.regex("a(bc)?")
    d.advance(a)
    assert d.accepting and d.allowed()[b]
    e = compiler.json_schema({"type": "number"})
    e.advance(bpe.encode_ordinary("1")[0])
    assert e.accepting and e.allowed()[bpe.encode_ordinary(".")[0]]


def test_finished_states(compiler, bpe):
    stop = bpe.eos_ids
    c = compiler.regex("abc")
    for t in bpe.encode_ordinary("abc"):
        assert not c.finished
        c.advance(t)
    assert c.finished and c.accepting
    assert c.allowed().nonzero().flatten().tolist() == sorted(stop)  # only a stop id can follow
    assert compiler.regex("").finished  # already complete, nothing can extend it
    a = compiler.regex("a+")
    a.advance(bpe.encode_ordinary("a")[0])
    assert a.accepting and not a.finished
    const = compiler.json_schema({"const": {"k": [1, "é"]}})
    for t in bpe.encode_ordinary('{"k":[1,"é"]}'):
        const.advance(t)
    assert const.finished


def test_stop_ids_and_advance_errors(compiler, bpe):
    stop = bpe.eos_ids[0]
    c = compiler.regex("ab")
    a, b = bpe.encode_ordinary("a")[0], bpe.encode_ordinary("b")[0]
    assert not c.allowed()[stop]
    with pytest.raises(ValueError, match="stop token"):
        c.advance(stop)
    with pytest.raises(ValueError, match="not allowed"):
        c.advance(b)
    with pytest.raises(ValueError, match="not allowed"):
        c.advance(compiler.vocab_size + 5)
    c.advance(a)
    c.advance(b)
    c.advance(stop)
    assert c.finished and not c.allowed().any()
    with pytest.raises(ValueError, match="already ended"):
        c.advance(b)


def test_mask_covers_the_model_vocabulary(compiler, bpe):
    """Masks have the model's length; ids beyond the tokenizer and special tokens are never allowed."""
    specials = sorted(set(bpe.special_tokens.values()) - set(bpe.eos_ids))
    c = compiler.json_object()
    for _ in range(12):
        mask = c.allowed()
        assert mask.shape == (compiler.vocab_size,) and mask.dtype == torch.bool
        assert not mask[bpe.vocab_size:].any() and not mask[specials].any()
        text = [i for i in mask.nonzero().flatten().tolist() if i not in bpe.eos_ids]
        if not text:
            break
        c.advance(text[len(text) // 2])


def test_compilation_is_cached_and_states_are_fresh(bpe):
    compiler = ConstraintCompiler(bpe, bpe.vocab_size, bpe.eos_ids, cache_size=2)
    c1, c2 = compiler.regex("[ab]+"), compiler.regex("[ab]+")
    assert c1.guide is c2.guide and c1 is not c2
    c1.advance(bpe.encode_ordinary("a")[0])
    assert c1.state != c2.state and c2.state == c2.guide.initial_state
    assert compiler.json_schema({"type": "integer"}).guide is compiler.json_schema('{"type": "integer"}').guide
    compiler.regex("x")  # a third pattern evicts the least recently used ([ab]+)
    assert compiler.cache_info() == {"size": 2, "capacity": 2}
    assert compiler.regex("[ab]+").guide is not c1.guide


# --- pattern translation and integer ranges against Python --------------------------------------

ALPHABET = 'ab-"\\é€ \n\t0Z_]&~'


@st.composite
def patterns(draw, depth: int = 3) -> str:
    leaf = st.one_of(
        st.sampled_from(ALPHABET).map(re.escape),
        st.sampled_from([".", r"\d", r"\w", r"\s", r"\D", r"\W", r"\S", "[a-c]", "[^a\"]", "[é-€]", r"[\w\-]",
                         r"[^\s\\]", "[^-]"]),
    )
    if depth == 0:
        return draw(leaf)
    sub = patterns(depth=depth - 1)
    kind = draw(st.sampled_from(["leaf", "cat", "alt", "group", "star", "plus", "opt", "count", "lazy"]))
    if kind == "leaf":
        return draw(leaf)
    if kind == "cat":
        return draw(sub) + draw(sub)
    if kind == "alt":
        return f"(?:{draw(sub)}|{draw(sub)})"
    if kind == "group":
        return f"({draw(sub)})"
    lo = draw(st.integers(0, 2))
    suffix = {"star": "*", "plus": "+", "opt": "?", "lazy": "*?",
              "count": f"{{{lo},{lo + draw(st.integers(0, 2))}}}"}[kind]
    return f"(?:{draw(sub)}){suffix}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_regex_translation_equals_python_re(bytes_compiler, data):
    """The compiled automaton accepts a string iff re.fullmatch(pattern, string, re.ASCII) does, on
    strings drawn to match (hypothesis' from_regex) and on arbitrary strings."""
    pattern = data.draw(patterns())
    anchors = data.draw(st.booleans())  # ^...$ changes nothing for a whole match
    compiled = re.compile(pattern, re.ASCII)
    text = translate_regex(f"^{pattern}$" if anchors else pattern)
    positives = data.draw(st.lists(st.from_regex(compiled, fullmatch=True), max_size=3))
    others = data.draw(st.lists(st.text(ALPHABET, max_size=6), max_size=6))
    for s in positives + others:  # NUL is never generated
        assert accepts(bytes_compiler, text, s) == (bool(compiled.fullmatch(s)) and "\x00" not in s), (pattern, s)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_json_string_pattern_has_search_semantics(bytes_compiler, data):
    """A JSON string with a `pattern` accepts json.dumps(s) iff re.search(pattern, s) finds a match,
    with the characters JSON escapes (quote, backslash, controls) written escaped."""
    pattern = data.draw(patterns(depth=2))
    anchored = data.draw(st.sampled_from(["", "^", "$", "^$"]))
    full = ("^" if "^" in anchored else "") + pattern + ("$" if "$" in anchored else "")
    text = schema_to_regex({"type": "string", "pattern": full})
    compiled = re.compile(full, re.ASCII)
    strings = data.draw(st.lists(st.text(ALPHABET + "\x01\x7f", max_size=6), max_size=6))
    strings += data.draw(st.lists(st.from_regex(compiled), max_size=2))
    for s in strings:  # (NUL is written escaped in JSON, so it may appear)
        assume(not s.endswith("\n"))  # re's $ also matches before a final newline; the automaton does not
        assert accepts(bytes_compiler, text, json.dumps(s, ensure_ascii=False)) == bool(compiled.search(s)), \
            (full, s)
    for raw in data.draw(st.lists(st.text(ALPHABET + "u01", max_size=8), max_size=8)):
        quoted = f'"{raw}"'  # any text the automaton accepts is a JSON string whose content matches
        if accepts(bytes_compiler, text, quoted):
            value = json.loads(quoted)
            assert isinstance(value, str) and compiled.search(value), (full, quoted)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.integers(-10**6, 10**6)), st.one_of(st.none(), st.integers(-10**6, 10**6)),
       st.lists(st.integers(-2 * 10**6, 2 * 10**6), min_size=1, max_size=20))
def test_integer_range_regex(lo, hi, numbers):
    if lo is not None and hi is not None and lo > hi:
        lo, hi = hi, lo
    pattern = re.compile(integer_range_regex(lo, hi))
    edges = [x + d for x in (lo, hi, 0) if x is not None for d in (-1, 0, 1)]
    for n in numbers + edges:
        assert bool(pattern.fullmatch(str(n))) == ((lo is None or n >= lo) and (hi is None or n <= hi)), (lo, hi, n)
    assert not pattern.fullmatch("-0") and not pattern.fullmatch("007")


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.integers(-30, 30)), st.one_of(st.none(), st.integers(-30, 30)), st.booleans(),
       st.booleans(), st.data())
def test_number_range_regex(lo, hi, lo_strict, hi_strict, data):
    if lo is not None and hi is not None and lo > hi:
        lo, hi = hi, lo
    if lo is not None and lo == hi and (lo_strict or hi_strict):
        with pytest.raises(ValueError, match="no number"):
            number_range_regex(lo, hi, exclusive_minimum=lo_strict, exclusive_maximum=hi_strict)
        return
    pattern = re.compile(number_range_regex(lo, hi, exclusive_minimum=lo_strict, exclusive_maximum=hi_strict))

    def inside(x: Decimal) -> bool:
        return ((lo is None or (x > lo if lo_strict else x >= lo)) and
                (hi is None or (x < hi if hi_strict else x <= hi)))

    numbers = data.draw(st.lists(st.from_regex(r"-?(?:0|[1-9][0-9]?)(?:\.[0-9]{1,3})?", fullmatch=True), max_size=30))
    edges = [f"{x + d}{frac}" for x in (lo, hi, 0) if x is not None for d in (-1, 0, 1) for frac in ("", ".0", ".5")]
    for text in numbers + edges:  # zero is written without a sign
        expected = inside(Decimal(text)) and not (text.startswith("-") and Decimal(text) == 0)
        assert bool(pattern.fullmatch(text)) == expected, (lo, hi, lo_strict, hi_strict, text)
    for text in data.draw(st.lists(st.from_regex(pattern, fullmatch=True), max_size=5)):
        assert inside(Decimal(text)), text


def test_translated_text_examples():
    assert translate_regex(r"^\d{2,}[^a]$") == r"[0-9]{2,}[\u0001-`b-\ud7ff\ue000-\U0010ffff]"
    assert translate_regex("a|b+") == "(?:a|b+)"
    assert schema_to_regex({"enum": ["é", 1, None]}) == '(?:"é"|1|null)'
    assert schema_to_regex({"type": "array", "items": {"type": "boolean"}, "maxItems": 2}) == \
        r"\[[ ]?(?:(?:true|false)(?:[ ]?,[ ]?(?:true|false))?)?[ ]?\]"


# --- sampling with a random model ------------------------------------------------------------------


@torch.no_grad()
def sample(model, constraint, prompt: list[int], stop_ids, seed: int, max_tokens: int = 120):
    """Temperature-1 sampling with the constraint's mask: the loop an engine runs."""
    g = torch.Generator().manual_seed(seed)
    cache = model.new_cache(1, len(prompt) + max_tokens)
    logits = model.logits(model.hidden_states(torch.tensor([prompt]), cache)[:, -1])[0]
    out = []
    for _ in range(max_tokens):
        if constraint.finished:
            return out, "finished"
        logits = logits.masked_fill(~constraint.allowed(), float("-inf"))
        tok = int(torch.multinomial(logits.softmax(-1), 1, generator=g))
        constraint.advance(tok)
        if tok in stop_ids:
            return out, "stop"
        out.append(tok)
        logits = model.logits(model.hidden_states(torch.tensor([[tok]]), cache)[:, -1])[0]
    return out, "length"


def test_sampling_with_a_random_model(compiler, bpe):
    torch.manual_seed(0)
    V = compiler.vocab_size
    model = build_model(ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=256,
                                    init_std=0.1)).eval()
    prompt = bpe.encode_ordinary("Answer in JSON:")
    stops = set(bpe.eos_ids)
    regex = r"[A-Z][a-zé]{1,6}( (€|[0-9]{1,3})){1,3}\."
    for seed in range(4):
        ids, how = sample(model, compiler.regex(regex), prompt, stops, seed)
        assert how != "length" and all(i < bpe.vocab_size for i in ids)
        assert re.fullmatch(regex, bpe.decode(ids, errors="strict")), bpe.decode(ids)
        for name in ("person", "shapes"):
            ids, how = sample(model, compiler.json_schema(SCHEMAS[name]), prompt, stops, seed, max_tokens=200)
            assert how != "length", bpe.decode(ids)
            validate(json.loads(bpe.decode(ids, errors="strict")), SCHEMAS[name])


# --- other tokenizers ------------------------------------------------------------------------------


def test_hf_byte_level_tokenizer(tmp_path):
    """A Hugging Face byte-level BPE loaded through load_tokenizer works the same way."""
    tokenizers = pytest.importorskip("tokenizers")
    from lmlab.tokenizer import load_tokenizer

    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(corpus(), trainer)
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    tok = load_tokenizer(tmp_path)
    compiler = ConstraintCompiler(tok, tok.vocab_size, tok.eos_ids)
    assert not compiler.prune  # every byte is a token
    rng, done = random.Random(3), 0
    for _ in range(20):
        data, how = walk(compiler.json_schema(SCHEMAS["person"]), tok, set(tok.eos_ids), rng)
        if how != "length":
            validate(json.loads(data.decode("utf-8")), SCHEMAS["person"])
            done += 1
    assert done >= 10
    assert_no_dead_ends(compiler.regex(ORACLE_PATTERNS[0]).guide)


@pytest.fixture(scope="module")
def sentencepiece_models(tmp_path_factory) -> dict:
    spm = pytest.importorskip("sentencepiece")
    from lmlab.tokenizer import load_tokenizer

    tmp = tmp_path_factory.mktemp("spm")
    (tmp / "train.txt").write_text("\n".join(corpus()).replace("é", "e").replace("ï", "i").replace("ü", "u")
                                   .replace("€", "E").replace("日本", "jp"), encoding="utf-8")
    out = {}
    for name, fallback in (("fallback", True), ("nofallback", False)):
        spm.SentencePieceTrainer.train(input=str(tmp / "train.txt"), model_prefix=str(tmp / name), model_type="bpe",
                                       vocab_size=400, byte_fallback=fallback, character_coverage=1.0,
                                       normalization_rule_name="identity", remove_extra_whitespaces=False,
                                       minloglevel=2)
        out[name] = load_tokenizer(tmp / f"{name}.model")
    return out


@pytest.mark.parametrize("name", ["fallback", "nofallback"])
def test_sentencepiece_tokenizers(sentencepiece_models, name):
    """Byte pieces give every byte; without byte fallback some bytes are no token, and the guide
    prunes the states the vocabulary cannot complete (here: anything with 'é', absent from training)."""
    tok = sentencepiece_models[name]
    compiler = ConstraintCompiler(tok, tok.vocab_size, tok.eos_ids)
    assert compiler.prune == (name == "nofallback")
    for pattern in [r"(é|a)b{1,3}", r"(a|bé)c?", r"[a-z]{1,4}( [a-z]{1,4})?"]:
        guide = compiler.regex(pattern).guide
        assert_no_dead_ends(guide)
        rng = random.Random(pattern)
        for _ in range(10):
            data, how = walk(compiler.regex(pattern), tok, set(tok.eos_ids), rng)
            assert how != "length" and re.fullmatch(pattern, data.decode("utf-8"))
            assert name == "fallback" or "é" not in data.decode("utf-8")
        controls = [i for i in range(tok.vocab_size) if tok.id_to_token(i) in ("<unk>", "<s>", "</s>")]
        assert controls and not guide.mask(guide.initial_state)[controls].any()
    if name == "nofallback":
        with pytest.raises(ValueError, match="tokenizer"):
            compiler.regex("é+")


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern, message", [
    ("(ab", "missing \\)"),
    (r"(a)\1", "backreferences"),
    ("a(?=b)", "lookahead"),
    ("(?i)abc", "IGNORECASE"),
    (r"\bword", "word boundaries"),
    ("a^b", "start and end"),
    ("[^\\s\\S]", "matches no character"),
    (42, "must be a string"),
])
def test_bad_regexes(compiler, pattern, message):
    with pytest.raises(ValueError, match=message):
        compiler.regex(pattern)


@pytest.mark.parametrize("schema, message", [
    ("{not json", "not valid JSON"),
    (False, "admits no value"),
    ([1, 2], "not list"),
    ({"type": "strin"}, "unknown type 'strin'"),
    ({"oneOf": [{"type": "string"}]}, "oneOf.*anyOf"),
    ({"type": "number", "multipleOf": 2}, "multipleOf"),
    ({"not": {"type": "null"}}, "not"),
    ({"type": "number", "minimum": 0.5}, "whole numbers"),
    ({"type": "number", "exclusiveMinimum": 1, "maximum": 1}, "no number"),
    ({"type": "string", "minLength": 5, "maxLength": 2}, "minLength 5 > maxLength 2"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "at most one of pattern"),
    ({"type": "string", "format": "email"}, "format 'email'"),
    ({"type": "string", "pattern": "(a"}, "invalid regular expression"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "required names \\['b'\\]"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems 3 > maxItems 1"),
    ({"type": "integer", "minimum": 5, "maximum": 4}, "no integer"),
    ({"$ref": "#/$defs/missing"}, "points to nothing"),
    ({"$ref": "https://example.com/schema"}, "only local references"),
    ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "exactly one schema"),
    ({"enum": []}, "non-empty list"),
    ({"type": "string", "enum": [1, 2]}, "no enum value"),
    ({"enum": ["a", "bb"], "maxLength": 1}, "enum together with"),
    ({"$defs": {"n": {"type": "array", "items": {"$ref": "#/$defs/n"}, "minItems": 1}}, "$ref": "#/$defs/n"},
     "deeper than max_depth"),
    ({"properties": {"x": {}}, "minLength": 2}, "different types"),
])
def test_bad_schemas(compiler, schema, message):
    with pytest.raises(ValueError, match=message):
        compiler.json_schema(schema)


def test_bad_compiler_arguments(bpe):
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        ConstraintCompiler(bpe, 10, [500])
    with pytest.raises(ValueError, match="cache_size"):
        ConstraintCompiler(bpe, bpe.vocab_size, bpe.eos_ids, cache_size=0)
