"""tiktoken rank files: written from a tokenizer trained here, read back into lmlab's Tokenizer, with ids identical to
a `tiktoken.Encoding` built from the same file and to transformers' conversion of it; the presets' patterns and
special tokens against tiktoken's own registry and Meta's Llama 3 numbering; malformed files."""

from __future__ import annotations

import base64
import gzip
import json

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from lmlab.tokenizer import Tokenizer
from lmlab.tokenizer.tiktoken_file import (
    LLAMA3_1_SPECIALS,
    LLAMA3_SPECIALS,
    PRESETS,
    is_tiktoken_file,
    load_tiktoken,
    read_tiktoken_ranks,
    save_tiktoken,
)

EXTRA = [
    "Hello world<|eot_id|> x<|begin_of_text|>", "  spaces\n\n\tand 12345 numbers 3.14159", "日本語 中文 🤗 👨‍👩‍👧",
    "it's I'M we'LL", "   ", "", "\r\n\r\n", "<|endoftext|><|endofprompt|>", "café e\u0301", "x" * 80,
]


@pytest.fixture(scope="module")
def texts(shared_data) -> list[str]:
    lines = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8").splitlines()[20_000:20_300]
    gsm = [json.loads(x)["question"] for x in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:100]]
    with gzip.open(shared_data / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        code = [json.loads(x)["prompt"] for x in f][:20]
    return lines + gsm + code + EXTRA


@pytest.fixture(scope="module")
def rank_file(tmp_path_factory, shared_data) -> tuple:
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:200_000]
    trained = Tokenizer.train(text.splitlines(), 800, special_tokens=[], progress=False)
    path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
    save_tiktoken(trained, path)
    return trained, path


def test_written_file_is_what_tiktoken_reads(rank_file):
    trained, path = rank_file
    assert load_tiktoken_bpe(str(path)) == read_tiktoken_ranks(path) == trained.mergeable_ranks
    first = path.read_text().splitlines()[:3]
    assert first == [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(3)]  # "AA== 0", ...
    assert is_tiktoken_file(path)


@pytest.mark.parametrize("preset", ["llama3", "llama3.1", "cl100k_base", "o200k_base", "gpt2"])
def test_ids_match_tiktoken(rank_file, texts, preset):
    _, path = rank_file
    tok = load_tiktoken(path, preset)
    ranks = load_tiktoken_bpe(str(path))
    enc = tiktoken.Encoding("ref", pat_str=PRESETS[preset].pattern, mergeable_ranks=ranks,
                            special_tokens=tok.special_tokens)
    for text in texts:
        ids = tok.encode(text, allowed_special="all")
        assert ids == enc.encode(text, allowed_special="all"), text
        assert tok.encode(text) == enc.encode_ordinary(text), text
        assert tok.decode(ids) == enc.decode(ids) == text


def test_explicit_pattern_and_special_tokens(rank_file, texts):
    trained, path = rank_file
    n = len(trained.mergeable_ranks)
    tok = load_tiktoken(path, pattern="gpt2", special_tokens={"<|eos|>": n}, eos_token="<|eos|>")
    enc = tiktoken.Encoding("ref", pat_str=tok.pattern, mergeable_ranks=trained.mergeable_ranks,
                            special_tokens={"<|eos|>": n})
    assert all(tok.encode(t, allowed_special="all") == enc.encode(t, allowed_special="all") for t in texts)
    assert tok.eos_ids == [n]


