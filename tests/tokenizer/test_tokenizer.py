"""The fast Tokenizer: round trips on arbitrary unicode, special tokens, tokenizer.json I/O, parity with
HF tokenizers/transformers in both directions, the merge-list fallback, pickling, and errors."""

from __future__ import annotations

import base64
import gzip
import json
import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmlab.tokenizer import (
    GPT4_PATTERN,
    Tokenizer,
    encode_reference,
    load_tokenizer,
    merge_list_problem,
    merges_from_ranks,
    ranks_from_merges,
)

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

TRAIN = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Café, naïve, façade, Ångström; 東京は日本の首都です。 Привет, мир! مرحبا بالعالم",
    "emoji 🤗🚀 👨‍👩‍👧 🇫🇷 and\r\nwindows\r\nlines\tand tabs    and spaces",
] * 4
UNICODE = [
    "héllo wörld Café ÅÉ", "e\u0301 cafe\u0301 A\u030a", "🤗👨‍👩‍👧‍👦 🇫🇷 👍🏽", "  \t\n\n   x \r\n\r\n",
    "\x00\x01\x7f nul",
    "日本語のテキスト、中文，한국어", "<|endoftext|> inside <|im_start|>user hi<|im_end|>", "   ", "a" * 50,
    "1234567 89.5", "it's I'M we'LL", "\u200b\u200d\ufeff", "x<|eos|>y<|bos|><|eos|>", "<|eo", "",
]
SPECIAL_PIECES = ["<|bos|>", "<|eos|>", "<|user|>", "<|", "|>", "<|eos", "eos|>"]
TEXT_PIECES = ["👨‍👩‍👧", "🇫🇷", "e\u0301", "\u200d", "\r\n", "\x00", "\t", "   ", "\u3000", " the", "'s", "123456"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(TRAIN, 600, min_frequency=1, progress=False)


def probe_texts(shared_data) -> list[str]:
    lines = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8").splitlines()[30_000:30_300]
    gsm = [json.loads(x)["question"] for x in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:100]]
    with gzip.open(shared_data / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        code = [json.loads(x)["prompt"] for x in f][:30]
    return lines + gsm + code + UNICODE + ["\n".join(lines[:50])]


# --- round trips and special tokens -------------------------------------------------------------

texts = st.lists(st.one_of(st.text(), st.sampled_from(TEXT_PIECES + SPECIAL_PIECES)), max_size=12).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts)
def test_round_trip_any_unicode(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size and i not in tok.special_tokens.values() for i in ids)
    assert ids == encode_reference(text, tok.merges, tok.pattern)
    both = tok.encode(text, allowed_special="all")
    assert tok.decode(both) == text  # special text becomes ids, and decodes back to the same text


def scan_specials(text: str, allowed) -> tuple[list[str], str]:
    """The allowed special-token names found in `text` left to right (longest first at a position),
    and the text without them: what encode should recognize, and what skip_special_tokens leaves."""
    names, rest, i = [], [], 0
    ordered = sorted(allowed, key=len, reverse=True)
    while i < len(text):
        name = next((n for n in ordered if text.startswith(n, i)), None)
        if name:
            names.append(name)
            i += len(name)
        else:
            rest.append(text[i])
            i += 1
    return names, "".join(rest)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.one_of(st.text(max_size=8), st.sampled_from(SPECIAL_PIECES)), max_size=10),
       allowed=st.sets(st.sampled_from(["<|bos|>", "<|eos|>", "<|user|>"])))
def test_special_tokens_only_where_allowed(tok, parts, allowed):
    text = "".join(parts)
    ids = tok.encode(text, allowed_special=allowed)
    assert tok.decode(ids) == text
    names, rest = scan_specials(text, allowed)
    assert [tok.id_to_token(i) for i in ids if i in tok.special_tokens.values()] == names
    assert tok.decode(ids, skip_special_tokens=True) == rest


def test_special_tokens_examples(tok):
    eos, bos = tok.special_tokens["<|eos|>"], tok.special_tokens["<|bos|>"]
    text = "hi<|eos|> <|bos|>there"
    assert eos not in tok.encode(text) and bos not in tok.encode(text)
    assert tok.encode(text) == tok.encode_ordinary(text)
    all_ids = tok.encode(text, allowed_special="all")
    assert all_ids == tok.encode("hi") + [eos] + tok.encode(" ") + [bos] + tok.encode("there")
    only_eos = tok.encode(text, allowed_special={"<|eos|>"})
    assert only_eos == tok.encode("hi") + [eos] + tok.encode(" <|bos|>there")
    assert tok.decode(all_ids, skip_special_tokens=True) == "hi there"
    assert tok.decode(all_ids) == text
    with pytest.raises(ValueError, match="unknown special tokens"):
        tok.encode(text, allowed_special={"<|nope|>"})
    with pytest.raises(ValueError, match="not the string"):
        tok.encode(text, allowed_special="<|eos|>")


