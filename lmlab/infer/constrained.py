"""Constrained decoding: output guaranteed to match a regular expression or a JSON schema.

The idea (Willard & Louf 2023, "Efficient Guided Generation for Large Language Models"): compile the
pattern to a deterministic automaton over bytes; for each automaton state, the tokens allowed next
are those whose bytes walk the automaton from that state without falling off it. Generation keeps
one automaton state per request: before sampling, logits of the other tokens are set to -inf; after
sampling, the state advances by the token's bytes. The stop (eos) ids are allowed exactly in
accepting states, so the output ends only on a complete match. Tokens are byte strings, so a
character split across tokens (one token ends with the lead byte of "é", the next starts with its
continuation byte) is matched byte by byte like any other text.

Which parts are a library and which are lmlab's own:

- regex -> byte automaton -> token index: `outlines-core` (Rust; the `serve` extra). It takes token
  *bytes*, so lmlab's byte-level BPE, Hugging Face byte-level BPEs and sentencepiece byte pieces need
  no conversion; it indexes a 32k vocabulary for a small schema in ~0.1-0.2 s, and releases the GIL
  while it does, so a server thread compiling a schema does not stall the engine thread. Determinizing
  UTF-8 automata and walking every token from every state is what that library exists for; lmlab adds
  what it lacks: a workaround for a bug in its index (see END_BYTE), stop ids, special tokens, pruning
  for vocabularies that lack some bytes, and masks cached per state.
- pattern syntax and JSON schema -> regex: lmlab's own, below. Patterns are parsed with Python's own
  `re` parser, so the syntax and error messages are Python's and the meaning is exactly
  `re.fullmatch(pattern, text, re.ASCII)`; the parse tree is written back in the subset of syntax that
  Python and the automaton read alike. outlines-core's schema converter is not used because it
  silently lets through output outside the schema in common cases: it ignores minimum/maximum,
  `uniqueItems`, `not` and other keywords it does not know, it concatenates `allOf`
  branches, it drops `pattern` when `maxLength` is also given, and it pastes `pattern` into the JSON
  string unescaped (so `".+"` admits a raw quote: invalid JSON). The converter here supports a stated
  subset and raises `ValueError` for everything else.

JSON output rules (what a schema compiles to):

- Whitespace: at most one space after `{`, `[`, `:` and `,` and before `}`, `]`, `:` and `,`
  (`WHITESPACE`, configurable), never a newline; a run of whitespace is at most two spaces, so a
  model cannot stall in whitespace. Object properties come in the order the schema lists them.
- Strings: any character but `"`, `\\` and control characters, a short escape (`\\" \\\\ \\/ \\b \\f
  \\n \\r \\t`) or `\\uXXXX` outside the surrogates (so every escape is one character for
  minLength/maxLength). Numbers and integers: JSON's grammar, no length limit (max_tokens bounds it).
- Supported keywords: type (one or a list), enum, const, properties, required, additionalProperties
  (an object without properties: its values' schema), items, minItems, maxItems, uniqueItems
  (false, or maxItems <= 1), minLength, maxLength, pattern (JSON Schema's search semantics: unanchored
  unless it begins with ^ / ends with $), format (date, time, date-time, uuid), minimum / maximum /
  exclusiveMinimum / exclusiveMaximum (on numbers: whole-number bounds, and the number is then written
  without an exponent), anyOf, a one-element allOf, local $ref
  (#/$defs/..., #/definitions/..., #), and annotations (title, description, default, ...). Anything
  else raises ValueError naming the keyword and where it is (oneOf too: exclusivity cannot be
  enforced by an automaton; use anyOf when the branches are disjoint).
- Depth: values the schema leaves open (`{}`, `true`, an object without properties, an array
  without items) nest at most `max_depth` containers deep, and a recursive $ref is expanded at most
  `max_depth` times on one path (deeper optional parts are left out). `json_object()` (OpenAI's
  response_format {"type": "json_object"}) is an open object, so it nests at most `max_depth` deep.

Text and tokens: the automaton matches the concatenated token bytes. Special tokens other than the
stop ids are never allowed, and NUL (U+0000) is never generated raw (see END_BYTE). A sentencepiece
tokenizer that drops the leading space of the decoded text ("▁" dummy prefix) can make the text differ
from the matched bytes by that one space when the pattern allows a leading space.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from typing import Any, Protocol

import torch

# The parser behind re.compile: private, but unchanged in substance for many releases, and it makes the
# pattern language exactly Python's.
try:  # Python 3.11+
    from re import _constants as sre_c
    from re import _parser as sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as sre_c  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

__all__ = [
    "WHITESPACE",
    "CompiledGuide",
    "Constraint",
    "ConstraintCompiler",
    "RegexConstraint",
    "integer_range_regex",
    "number_range_regex",
    "schema_to_regex",
    "translate_regex",
]

WHITESPACE = r"[ ]?"
DEFAULT_MAX_DEPTH = 3


class Constraint(Protocol):
    """The state of one request's constrained generation, as the engine uses it."""

    def allowed(self) -> torch.Tensor:
        """bool (V,) over the model's vocabulary: the tokens allowed next (stop ids iff complete)."""
        ...

    def advance(self, token_id: int) -> None:
        """Record the sampled token; raises ValueError if it was not allowed."""
        ...

    @property
    def finished(self) -> bool:
        """A complete match that no token can extend (or a stop id was taken)."""
        ...


# --- pattern syntax: Python's re -> the syntax both re and the automaton read -------------------

