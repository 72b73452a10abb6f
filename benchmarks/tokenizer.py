"""lmlab's byte-level BPE against HF `tokenizers` and tiktoken, in one run.

Measures, on the first --train-bytes of tinyshakespeare (from the shared data folder):
  - training: lmlab's fast trainer (`train_bpe`, pure Python) vs HF's BpeTrainer (Rust), same
    pre-tokenization regex, same vocabulary size and minimum pair frequency;
  - encoding throughput (MB/s of UTF-8 input) with the tokenizer lmlab trained: lmlab's
    `Tokenizer.encode` vs a tiktoken Encoding built from the same ranks and pattern vs HF
    `tokenizers` reading the tokenizer.json lmlab wrote (same vocab and merges); one call on the
    whole text, and `encode_batch` on its lines in chunks.
Before timing, it checks that the three encoders give the same ids, so the work is equal.
Each measurement is the median of --repeats runs, alternating between the libraries.

    python benchmarks/tokenizer.py                 # the configuration in docs/benchmarks.md
    LMLAB_SHARED_DATA=/path/to/data python benchmarks/tokenizer.py --vocab 4096

The data folder is `$LMLAB_SHARED_DATA`, else `../shared/data` beside the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from common import timed  # benchmarks/common.py: scripts run as `python benchmarks/NAME.py`

REPO = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-bytes", type=int, default=1_000_000, help="bytes of tinyshakespeare to train on")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--pattern", default="gpt4", help="gpt2, gpt4 or a regex")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="threads for the batch encoders")
    p.add_argument("--json", help="also write the results to this JSON file")
    return p.parse_args()


def shared_text() -> str:
    root = Path(os.environ.get("LMLAB_SHARED_DATA", REPO.parent / "shared" / "data"))
    path = root / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        sys.exit(f"benchmarks/tokenizer.py: {path} not found. Set LMLAB_SHARED_DATA to the shared data folder "
                 "(the one whose README lists tinyshakespeare).")
    return path.read_text(encoding="utf-8")


def alternate(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in turns so that machine load hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name] += timed(fn, 1)
    return {name: statistics.median(t) for name, t in times.items()}


def hf_trainer(pattern: str, vocab: int, min_frequency: int):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return tok, trainer


def main() -> None:
    args = parse_args()
    import tiktoken
    from tokenizers import Tokenizer as HFTokenizer

    from lmlab.tokenizer import PATTERNS, Tokenizer, train_bpe

    pattern = PATTERNS.get(args.pattern, args.pattern)
    full = shared_text()
    train_text = full.encode("utf-8")[: args.train_bytes].decode("utf-8", errors="ignore")
    mb_train = len(train_text.encode("utf-8")) / 1e6

    # --- training ---
    def lmlab_train():
        return train_bpe([train_text], args.vocab, pattern, min_frequency=args.min_frequency, progress=False)

    def hf_train():
        tok, trainer = hf_trainer(pattern, args.vocab, args.min_frequency)
        tok.train_from_iterator([train_text], trainer)
        return tok

    train_s = alternate({"lmlab": lmlab_train, "hf": hf_train}, args.repeats)

    # --- encoding, with lmlab's tokenizer served three ways ---
    ours = Tokenizer.train([train_text], args.vocab, pattern=pattern, special_tokens=(),
                           min_frequency=args.min_frequency, progress=False)
    assert ours.uses_tiktoken
    plain_tiktoken = tiktoken.Encoding("same-ranks", pat_str=pattern, mergeable_ranks=ours.mergeable_ranks,
                                       special_tokens={})
    with tempfile.TemporaryDirectory() as d:
        ours.save(Path(d) / "tok")
        hf = HFTokenizer.from_file(str(Path(d) / "tok" / "tokenizer.json"))
    hf.no_truncation()

    text = full
    lines = full.splitlines(keepends=True)
    chunks = ["".join(lines[i : i + 50]) for i in range(0, len(lines), 50)]
    ids = ours.encode(text)
    if not (ids == plain_tiktoken.encode_ordinary(text) == hf.encode(text, add_special_tokens=False).ids):
        sys.exit("the encoders disagree on the benchmark text; timing them would compare different work")
    batch_ids = ours.encode_batch(chunks, num_threads=args.threads)
    assert batch_ids == [e.ids for e in hf.encode_batch(chunks, add_special_tokens=False)]

    mb = len(text.encode("utf-8")) / 1e6
    single = alternate({
        "lmlab": lambda: ours.encode(text),
        "tiktoken": lambda: plain_tiktoken.encode_ordinary(text),
        "hf": lambda: hf.encode(text, add_special_tokens=False),
    }, args.repeats)
    batch = alternate({
        "lmlab": lambda: ours.encode_batch(chunks, num_threads=args.threads),
        "tiktoken": lambda: plain_tiktoken.encode_ordinary_batch(chunks, num_threads=args.threads),
        "hf": lambda: hf.encode_batch(chunks, add_special_tokens=False),
    }, args.repeats)

    print(f"tinyshakespeare: train on {mb_train:.2f} MB to vocab {args.vocab} ({args.pattern} pattern, "
          f"min frequency {args.min_frequency}); encode {mb:.2f} MB ({len(ids):,} tokens, "
          f"{len(chunks)} chunks for the batch); median of {args.repeats}\n")
    print("| measurement | lmlab | peer | lmlab / peer |")
    print("|---|---:|---:|---:|")
    print(f"| BPE training, s (peer: HF tokenizers) | {train_s['lmlab']:.2f} | {train_s['hf']:.2f} | "
          f"{train_s['lmlab'] / train_s['hf']:.2f}x time |")
    for label, table in (("encode, one text", single), (f"encode_batch, {args.threads} threads", batch)):
        for peer in ("tiktoken", "hf"):
            print(f"| {label}, MB/s (peer: {peer}) | {mb / table['lmlab']:.1f} | {mb / table[peer]:.1f} | "
                  f"{table[peer] / table['lmlab']:.2f}x speed |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"train_s": train_s, "encode_s": single, "encode_batch_s": batch, "mb": mb,
                       "train_mb": mb_train, "args": vars(args)}, f, indent=2)


if __name__ == "__main__":
    main()
