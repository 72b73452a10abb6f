"""Chat templates and loss masks: a conversation becomes token ids plus a mask of the tokens to train on.

`render_chat(tokenizer, messages) -> (ids, loss_mask)`. Messages are OpenAI-style dicts: role in system / user /
assistant / tool, content a string; an assistant message may carry `tool_calls` ([{"function": {"name",
"arguments"}}]). The mask is 1 exactly on what the model must learn to write: each assistant turn's content (and
tool calls) plus the end-of-turn token that stops it, never the role header or anyone else's text, as in
supervised fine-tuning on completions only (Ouyang et al. 2022; TRL's `assistant_only_loss`).

Two kinds of template:

- lmlab's own (the tokenizer has no `chat_template`): `<|bos|>` then, per message, `<|role|>content<|end|>`, with
  each marker a single special-token id (`bpe.DEFAULT_SPECIAL_TOKENS`). The text of a message is encoded as
  ordinary text, so a user who types "<|assistant|>" gets characters, not the role token: no prompt injection.
  `LMLAB_CHAT_TEMPLATE` is the same format as a Jinja template, written into a saved tokenizer's
  tokenizer_config.json, so that transformers' `apply_chat_template` gives the same ids (and, through its
  `{% generation %}` blocks, the same assistant mask).
- a Hugging Face Jinja template (`tokenizer.chat_template`): rendered as transformers renders it (a sandboxed,
  immutable Jinja environment with trim_blocks and lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson`
  that keeps non-ASCII characters, the special tokens as variables), then encoded with every special token
  recognized and no bos/eos added, as `apply_chat_template(messages, tokenize=True)` does. The mask comes from the
  template's `{% generation %}` blocks when it has them (transformers' `return_assistant_tokens_mask`); otherwise
  each assistant turn is found by rendering prefixes of the conversation: what appending the assistant message
  adds to the conversation that ends with the generation prompt is that turn, cut where a continuation of the
  conversation (one more user message) departs from it, then stripped of trailing whitespace.

Written by hand rather than through transformers because lmlab tokenizers are not transformers tokenizers and
the mask needs character offsets; jinja2 does the rendering.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
BOS, END = "<|bos|>", "<|end|>"
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
# Unicode noncharacters, reserved for internal use, mark where a {% generation %} block's output starts and ends.
_GEN_START, _GEN_END = "\ufdd0", "\ufdd1"
_PROBE = {"role": "user", "content": "Continue."}

# lmlab's format as a Jinja template (rendered by transformers with trim_blocks and lstrip_blocks). The tool list
# goes into the system turn; tool calls follow the assistant's text, one JSON object per line.
LMLAB_CHAT_TEMPLATE = (
    "{{- '<|bos|>' }}"
    "{%- set has_system = messages | length > 0 and messages[0]['role'] == 'system' %}"
    "{%- if tools %}"
    "{{- '<|system|>' }}"
    "{%- if has_system %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- 'Tools:' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '<|end|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{- raise_exception('unknown role ' + message['role']) }}"
    "{%- endif %}"
    "{%- if not (loop.first and tools and has_system) %}"
    "{%- set content = message['content'] if message['content'] is string else '' %}"
    "{{- '<|' + message['role'] + '|>' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}"
    "{{- content }}"
    "{%- if message['tool_calls'] is defined and message['tool_calls'] %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set fn = call['function'] if call['function'] is defined else call %}"
    "{%- if content or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{{- '{\"name\": ' + (fn['name'] | tojson) + ', \"arguments\": ' }}"
    "{%- if fn['arguments'] is string %}{{- fn['arguments'] }}{%- else %}{{- fn['arguments'] | tojson }}{%- endif %}"
    "{{- '}' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|end|>' }}"
    "{%- endgeneration %}"
    "{%- else %}"
    "{{- content + '<|end|>' }}"
    "{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>' }}{%- endif %}"
)


class ChatTemplateError(ValueError):
    """A conversation that a template cannot render, or a template whose assistant turns cannot be located."""


# --- messages -------------------------------------------------------------------------------
def validate_messages(messages: Sequence[dict], tools: Sequence[dict] | None = None) -> list[dict]:
    """Check the conversation's shape and return copies of the messages without None-valued keys (transformers
    drops them too: templates test whether a key exists, and OpenAI clients send content=None with tool calls)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ChatTemplateError("the conversation is empty; give at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatTemplateError(f"message {i} is a {type(m).__name__}, not a dict with 'role' and 'content'")
        m = {k: v for k, v in m.items() if v is not None}
        role = m.get("role")
        if role not in ROLES:
            raise ChatTemplateError(f"message {i} has role {role!r}; roles are {', '.join(ROLES)}")
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise ChatTemplateError(f"message {i}: only assistant messages carry tool_calls, not {role}")
            _check_tool_calls(calls, i)
        if "content" in m and not isinstance(m["content"], str):
            raise ChatTemplateError(f"message {i}: content must be a string, got {type(m['content']).__name__}")
        if "content" not in m and not calls:
            raise ChatTemplateError(f"message {i} ({role}) has no content")
        out.append(m)
    if tools is not None and (isinstance(tools, (str, dict)) or not all(isinstance(t, dict) for t in tools)):
        raise ChatTemplateError("tools must be a list of JSON-schema dicts, one per tool")
    for where, value in (("messages", out), ("tools", tools)):
        if _holds_marker(value):
            raise ChatTemplateError(f"{where} contain U+FDD0 or U+FDD1, Unicode noncharacters reserved here")
    return out


def _check_tool_calls(calls: Any, i: int) -> None:
    if not isinstance(calls, list) or not calls:
        raise ChatTemplateError(f"message {i}: tool_calls must be a non-empty list")
    for call in calls:
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or "arguments" not in fn:
            raise ChatTemplateError(
                f"message {i}: each tool call is {{'function': {{'name': str, 'arguments': dict or JSON string}}}}"
                f", got {call!r}"
            )


def _holds_marker(value: Any) -> bool:
    if isinstance(value, str):
        return _GEN_START in value or _GEN_END in value
    if isinstance(value, dict):
        return any(_holds_marker(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_marker(v) for v in value)
    return False


# --- lmlab's own template -------------------------------------------------------------------
def _tool_call_text(message: dict) -> str:
    """The assistant's text followed by its tool calls, one JSON object per line (as LMLAB_CHAT_TEMPLATE)."""
    content = message.get("content", "")
    lines = []
    for call in message.get("tool_calls") or []:
        fn = call.get("function", call)
        args = fn["arguments"]
        args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        lines.append('{"name": ' + json.dumps(fn["name"], ensure_ascii=False) + ', "arguments": ' + args + "}")
    return "\n".join([content] + lines) if content else "\n".join(lines)


def _lmlab_parts(messages: list[dict], tools: Sequence[dict] | None, add_generation_prompt: bool) -> list:
    """The conversation as [(special token name or None, text, trained)]: a special token when the first item is
    set, else ordinary text; `trained` marks the assistant's tokens."""
    parts: list[tuple[str | None, str, bool]] = [(BOS, BOS, False)]
    first = 0
    if tools:
        text = ""
        if messages[0]["role"] == "system":
            text, first = messages[0]["content"] + "\n\n", 1
        text += "Tools:" + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
        parts += [(ROLE_TOKENS["system"], ROLE_TOKENS["system"], False), (None, text, False), (END, END, False)]
    for m in messages[first:]:
        trained = m["role"] == "assistant"
        text = _tool_call_text(m) if trained else m.get("content", "")
        parts += [(ROLE_TOKENS[m["role"]], ROLE_TOKENS[m["role"]], False), (None, text, trained), (END, END, trained)]
    if add_generation_prompt:
        parts.append((ROLE_TOKENS["assistant"], ROLE_TOKENS["assistant"], False))
    return parts


def _render_lmlab(tokenizer, messages, tools, add_generation_prompt) -> tuple[list[int], list[int]]:
    parts = _lmlab_parts(messages, tools, add_generation_prompt)
    needed = sorted({name for name, _, _ in parts if name is not None})
    missing = [t for t in needed if t not in tokenizer.special_tokens]
    if missing:
        raise ChatTemplateError(
            f"the tokenizer has no chat template and lacks lmlab's chat tokens {missing}; train it with "
            "lmlab.tokenizer.DEFAULT_SPECIAL_TOKENS, or set tokenizer.chat_template to a Jinja template"
        )
    ids: list[int] = []
    mask: list[int] = []
    for name, text, trained in parts:
        # message text is ordinary text: special-token names in it stay characters
        new = [tokenizer.special_tokens[name]] if name is not None else tokenizer.encode(text, allowed_special=())
        ids += new
        mask += [int(trained)] * len(new)
    return ids, mask


# --- Jinja templates ------------------------------------------------------------------------
@lru_cache(maxsize=32)
def _compile(template: str):
    """The template compiled in an environment that behaves like transformers' (see the module docstring)."""
    try:
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ImportError("Jinja chat templates need jinja2: pip install 'lmlab[hf]'") from e

    class Generation(Extension):
        """{% generation %}...{% endgeneration %}: wraps the block's output in markers, located after rendering."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller) -> str:
            return _GEN_START + caller() + _GEN_END

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


def _special_variables(tokenizer) -> dict[str, str]:
    """The special-token names a template may use: bos_token, eos_token, pad_token, unk_token."""
    names = {f"{role}_token": getattr(tokenizer, f"{role}_token", None) for role in ("bos", "eos", "pad", "unk")}
    return {key: name for key, name in names.items() if name is not None}


def _render_text(template: str, tokenizer, messages, tools, add_generation_prompt: bool) -> tuple[str, list]:
    """Rendered text (markers removed) and the (start, end) spans of its {% generation %} blocks."""
    import jinja2

    try:
        raw = _compile(template).render(
            messages=messages, tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
            **_special_variables(tokenizer),
        )
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template refused this conversation: {e}") from None
    text, spans, start = [], [], None
    pos = 0
    for piece in re.split(f"([{_GEN_START}{_GEN_END}])", raw):
        if piece == _GEN_START:
            start = pos
        elif piece == _GEN_END:
            if start is not None and pos > start:
                spans.append((start, pos))
            start = None
        else:
            text.append(piece)
            pos += len(piece)
    return "".join(text), spans


def _special_pattern(tokenizer) -> re.Pattern | None:
    """A regex finding the tokenizer's special and added tokens in text (longest first)."""
    names = set(tokenizer.special_tokens)
    added = getattr(tokenizer, "added_tokens", None) or {}
    names |= {t.content for t in added} if isinstance(added, list) else set(added)
    names = sorted(names, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, names))) if names else None