MAX_CODE_POINT = 0x10FFFF
_SURROGATES = [(0xD800, 0xDFFF)]  # not characters: never in valid UTF-8, and the automaton rejects them
# re.ASCII meanings of \d \w \s (JSON Schema's ECMA-262 \d and \w are the same)
_CATEGORIES = {
    sre_c.CATEGORY_DIGIT: [(0x30, 0x39)],
    sre_c.CATEGORY_WORD: [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
    sre_c.CATEGORY_SPACE: [(0x09, 0x0D), (0x20, 0x20)],
}
_NEGATED = {sre_c.CATEGORY_NOT_DIGIT: sre_c.CATEGORY_DIGIT, sre_c.CATEGORY_NOT_WORD: sre_c.CATEGORY_WORD,
            sre_c.CATEGORY_NOT_SPACE: sre_c.CATEGORY_SPACE}
_BEGIN = (sre_c.AT_BEGINNING, sre_c.AT_BEGINNING_STRING)
_END = (sre_c.AT_END, sre_c.AT_END_STRING)
_META = set("\\.+*?()|[]{}^$#&-~")  # escaped with a backslash; `&&`, `--`, `~~` are set operators to the automaton
_HARMLESS_FLAGS = sre_c.SRE_FLAG_UNICODE | sre_c.SRE_FLAG_VERBOSE | sre_c.SRE_FLAG_ASCII

# JSON strings: characters that must be escaped, and the one escape written for each
_JSON_SPECIAL = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]
_JSON_ESCAPES = {0x22: '\\"', 0x5C: "\\\\", 0x08: "\\b", 0x0C: "\\f", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}
# one character of a JSON string: unescaped, a short escape, or \uXXXX outside the surrogates (so that every
# escape is one character, for minLength/maxLength, and the text never decodes to half a character)
JSON_STRING_CHAR = r'(?:[^"\\\u0000-\u001f]|\\["\\/bfnrt]|\\u(?:[0-9a-cA-CefEF][0-9a-fA-F]{3}|[dD][0-7][0-9a-fA-F]{2}))'

Ranges = list[tuple[int, int]]


def _normalize(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _subtract(ranges: Ranges, removed: Ranges) -> Ranges:
    out = []
    for lo, hi in _normalize(ranges):
        for rlo, rhi in _normalize(removed):
            if rhi < lo or rlo > hi:
                continue
            if rlo > lo:
                out.append((lo, rlo - 1))
            lo = rhi + 1
            if lo > hi:
                break
        if lo <= hi:
            out.append((lo, hi))
    return out


def _complement(ranges: Ranges) -> Ranges:
    return _subtract([(0, MAX_CODE_POINT)], ranges)


def _contains(ranges: Ranges, cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in ranges)


def _escape_char(cp: int) -> str:
    """One character as regex text read the same way by Python's re and the automaton."""
    c = chr(cp)
    if c.isascii() and c.isalnum():
        return c
    if c in _META:
        return "\\" + c
    if cp < 0x20 or cp == 0x7F or c.isspace() or not c.isprintable():
        return f"\\u{cp:04x}" if cp <= 0xFFFF else f"\\U{cp:08x}"
    return c  # `"`, `<`, `,`, letters of other scripts, ...: literal (`\\<` would be a word boundary)


def escape_text(text: str) -> str:
    """Regex matching exactly `text`."""
    return "".join(_escape_char(ord(c)) for c in text)


def _class_text(ranges: Ranges) -> str:
    if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
        return _escape_char(ranges[0][0])
    parts = [_escape_char(lo) if lo == hi else f"{_escape_char(lo)}-{_escape_char(hi)}" for lo, hi in ranges]
    return "[" + "".join(parts) + "]"


def _json_escape_regex(cp: int) -> str:
    """Regex for the JSON escape of special character `cp` (the form json.dumps writes)."""
    escape = _JSON_ESCAPES.get(cp, f"\\u{cp:04x}")
    return escape_text(escape)


class _PatternWriter:
    """Writes a parsed Python pattern back as regex text. `json_string`: a JSON Schema `pattern`, i.e.
    searched (it may match anywhere in the string unless anchored with ^ / $) in the decoded content
    of a JSON string, so the characters JSON escapes are written escaped."""

    def __init__(self, pattern: str, json_string: bool):
        self.pattern, self.json_string = pattern, json_string

    def fail(self, why: str) -> ValueError:
        return ValueError(f"regular expression {self.pattern!r}: {why}")

    def write(self) -> str:
        try:
            parsed = sre_parse.parse(self.pattern)
        except re.error as e:
            raise ValueError(f"invalid regular expression {self.pattern!r}: {e}") from None
        flags = parsed.state.flags
        self._check_flags(flags)
        return self._seq(list(parsed.data), start=True, end=True, dotall=bool(flags & sre_c.SRE_FLAG_DOTALL))

    def _check_flags(self, flags: int) -> None:
        bad = flags & ~_HARMLESS_FLAGS & ~sre_c.SRE_FLAG_DOTALL
        if bad:
            names = [n for n, f in (("(?i) IGNORECASE", sre_c.SRE_FLAG_IGNORECASE),
                                    ("(?m) MULTILINE", sre_c.SRE_FLAG_MULTILINE),
                                    ("(?L) LOCALE", sre_c.SRE_FLAG_LOCALE)) if flags & f]
            raise self.fail(f"the flags {names or bad} are not supported; spell cases out ([Aa]) instead of (?i)")

    # A sequence at the start (end) of the whole pattern may begin with ^ (end with $); elsewhere an
    # anchor could never match. A JSON pattern's unanchored start/end gets "any characters".
    def _seq(self, items: list, start: bool, end: bool, dotall: bool) -> str:
        anchored_start = anchored_end = False
        while start and items and items[0][0] is sre_c.AT and items[0][1] in _BEGIN:
            items, anchored_start = items[1:], True
        while end and items and items[-1][0] is sre_c.AT and items[-1][1] in _END:
            items, anchored_end = items[:-1], True
        start, end = start and not anchored_start, end and not anchored_end
        if not items:
            return self._anything() if self.json_string and (start or end) else ""
        parts = []
        for i, (op, av) in enumerate(items):
            parts.append(self._node(op, av, start and i == 0, end and i == len(items) - 1, dotall))
        return "".join(parts)

    @staticmethod
    def _anything() -> str:
        return JSON_STRING_CHAR + "*"

    def _node(self, op, av, start: bool, end: bool, dotall: bool) -> str:
        if op is sre_c.BRANCH:
            alts = [self._seq(list(alt), start, end, dotall) for alt in av[1]]
            return "(?:" + "|".join(alts) + ")"
        if op is sre_c.SUBPATTERN:
            _, add, remove, sub = av
            if (add | remove) & ~_HARMLESS_FLAGS & ~sre_c.SRE_FLAG_DOTALL:
                self._check_flags(add | remove)
            if remove & sre_c.SRE_FLAG_DOTALL:
                dotall = False
            if add & sre_c.SRE_FLAG_DOTALL:
                dotall = True
            return "(?:" + self._seq(list(sub.data), start, end, dotall) + ")"
        text = self._atom(op, av, dotall)
        if self.json_string:
            text = (self._anything() if start else "") + text + (self._anything() if end else "")
        return text

    def _atom(self, op, av, dotall: bool) -> str:
        """A node that is not a branch or group: a character (class) or a repetition."""
        if op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT):  # laziness does not change the set of matches
            lo, hi, sub = av
            body = self._seq(list(sub.data), False, False, dotall)
            return _quantify(body, lo, None if hi == sre_c.MAXREPEAT else hi)
        if op is sre_c.LITERAL:
            return self._chars([(av, av)])
        if op is sre_c.NOT_LITERAL:
            return self._chars(_complement([(av, av)]))
        if op is sre_c.ANY:
            return self._chars([(0, MAX_CODE_POINT)] if dotall else _complement([(0x0A, 0x0A)]))
        if op is sre_c.IN:
            return self._chars(self._class(av))
        if op is sre_c.AT:
            if av in (sre_c.AT_BOUNDARY, sre_c.AT_NON_BOUNDARY):
                raise self.fail("word boundaries (\\b, \\B) are not supported")
            raise self.fail("^ and $ (\\A, \\Z) are supported only at the start and end of the pattern")
        what = {sre_c.GROUPREF: "backreferences", sre_c.GROUPREF_EXISTS: "conditional groups",
                sre_c.ASSERT: "lookahead/lookbehind", sre_c.ASSERT_NOT: "negative lookahead/lookbehind"}
        for name in ("POSSESSIVE_REPEAT", "ATOMIC_GROUP"):
            if hasattr(sre_c, name) and op is getattr(sre_c, name):
                what[op] = "possessive quantifiers and atomic groups"
        raise self.fail(f"{what.get(op, str(op))} cannot be compiled to a finite automaton; rewrite without them")

    def _class(self, items) -> Ranges:
        negate = bool(items) and items[0][0] is sre_c.NEGATE
        ranges: Ranges = []
        for op, av in items[negate:]:
            if op is sre_c.LITERAL:
                ranges.append((av, av))
            elif op is sre_c.RANGE:
                ranges.append(av)
            elif op is sre_c.CATEGORY and av in _CATEGORIES:
                ranges += _CATEGORIES[av]
            elif op is sre_c.CATEGORY and av in _NEGATED:
                ranges += _complement(_CATEGORIES[_NEGATED[av]])
            else:
                raise self.fail(f"unsupported item {op} {av} in a character class")
        return _complement(ranges) if negate else _normalize(ranges)

    def _chars(self, ranges: Ranges) -> str:
        ranges = _subtract(ranges, _SURROGATES)
        if not self.json_string:
            ranges = _subtract(ranges, [(0, 0)])  # NUL marks the end of the text to the automaton
            if not ranges:
                raise self.fail("a character class matches no character (NUL is never generated)")
            return _class_text(ranges)
        plain = _subtract(ranges, _JSON_SPECIAL)
        alts = [_class_text(plain)] if plain else []
        for lo, hi in _JSON_SPECIAL:
            alts += [_json_escape_regex(cp) for cp in range(lo, hi + 1) if _contains(ranges, cp)]
        if not alts:
            raise self.fail("a character class matches no character")
        return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"