def test_llama3_special_tokens(rank_file):
    trained, path = rank_file
    n = len(trained.mergeable_ranks)  # 128000 in Meta's file: the specials follow the ranks
    tok = load_tiktoken(path, "llama3")
    assert len(tok.special_tokens) == 256 and sorted(tok.special_tokens.values()) == list(range(n, n + 256))
    expected = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<|reserved_special_token_0|>": 2,
                "<|reserved_special_token_3|>": 5, "<|start_header_id|>": 6, "<|end_header_id|>": 7,
                "<|reserved_special_token_4|>": 8, "<|eot_id|>": 9, "<|reserved_special_token_5|>": 10,
                "<|reserved_special_token_250|>": 255}
    assert {t: tok.special_tokens[t] - n for t in expected} == expected
    assert tok.bos_id == n and tok.eos_ids == [n + 1, n + 9] and tok.add_bos
    assert tok.encode("hi", add_special_tokens=True)[0] == n

    tok31 = load_tiktoken(path, "llama3.1")
    expected31 = {"<|reserved_special_token_1|>": 3, "<|finetune_right_pad_id|>": 4,
                  "<|reserved_special_token_2|>": 5, "<|eom_id|>": 8, "<|eot_id|>": 9, "<|python_tag|>": 10,
                  "<|reserved_special_token_3|>": 11, "<|reserved_special_token_247|>": 255}
    assert {t: tok31.special_tokens[t] - n for t in expected31} == expected31
    assert tok31.eos_ids == [n + 1, n + 8, n + 9]
    assert len(set(LLAMA3_SPECIALS)) == len(set(LLAMA3_1_SPECIALS)) == 256


@pytest.mark.parametrize("name", ["r50k_base", "p50k_base", "cl100k_base", "o200k_base"])
def test_presets_agree_with_tiktoken_registry(rank_file, monkeypatch, name):
    """tiktoken's encoding constructors download their rank file; fed ours instead, they give the pattern and
    special tokens that the presets must reproduce."""
    from tiktoken_ext import openai_public

    trained, _ = rank_file
    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", lambda *a, **k: trained.mergeable_ranks)
    spec = getattr(openai_public, name)()
    preset = PRESETS[name]
    assert preset.pattern == spec["pat_str"]
    assert preset.special_tokens(len(trained.mergeable_ranks)) == spec["special_tokens"]


def test_transformers_converts_the_same_file(rank_file, texts, tmp_path):
    transformers = pytest.importorskip("transformers")
    _, path = rank_file
    tok = load_tiktoken(path, "llama3")
    (tmp_path / "tokenizer.model").write_bytes(path.read_bytes())
    decoder = {str(i): {"content": t, "special": True, "normalized": False, "lstrip": False, "rstrip": False,
                        "single_word": False} for t, i in tok.special_tokens.items()}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
         "eos_token": "<|end_of_text|>", "added_tokens_decoder": decoder}))
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in texts:
        assert tok.encode(text, allowed_special="all") == hf.encode(text, add_special_tokens=False), text


def test_save_refuses_to_overwrite(rank_file, tmp_path):
    trained, _ = rank_file
    save_tiktoken(trained.mergeable_ranks, tmp_path / "r.tiktoken")
    with pytest.raises(FileExistsError):
        save_tiktoken(trained, tmp_path / "r.tiktoken")
    save_tiktoken(trained, tmp_path / "r.tiktoken", overwrite=True)


@pytest.mark.parametrize("content, match", [
    (b"QQ== 0\nQg== x\n", r":2: expected '<base64 token> <rank>'"),
    (b"QQ== 0\nQQ== 1\n", r":2: token b'A' is listed twice"),
    (b"QQ== 0\nQg== 0\n", r":2: rank 0 is given twice \(also on line 1\)"),
    (b"QQ== 0\n!!!! 1\n", r":2: .* is not base64"),
    (b"\n\n", "holds no ranks"),
])
def test_malformed_files(tmp_path, content, match):
    (tmp_path / "bad.tiktoken").write_bytes(content)
    with pytest.raises(ValueError, match=match):
        read_tiktoken_ranks(tmp_path / "bad.tiktoken")


def test_usage_errors(rank_file):
    _, path = rank_file
    with pytest.raises(ValueError, match="holds no pre-tokenization pattern"):
        load_tiktoken(path)
    with pytest.raises(ValueError, match="unknown tiktoken preset 'llama9'"):
        load_tiktoken(path, "llama9")
    with pytest.raises(ValueError, match="preset .gpt2."):  # id 5 is already a rank
        load_tiktoken(path, "gpt2", special_tokens={"<|endoftext|>": 5})
