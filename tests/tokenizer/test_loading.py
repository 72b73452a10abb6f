"""load_tokenizer: which reader each kind of checkpoint directory (or file) goes to, the configuration files it
applies, ids identical to transformers' AutoTokenizer on the same directories (built here with save_pretrained),
and clear errors for what it cannot read."""

from __future__ import annotations

import json

import pytest

from lmlab.tokenizer import Tokenizer
from lmlab.tokenizer.loading import load_tokenizer, tokenizer_kind
from lmlab.tokenizer.sentencepiece import SentencePieceTokenizer
from lmlab.tokenizer.tiktoken_file import save_tiktoken

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

TEXTS = ["Hello world", " leading space", "<s>x</s> <|eot_id|> <bos>", "日本語 🤗", "a\n\n  b\tc ", "", "x" * 40,
         "<start_of_turn>user\nhi<end_of_turn>"]


@pytest.fixture(scope="module")
def texts(shared_data) -> list[str]:
    lines = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8").splitlines()[10_000:10_150]
    gsm = [json.loads(x)["question"] for x in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:50]]
    return lines + gsm + TEXTS


@pytest.fixture(scope="module")
def sp_models(tmp_path_factory, shared_data) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("sp_models")
    (tmp / "train.txt").write_text(
        (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:200_000] + "\n日本語 🤗")
    common = dict(model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                  remove_extra_whitespaces=False, minloglevel=2)
    spm.SentencePieceTrainer.train(input=str(tmp / "train.txt"), model_prefix=str(tmp / "llama"),
                                   vocab_size=900, **common)
    spm.SentencePieceTrainer.train(input=str(tmp / "train.txt"), model_prefix=str(tmp / "gemma"),
                                   vocab_size=900, add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
                                   pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
                                   user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], **common)
    return {"llama": str(tmp / "llama.model"), "gemma": str(tmp / "gemma.model")}


@pytest.fixture(scope="module")
def byte_level(shared_data) -> Tokenizer:
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:100_000]
    base = Tokenizer.train(text.splitlines(), 700, special_tokens=["<|begin_of_text|>", "<|end_of_text|>",
                                                                   "<|eot_id|>"], progress=False)
    return Tokenizer(base.mergeable_ranks, base.pattern, base.special_tokens, bos_token="<|begin_of_text|>",
                     eos_token="<|end_of_text|>", merges=base.merges, add_bos=True)


def _hf_dir(sp_models, name, path, **config):
    """A checkpoint's tokenizer files as transformers writes them (tokenizer.json + tokenizer_config.json)."""
    from transformers import GemmaTokenizer, LlamaTokenizer

    src = path.parent / f"{path.name}_src"
    src.mkdir()
    (src / "tokenizer.model").write_bytes(open(sp_models[name], "rb").read())
    hf = (GemmaTokenizer if name == "gemma" else LlamaTokenizer).from_pretrained(src, **config)
    hf.save_pretrained(path)
    return path


def _parity(ours, path, texts) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(path)
    for text in texts:
        assert ours.encode(text, allowed_special="all", add_special_tokens=True) == hf.encode(text), text
        ids = ours.encode(text, allowed_special="all")
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), text


# --- dispatch -------------------------------------------------------------------------------
def test_byte_level_directory(byte_level, texts, tmp_path):
    byte_level.save(tmp_path / "bl")
    tok = load_tokenizer(tmp_path / "bl")
    assert isinstance(tok, Tokenizer) and tokenizer_kind(tmp_path / "bl" / "tokenizer.json") == "byte-level"
    _parity(tok, tmp_path / "bl", texts)
    assert isinstance(load_tokenizer(tmp_path / "bl" / "tokenizer.json"), Tokenizer)  # the file alone


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_sentencepiece_json_directory(sp_models, texts, tmp_path, name):
    path = _hf_dir(sp_models, name, tmp_path / name, add_bos_token=True)
    tok = load_tokenizer(path)
    assert isinstance(tok, SentencePieceTokenizer) and tok.merges is not None and tok.add_bos
    assert tokenizer_kind(path / "tokenizer.json") == "sentencepiece-json"
    _parity(tok, path, texts)


def test_model_file_directory(sp_models, texts, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(open(sp_models["gemma"], "rb").read())
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer) and tok.merges is None
    assert tokenizer_kind(tmp_path / "tokenizer.model") == "sentencepiece"
    sp = spm.SentencePieceProcessor(model_file=sp_models["gemma"])
    assert all(tok.encode(t) == sp.encode(t) for t in texts)
    assert tok.bos_token == "<bos>" and tok.eos_ids == [1] and tok.add_bos  # sentencepiece models add a bos
    assert isinstance(load_tokenizer(sp_models["gemma"]), SentencePieceTokenizer)  # the .model file alone