def test_add_special_tokens():
    base = Tokenizer.train(TRAIN, 400, min_frequency=1, progress=False)
    both = Tokenizer(base.mergeable_ranks, base.pattern, base.special_tokens, bos_token="<|bos|>",
                     eos_token="<|eos|>", add_bos=True, add_eos=True, merges=base.merges)
    plain = base.encode("hello")
    assert both.encode("hello", add_special_tokens=True) == [both.bos_id, *plain, both.eos_id]
    assert both.encode("hello") == plain
    assert both.encode_batch(["hello", ""], add_special_tokens=True) == [[both.bos_id, *plain, both.eos_id],
                                                                        [both.bos_id, both.eos_id]]


def test_lone_surrogates_become_replacement_characters(tok):
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")
    assert tok.decode(tok.encode("x\udfffy")) == "x\ufffdy"


def test_decode_partial_utf8_and_bad_ids(tok):
    ids = tok.encode("🤗")
    assert tok.decode(ids[:1]) == "\ufffd" * len(tok.decode(ids[:1]))
    assert tok.decode_bytes(ids) == "🤗".encode()
    with pytest.raises(UnicodeDecodeError):
        tok.decode(ids[:1], errors="strict")
    for bad in (tok.vocab_size, -1, 10**12):
        with pytest.raises(ValueError, match=f"token id {bad} is not in the vocabulary"):
            tok.decode([1, bad])
        with pytest.raises(ValueError, match="not in the vocabulary"):
            tok.token_bytes(bad)


def test_token_lookups(tok):
    the = tok.encode(" the")
    assert len(the) == 1
    assert tok.id_to_token(the[0]) == "Ġthe" and tok.token_to_id("Ġthe") == the[0]
    assert tok.token_bytes(the[0]) == b" the"
    assert tok.token_to_id("<|eos|>") == tok.eos_id and tok.id_to_token(tok.eos_id) == "<|eos|>"
    assert tok.token_to_id("no such token") is None and tok.token_to_id("Ġzzzzqq") is None
    assert [tok.token_bytes(i) for i in range(256)] == [bytes([i]) for i in range(256)]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(texts, max_size=6))
def test_encode_batch_equals_encode(tok, batch):
    for kwargs in ({}, {"allowed_special": "all"}, {"allowed_special": "all", "add_special_tokens": True}):
        assert tok.encode_batch(batch, **kwargs) == [tok.encode(t, **kwargs) for t in batch]


def test_pickle_both_encoders(tok):
    again = pickle.loads(pickle.dumps(tok))
    text = " ".join(TRAIN) + "<|eos|>"
    assert again.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
    assert again.uses_tiktoken and again.eos_ids == tok.eos_ids
    slow = Tokenizer(tok.mergeable_ranks, tok.pattern, tok.special_tokens, merges=list(reversed(tok.merges)))
    assert not slow.uses_tiktoken
    slow_again = pickle.loads(pickle.dumps(slow))
    assert not slow_again.uses_tiktoken and slow_again.encode(text) == slow.encode(text)


# --- tokenizer.json I/O -------------------------------------------------------------------------

def test_save_load_round_trip(tok, tmp_path):
    chatty = Tokenizer(tok.mergeable_ranks, tok.pattern, tok.special_tokens, name="chatty", bos_token="<|bos|>",
                       eos_token="<|eos|>", pad_token="<|pad|>", eos_tokens=["<|end|>"], add_bos=True,
                       chat_template="{{ messages }}", merges=tok.merges)
    chatty.save(tmp_path / "t")
    loaded = Tokenizer.from_hf_json(tmp_path / "t")
    for attr in ("mergeable_ranks", "special_tokens", "pattern", "merges", "bos_id", "eos_id", "pad_id",
                 "chat_template", "add_bos", "add_eos", "vocab_size"):
        assert getattr(loaded, attr) == getattr(chatty, attr), attr
    assert loaded.eos_ids == [chatty.eos_id, chatty.special_tokens["<|end|>"]]
    assert loaded.name == "t" and loaded.uses_tiktoken
    text = " ".join(TRAIN + UNICODE)
    assert loaded.encode(text, add_special_tokens=True, allowed_special="all") == chatty.encode(
        text, add_special_tokens=True, allowed_special="all")
    assert load_tokenizer(tmp_path / "t").encode(text) == chatty.encode(text)
    with pytest.raises(FileExistsError, match="overwrite"):
        chatty.save(tmp_path / "t")
    tok.save(tmp_path / "t", overwrite=True)
    assert not Tokenizer.from_hf_json(tmp_path / "t" / "tokenizer.json").add_bos


