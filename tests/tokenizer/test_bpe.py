"""BPE training and the reference encoder: a hand-worked example, the fast trainer against the plain
merge loop (real text and generated corpora), and tiktoken's rank rule against the merge list."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmlab.tokenizer import (
    GPT2_PATTERN,
    Tokenizer,
    encode_reference,
    merge_list_problem,
    ranks_from_merges,
    train_bpe,
    train_bpe_reference,
)
from lmlab.tokenizer.bpe import pretokenize, resolve_pattern

WORD = "aaabdaaabac"  # the classic BPE example: one pre-token under every pattern here


def test_hand_worked_example():
    # pairs of "aaabdaaabac": aa x4 (overlaps count), ab x2, then bd, da, ba, ac once each
    #   1. (a, a) -> the word is aa a b d aa a b a c; (aa, a) and (a, b) both occur twice, and
    #      (b"a", b"b") < (b"aa", b"a") because b"a" is a prefix of b"aa": (a, b) wins the tie
    #   2. (a, b) -> aa ab d aa ab a c
    #   3. (aa, ab) -> aaab d aaab a c: every pair occurs once now
    #   4. with min_frequency=1, the smallest of the count-1 pairs each time: (a, c), then
    #      (aaab, ac) < (aaab, d) < (d, aaab), then (aaab, d), then the whole word; then no pair is left
    expected = [(b"a", b"a"), (b"a", b"b"), (b"aa", b"ab"), (b"a", b"c"),
                (b"aaab", b"ac"), (b"aaab", b"d"), (b"aaabd", b"aaabac")]
    for train in (train_bpe_reference, lambda *a, **k: train_bpe(*a, **k, progress=False)):
        assert train([WORD], 256 + 20, min_frequency=1) == expected  # ends with one token
        assert train([WORD], 256 + 20, min_frequency=2) == expected[:3]  # min_frequency stops it
        assert train([WORD], 256 + 2, min_frequency=1) == expected[:2]  # vocab_size stops it
    ids = encode_reference(WORD, expected[:4])
    assert ids == [258, ord("d"), 258, 259]  # aaab d aaab ac
    assert ranks_from_merges(expected)[b"aaab"] == 258
    assert encode_reference(WORD + " " + WORD, expected) == [262, 32, 262]


def test_frequencies_weight_pairs():
    # "ab" occurs 3 times as a word, "cd" twice: (a, b) is merged first, then (c, d)
    merges = train_bpe_reference(["ab ab ab cd cd"], 256 + 5, GPT2_PATTERN, min_frequency=2)
    assert merges[:2] == [(b" ", b"a"), (b" a", b"b")] or merges[0] == (b"a", b"b")
    counts = pretokenize(["ab ab ab cd cd"], GPT2_PATTERN)
    assert counts == {b"ab": 1, b" ab": 2, b" cd": 2}


def test_identical_merges_on_real_text(shared_data):
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:200_000]
    fast = train_bpe([text], 1000, progress=False)
    reference = train_bpe_reference([text], 1000)
    assert len(fast) == 1000 - 256
    assert fast == reference
    assert merge_list_problem(fast, ranks_from_merges(fast)) is None


corpora = st.lists(st.text(alphabet="ab c\n'1é", min_size=0, max_size=30), min_size=1, max_size=8)
patterns = st.sampled_from(["gpt2", "gpt4", r"[a-z]+|\s+", r"..?"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corpus=corpora, extra=st.integers(0, 60), min_frequency=st.integers(1, 3), pattern=patterns)
def test_identical_merges_on_generated_corpora(corpus, extra, min_frequency, pattern):
    if not "".join(corpus):
        return  # empty corpora raise (tested below)
    fast = train_bpe(corpus, 256 + extra, pattern, min_frequency=min_frequency, progress=False)
    assert fast == train_bpe_reference(corpus, 256 + extra, pattern, min_frequency=min_frequency)


# --- tiktoken's rank rule = the merge list, on trained merges ------------------------------------

def _adversarial_strings(merges, corpus) -> list[str]:
    """Every token alone, every pair of tokens glued, and the corpus itself: the strings where a
    difference between the two rules would show."""
    tokens = [a + b for a, b in merges]
    glued = [x + y for x in tokens[-20:] for y in tokens[-20:]] + tokens
    return [t.decode("utf-8", errors="replace") for t in glued] + list(corpus)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corpus=st.lists(st.text(alphabet="abc ", min_size=1, max_size=40), min_size=1, max_size=6),
       extra=st.integers(1, 80), probe=st.text(alphabet="abc ", max_size=40))
def test_tiktoken_ids_equal_merge_list_ids(corpus, extra, probe):
    """Tiny alphabets and many merges are where two splits of one token coexist; the proof in
    tokenizer.py says the rules still agree, and this searches for a counterexample."""
    merges = train_bpe(corpus, 256 + extra, r"[abc]+| +", min_frequency=1, progress=False)
    ranks = ranks_from_merges(merges)
    assert merge_list_problem(merges, ranks) is None
    tok = Tokenizer(ranks, r"[abc]+| +", merges=merges)
    assert tok.uses_tiktoken
    for s in [probe, *_adversarial_strings(merges, corpus)]:
        assert tok.encode(s) == encode_reference(s, merges, r"[abc]+| +"), s


def test_tiktoken_ids_equal_reference_on_real_text(shared_data):
    text = (shared_data / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
    gsm = (shared_data / "gsm8k" / "test.jsonl").read_text(encoding="utf-8")[:100_000]
    tok = Tokenizer.train([text[:300_000]], 3000, progress=False)
    assert tok.uses_tiktoken
    for sample in (text[600_000:700_000], gsm):
        assert tok.encode(sample) == encode_reference(sample, tok.merges, tok.pattern)
    tokens = [tok.token_bytes(i).decode("utf-8", errors="replace") for i in range(256, 2992)]
    assert [tok.encode(t) for t in tokens] == [encode_reference(t, tok.merges, tok.pattern) for t in tokens]


def test_rule_difference_is_detected_and_handled():
    """A hand-made merge list (not one training could give) on which the two rules differ:
    "bc" is learnt before "ab", so merge-list BPE turns "abcd" into a + bcd, while tiktoken
    finds "abcd" = a + bcd in the vocabulary and takes it."""
    merges = [(b"c", b"d"), (b"b", b"cd"), (b"a", b"b"), (b"ab", b"cd")]
    ranks = ranks_from_merges(merges)
    assert "does not turn the bytes" in merge_list_problem(merges, ranks)
    plain = Tokenizer(ranks, r"\S+|\s+")  # ranks alone: tiktoken's rule is the definition
    exact = Tokenizer(ranks, r"\S+|\s+", merges=merges)
    assert plain.uses_tiktoken and not exact.uses_tiktoken
    assert plain.encode("abcd") == [ranks[b"abcd"]]
    assert exact.encode("abcd") == encode_reference("abcd", merges, r"\S+|\s+") == [ord("a"), ranks[b"bcd"]]
    assert exact.decode(exact.encode("xabcd abc")) == "xabcd abc"


def test_special_tokens_come_after_merges_and_stay_whole():
    text = "the cat sat on the mat; a quick brown fox jumps over the lazy dog. " * 20
    tok = Tokenizer.train([text], 290, special_tokens=["<|bos|>", "<|eos|>"], min_frequency=1, progress=False)
    assert len(tok.merges) == 288 - 256 and tok.vocab_size == 290
    assert tok.special_tokens == {"<|bos|>": 288, "<|eos|>": 289}
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eos_ids) == (288, 289, None, [289])
    ids = tok.encode("the cat<|eos|>the mat", allowed_special="all")
    assert ids.count(289) == 1
    left, right = ids[: ids.index(289)], ids[ids.index(289) + 1 :]
    assert left == tok.encode("the cat") and right == tok.encode("the mat")  # nothing merges across it


def test_training_errors():
    with pytest.raises(ValueError, match="below 256"):
        train_bpe(["abc"], 100, progress=False)
    with pytest.raises(ValueError, match="min_frequency"):
        train_bpe_reference(["abc"], 300, min_frequency=0)
    with pytest.raises(ValueError, match="empty"):
        train_bpe([], 300, progress=False)
    with pytest.raises(ValueError, match="empty"):
        train_bpe_reference([""], 300)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        train_bpe(["abc"], 300, "([a-z", progress=False)
    with pytest.raises(ValueError, match="matches the empty string"):
        resolve_pattern(r"\w*")
    with pytest.raises(ValueError, match="leaves no room"):
        Tokenizer.train(["abc"], 260, progress=False)  # 256 + 8 default special tokens > 260


def test_pattern_gaps_are_kept():
    # a pattern that does not match everything: the text between matches is a piece of its own
    # (HF Split "Isolated"), so nothing is lost
    merges = train_bpe(["hello world, hello!"], 270, r"\w+", min_frequency=1, progress=False)
    ids = encode_reference("hello, world!!", merges, r"\w+")
    assert b"".join(ranks_inverse(merges)[i] for i in ids) == b"hello, world!!"


def ranks_inverse(merges):
    return {i: t for t, i in ranks_from_merges(merges).items()}
