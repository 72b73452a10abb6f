"""Deduplication: exact (a hash of the normalized text) and near-duplicate (MinHash + LSH).

Near-duplicates follow Broder (1997, "On the resemblance and containment of documents") and the
banding scheme of Leskovec, Rajaraman & Ullman ("Mining of Massive Datasets", ch. 3), as used for
pretraining corpora since GPT-3 (Brown et al. 2020) and The Pile:

1. A document becomes a set S of shingles (word or character n-grams), each hashed to an integer.
2. k hash functions h_i(x) = (a_i x + b_i) mod p, with p = 2^31 - 1 prime and random a_i != 0,
   b_i (a universal family; each is a permutation of Z_p). The signature is
   sig_i(S) = min_{x in S} h_i(x), and P[sig_i(A) = sig_i(B)] = J(A, B) = |A & B| / |A | B|,
   so the fraction of equal signature entries estimates the Jaccard similarity.
3. The k entries are cut into b bands of r rows. Two documents become a candidate pair when
   they agree on every row of at least one band, which happens with probability
   P(s) = 1 - (1 - s^r)^b for Jaccard s: an S-curve that rises steeply near (1/b)^(1/r).
4. Candidates are (optionally) verified by their estimated Jaccard, joined by union-find into
   clusters, and the first document of each cluster (in input order) is kept.

Written by hand rather than with datasketch because the mechanism is the lesson; numpy does the
k-fold hashing of all shingles at once.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from dataclasses import dataclass

import numpy as np

PRIME = (1 << 31) - 1  # a, x, b < 2^31, so a * x + b < 2^63: exact in uint64
_BASE = 1_000_003  # polynomial base that combines the hashes of a shingle's n tokens
_TOKEN = re.compile(r"\w+")
_BLOCK = 4096  # shingles hashed per numpy step: bounds memory at k * 4096 * 8 bytes


# --- exact ------------------------------------------------------------------------------------

def exact_key(text: str) -> bytes:
    """The key under which two documents count as exact duplicates: 16 bytes of BLAKE2b of the
    text case-folded with its whitespace collapsed (so a re-indented or re-cased copy is found,
    and nothing else is)."""
    return hashlib.blake2b(" ".join(text.casefold().split()).encode("utf-8", "surrogatepass"),
                           digest_size=16).digest()


class ExactDeduplicator:
    """Remembers the key of every document seen (about 100 bytes each) and the index of the first
    document with that key."""

    def __init__(self) -> None:
        self.first: dict[bytes, int] = {}

    def check(self, key: bytes, index: int) -> int | None:
        """None when `key` is new (and remember it for `index`), else the index of the first
        document that had it."""
        first = self.first.setdefault(key, index)
        return None if first == index else first


# --- shingles and signatures ------------------------------------------------------------------

@dataclass
class MinHashConfig:
    """Near-duplicate detection.

    threshold: Jaccard similarity of shingle sets from which two documents are near-duplicates.
    num_perm: signature length k (the estimate's standard error is sqrt(J(1-J)/k): 0.035 at
      J = 0.8 with k = 128).
    shingle: "word" (n-grams of lowercased word tokens: insensitive to punctuation and spacing)
      or "char" (n-grams of characters of the lowercased, space-collapsed text: for text without
      word boundaries, or very short documents).
    ngram: shingle length n.
    bands, rows: LSH banding; None chooses them from the threshold (`optimal_bands`).
    fp_weight, fn_weight: the weights of that choice. None: 0.1 and 0.9 when verifying (a false
      positive of the banding then costs one signature comparison, a false negative is lost for
      good), else the textbook 0.5 and 0.5. At threshold 0.8 and k = 128 that gives 14 bands of
      9 rows (pairs at J = 0.85 become candidates with probability 0.975) instead of 9 x 13 (0.69).
    verify: keep a candidate pair only when its estimated Jaccard reaches the threshold; without
      it every candidate pair (including the banding's false positives) is joined.
    seed: draws the hash functions.
    """

    threshold: float = 0.8
    num_perm: int = 128
    shingle: str = "word"
    ngram: int = 5
    bands: int | None = None
    rows: int | None = None
    fp_weight: float | None = None
    fn_weight: float | None = None
    verify: bool = True
    seed: int = 0

    def validate(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"near-duplicate threshold is a Jaccard similarity in (0, 1], got {self.threshold}")
        if self.num_perm < 2:
            raise ValueError(f"num_perm must be at least 2, got {self.num_perm}")
        if self.shingle not in ("word", "char"):
            raise ValueError(f"shingle must be 'word' or 'char', got {self.shingle!r}")
        if self.ngram < 1:
            raise ValueError(f"ngram must be at least 1, got {self.ngram}")
        if any(w is not None and w < 0 for w in (self.fp_weight, self.fn_weight)):
            raise ValueError("fp_weight and fn_weight must be non-negative")
        if (self.bands is None) != (self.rows is None):
            raise ValueError("give both bands and rows, or neither (they are then chosen from the threshold)")
        if self.bands is not None and (self.bands < 1 or self.rows < 1 or self.bands * self.rows > self.num_perm):
            raise ValueError(f"need bands >= 1, rows >= 1 and bands * rows <= num_perm ({self.num_perm}), "
                             f"got {self.bands} x {self.rows}")

    def banding(self) -> tuple[int, int]:
        if self.bands is not None:
            return self.bands, self.rows
        default_fp, default_fn = (0.1, 0.9) if self.verify else (0.5, 0.5)
        fp = default_fp if self.fp_weight is None else self.fp_weight
        fn = default_fn if self.fn_weight is None else self.fn_weight
        return optimal_bands(self.threshold, self.num_perm, fp, fn)


def _combine(ids: np.ndarray, n: int) -> np.ndarray:
    """Hash every window of n consecutive ids (each < PRIME) to one value < PRIME, as the
    polynomial sum_j ids[i + j] * BASE^(n - 1 - j) mod PRIME."""
    if len(ids) <= n:  # shorter than one shingle: the whole sequence is the only shingle
        n = len(ids)
    m = len(ids) - n + 1
    h = ids[:m].copy()
    for j in range(1, n):
        h = (h * np.uint64(_BASE) + ids[j:j + m]) % np.uint64(PRIME)
    return h


def shingle_hashes(text: str, kind: str = "word", n: int = 5) -> np.ndarray:
    """The hashed shingle set of `text` (uint64 values < PRIME, possibly repeated)."""
    if kind == "word":
        ids = [zlib.crc32(w.encode("utf-8", "surrogatepass")) % PRIME for w in _TOKEN.findall(text.lower())]
        ids = np.asarray(ids, dtype=np.uint64)
    elif kind == "char":
        flat = " ".join(text.lower().split())
        ids = np.frombuffer(flat.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
    else:
        raise ValueError(f"shingle kind must be 'word' or 'char', got {kind!r}")
    if len(ids) == 0:  # no tokens at all: hash the raw text, so only identical texts collide
        return np.asarray([zlib.crc32(text.encode("utf-8", "surrogatepass")) % PRIME], dtype=np.uint64)
    return _combine(ids, n)


class MinHasher:
    """k universal hash functions (a_i x + b_i) mod PRIME, drawn from a seed."""

    def __init__(self, num_perm: int = 128, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, PRIME, size=num_perm, dtype=np.uint64)[:, None]
        self.b = rng.integers(0, PRIME, size=num_perm, dtype=np.uint64)[:, None]
        self.num_perm = num_perm

    def signature(self, shingles: np.ndarray) -> np.ndarray:
        """min over the shingles of every hash function: a uint32 vector of length k."""
        sig = np.full(self.num_perm, PRIME, dtype=np.uint64)
        for start in range(0, len(shingles), _BLOCK):
            block = shingles[None, start:start + _BLOCK]
            sig = np.minimum(sig, ((self.a * block + self.b) % np.uint64(PRIME)).min(axis=1))
        return sig.astype(np.uint32)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    return float(np.mean(sig_a == sig_b))


# --- banding ----------------------------------------------------------------------------------

def candidate_probability(s: np.ndarray | float, bands: int, rows: int) -> np.ndarray | float:
    """P(two documents with Jaccard s share at least one band) = 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - np.asarray(s, dtype=np.float64) ** rows) ** bands


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5,
                  grid: int = 1001) -> tuple[int, int]:
    """The (bands, rows) with bands * rows <= num_perm that minimize

        fp_weight * FP + fn_weight * FN,
        FP = integral_0^t P(s) ds          (area under the S-curve below the threshold t),
        FN = integral_t^1 (1 - P(s)) ds    (area above it beyond t),

    with P(s) = 1 - (1 - s^r)^b, i.e. pairs uniformly spread over similarity, weighted by how
    wrongly each would be treated. Integrals by the trapezoid rule on `grid` points."""
    pairs = np.array([(b, r) for b in range(1, num_perm + 1) for r in range(1, num_perm // b + 1)])
    b, r = pairs[:, :1].astype(np.float64), pairs[:, 1:].astype(np.float64)
    below, above = np.linspace(0.0, threshold, grid), np.linspace(threshold, 1.0, grid)
    fp = np.trapezoid(candidate_probability(below[None, :], b, r), below, axis=1)
    fn = np.trapezoid(1.0 - candidate_probability(above[None, :], b, r), above, axis=1)
    best = int(np.argmin(fp_weight * fp + fn_weight * fn))
    return int(pairs[best, 0]), int(pairs[best, 1])


# --- clustering -------------------------------------------------------------------------------

class UnionFind:
    """Disjoint sets over 0..n-1; the root of a set is always its smallest member, so the root is
    the document to keep."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


@dataclass
class NearDuplicates:
    """The result of `find_near_duplicates` over n documents.

    keep: bool[n], True for the first document of every cluster (and for singletons).
    root: int[n], the index of the kept document of each document's cluster.
    bands, rows: the banding used.
    candidate_pairs: pairs that shared a band (counted once per band they share).
    joined_pairs: candidate pairs that were joined (after verification, when on).
    """

    keep: np.ndarray
    root: np.ndarray
    bands: int
    rows: int
    candidate_pairs: int = 0
    joined_pairs: int = 0

    @property
    def removed(self) -> int:
        return int((~self.keep).sum())


def _buckets(band: np.ndarray) -> list[np.ndarray]:
    """Groups (of at least two row indices, ascending) of identical rows of `band`."""
    keys = np.ascontiguousarray(band).view(np.dtype((np.void, band.dtype.itemsize * band.shape[1]))).ravel()
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    if counts.max(initial=0) < 2:
        return []
    order = np.argsort(inverse, kind="stable")  # stable: members stay in ascending index order
    groups = np.split(order, np.cumsum(counts)[:-1])
    return [g for g in groups if len(g) > 1]


def find_near_duplicates(signatures: np.ndarray, cfg: MinHashConfig | None = None) -> NearDuplicates:
    """Cluster documents by LSH over their MinHash signatures (shape n x num_perm, uint32)."""
    cfg = cfg or MinHashConfig()
    cfg.validate()
    n = len(signatures)
    if n and signatures.shape[1] != cfg.num_perm:
        raise ValueError(f"signatures have {signatures.shape[1]} entries but num_perm is {cfg.num_perm}")
    bands, rows = cfg.banding()
    uf = UnionFind(n)
    candidates = joined = 0
    for band in range(bands if n else 0):
        for members in _buckets(signatures[:, band * rows:(band + 1) * rows]):
            candidates += len(members) * (len(members) - 1) // 2
            if not cfg.verify:
                for j in members[1:]:
                    uf.union(int(members[0]), int(j))
                joined += len(members) - 1
                continue
            sigs = signatures[members]
            for pos in range(len(members) - 1):
                similar = (sigs[pos + 1:] == sigs[pos]).mean(axis=1) >= cfg.threshold
                for j in members[pos + 1:][similar]:
                    uf.union(int(members[pos]), int(j))
                joined += int(similar.sum())
    root = np.array([uf.find(i) for i in range(n)], dtype=np.int64)
    keep = root == np.arange(n)
    return NearDuplicates(keep=keep, root=root, bands=bands, rows=rows, candidate_pairs=candidates,
                          joined_pairs=joined)