def _cut_inside_token(text: str, end: int, specials: re.Pattern | None) -> int:
    """`end` moved back to the start of a special token of `text` that it falls strictly inside of."""
    if specials is not None:
        for m in specials.finditer(text):
            if m.start() < end < m.end():
                return m.start()
            if m.start() >= end:
                break
    return end


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _assistant_spans(template, tokenizer, messages, tools, full: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in `full`, by rendering conversation prefixes (module docstring)."""
    specials = _special_pattern(tokenizer)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            before, _ = _render_text(template, tokenizer, messages[:i], tools, True)
        except ChatTemplateError as e:
            raise ChatTemplateError(
                f"cannot locate assistant message {i}: the template refuses the conversation before it ({e}); "
                "mark the assistant turns with {% generation %} ... {% endgeneration %}"
            ) from None
        after, _ = _render_text(template, tokenizer, messages[: i + 1], tools, False)
        if not (after.startswith(before) and full.startswith(before)):
            raise ChatTemplateError(
                f"cannot locate assistant message {i}: the template renders the conversation before it differently "
                "once it continues (it is not prefix-stable); wrap the assistant turns of the template in "
                "{% generation %} ... {% endgeneration %} to mark them"
            )
        start = len(before)
        end = start + _common_prefix(after[start:], full[start:])
        try:  # where a continued conversation departs from `after`, the turn is over (drops a final eos)
            probe, _ = _render_text(template, tokenizer, [*messages[: i + 1], _PROBE], tools, False)
            if probe.startswith(before):
                end = min(end, start + _common_prefix(after[start:], probe[start:]))
                end = _cut_inside_token(probe, end, specials)
        except ChatTemplateError:
            pass  # a template that refuses the probe (say, a strict role order): keep the whole addition
        end = _cut_inside_token(full, _cut_inside_token(after, end, specials), specials)
        while end > start and full[end - 1].isspace():
            end -= 1
        if end > start:
            spans.append((start, end))
    return spans


def token_spans(tokenizer, text: str, ids: list[int]) -> list[tuple[int, int]]:
    """Character span of `text` that each token of `ids` (its encoding, all specials allowed) comes from.

    Tokenizers that know their offsets (`encode_with_offsets`) give them; for byte-level BPE the tokens' bytes
    spell the text's UTF-8 bytes, so offsets follow from token lengths (a token that ends inside a character
    covers that character). For a tokenizer that normalizes Unicode, `text` must already be normalized."""
    if hasattr(tokenizer, "encode_with_offsets"):
        found, spans = tokenizer.encode_with_offsets(text, allowed_special="all")
        if found != ids:
            raise ChatTemplateError("the tokenizer's offsets do not belong to these ids")
        return spans
    byte_to_char = [i for i, c in enumerate(text) for _ in range(len(c.encode("utf-8")))]
    spans, pos = [], 0
    for id in ids:
        n = len(tokenizer.token_bytes(id))
        if n == 0 or pos + n > len(byte_to_char):
            raise ChatTemplateError("the tokens' bytes do not spell the rendered text; cannot compute a loss mask")
        spans.append((byte_to_char[pos], byte_to_char[pos + n - 1] + 1))
        pos += n
    if pos != len(byte_to_char):
        raise ChatTemplateError("the tokens' bytes do not spell the rendered text; cannot compute a loss mask")
    return spans


def _assistant_mask(tokenizer, text: str, ids: list[int], spans: list[tuple[int, int]]) -> list[int]:
    """1 for each token overlapping a span (a token of zero width: lying inside one), as transformers' mask."""
    form = getattr(tokenizer, "normalization", None)
    if form and not hasattr(tokenizer, "encode_with_offsets"):
        import unicodedata

        # the tokens spell the normalized text: move the spans there (normalizing each side of a boundary apart
        # is exact unless a combining character sits right at it)
        spans = [(len(unicodedata.normalize(form, text[:s])), len(unicodedata.normalize(form, text[:e])))
                 for s, e in spans]
        text = unicodedata.normalize(form, text)
    mask = []
    for a, b in token_spans(tokenizer, text, ids):
        hit = any((a < e and b > s) if b > a else (s <= a < e) for s, e in spans)
        mask.append(int(hit))
    return mask


