"""`load_tokenizer(path)`: the tokenizer of a checkpoint directory (or a tokenizer file), whatever its format.

A Hugging Face checkpoint carries its tokenizer in one of three forms, tried in this order:

    tokenizer.json     byte-level BPE (GPT-2, Llama 3, Qwen2/3)         -> Tokenizer.from_hf_json
                       sentencepiece-style BPE (Llama 2, Mistral, Gemma, Phi-3) -> SentencePieceTokenizer
    tokenizer.model    a sentencepiece protobuf (Llama 2, Gemma)        -> SentencePieceTokenizer
                       or a tiktoken rank file (Llama 3 original)       -> Tokenizer (tiktoken_file)

and the files beside it say how the tokenizer is used: tokenizer_config.json (bos / eos / pad token names,
add_bos_token / add_eos_token, the chat template), chat_template.jinja (the chat template, in newer checkpoints;
it wins over the config's) and generation_config.json (eos_token_id, one id or several: the ids that end
generation). This follows what transformers' AutoTokenizer reads, so that the ids match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .sentencepiece import AddedToken, SentencePieceError, SentencePieceTokenizer, is_sentencepiece_json
from .tiktoken_file import is_tiktoken_file, load_tiktoken
from .tokenizer import Tokenizer

__all__ = ["load_tokenizer", "tokenizer_kind"]

JSON_FILE = "tokenizer.json"
MODEL_FILE = "tokenizer.model"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
GENERATION_FILE = "generation_config.json"

AnyTokenizer = Tokenizer | SentencePieceTokenizer


def load_tokenizer(path: str | Path) -> AnyTokenizer | None:
    """The tokenizer of a checkpoint directory (None when it has no tokenizer file), or of one tokenizer file
    (tokenizer.json, a sentencepiece .model, a .tiktoken rank file); the configuration files beside it are
    applied either way. Raises ValueError for a file lmlab cannot read, saying what it is."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        directory = path
        file = next((path / n for n in (JSON_FILE, MODEL_FILE) if (path / n).is_file()), None)
        if file is None:
            return None
    else:
        directory, file = path.parent, path
    config = _read_json(directory / CONFIG_FILE)
    generation = _read_json(directory / GENERATION_FILE)
    template = _chat_template(directory, config)
    kind = tokenizer_kind(file)
    if kind == "byte-level":  # Tokenizer.from_hf_json reads the config files beside the file itself
        return _configure_byte_level(Tokenizer.from_hf_json(file), config, template)
    if kind == "tiktoken":
        return _tiktoken(file, config, generation, template)
    try:
        if kind == "sentencepiece-json":
            data = json.loads(file.read_text(encoding="utf-8"))
            tok = SentencePieceTokenizer.from_hf_json(data, name=directory.name)
        else:
            tok = SentencePieceTokenizer.from_model_file(file, name=directory.name)
        return _configure_sentencepiece(tok, config, generation, template, file)
    except SentencePieceError as e:
        raise ValueError(str(e) if str(file) in str(e) else f"{file}: {e}") from None


def tokenizer_kind(file: str | Path) -> str:
    """"byte-level", "sentencepiece-json" (tokenizer.json files), "sentencepiece" (a protobuf .model) or
    "tiktoken" (a rank file); a ValueError for anything else."""
    file = Path(file)
    with open(file, "rb") as f:
        head = f.read(64)
    if head.lstrip()[:1] == b"{":
        data = _read_json(file)
        model = (data.get("model") or {}).get("type")
        if is_sentencepiece_json(data):
            return "sentencepiece-json"
        steps = json.dumps({k: data.get(k) for k in ("pre_tokenizer", "decoder")})
        if model == "BPE" and "ByteLevel" in steps:
            return "byte-level"
        raise ValueError(
            f"{file} is a tokenizer.json with a {model} model and pre-tokenizer "
            f"{(data.get('pre_tokenizer') or {}).get('type')}: neither a byte-level BPE (GPT-2, Llama 3, Qwen2) nor "
            "a sentencepiece-style BPE (Llama 2, Mistral, Gemma, Phi-3), the two kinds lmlab reads"
        )
    if is_tiktoken_file(file):
        return "tiktoken"
    if head[:1] == b"\x0a":  # protobuf field 1 (pieces), length-delimited: a sentencepiece ModelProto
        return "sentencepiece"
    raise ValueError(
        f"{file} is neither a tokenizer.json, a sentencepiece .model (protobuf) nor a tiktoken rank file; "
        "it may be truncated or not a tokenizer at all"
    )


