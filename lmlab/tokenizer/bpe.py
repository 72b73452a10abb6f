"""Byte-level BPE: two trainers and the reference encoder (Sennrich et al. 2016, with GPT-2's bytes).

Byte pair encoding (Sennrich, Haddow & Birch, "Neural Machine Translation of Rare Words with
Subword Units", ACL 2016) starts from single symbols and repeatedly merges the most frequent
adjacent pair into a new symbol. GPT-2 (Radford et al. 2019) made it byte-level: the symbols are
the 256 byte values, so every string is encodable and nothing is ever unknown, and a regex first
splits text into pre-tokens (words, numbers, punctuation runs, whitespace) that merges never cross.

This module is the readable core that the fast `Tokenizer` (tokenizer.py) is checked against:

- `train_bpe_reference`: the merge loop as the paper states it: count every adjacent pair over the
  word-frequency table, merge the most frequent, repeat. O(merges x corpus); for tests.
- `train_bpe`: the same merges, fast: pair counts are updated incrementally from the words that
  contain the merged pair only (an index pair -> words), and the best pair comes from a heap with
  lazy invalidation. Both trainers must return identical merges; the tests check it.
- `encode_reference`: apply the merges to each pre-token in merge order (lowest merge rank first,
  leftmost on ties), the way a merge-list tokenizer (GPT-2's encoder.py, HF `tokenizers`) does.

Rules shared by both trainers (and documented because they define the output):
- Pair counts count every adjacent position, overlapping ones included ("aaa" holds (a, a) twice,
  as in the paper and HF); a merge rewrites each word left to right without overlaps ("aaa" ->
  "aa" "a").
- The best pair has the highest count; ties go to the pair (left, right) that is smallest as a
  tuple of byte strings (Python's ordering: bytes compare lexicographically, then by length).
- Training stops at `vocab_size` (256 byte tokens + merges) or when the best pair occurs fewer than
  `min_frequency` times.
- Ids: byte b is token b; merge i creates token 256 + i. Special tokens are appended after by the
  caller (`Tokenizer.train`).

Written by hand although HF `tokenizers` trains BPE faster: the point is to show the algorithm and
to own its definition (tie-breaking, counting), which tiktoken-compatibility depends on.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from itertools import pairwise

import regex
from tqdm.auto import tqdm

# GPT-2's pre-tokenizer (Radford et al. 2019): contractions, optional space + letters / numbers /
# other, whitespace runs that leave their last space to the next word.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-4's cl100k_base pre-tokenizer as Llama 3 publishes it (no possessive quantifiers, so every
# regex engine involved reads it alike): case-insensitive contractions, numbers in groups of at
# most three digits, newlines kept apart from other whitespace.
GPT4_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

# lmlab's special tokens: sequence boundaries, padding, and the chat roles with one end-of-turn
# marker (the chat template in chat.py renders `<|user|>...<|end|>`).
DEFAULT_SPECIAL_TOKENS = (
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|tool|>",
    "<|end|>",
)

Merge = tuple[bytes, bytes]


def resolve_pattern(pattern: str) -> str:
    """A named pattern ("gpt2", "gpt4") or a regex, checked to compile and not to match ''."""
    pattern = PATTERNS.get(pattern, pattern)
    try:
        compiled = regex.compile(pattern)
    except regex.error as e:
        raise ValueError(
            f"the pre-tokenization pattern {pattern!r} is not a valid regular expression ({e}); "
            f"pass one of {sorted(PATTERNS)} or a valid regex"
        ) from None
    if compiled.search("") is not None:
        raise ValueError(
            f"the pre-tokenization pattern {pattern!r} matches the empty string; a pre-token must hold "
            "at least one character (use + instead of *)"
        )
    return pattern


def covering_pattern(pattern: str) -> str:
    """`pattern`, extended so that the text between two matches becomes a piece of its own.

    HF's Split(behavior="Isolated") keeps those gaps as pieces, while tiktoken and `findall` drop
    them, which would lose text for a pattern that does not match everything (say `\\w+`). The
    second branch only runs where `pattern` does not match, so it never changes the pieces of a
    pattern that covers all text (GPT-2's, GPT-4's)."""
    return f"(?:{pattern})|(?:(?!(?:{pattern}))[\\s\\S])+"


def clean_surrogates(text: str) -> str:
    """Lone UTF-16 surrogates (which UTF-8 cannot encode) become U+FFFD, as tiktoken does."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def pretokenize(texts: Iterable[str], pattern: str = GPT4_PATTERN, *, progress: bool = False) -> Counter[bytes]:
    """Word-frequency table: UTF-8 bytes of each pre-token -> how often it occurs in `texts`."""
    split = regex.compile(covering_pattern(resolve_pattern(pattern)))
    counts: Counter[str] = Counter()
    for text in tqdm(texts, desc="pre-tokenizing", unit="doc", disable=not progress):
        counts.update(split.findall(clean_surrogates(text)))
    return Counter({word.encode("utf-8"): n for word, n in counts.items()})