def _is_atom(text: str) -> bool:
    """Whether regex text (as written here) is one character or one class, so needs no group."""
    if len(text) == 1 or re.fullmatch(r"\\(?:[^uU]|u[0-9a-f]{4}|U[0-9a-f]{8})", text):
        return True
    if text.startswith("["):  # one class: its first unescaped "]" is the last character
        i = 1
        while i < len(text):
            if text[i] == "]":
                return i == len(text) - 1
            i += 2 if text[i] == "\\" else 1
    return False


def _quantify(body: str, lo: int, hi: int | None) -> str:
    if not body or hi == 0:
        return ""
    group = body if _is_atom(body) else f"(?:{body})"
    if (lo, hi) == (0, None):
        return group + "*"
    if (lo, hi) == (1, None):
        return group + "+"
    if (lo, hi) == (0, 1):
        return group + "?"
    if lo == hi:
        return group if lo == 1 else f"{group}{{{lo}}}"
    return f"{group}{{{lo},{'' if hi is None else hi}}}"


def translate_regex(pattern: str) -> str:
    """`pattern` (Python `re` syntax, matched whole as by `re.fullmatch`, with `re.ASCII` meanings of
    \\d \\w \\s) as regex text for the automaton. ValueError for a bad pattern or one an automaton
    cannot express (backreferences, lookaround, \\b, anchors inside, (?i))."""
    if not isinstance(pattern, str):
        raise ValueError(f"a regular expression must be a string, got {type(pattern).__name__}")
    return _PatternWriter(pattern, json_string=False).write()


def json_string_pattern_regex(pattern: str) -> str:
    """Regex for the JSON text of a string whose content matches JSON Schema `pattern` (searched,
    unless anchored), with the characters JSON must escape written escaped."""
    return '"' + _PatternWriter(pattern, json_string=True).write() + '"'


# --- integer ranges ----------------------------------------------------------------------------