# --- the entry points -----------------------------------------------------------------------
def _template_of(tokenizer, template: str | None) -> str | None:
    template = template if template is not None else getattr(tokenizer, "chat_template", None)
    if template is not None and not isinstance(template, str):
        raise ChatTemplateError(f"a chat template is a Jinja string, got {type(template).__name__}")
    if template is not None and not template.strip():
        raise ChatTemplateError("the chat template is empty; give a Jinja template, or None for lmlab's own")
    return None if template == LMLAB_CHAT_TEMPLATE else template  # lmlab's format: rendered natively


def render_chat(
    tokenizer,
    messages: Sequence[dict],
    *,
    add_generation_prompt: bool = False,
    tools: Sequence[dict] | None = None,
    template: str | None = None,
) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a conversation: the template is `template`, else `tokenizer.chat_template`, else lmlab's
    own. add_generation_prompt appends the header of the assistant turn that the model is to write next; tools
    (JSON schemas) are shown to the model as the template says. See the module docstring for the mask."""
    return _render(tokenizer, messages, add_generation_prompt, tools, template)


def render_chat_text(
    tokenizer,
    messages: Sequence[dict],
    *,
    add_generation_prompt: bool = False,
    tools: Sequence[dict] | None = None,
    template: str | None = None,
) -> str:
    """The rendered conversation as text (what `render_chat` tokenizes); needs no tokenizing."""
    messages = validate_messages(messages, tools)
    tools = list(tools) if tools else None
    template = _template_of(tokenizer, template)
    if template is None:
        return "".join(text for _, text, _ in _lmlab_parts(messages, tools, bool(add_generation_prompt)))
    return _render_text(template, tokenizer, messages, tools, bool(add_generation_prompt))[0]


def _render(tokenizer, messages, add_generation_prompt, tools, template) -> tuple[list[int], list[int]]:
    messages = validate_messages(messages, tools)
    tools = list(tools) if tools else None
    template = _template_of(tokenizer, template)
    if template is None:
        return _render_lmlab(tokenizer, messages, tools, bool(add_generation_prompt))
    text, spans = _render_text(template, tokenizer, messages, tools, bool(add_generation_prompt))
    ids = tokenizer.encode(text, allowed_special="all")
    if not spans and not re.search(r"\{%-?\s*generation\s*-?%\}", template):
        spans = _assistant_spans(template, tokenizer, messages, tools, text)
    mask = _assistant_mask(tokenizer, text, ids, spans) if spans else [0] * len(ids)
    return ids, mask


def turn_end_id(tokenizer) -> int | None:
    """The special token the tokenizer's chat template closes an assistant message with (lmlab's <|end|>, ChatML's
    <|im_end|>, Llama 3's <|eot_id|>), found by rendering a one-turn chat and reading the last token of the
    assistant's loss mask; None when the template closes turns with plain text."""
    ids, mask = render_chat(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    # only a special token (one that decoding with skip_special_tokens drops) can be a stop: a template that
    # closes turns with plain text ("\n") must not cut multi-line answers
    if trained and tokenizer.decode([trained[-1]], skip_special_tokens=True) == "":
        return trained[-1]
    return None


def end_of_turn_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn, for generation: the tokenizer's eos ids and `turn_end_id`."""
    stops = list(getattr(tokenizer, "eos_ids", None) or [])
    end = turn_end_id(tokenizer)
    return stops + ([end] if end is not None and end not in stops else [])