def token_bytes_of(merges: Sequence[Merge]) -> list[bytes]:
    """Bytes of every token, indexed by id: 256 single bytes, then one token per merge."""
    return [bytes([b]) for b in range(256)] + [a + b for a, b in merges]


def ranks_from_merges(merges: Sequence[Merge]) -> dict[bytes, int]:
    """tiktoken's `mergeable_ranks` for a merge list: token bytes -> id, ids in merge order."""
    ranks: dict[bytes, int] = {}
    for rank, token in enumerate(token_bytes_of(merges)):
        if token in ranks:
            raise ValueError(f"merge {rank - 256} creates {token!r}, which an earlier merge already created")
        ranks[token] = rank
    return ranks


# --- reference trainer ------------------------------------------------------------------------

def _merge_word(word: tuple[bytes, ...], pair: Merge) -> tuple[bytes, ...]:
    """Replace each occurrence of `pair` in `word`, left to right, without overlaps."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _word_table(texts: Iterable[str], pattern: str, progress: bool = False) -> Counter[bytes]:
    table = pretokenize(texts, pattern, progress=progress)
    if not table:
        raise ValueError("the training texts are empty: there is nothing to learn merges from")
    return table


def _check_training_args(vocab_size: int, min_frequency: int) -> None:
    if vocab_size < 256:
        raise ValueError(f"vocab_size {vocab_size} is below 256: a byte-level BPE needs one token per byte value")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be at least 1, got {min_frequency}")


def train_bpe_reference(
    texts: Iterable[str], vocab_size: int, pattern: str = GPT4_PATTERN, *, min_frequency: int = 2
) -> list[Merge]:
    """Merges learnt from `texts` by the plain loop of Sennrich et al. (2016), Algorithm 1.

    `vocab_size` counts the 256 byte tokens and the merges (not special tokens). Slow, on purpose
    simple: every step recounts all pairs. See the module docstring for counting and ties."""
    _check_training_args(vocab_size, min_frequency)
    words = {tuple(bytes([b]) for b in word): n for word, n in _word_table(texts, pattern).items()}
    merges: list[Merge] = []
    while 256 + len(merges) < vocab_size:
        pairs: Counter[Merge] = Counter()
        for word, n in words.items():
            for pair in pairwise(word):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < min_frequency:
            break
        merges.append(best)
        words = {_merge_word(word, best): n for word, n in words.items()}
    return merges


# --- fast trainer -----------------------------------------------------------------------------

def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    pattern: str = GPT4_PATTERN,
    *,
    min_frequency: int = 2,
    progress: bool = True,
) -> list[Merge]:
    """The merges of `train_bpe_reference`, computed incrementally.

    Work is done once per distinct pre-token (weighted by its frequency), not per occurrence. After
    a merge only the words that contain the merged pair are rewritten; their old pairs are
    subtracted from the counts and their new pairs added. The most frequent pair comes from a
    max-heap of (-count, left bytes, right bytes); an entry whose count is out of date is refreshed
    when it reaches the top (counts of existing pairs only ever go down, so the heap is never
    too pessimistic, and new pairs are pushed when they appear)."""
    _check_training_args(vocab_size, min_frequency)
    table = _word_table(texts, pattern, progress)
    vocab = [bytes([b]) for b in range(256)]  # id -> bytes, grows by one per merge
    words = [list(word) for word in table]  # symbols as ids; bytes iterate as ints
    freqs = list(table.values())

    counts: defaultdict[tuple[int, int], int] = defaultdict(int)
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)  # may hold stale word indices
    for w, (word, n) in enumerate(zip(words, freqs, strict=True)):
        for pair in pairwise(word):
            counts[pair] += n
            where[pair].add(w)
    heap = [(-n, vocab[a], vocab[b], (a, b)) for (a, b), n in counts.items()]
    heapq.heapify(heap)

    merges: list[Merge] = []
    n_merges = vocab_size - 256
    bar = tqdm(total=n_merges, desc="bpe merges", unit="merge", disable=not progress)
    while len(merges) < n_merges and heap:
        neg, _, _, pair = heapq.heappop(heap)
        current = counts.get(pair, 0)
        if -neg != current:  # stale entry: put it back with its true count
            if current > 0:
                heapq.heappush(heap, (-current, vocab[pair[0]], vocab[pair[1]], pair))
            continue
        if current < min_frequency:
            break
        new_id = len(vocab)
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
        merges.append((vocab[pair[0]], vocab[pair[1]]))
        _apply_merge(pair, new_id, words, freqs, counts, where, heap, vocab)
        bar.update(1)
    bar.close()
    return merges


def _apply_merge(pair, new_id, words, freqs, counts, where, heap, vocab) -> None:
    """Rewrite every word holding `pair` and update pair counts, the index, and the heap."""
    a, b = pair
    touched: set[tuple[int, int]] = set()  # new pairs whose counts changed: pushed once at the end
    for w in where.pop(pair):
        word = words[w]
        if len(word) < 2:
            continue
        new, i, found = [], 0, False
        while i < len(word):
            if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                new.append(new_id)
                i += 2
                found = True
            else:
                new.append(word[i])
                i += 1
        if not found:  # stale index entry
            continue
        n = freqs[w]
        for p in pairwise(word):
            counts[p] -= n
        for p in pairwise(new):
            counts[p] += n
            if new_id in p:
                touched.add(p)
                where[p].add(w)
        words[w] = new
    counts.pop(pair, None)
    for p in touched:
        if counts[p] > 0:
            heapq.heappush(heap, (-counts[p], vocab[p[0]], vocab[p[1]], p))


# --- reference encoder ------------------------------------------------------------------------

def encode_reference(text: str, merges: Sequence[Merge], pattern: str = GPT4_PATTERN) -> list[int]:
    """Ids of `text` under merge-list semantics: split with `pattern`, then in each pre-token merge
    the adjacent pair with the lowest merge rank (leftmost on ties) until no pair is a merge.
    Token ids as in `ranks_from_merges`. Special tokens are not looked for: this is plain text."""
    merge_rank = {pair: i for i, pair in enumerate(merges)}
    ids = ranks_from_merges(merges)
    out: list[int] = []
    for piece in regex.findall(covering_pattern(resolve_pattern(pattern)), clean_surrogates(text)):
        parts = [bytes([b]) for b in piece.encode("utf-8")]
        while len(parts) > 1:
            ranked = [(merge_rank.get((x, y), len(merges)), i) for i, (x, y) in enumerate(pairwise(parts))]
            rank, i = min(ranked)
            if rank == len(merges):
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        out.extend(ids[part] for part in parts)
    return out