def test_ranks_only_tokenizer_saves_an_exact_merge_list(tok, tmp_path):
    # built from tiktoken ranks alone (as a .tiktoken file gives): the merges are derived on save
    bare = Tokenizer(tok.mergeable_ranks, tok.pattern, tok.special_tokens)
    merges, exact = merges_from_ranks(tok.mergeable_ranks)
    assert exact and merges == tok.merges
    bare.save(tmp_path / "bare")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "bare" / "tokenizer.json"))
    text = " ".join(TRAIN + UNICODE)
    assert hf.encode(text, add_special_tokens=False).ids == bare.encode(text, allowed_special="all")


def _check_parity(ours: Tokenizer, hf, texts: list[str]) -> int:
    """Identical ids (special text recognized, template applied) and identical decoding."""
    for text in texts:
        ids = hf(text)["input_ids"]
        assert ours.encode(text, add_special_tokens=True, allowed_special="all") == ids, text
        assert ours.decode(ids) == hf.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), text
        assert ours.encode(text) == hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"], text
    return len(texts)


@pytest.mark.parametrize("normalization", [None, "NFC"])
def test_transformers_loads_lmlab_tokenizer(tok, tmp_path, shared_data, normalization):
    ours = Tokenizer(tok.mergeable_ranks, tok.pattern, tok.special_tokens, bos_token="<|bos|>",
                     eos_token="<|eos|>", pad_token="<|pad|>", add_bos=True, merges=tok.merges,
                     normalization=normalization)
    ours.save(tmp_path / "t")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "t")
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert _check_parity(ours, hf, probe_texts(shared_data)) > 400
    composed = ours.encode("cafe\u0301")
    assert (composed == ours.encode("café")) == (normalization == "NFC")


@pytest.mark.parametrize("pattern", ["gpt2", r"\w+", r"[a-z]+|\d"])
def test_transformers_parity_other_patterns(pattern, tmp_path, shared_data):
    """Patterns that leave gaps between matches (\\w+ skips spaces and punctuation): the gaps are
    pieces of their own, as in HF's Split(behavior="isolated"), so no text is lost or changed."""
    ours = Tokenizer.train(TRAIN, 500, pattern=pattern, min_frequency=1, progress=False)
    ours.save(tmp_path / "t")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "t")
    assert _check_parity(ours, hf, probe_texts(shared_data)[::3]) > 100
    assert ours.decode(ours.encode("a, b!  c\n")) == "a, b!  c\n"


def test_decode_of_any_ids_matches_transformers(tok, tmp_path):
    """Random id sequences cut characters anywhere: invalid UTF-8 becomes U+FFFD as in HF."""
    import random

    tok.save(tmp_path / "t")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "t")
    rng = random.Random(0)
    for _ in range(1000):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 12))]
        assert tok.decode(ids) == hf.decode(ids), ids
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), ids


# --- reading tokenizer.json files made by HF tokenizers --------------------------------------------

def _hf_bpe(kind: str, texts: list[str], vocab_size: int = 1500):
    """A byte-level BPE trained by HF tokenizers, configured as GPT-2, Llama 3 or Qwen2 configure theirs."""
    tok = tokenizers.Tokenizer(models.BPE())
    if kind == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        specials = ["<|endoftext|>"]
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GPT4_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        specials = (["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"] if kind == "llama3"
                    else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    if kind == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    if kind == "llama3":
        bos = ("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B:1",
                                          special_tokens=[bos]),
        ])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if kind == "qwen2":
        tok.add_tokens([tokenizers.AddedToken("<tool_call>", special=False, normalized=False)])
    return tok, specials


def _write_hf_dir(path, tok, config: dict, generation: dict | None = None):
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    return path


