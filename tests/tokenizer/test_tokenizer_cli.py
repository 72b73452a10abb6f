"""`lmlab tokenizer train|encode|decode|info` end to end through `lmlab.cli.main`, their errors, and
`lmlab generate` on a checkpoint whose tokenizer lmlab trained."""

from __future__ import annotations

import json

import pytest

from lmlab.cli import main
from lmlab.tokenizer import Tokenizer, load_tokenizer


def run(*argv) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data):
    d = tmp_path_factory.mktemp("corpus")
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:150_000]
    (d / "shakespeare.txt").write_text(text, encoding="utf-8")
    rows = [json.loads(x) for x in (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:400]]
    (d / "gsm.jsonl").write_text("".join(json.dumps({"body": r["question"], "text": 1}) + "\n" for r in rows))
    return d


def test_train_encode_decode_info(corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    assert run("tokenizer", "train", "--input", corpus / "shakespeare.txt", "--vocab-size", 1000,
               "--out", out, "--no-progress") == 0
    summary = capsys.readouterr().out
    assert "vocab size    1,000 (256 bytes + 736 merges + 8 special)" in summary
    assert "bytes/token" in summary and f"wrote {out}" in summary
    tok = load_tokenizer(out)
    assert isinstance(tok, Tokenizer) and tok.vocab_size == 1000 and tok.eos_token == "<|eos|>"
    text = (corpus / "shakespeare.txt").read_text(encoding="utf-8")
    n_bytes = len(text.encode())
    assert f"{n_bytes:,} bytes -> {len(tok.encode(text)):,} tokens" in summary

    line = "ROMEO: What light through yonder window breaks? <|eos|>"
    assert run("tokenizer", "encode", "--tokenizer", out, "--text", line, "--ids-only") == 0
    ids = capsys.readouterr().out.split()
    assert [int(i) for i in ids] == tok.encode(line)
    assert run("tokenizer", "encode", "--tokenizer", out, "--text", line, "--ids-only", "--allow-special") == 0
    special_ids = [int(i) for i in capsys.readouterr().out.split()]
    assert special_ids[-1] == tok.eos_id and special_ids == tok.encode(line, allowed_special="all")

    assert run("tokenizer", "decode", "--tokenizer", out, "--ids", " ".join(map(str, special_ids))) == 0
    assert capsys.readouterr().out == line + "\n"
    assert run("tokenizer", "decode", "--tokenizer", out, "--ids", ",".join(map(str, special_ids)),
               "--skip-special-tokens") == 0
    assert capsys.readouterr().out == line.replace("<|eos|>", "") + "\n"

    (tmp_path / "line.txt").write_text(line)
    assert run("tokenizer", "encode", "--tokenizer", out, "--file", tmp_path / "line.txt") == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == len(ids) + 1 and table[0].split()[0] == ids[0] and "tokens for" in table[-1]

    assert run("tokenizer", "info", out, "--sample", corpus / "shakespeare.txt", "--max-specials", 3) == 0
    info = capsys.readouterr().out
    assert "tiktoken encoder" in info and "1,000" in info and "<|eos|> (993)" in info
    assert "bytes/token" in info and "and 5 more" in info


def test_train_jsonl_options(corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    assert run("tokenizer", "train", "--input", corpus / "gsm.jsonl", corpus / "shakespeare.txt",
               "--text-field", "body", "--vocab-size", 600, "--out", out, "--pattern", "gpt2",
               "--special", "<|endoftext|>", "--max-bytes", 20_000, "--min-frequency", 3, "--no-progress") == 0
    summary = capsys.readouterr().out
    assert "20,000 bytes ->" in summary  # only GSM8K questions were read, cut at 20 KB
    tok = load_tokenizer(out)
    assert tok.special_tokens == {"<|endoftext|>": 599} and tok.eos_id is None
    from lmlab.tokenizer import GPT2_PATTERN

    assert tok.pattern == GPT2_PATTERN
    # training without special tokens, with a custom regex, to a size the corpus cannot fill
    assert run("tokenizer", "train", "--input", corpus / "gsm.jsonl", "--text-field", "body",
               "--vocab-size", 50_000, "--out", tmp_path / "t2", "--pattern", r"\w+|\W+", "--special",
               "--max-bytes", 3000, "--min-frequency", 5, "--no-progress") == 0
    assert "stopped early" in capsys.readouterr().out
    assert load_tokenizer(tmp_path / "t2").special_tokens == {}


def test_errors(corpus, tmp_path, capsys):
    def fails(*argv, match):
        assert run(*argv) == 1
        assert match in capsys.readouterr().err

    train = ("tokenizer", "train", "--no-progress", "--out", tmp_path / "t")
    fails(*train, "--input", corpus / "shakespeare.txt", "--vocab-size", 260, match="leaves no room")
    fails(*train, "--input", corpus / "shakespeare.txt", "--vocab-size", 100, "--special",
          match="need at least 256")
    (tmp_path / "empty.txt").write_text("")
    fails(*train, "--input", tmp_path / "empty.txt", "--vocab-size", 500, match="holds no text")
    fails(*train, "--input", tmp_path / "nope.txt", "--vocab-size", 500, match="no such file")
    fails(*train, "--input", corpus / "shakespeare.txt", "--vocab-size", 500, "--pattern", "([a-z",
          match="not a valid regular expression")
    fails(*train, "--input", corpus / "gsm.jsonl", "--vocab-size", 500, match="--text-field")  # "text" is a number
    fails(*train, "--input", corpus / "shakespeare.txt", "--vocab-size", 500, "--max-bytes", 0, match="--max-bytes")
    assert run(*train, "--input", corpus / "shakespeare.txt", "--vocab-size", 300, "--max-bytes", 5000) == 0
    fails(*train, "--input", corpus / "shakespeare.txt", "--vocab-size", 300, match="--overwrite")
    fails("tokenizer", "decode", "--tokenizer", tmp_path / "t", "--ids", "1 x", match="must be integers")
    fails("tokenizer", "decode", "--tokenizer", tmp_path / "t", "--ids", "1 99999", match="not in the vocabulary")
    fails("tokenizer", "encode", "--tokenizer", tmp_path / "none", "--text", "x", match="not a directory")
    (tmp_path / "empty_dir").mkdir()
    fails("tokenizer", "info", tmp_path / "empty_dir", match="holds no tokenizer")
    fails("tokenizer", "encode", "--tokenizer", tmp_path / "t", "--file", tmp_path / "nope.txt", match="not found")


@pytest.mark.parametrize("command", ["train", "encode", "decode", "info"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["tokenizer", command, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert "usage: lmlab tokenizer " + command in out and len(out) > 300


def test_generate_with_an_lmlab_tokenizer(corpus, tmp_path, capsys):
    """A checkpoint whose tokenizer lmlab trained: `lmlab generate` greedy text = transformers'."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d = tmp_path / "model"
    assert run("tokenizer", "train", "--input", corpus / "shakespeare.txt", "--vocab-size", 512,
               "--out", d, "--no-progress") == 0
    tok = load_tokenizer(d)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
    capsys.readouterr()
    assert run("generate", "--model", d, "--prompt", "First Citizen:", "--temperature", "0",
               "--max-new-tokens", "8", "--no-stream", "--ignore-eos") == 0
    text = capsys.readouterr().out.rstrip("\n")
    hf_tok = transformers.AutoTokenizer.from_pretrained(d)
    hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    ids = torch.tensor([hf_tok("First Citizen:")["input_ids"]])
    assert ids[0].tolist() == tok.encode("First Citizen:", add_special_tokens=True)
    ref = hf.generate(ids, do_sample=False, max_new_tokens=8, min_new_tokens=8, pad_token_id=tok.pad_id)
    assert text == hf_tok.decode(ref[0, ids.shape[1] :].tolist())

    other = tmp_path / "other"  # a bigger tokenizer beside a model with fewer embeddings: refused
    text = (corpus / "shakespeare.txt").read_text(encoding="utf-8")[:50_000]
    Tokenizer.train([text], 600, progress=False).save(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).write_bytes((other / name).read_bytes())
    with pytest.warns(UserWarning, match="eos_token_id .* not an added token"):  # generation_config's eos
        assert run("generate", "--model", d, "--prompt", "First", "--max-new-tokens", "2") == 1
    assert "do not belong together" in capsys.readouterr().err


def test_chat_shows_text_ids_and_mask(corpus, tmp_path, capsys):
    out = tmp_path / "tok"
    tok = Tokenizer.train([(corpus / "shakespeare.txt").read_text(encoding="utf-8")[:20_000]], 400, progress=False)
    tok.save(out)
    messages = [{"role": "user", "content": "Who art thou?"}, {"role": "assistant", "content": "A friend."}]
    (tmp_path / "chat.json").write_text(json.dumps({"messages": messages}))
    assert run("tokenizer", "chat", "--tokenizer", out, "--messages", tmp_path / "chat.json") == 0
    lines = capsys.readouterr().out.splitlines()
    ids, mask = tok.render_chat(messages)
    assert lines[0] == "<|bos|><|user|>Who art thou?<|end|><|assistant|>A friend.<|end|>"
    assert f"{len(ids)} tokens, {sum(mask)} in the loss mask" in lines
    rows = [row.split()[:2] for row in lines[-len(ids):]]
    assert rows == [[str(i), str(m)] for i, m in zip(ids, mask, strict=True)]
    (tmp_path / "bad.json").write_text("[{")
    assert run("tokenizer", "chat", "--tokenizer", out, "--messages", tmp_path / "bad.json") == 1
    assert "--messages" in capsys.readouterr().err