def test_tiktoken_model_directory(byte_level, tmp_path):
    save_tiktoken(byte_level, tmp_path / "tokenizer.model")  # Llama 3's original layout: a rank file
    tok = load_tokenizer(tmp_path)
    n = len(byte_level.mergeable_ranks)
    assert isinstance(tok, Tokenizer) and tokenizer_kind(tmp_path / "tokenizer.model") == "tiktoken"
    assert tok.special_tokens["<|begin_of_text|>"] == n and tok.special_tokens["<|eot_id|>"] == n + 9
    assert tok.encode("hi <|eot_id|>", allowed_special="all", add_special_tokens=True) == [
        n, *byte_level.encode("hi "), n + 9]

    # a config that lists the special tokens names them (and generation_config says which end generation)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|bos|>", "eos_token": "<|eos|>", "add_bos_token": False, "added_tokens_decoder": {
            str(n): {"content": "<|bos|>", "special": True}, str(n + 1): {"content": "<|eos|>", "special": True},
            str(n + 2): {"content": "<|end|>", "special": True}}}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [n + 1, n + 2]}))
    tok = load_tokenizer(tmp_path)
    assert tok.special_tokens == {"<|bos|>": n, "<|eos|>": n + 1, "<|end|>": n + 2}
    assert tok.eos_ids == [n + 1, n + 2] and not tok.add_bos and tok.bos_id == n


def test_directory_order_and_empty_directories(sp_models, byte_level, tmp_path):
    assert load_tokenizer(tmp_path) is None
    (tmp_path / "config.json").write_text("{}")
    assert load_tokenizer(tmp_path) is None
    (tmp_path / "tokenizer.model").write_bytes(open(sp_models["llama"], "rb").read())
    byte_level.write_files(tmp_path)  # tokenizer.json beside tokenizer.model: it wins, as in transformers
    assert isinstance(load_tokenizer(tmp_path), Tokenizer)


# --- configuration files --------------------------------------------------------------------
def test_configs_are_applied(sp_models, byte_level, tmp_path):
    path = _hf_dir(sp_models, "llama", tmp_path / "llama")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.update(add_bos_token=True, add_eos_token=True, chat_template="{{ 'from config' }}")
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = load_tokenizer(path)
    assert tok.chat_template == "{{ 'from config' }}" and tok.eos_ids == [2, 0]
    # tokenizer.json's post-processor decides whether bos/eos are added, not the config's flags:
    # transformers 5 reads the same files that way (4.x rebuilt the post-processor from the flags)
    hf = transformers.AutoTokenizer.from_pretrained(path)
    assert all(tok.encode(t, add_special_tokens=True) == hf.encode(t) for t in ["hi there", " x", ""])
    (path / "tokenizer.json").unlink()  # a bare tokenizer.model has no post-processor: the flags decide
    (path / "tokenizer.model").write_bytes(open(sp_models["llama"], "rb").read())
    tok = load_tokenizer(path)
    assert tok.add_bos and tok.add_eos
    assert tok.encode("hi there", add_special_tokens=True) == [tok.bos_id, *tok.encode("hi there"), tok.eos_id]
    (path / "chat_template.jinja").write_text("{{ 'from file' }}")  # newer checkpoints: the file wins
    assert load_tokenizer(path).chat_template == "{{ 'from file' }}"

    byte_level.save(tmp_path / "bl")
    config = json.loads((tmp_path / "bl" / "tokenizer_config.json").read_text())
    flipped = not byte_level.add_bos
    (tmp_path / "bl" / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": flipped}))
    (tmp_path / "bl" / "chat_template.jinja").write_text("{{ 'jinja' }}")
    tok = load_tokenizer(tmp_path / "bl")
    assert tok.add_bos == byte_level.add_bos and tok.chat_template == "{{ 'jinja' }}"
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "bl")
    assert tok.encode("hi there", add_special_tokens=True) == hf.encode("hi there")


def test_added_tokens_from_config(sp_models, tmp_path):
    """A .model checkpoint whose tokenizer_config.json adds tokens past the pieces (a pad token, chat markers)."""
    (tmp_path / "tokenizer.model").write_bytes(open(sp_models["llama"], "rb").read())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "pad_token": "<pad>", "added_tokens_decoder": {
            "900": {"content": "<pad>", "special": True}, "901": {"content": "<|end|>", "special": True,
                                                                  "rstrip": True}}}))
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == 902 and tok.pad_id == 900
    assert tok.encode("a<|end|>\n b", allowed_special="all")[-2:] == [901, tok.token_to_id("b")]  # rstrip
    assert tok.decode([900, 901], skip_special_tokens=True) == ""


# --- errors ---------------------------------------------------------------------------------
def test_errors(sp_models, tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing")
    wordpiece = tmp_path / "wp"
    wordpiece.mkdir()
    (wordpiece / "tokenizer.json").write_text(json.dumps(
        {"model": {"type": "WordPiece", "vocab": {"[UNK]": 0}}, "pre_tokenizer": {"type": "BertPreTokenizer"}}))
    with pytest.raises(ValueError, match="WordPiece model .* neither a byte-level BPE .* nor a sentencepiece"):
        load_tokenizer(wordpiece)
    (wordpiece / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_tokenizer(wordpiece)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "tokenizer.model").write_bytes(b"\x00\x01binary junk")
    with pytest.raises(ValueError, match="neither a tokenizer.json, a sentencepiece .model .* nor a tiktoken"):
        load_tokenizer(garbage)
    (garbage / "tokenizer.model").write_bytes(open(sp_models["llama"], "rb").read()[:500])
    with pytest.raises(ValueError, match="tokenizer.model is not a readable sentencepiece model: truncated"):
        load_tokenizer(garbage)
    (garbage / "tokenizer.model").write_bytes(open(sp_models["llama"], "rb").read())
    (garbage / "generation_config.json").write_text(json.dumps({"eos_token_id": 5000}))
    with pytest.raises(ValueError, match="eos_token_id 5000 is not a token"):
        load_tokenizer(garbage)
    (garbage / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not an object"):
        load_tokenizer(garbage)