@pytest.fixture(scope="module")
def train_texts(shared_data) -> list[str]:
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:200_000]
    gsm = [json.loads(x)["question"] for x in (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:300]]
    return [text, *gsm, *TRAIN]


@pytest.mark.parametrize("kind", ["gpt2", "llama3", "qwen2"])
def test_lmlab_loads_hf_built_tokenizers(kind, tmp_path, shared_data, train_texts):
    hf_tok, specials = _hf_bpe(kind, train_texts)
    config = {"gpt2": {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"},
              "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": "{{ x }}"},
              "qwen2": {"eos_token": {"content": "<|im_end|>"}, "pad_token": "<|endoftext|>"}}[kind]
    generation = {"eos_token_id": [hf_tok.token_to_id("<|end_of_text|>"), hf_tok.token_to_id("<|eot_id|>")]} \
        if kind == "llama3" else None
    d = _write_hf_dir(tmp_path / kind, hf_tok, config, generation)
    ours = Tokenizer.from_hf_json(d)
    assert ours.uses_tiktoken, ours.merge_list_problem  # HF's trainer also satisfies the conditions
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    texts = probe_texts(shared_data) + ["a<tool_call>b <tool_call>"]
    assert _check_parity(ours, hf, texts) > 400
    if kind == "llama3":
        assert ours.add_bos and ours.encode("hi", add_special_tokens=True)[0] == hf_tok.token_to_id(specials[0])
        assert ours.eos_ids == [hf_tok.token_to_id("<|eot_id|>"), hf_tok.token_to_id("<|end_of_text|>")]
        assert ours.chat_template == "{{ x }}"
    if kind == "qwen2":
        assert ours.normalization == "NFC" and ours.added_tokens == {"<tool_call>": hf_tok.token_to_id("<tool_call>")}
        assert ours.encode("e\u0301") == ours.encode("é")
        assert hf_tok.token_to_id("<tool_call>") in ours.encode("x<tool_call>")  # non-special: always matched
        assert ours.decode(ours.encode("x<tool_call>"), skip_special_tokens=True) == "x<tool_call>"
    if kind == "gpt2":
        assert ours.eos_ids == [0] and ours.special_tokens == {"<|endoftext|>": 0}