def _digits(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"[{lo}-{hi}]"


def _alternatives(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else "(?:" + "|".join(parts) + ")"


def _same_length(a: str, b: str) -> str:
    """Regex for the decimal numbers from a to b (digit strings of one length, a <= b)."""
    if a == b:
        return a
    if len(a) == 1:
        return _digits(int(a), int(b))
    if a[0] == b[0]:
        return a[0] + _same_length(a[1:], b[1:])
    rest = len(a) - 1
    low_full, high_full = a[1:] == "0" * rest, b[1:] == "9" * rest
    parts = []
    if not low_full:  # a[0] followed by a[1:] .. 99..9
        parts.append(a[0] + _same_length(a[1:], "9" * rest))
    first = int(a[0]) + (not low_full)
    last = int(b[0]) - (not high_full)
    if first <= last:  # whole blocks: any tail
        parts.append(_digits(first, last) + ("[0-9]" if rest == 1 else f"[0-9]{{{rest}}}"))
    if not high_full:  # b[0] followed by 00..0 .. b[1:]
        parts.append(b[0] + _same_length("0" * rest, b[1:]))
    return _alternatives(parts)


def _non_negative(lo: int, hi: int | None) -> str:
    parts = []
    top = hi if hi is not None else 10 ** len(str(lo)) - 1
    for n in range(len(str(lo)), len(str(top)) + 1):
        a, b = max(lo, 10 ** (n - 1) if n > 1 else 0), min(top, 10**n - 1)
        if a <= b:
            parts.append(_same_length(str(a), str(b)))
    if hi is None:  # and every longer number
        parts.append(f"[1-9][0-9]{{{len(str(lo))},}}")
    return _alternatives(parts)


def integer_range_regex(minimum: int | None = None, maximum: int | None = None) -> str:
    """Regex for the JSON integers n with minimum <= n <= maximum (either bound may be None),
    written without leading zeros or "-0"."""
    if minimum is not None and maximum is not None and minimum > maximum:
        raise ValueError(f"no integer lies in [{minimum}, {maximum}]")
    parts = []
    if minimum is None or minimum < 0:  # negative numbers: "-" and their absolute value
        low = 1 if maximum is None or maximum >= 0 else -maximum
        parts.append("-" + _non_negative(low, None if minimum is None else -minimum))
    if maximum is None or maximum >= 0:
        parts.append(_non_negative(0 if minimum is None or minimum < 0 else minimum, maximum))
    return _alternatives(parts)


_ANY_FRACTION, _ZERO_FRACTION, _NONZERO_FRACTION = r"(?:\.[0-9]+)?", r"(?:\.0+)?", r"\.[0-9]*[1-9][0-9]*"


def _magnitude(low: int, low_strict: bool, high: int | None, high_strict: bool) -> str | None:
    """Regex for unsigned decimals m = n.f (integer part n, fraction f) with low <(=) m <(=) high, or None
    when there is none. m >= low iff n >= low; m > low iff n > low, or n == low with f > 0; m <= high iff
    n < high, or n == high with f == 0; m < high iff n < high."""
    parts = []
    first, last = low + low_strict, None if high is None else high - 1
    if last is None or first <= last:  # any fraction
        parts.append(_non_negative(first, last) + _ANY_FRACTION)
    if low_strict and (high is None or low < high):
        parts.append(_non_negative(low, low) + _NONZERO_FRACTION)
    if high is not None and not high_strict and (high > low or (high == low and not low_strict)):
        parts.append(_non_negative(high, high) + _ZERO_FRACTION)
    return _alternatives(parts) if parts else None


def number_range_regex(minimum: int | None = None, maximum: int | None = None, *, exclusive_minimum: bool = False,
                       exclusive_maximum: bool = False) -> str:
    """Regex for the JSON numbers (written without exponent, zero without a sign) between integer bounds
    (None: unbounded), each inclusive unless exclusive_*."""
    parts = []
    if maximum is None or maximum > 0 or (maximum == 0 and not exclusive_maximum):  # 0 and up
        low, strict = (minimum, exclusive_minimum) if minimum is not None and minimum >= 0 else (0, False)
        found = _magnitude(low, strict, maximum, exclusive_maximum)
        if found is not None:
            parts.append(found)
    if minimum is None or minimum < 0:  # below 0: "-" and a magnitude m > 0 with -minimum >(=) m >(=) -maximum
        low, strict = (-maximum, exclusive_maximum) if maximum is not None and maximum < 0 else (0, True)
        found = _magnitude(low, strict, None if minimum is None else -minimum, exclusive_minimum)
        if found is not None:
            parts.append("-" + found)  # found has no top-level "|": _alternatives groups
    if not parts:
        raise ValueError(f"no number lies between {minimum} and {maximum}")
    return _alternatives(parts)


# --- JSON schema -> regex -------------------------------------------------------------------------

INTEGER = r"-?(?:0|[1-9][0-9]*)"
NUMBER = INTEGER + r"(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
BOOLEAN = "(?:true|false)"
NULL = "null"
STRING = '"' + JSON_STRING_CHAR + '*"'
_DATE = (r"[0-9]{4}-(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])|(?:0[13-9]|1[0-2])-(?:29|30)"
         r"|(?:0[13578]|1[02])-31)")  # Feb 29 left out: it needs the year's leap rule
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]+)?(?:Z|[+\-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": _DATE + "T" + _TIME,
    "uuid": r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
}

ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment",
                         "deprecated", "readOnly", "writeOnly", "$defs", "definitions"})