# --- configuration files ------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); fix or remove it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def _name(value: Any) -> str | None:
    """A token name from tokenizer_config.json: a string, or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    file = directory / TEMPLATE_FILE
    if file.is_file():
        return file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _generation_eos(generation: dict[str, Any]) -> list[int]:
    eos = generation.get("eos_token_id")
    return [eos] if isinstance(eos, int) else [i for i in eos or [] if isinstance(i, int)]


# --- byte-level tokenizer.json (lmlab's Tokenizer) ------------------------------------------
def _configure_byte_level(tok: Tokenizer, config: dict[str, Any], template: str | None) -> Tokenizer:
    """What Tokenizer.from_hf_json leaves to the caller: chat_template.jinja. The add_bos_token /
    add_eos_token flags of tokenizer_config.json are not applied: tokenizer.json's post-processor
    decides, as in transformers 5 (4.x rebuilt the post-processor from the flags for some classes)."""
    changes: dict[str, Any] = {}
    if template is not None:
        changes["chat_template"] = template
    return _rebuild(tok, **changes)


def _rebuild(tok: Tokenizer, **changes) -> Tokenizer:
    """`tok` with some constructor arguments changed, through the pickle path (which rebuilds the derived state:
    ids, encoder, post-processing) without redoing the merge-list checks."""
    if not changes:
        return tok
    state = tok.__getstate__()
    state.update(changes)
    for flag, role in (("add_bos", "bos_token"), ("add_eos", "eos_token")):
        if state[flag] and state[role] is None:
            raise ValueError(f"{CONFIG_FILE} asks to add the {role} but the tokenizer names none")
    rebuilt = Tokenizer.__new__(Tokenizer)
    rebuilt.__setstate__(state)
    return rebuilt


# --- tiktoken rank files --------------------------------------------------------------------
def _tiktoken(file: Path, config: dict[str, Any], generation: dict[str, Any], template: str | None) -> Tokenizer:
    """A rank file (Llama 3's original tokenizer.model) with Llama 3's pattern. Its special tokens are those that
    tokenizer_config.json's added_tokens_decoder lists, with the names the config gives; without a config,
    Llama 3's (the "llama3" preset)."""
    decoder = config.get("added_tokens_decoder") or {}
    specials = {_name(v): int(k) for k, v in decoder.items() if _name(v)} or None
    kwargs: dict[str, Any] = {"name": file.parent.name, "chat_template": template}
    if specials is not None:  # the preset's names need not exist: the config says which are which
        kwargs.update(bos_token=None, eos_token=None, eos_tokens=[], add_bos=False)
    for key in ("bos_token", "eos_token", "pad_token"):
        if _name(config.get(key)):
            kwargs[key] = _name(config[key])
    for key, attr in (("add_bos_token", "add_bos"), ("add_eos_token", "add_eos")):
        if isinstance(config.get(key), bool):
            kwargs[attr] = config[key]
    tok = load_tiktoken(file, "llama3", special_tokens=specials, **kwargs)
    by_id = {i: t for t, i in tok.special_tokens.items()}
    eos = [by_id[i] for i in _generation_eos(generation) if i in by_id]
    eos += [t for t in config.get("lmlab_eos_tokens") or [] if t in tok.special_tokens]
    return _rebuild(tok, eos_tokens=list(dict.fromkeys(eos))) if eos else tok


# --- sentencepiece --------------------------------------------------------------------------
def _configure_sentencepiece(
    tok: SentencePieceTokenizer, config: dict[str, Any], generation: dict[str, Any], template: str | None, file: Path
) -> SentencePieceTokenizer:
    """Apply tokenizer_config.json / generation_config.json to a sentencepiece tokenizer: rebuild it with the
    config's special-token names, flags and template, the eos ids of generation_config.json, and the added tokens
    that added_tokens_decoder lists beyond the model's own (tokens that transformers adds on loading)."""
    added = {t.id: t for t in tok.added_tokens}
    for key, spec in (config.get("added_tokens_decoder") or {}).items():
        content = _name(spec)
        i = int(key)
        if content is None or i in added or (i < len(tok.pieces) and tok.pieces[i].text == content and
                                             not spec.get("special")):
            continue
        if i < len(tok.pieces) and tok.pieces[i].text != content:
            raise ValueError(f"{CONFIG_FILE}: added token {content!r} has id {i}, the piece {tok.pieces[i].text!r}")
        added[i] = AddedToken(content, i, special=bool(spec.get("special")), lstrip=bool(spec.get("lstrip")),
                              rstrip=bool(spec.get("rstrip")))
    params = dict(
        merges=tok.merges, added_tokens=list(added.values()), rules=tok.rules, byte_fallback=tok.byte_fallback,
        fuse_unk=tok.fuse_unk, ignore_merges=tok.ignore_merges, name=tok.name, bos_token=tok.bos_token,
        eos_token=tok.eos_token, pad_token=tok.pad_token, eos_tokens=tok.eos_tokens, chat_template=tok.chat_template,
        add_bos=tok.add_bos, add_eos=tok.add_eos,
    )
    for key in ("bos_token", "eos_token", "pad_token"):
        if key in config:
            params[key] = _name(config[key])
    # A .model file has no post-processor, so the flags decide; a tokenizer.json's post-processor
    # decides for itself, as in transformers 5.
    if file.suffix != ".json":
        for key, attr in (("add_bos_token", "add_bos"), ("add_eos_token", "add_eos")):
            if isinstance(config.get(key), bool):
                params[attr] = config[key]
    if template is not None:
        params["chat_template"] = template
    names = {i: p.text for i, p in enumerate(tok.pieces)} | {t.id: t.content for t in added.values()}
    eos_names = [t for t in config.get("lmlab_eos_tokens") or [] if isinstance(t, str)]
    for i in _generation_eos(generation):
        if i not in names:
            raise ValueError(f"{GENERATION_FILE}: eos_token_id {i} is not a token of {file}")
        eos_names.append(names[i])
    if eos_names:
        params["eos_tokens"] = list(dict.fromkeys(eos_names))
    if params["add_bos"] and params["bos_token"] is None:
        raise ValueError(f"{file}: add_bos_token is set but no bos_token is named")
    return SentencePieceTokenizer(tok.pieces, **params)