def test_tiktoken_converted_file_uses_the_exact_merge_list(tok, tmp_path, shared_data):
    """Llama 3's tokenizer.json comes from tiktoken ranks through transformers' converter, which
    lists every split of each token as a merge. The merge list then is not one merge per token,
    so lmlab encodes with the merge-list encoder, and still matches HF exactly."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks_file = tmp_path / "tok.tiktoken"
    ranks_file.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in tok.mergeable_ranks.items()))
    converted = TikTokenConverter(vocab_file=str(ranks_file), pattern=tok.pattern,
                                  extra_special_tokens=list(tok.special_tokens)).converted()
    d = _write_hf_dir(tmp_path / "llama3ish", converted, {"eos_token": "<|eos|>"})
    ours = Tokenizer.from_hf_json(d)
    assert ours.ignore_merges and not ours.uses_tiktoken
    assert "both create" in ours.merge_list_problem
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    assert _check_parity(ours, hf, probe_texts(shared_data)) > 400


def test_ids_out_of_merge_order_fall_back(tmp_path, train_texts, shared_data):
    hf_tok, _ = _hf_bpe("gpt2", train_texts, vocab_size=600)
    data = json.loads(hf_tok.to_str())
    vocab = data["model"]["vocab"]
    a, b = data["model"]["merges"][10], data["model"]["merges"][200]  # swap the ids of two merged tokens
    ta, tb = "".join(a) if isinstance(a, list) else a.replace(" ", ""), "".join(b) if isinstance(b, list) else \
        b.replace(" ", "")
    vocab[ta], vocab[tb] = vocab[tb], vocab[ta]
    d = tmp_path / "swapped"
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps(data))
    ours = Tokenizer.from_hf_json(d)
    assert not ours.uses_tiktoken and "out of merge order" in ours.merge_list_problem
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    assert _check_parity(ours, hf, probe_texts(shared_data)[:200]) == 200


# --- errors -----------------------------------------------------------------------------------

def test_constructor_errors(tok):
    ranks = tok.mergeable_ranks
    with pytest.raises(ValueError, match="no token for byte 7"):
        Tokenizer({t: r for t, r in ranks.items() if t != b"\x07"}, "gpt4")
    with pytest.raises(ValueError, match="id 5 is given to two tokens"):
        Tokenizer({**ranks, b"zzqq": 5}, "gpt4")
    with pytest.raises(ValueError, match="already used"):
        Tokenizer(ranks, "gpt4", {"<|x|>": 3})
    with pytest.raises(ValueError, match="bos_token '<|x|>' is not a special token"):
        Tokenizer(ranks, "gpt4", bos_token="<|x|>")
    with pytest.raises(ValueError, match="add_bos=True needs a bos_token"):
        Tokenizer(ranks, "gpt4", add_bos=True)
    with pytest.raises(ValueError, match="normalization"):
        Tokenizer(ranks, "gpt4", normalization="lowercase")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        Tokenizer(ranks, "(unclosed")
    with pytest.raises(ValueError, match="empty"):
        Tokenizer({}, "gpt4")


def _json_dir(tmp_path, data, name="bad"):
    d = tmp_path / name
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps(data) if not isinstance(data, str) else data)
    return d


def test_from_hf_json_errors(tok, tmp_path):
    good = tok.to_hf_json()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_hf_json(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not valid JSON"):
        Tokenizer.from_hf_json(_json_dir(tmp_path, "{oops", "broken"))
    spm = {**good, "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581"}}
    with pytest.raises(ValueError, match="sentencepiece-style.*load_tokenizer"):
        Tokenizer.from_hf_json(_json_dir(tmp_path, spm, "spm"))
    fallback = {**good, "model": {**good["model"], "byte_fallback": True}}
    with pytest.raises(ValueError, match="load_tokenizer"):
        Tokenizer.from_hf_json(_json_dir(tmp_path, fallback, "fallback"))
    wordpiece = {**good, "model": {"type": "WordPiece", "vocab": {}}}
    with pytest.raises(ValueError, match="unsupported model type"):
        Tokenizer.from_hf_json(_json_dir(tmp_path, wordpiece, "wp"))
    lower = {**good, "normalizer": {"type": "Lowercase"}}
    with pytest.raises(ValueError, match="unsupported normalizer.*Lowercase"):
        Tokenizer.from_hf_json(_json_dir(tmp_path, lower, "lower"))
    digits = {**good, "pre_tokenizer": {"type": "Digits", "individual_digits": True}}
    with pytest.raises(ValueError, match="unsupported pre_tokenizer.*Digits"):
        Tokenizer.from_hf_json(_json_dir(tmp_path, digits, "digits"))
    roberta = {**good, "post_processor": {"type": "RobertaProcessing"}}
    with pytest.raises(ValueError, match="unsupported post_processor"):
        Tokenizer.from_hf_json(_json_dir(tmp_path, roberta, "roberta"))
    prefix = {**good, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True}}
    with pytest.raises(ValueError, match="add_prefix_space"):
        Tokenizer.from_hf_json(_json_dir(tmp_path, prefix, "prefix"))
    lstrip = {**good, "added_tokens": [{**good["added_tokens"][0], "lstrip": True}]}
    with pytest.raises(ValueError, match="lstrip"):
        Tokenizer.from_hf_json(_json_dir(tmp_path, lstrip, "lstrip"))


def test_generation_config_eos_ids(tok, tmp_path):
    tok.save(tmp_path / "t")
    eos, end = tok.special_tokens["<|eos|>"], tok.special_tokens["<|end|>"]
    assert Tokenizer.from_hf_json(tmp_path / "t").eos_ids == [eos]
    (tmp_path / "t" / "generation_config.json").write_text(json.dumps({"eos_token_id": end}))
    assert Tokenizer.from_hf_json(tmp_path / "t").eos_ids == [eos, end]
    (tmp_path / "t" / "generation_config.json").write_text(json.dumps({"eos_token_id": [end, eos]}))
    assert Tokenizer.from_hf_json(tmp_path / "t").eos_ids == [eos, end]
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps({}))
    assert Tokenizer.from_hf_json(tmp_path / "t").eos_ids == [end, eos]  # generation_config alone


def test_merge_list_problem_messages(tok):
    ranks = tok.mergeable_ranks
    assert merge_list_problem(tok.merges, ranks) is None
    assert "created by no merge" in merge_list_problem(tok.merges[:-1], ranks)
    assert "byte values have no token" in merge_list_problem([], {b"a": 0})
    extra = {**ranks, b"zz": 9999}
    assert "outside the vocabulary" in merge_list_problem([*tok.merges, (b"zz", b"q\xff")], extra)
    assert ranks_from_merges(tok.merges) == ranks