TYPE_KEYWORDS = {
    "string": {"minLength", "maxLength", "pattern", "format"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "boolean": set(),
    "null": set(),
    "array": {"items", "minItems", "maxItems", "uniqueItems"},
    "object": {"properties", "required", "additionalProperties"},
}
KNOWN = ANNOTATIONS | {"type", "enum", "const", "anyOf", "allOf", "$ref"} | set().union(*TYPE_KEYWORDS.values())
_HINTS = {
    "oneOf": "an automaton cannot enforce that exactly one branch matches; use anyOf if the branches are disjoint",
    "multipleOf": "not expressible as a regular expression",
    "not": "negation is not supported",
    "minProperties": "list the properties in properties/required instead",
    "maxProperties": "list the properties in properties/required instead",
    "patternProperties": "not supported",
    "prefixItems": "tuples are not supported; use an object",
    "contains": "not supported",
}


class _TooDeep(Exception):
    """A recursive $ref went deeper than max_depth: the caller drops an optional part or fails."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _matches_type(value: Any, name: str) -> bool:
    return {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: _is_int(v) or (isinstance(v, float) and v.is_integer()),
        "number": lambda v: _is_int(v) or isinstance(v, float),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
        "array": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
    }[name](value)


class _SchemaWriter:
    """JSON schema -> regex; see the module docstring for the subset and the rules."""

    def __init__(self, root: Any, whitespace: str, max_depth: int):
        self.root, self.ws, self.max_depth = root, whitespace, max_depth
        self.expanding: dict[str, int] = defaultdict(int)  # $ref -> expansions on the current path

    def fail(self, path: str, why: str) -> ValueError:
        return ValueError(f"JSON schema at {path}: {why}")

    # -- any JSON value, nested at most `levels` containers deep
    def any_value(self, levels: int) -> str:
        scalars = [STRING, NUMBER, BOOLEAN, NULL]
        if levels > 0:
            scalars += [self.open_object(self.any_value(levels - 1)), self.open_array(self.any_value(levels - 1))]
        return _alternatives(scalars)

    def open_object(self, value: str) -> str:
        ws = self.ws
        member = f"{STRING}{ws}:{ws}{value}"
        return rf"\{{{ws}(?:{member}(?:{ws},{ws}{member})*)?{ws}\}}"

    def open_array(self, item: str) -> str:
        ws = self.ws
        return rf"\[{ws}(?:{item}(?:{ws},{ws}{item})*)?{ws}\]"

    # -- a schema
    def value(self, schema: Any, path: str) -> str:
        if schema is True:
            return self.any_value(self.max_depth)
        if schema is False:
            raise self.fail(path, "the schema `false` admits no value")
        if not isinstance(schema, dict):
            raise self.fail(path, f"a schema is an object or a boolean, not {type(schema).__name__}")
        unknown = sorted(set(schema) - KNOWN)
        if unknown:
            hints = "; ".join(f"{k}: {_HINTS[k]}" for k in unknown if k in _HINTS)
            raise self.fail(path, f"unsupported keyword(s) {unknown}" + (f" ({hints})" if hints else "")
                            + f"; supported: {sorted(KNOWN - ANNOTATIONS)} and annotations")
        constraints = set(schema) - ANNOTATIONS
        if "$ref" in schema:
            self._alone(schema, "$ref", path)
            return self.ref(schema["$ref"], path)
        if "allOf" in schema:
            self._alone(schema, "allOf", path)
            parts = schema["allOf"]
            if not isinstance(parts, list) or len(parts) != 1:
                raise self.fail(path, "allOf is supported with exactly one schema (merge the others into it)")
            return self.value(parts[0], f"{path}.allOf[0]")
        if "anyOf" in schema:
            self._alone(schema, "anyOf", path)
            return self.any_of(schema["anyOf"], path)
        types = self.types(schema, path)
        for key in ("const", "enum"):
            if key in schema:
                others = sorted(constraints - {key, "type"})
                if others:
                    raise self.fail(path, f"{key} together with {others} is not supported; list only values "
                                          f"that satisfy them in {key}")
                values = [schema["const"]] if key == "const" else schema["enum"]
                if not isinstance(values, list) or not values:
                    raise self.fail(path, "enum must be a non-empty list")
                return self.literals(values, types, path, key)
        if types is None:
            types = self.infer_types(constraints, path)
            if types is None:
                return self.any_value(self.max_depth)
        alts, deep = [], False
        for t in types:
            try:
                alts.append(self.typed(t, schema, path))
            except _TooDeep:
                deep = True
        if not alts and deep:
            raise _TooDeep
        return _alternatives(alts)

    def _alone(self, schema: dict, key: str, path: str) -> None:
        others = sorted(set(schema) - ANNOTATIONS - {key})
        if others:
            raise self.fail(path, f"{key} together with {others} is not supported; move them into the {key} "
                                  "schema(s)")

    def types(self, schema: dict, path: str) -> list[str] | None:
        if "type" not in schema:
            return None
        t = schema["type"]
        names = [t] if isinstance(t, str) else t
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise self.fail(path, f"type must be a type name or a non-empty list of them, got {t!r}")
        for n in names:
            if n not in TYPE_KEYWORDS:
                raise self.fail(path, f"unknown type {n!r}; JSON Schema's types are {sorted(TYPE_KEYWORDS)}")
        return list(dict.fromkeys(names))

    def infer_types(self, keywords: set[str], path: str) -> list[str] | None:
        """The type implied by type-specific keywords when `type` is missing (None: any value)."""
        implied = {t for t, keys in TYPE_KEYWORDS.items() if keywords & keys}
        if not implied:
            return None
        if implied == {"integer", "number"}:  # bounds alone: numbers
            return ["number"]
        if len(implied) > 1:
            raise self.fail(path, f"keywords {sorted(keywords)} belong to different types; add a `type`")
        return sorted(implied)

    def literals(self, values: list, types: list[str] | None, path: str, key: str) -> str:
        kept = [v for v in values if types is None or any(_matches_type(v, t) for t in types)]
        if not kept:
            raise self.fail(path, f"no {key} value is of type {types}")
        texts = dict.fromkeys(json.dumps(v, ensure_ascii=False, separators=(",", ":")) for v in kept)
        return _alternatives([escape_text(t) for t in texts])

    def any_of(self, branches: Any, path: str) -> str:
        if not isinstance(branches, list) or not branches:
            raise self.fail(path, "anyOf must be a non-empty list of schemas")
        alts, deep = [], False
        for i, branch in enumerate(branches):
            try:
                alts.append(self.value(branch, f"{path}.anyOf[{i}]"))
            except _TooDeep:
                deep = True
        if not alts and deep:
            raise _TooDeep
        return _alternatives(alts)

    def ref(self, ref: Any, path: str) -> str:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise self.fail(path, f"only local references (#, #/$defs/Name, ...) are supported, got {ref!r}")
        target = self.root
        for part in ref[2:].split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise self.fail(path, f"$ref {ref!r} points to nothing")
            target = target[part]
        if self.expanding[ref] >= self.max_depth:
            raise _TooDeep
        self.expanding[ref] += 1
        try:
            return self.value(target, ref)
        finally:
            self.expanding[ref] -= 1

    # -- one type
    def typed(self, t: str, schema: dict, path: str) -> str:
        if t == "string":
            return self.string(schema, path)
        if t == "integer":
            return self.integer(schema, path)
        if t == "number":
            return self.number(schema, path)
        if t == "boolean":
            return BOOLEAN
        if t == "null":
            return NULL
        if t == "array":
            return self.array(schema, path)
        return self.object(schema, path)

    def _count(self, schema: dict, key: str, path: str) -> int | None:
        value = schema.get(key)
        if value is not None and (not _is_int(value) or value < 0):
            raise self.fail(path, f"{key} must be a non-negative integer, got {value!r}")
        return value

    def string(self, schema: dict, path: str) -> str:
        lo, hi = self._count(schema, "minLength", path), self._count(schema, "maxLength", path)
        pattern, fmt = schema.get("pattern"), schema.get("format")
        if lo is not None and hi is not None and lo > hi:
            raise self.fail(path, f"minLength {lo} > maxLength {hi}")
        if sum(x is not None for x in (pattern, fmt)) + (lo is not None or hi is not None) > 1:
            raise self.fail(path, "combine at most one of pattern, format and minLength/maxLength "
                                  "(a regex cannot intersect them); fold the length into the pattern")
        if pattern is not None:
            if not isinstance(pattern, str):
                raise self.fail(path, "pattern must be a string")
            return json_string_pattern_regex(pattern)
        if fmt is not None:
            if fmt not in FORMATS:
                raise self.fail(path, f"format {fmt!r} is not supported; supported: {sorted(FORMATS)}, or use a "
                                      "pattern")
            return f'"{FORMATS[fmt]}"'
        if lo is None and hi is None:
            return STRING
        return f'"{JSON_STRING_CHAR}{{{lo or 0},{"" if hi is None else hi}}}"'

    def bounds(self, schema: dict, path: str) -> tuple[Any, Any, Any, Any]:
        minimum, maximum = schema.get("minimum"), schema.get("maximum")
        above, below = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
        for key, v in (("minimum", minimum), ("maximum", maximum), ("exclusiveMinimum", above),
                       ("exclusiveMaximum", below)):
            flag = isinstance(v, bool) and key.startswith("exclusive")  # draft 4: a flag on minimum/maximum
            if v is not None and not flag and not (isinstance(v, int | float) and not isinstance(v, bool)
                                                   and math.isfinite(v)):
                raise self.fail(path, f"{key} must be a finite number, got {v!r}")
        return minimum, maximum, above, below

    def number(self, schema: dict, path: str) -> str:
        """Bounded numbers: integer-valued bounds only, and the output is written without an exponent."""
        minimum, maximum, above, below = self.bounds(schema, path)
        if minimum is None and maximum is None and above in (None, True, False) and below in (None, True, False):
            return NUMBER
        lows = [(minimum, above is True)] if minimum is not None else []
        highs = [(maximum, below is True)] if maximum is not None else []
        lows += [(above, True)] if above is not None and not isinstance(above, bool) else []
        highs += [(below, True)] if below is not None and not isinstance(below, bool) else []
        if any(v != int(v) for v, _ in lows + highs):
            raise self.fail(path, "number bounds must be whole numbers (e.g. minimum 0, maximum 1); use an "
                                  "integer schema or no bound")
        low = max(lows, key=lambda b: (b[0], b[1]), default=(None, False))  # the tighter bound wins
        high = min(highs, key=lambda b: (b[0], not b[1]), default=(None, False))
        try:
            return number_range_regex(None if low[0] is None else int(low[0]), None if high[0] is None
                                      else int(high[0]), exclusive_minimum=low[1], exclusive_maximum=high[1])
        except ValueError as e:
            raise self.fail(path, str(e)) from None

    def integer(self, schema: dict, path: str) -> str:
        minimum, maximum, above, below = self.bounds(schema, path)
        lows, highs = [], []
        if minimum is not None:
            lows.append(math.floor(minimum) + 1 if above is True else math.ceil(minimum))
        if maximum is not None:
            highs.append(math.ceil(maximum) - 1 if below is True else math.floor(maximum))
        if above is not None and not isinstance(above, bool):
            lows.append(math.floor(above) + 1)
        if below is not None and not isinstance(below, bool):
            highs.append(math.ceil(below) - 1)
        lo, hi = max(lows, default=None), min(highs, default=None)
        if lo is None and hi is None:
            return INTEGER
        if lo is not None and hi is not None and lo > hi:
            raise self.fail(path, f"no integer satisfies the bounds (from {lo} to {hi})")
        return integer_range_regex(lo, hi)

    def array(self, schema: dict, path: str) -> str:
        lo, hi = self._count(schema, "minItems", path) or 0, self._count(schema, "maxItems", path)
        if hi is not None and lo > hi:
            raise self.fail(path, f"minItems {lo} > maxItems {hi}")
        unique = schema.get("uniqueItems", False)
        if unique is True and (hi is None or hi > 1):
            raise self.fail(path, "uniqueItems is not expressible as a regular expression (unless maxItems <= 1)")
        items = schema.get("items", True)
        if isinstance(items, list):
            raise self.fail(path, "items as a list (tuples) is not supported")
        ws = self.ws
        if items is False or hi == 0:
            if lo > 0:
                raise self.fail(path, f"minItems {lo} but no item is allowed")
            return rf"\[{ws}\]"
        try:
            item = self.any_value(self.max_depth - 1) if items is True else self.value(items, f"{path}.items")
        except _TooDeep:
            if lo > 0:
                raise
            return rf"\[{ws}\]"
        more = _quantify(f"{ws},{ws}{item}", max(lo - 1, 0), None if hi is None else hi - 1)
        body = f"{item}{more}"
        return rf"\[{ws}{body}{ws}\]" if lo > 0 else rf"\[{ws}(?:{body})?{ws}\]"

    def object(self, schema: dict, path: str) -> str:
        properties = schema.get("properties")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise self.fail(path, "required must be a list of property names")
        if properties is None:
            if required:
                raise self.fail(path, f"required {required} without properties: describe them in properties")
            extra = schema.get("additionalProperties", True)
            if extra is False:
                return rf"\{{{self.ws}\}}"
            value = self.any_value(self.max_depth - 1) if extra is True else \
                self.value(extra, f"{path}.additionalProperties")
            return self.open_object(value)
        if not isinstance(properties, dict):
            raise self.fail(path, "properties must be an object")
        missing = [r for r in required if r not in properties]
        if missing:
            raise self.fail(path, f"required names {missing}, which properties does not describe")
        members: list[tuple[str, bool]] = []  # (regex of "key": value, required)
        for name, sub in properties.items():
            key = escape_text(json.dumps(name, ensure_ascii=False))
            try:
                value = self.value(sub, f"{path}.properties.{name}")
            except _TooDeep:
                if name in required:
                    raise
                continue  # too deep: leave the optional property out
            members.append((f"{key}{self.ws}:{self.ws}{value}", name in required))
        return rf"\{{{self.ws}{self.members(members)}{self.ws}\}}"

    def members(self, members: list[tuple[str, bool]]) -> str:
        """Members in order, each present or (if optional) absent, comma-separated. The first member
        written is some j whose predecessors are all optional and absent; each later one is preceded
        by a comma."""
        sep = f"{self.ws},{self.ws}"
        alts = []
        for j, (member, req) in enumerate(members):
            tail = "".join(f"{sep}{m}" if r else f"(?:{sep}{m})?" for m, r in members[j + 1:])
            alts.append(member + tail)
            if req:
                break
        if not members or not any(r for _, r in members):
            alts.append("")
        return _alternatives(alts) if alts else ""


def schema_to_regex(schema: dict | str | bool, *, whitespace: str = WHITESPACE,
                    max_depth: int = DEFAULT_MAX_DEPTH) -> str:
    """Regex for the JSON texts valid under `schema` (a dict, or its JSON text); see the module
    docstring for the supported subset. ValueError for a malformed or unsupported schema."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
    if max_depth < 1:
        raise ValueError(f"max_depth must be >= 1, got {max_depth}")
    try:
        return _SchemaWriter(schema, whitespace, max_depth).value(schema, "$")
    except _TooDeep:
        raise ValueError(f"JSON schema: a required part recurses deeper than max_depth={max_depth}") from None


# --- the token-level automaton ------------------------------------------------------------------------

# The library's index (0.2.x) drops a token whose last byte follows a point where the text so far was
# already a complete match (it reads the automaton's one-byte-delayed match flag as "this token ends in a
# match"): for (ab)+ after "ab" it forbids the token "a", for a(bc)? after "a" the token "b", after a
# complete "é" the lead byte of the next one. So the automaton is built for NUL + pattern + NUL: no state
# inside the text is a match state, every transition is kept, and a pseudo-token b"\x00" (END) is allowed
# exactly where the text is complete. The leading NUL (read once, before the first token) keeps small the
# unanchored search automaton that the library also builds: without it, a pattern that matches late makes
# that automaton blow up (open JSON nested 3 deep: 50 s instead of 0.04 s). NUL is therefore never
# generated (translate_regex removes it from every class; JSON escapes it anyway).
END_BYTE = b"\x00"


def _text_token_bytes(tokenizer, vocab_size: int, stop_ids: frozenset[int]) -> dict[bytes, list[int]]:
    """bytes -> ids of the tokens that may appear in constrained text: every id below both vocabulary
    sizes with non-empty bytes, except stop ids, special tokens, sentencepiece control/unknown pieces
    (which decode to markup such as "<s>", not text) and tokens holding a NUL byte."""
    excluded = set(stop_ids) | set(getattr(tokenizer, "special_tokens", {}).values())
    pieces = getattr(tokenizer, "pieces", None)
    if pieces is not None:  # SentencePieceTokenizer
        from ..tokenizer.sentencepiece import PieceType

        excluded |= {i for i, p in enumerate(pieces) if p.type in (PieceType.CONTROL, PieceType.UNKNOWN)}
    table: dict[bytes, list[int]] = defaultdict(list)
    for i in range(min(vocab_size, tokenizer.vocab_size)):
        if i in excluded:
            continue
        try:
            raw = tokenizer.token_bytes(i)
        except ValueError:  # an id without a token (a hole in the vocabulary)
            continue
        if raw and END_BYTE not in raw:
            table[raw].append(i)
    return dict(table)


def _utf8_bytes_missing(table: dict[bytes, list[int]]) -> list[int]:
    """Byte values that occur in valid UTF-8 (NUL aside) but are no single-byte token."""
    usable = [*range(0x01, 0xC0), *range(0xC2, 0xF5)]
    return [b for b in usable if bytes([b]) not in table]


class CompiledGuide:
    """One compiled pattern over one vocabulary: the automaton states, the allowed-token mask of each
    state (computed when first needed, then cached) and the transitions. Shared by every request
    with the same pattern; it holds no per-request state."""

    def __init__(self, regex: str, index, vocab_size: int, stop_ids: Sequence[int], end_id: int, prune: bool,
                 compile_seconds: float):
        self.regex, self.index, self.vocab_size = regex, index, vocab_size
        self.stop_ids = torch.tensor(sorted(stop_ids), dtype=torch.long)
        self._stop_set = frozenset(self.stop_ids.tolist())
        self.end_id = end_id  # ids >= vocab_size (END, the library's own end id, stand-in bytes) are no model tokens
        self.initial_state: int = index.get_next_state(index.get_initial_state(), end_id)  # past the first NUL
        self.compile_seconds = compile_seconds
        self._masks: dict[int, torch.Tensor] = {}
        self._accepting: dict[int, bool] = {}
        self._finished: dict[int, bool] = {}
        self.live: set[int] | None = self._live_states() if prune else None
        if self.live is not None and self.initial_state not in self.live:
            raise ValueError("no text this tokenizer can write matches it")

    def _live_states(self) -> set[int]:
        """States from which real tokens can reach a complete match. Needed only when some byte is no
        token: otherwise every state of the automaton can be completed byte by byte."""
        back: dict[int, set[int]] = defaultdict(set)
        live = set()
        for state, row in self.index.get_transitions().items():
            for token, nxt in row.items():
                if token == self.end_id:
                    live.add(state)
                elif token < self.vocab_size:
                    back[nxt].add(state)
        todo = list(live)
        while todo:
            for prev in back[todo.pop()]:
                if prev not in live:
                    live.add(prev)
                    todo.append(prev)
        return live

    def mask(self, state: int) -> torch.Tensor:
        """bool (vocab_size,): tokens allowed in `state` (cached; do not modify)."""
        mask = self._masks.get(state)
        if mask is None:
            tokens = self.index.get_allowed_tokens(state) or []
            accepting = self.end_id in tokens
            allowed = [t for t in tokens if t < self.vocab_size]
            if self.live is not None:
                allowed = [t for t in allowed if self.index.get_next_state(state, t) in self.live]
            mask = torch.zeros(self.vocab_size, dtype=torch.bool)
            if allowed:
                mask[torch.tensor(allowed, dtype=torch.long)] = True
            if accepting and len(self.stop_ids):
                mask[self.stop_ids] = True
            self._accepting[state], self._finished[state] = accepting, accepting and not allowed
            self._masks[state] = mask
        return mask

    def is_accepting(self, state: int) -> bool:
        """The text so far is a complete match."""
        if state not in self._accepting:
            self.mask(state)
        return self._accepting[state]

    def is_finished(self, state: int) -> bool:
        """A complete match that no text token can extend."""
        if state not in self._finished:
            self.mask(state)
        return self._finished[state]

    def next_state(self, state: int, token_id: int) -> int:
        """The state after text token `token_id`; ValueError when the token is not allowed."""
        if not 0 <= token_id < self.vocab_size or token_id in self._stop_set or not self.mask(state)[token_id]:
            raise ValueError(f"token {token_id} is not allowed by the constraint in this state")
        return self.index.get_next_state(state, token_id)


class RegexConstraint:
    """One request's position in a `CompiledGuide` (the `Constraint` the engine uses)."""

    def __init__(self, guide: CompiledGuide):
        self.guide = guide
        self.state = guide.initial_state
        self.stopped = False  # a stop id was taken
        self._stop_ids = frozenset(guide.stop_ids.tolist())

    def allowed(self) -> torch.Tensor:
        if self.stopped:
            return torch.zeros(self.guide.vocab_size, dtype=torch.bool)
        return self.guide.mask(self.state).clone()

    def advance(self, token_id: int) -> None:
        token_id = int(token_id)
        if self.stopped:
            raise ValueError("the constrained output already ended with a stop token")
        if token_id in self._stop_ids:
            if not self.accepting:
                raise ValueError(f"stop token {token_id} before the output matches the constraint")
            self.stopped = True
            return
        self.state = self.guide.next_state(self.state, token_id)

    @property
    def accepting(self) -> bool:
        """The output so far is a complete match (a stop token may follow)."""
        return self.guide.is_accepting(self.state)

    @property
    def finished(self) -> bool:
        return self.stopped or self.guide.is_finished(self.state)


class ConstraintCompiler:
    """Compiles regexes and JSON schemas into `RegexConstraint`s for one tokenizer and model.

    tokenizer: an lmlab tokenizer (`token_bytes(id)`, `vocab_size`, special tokens);
    vocab_size: the model's vocabulary size (masks have this length; it may exceed the tokenizer's);
    stop_ids: ids that end generation, allowed exactly when the output is a complete match.
    whitespace / max_depth: the JSON rules of the module docstring. cache_size: compiled patterns kept
    (least recently used dropped first); compilation is shared, each call returns a fresh state.
    Safe to call from several threads; a constraint belongs to the one thread running its request.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_ids: Sequence[int], *, whitespace: str = WHITESPACE,
                 max_depth: int = DEFAULT_MAX_DEPTH, cache_size: int = 32):
        from outlines_core import Vocabulary  # the serve extra

        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.vocab_size = vocab_size
        self.stop_ids = sorted({int(i) for i in stop_ids})
        bad = [i for i in self.stop_ids if not 0 <= i < vocab_size]
        if bad:
            raise ValueError(f"stop ids {bad} are outside the model's vocabulary [0, {vocab_size})")
        self.whitespace, self.max_depth, self.cache_size = whitespace, max_depth, cache_size
        table = _text_token_bytes(tokenizer, vocab_size, frozenset(self.stop_ids))
        if not table:
            raise ValueError("the tokenizer has no text tokens within the model's vocabulary")
        # Ids from max(vocab sizes) on are no model tokens: the library's end-of-text id, END, and stand-ins
        # for bytes that are no token, so that the library never finds a state without transitions (it
        # refuses the whole pattern then); the guide prunes the states only stand-ins could complete.
        free = max(vocab_size, tokenizer.vocab_size)
        self.end_id = free + 1
        missing = _utf8_bytes_missing(table)
        stand_ins = {bytes([b]): [self.end_id + 1 + k] for k, b in enumerate(missing)}
        self.prune = bool(missing)
        self.vocabulary = Vocabulary(free, {**table, **stand_ins, END_BYTE: [self.end_id]})
        self._cache: OrderedDict[str, CompiledGuide] = OrderedDict()
        self._lock = threading.Lock()

    def regex(self, pattern: str) -> RegexConstraint:
        """Output matching `pattern` whole (Python `re` syntax; see `translate_regex`)."""
        return RegexConstraint(self.compile(translate_regex(pattern), what=f"regex {pattern!r}"))

    def json_schema(self, schema: dict | str) -> RegexConstraint:
        """Output that is a JSON text valid under `schema` (a dict or its JSON text)."""
        if not isinstance(schema, dict | str | bool):
            raise ValueError(f"a JSON schema is a dict or its JSON text, not {type(schema).__name__}")
        regex = schema_to_regex(schema, whitespace=self.whitespace, max_depth=self.max_depth)
        return RegexConstraint(self.compile(regex, what="JSON schema"))

    def json_object(self) -> RegexConstraint:
        """Any JSON object, nested at most max_depth containers deep."""
        return self.json_schema({"type": "object"})

    def compile(self, regex: str, what: str = "regex") -> CompiledGuide:
        """The guide of regex text as `translate_regex` / `schema_to_regex` write it (cached). The text
        must not match NUL, which marks the end of the text to the automaton."""
        with self._lock:
            guide = self._cache.get(regex)
            if guide is not None:
                self._cache.move_to_end(regex)
                return guide
        guide = self._build(regex, what)  # outside the lock: the library releases the GIL while it works
        with self._lock:
            self._cache[regex] = guide
            self._cache.move_to_end(regex)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return guide

    def _build(self, regex: str, what: str) -> CompiledGuide:
        from outlines_core import Index

        start = time.perf_counter()
        try:
            index = Index(f"\\x00(?:{regex})\\x00", self.vocabulary)
        except (ValueError, TypeError, RuntimeError) as e:
            message = str(e).splitlines()[0]
            if "incompatible" in message:
                hint = "some text it needs cannot be written with this tokenizer's tokens"
            elif "size" in message.lower() or "too big" in message.lower():
                hint = "it is too large; lower repetition counts, maxLength/maxItems or max_depth"
            else:
                hint = "it cannot be compiled to a token automaton"
            raise ValueError(f"{what}: {hint} ({message})") from None
        try:
            return CompiledGuide(regex, index, self.vocab_size, self.stop_ids, self.end_id, self.prune,
                                 time.perf_counter() - start)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None

    def cache_info(self) -> dict[str, int]:
        with self._lock:
            return {"size": len(self._cache), "capacity": self.cache_size}
