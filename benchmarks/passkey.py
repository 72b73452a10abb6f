"""Context extension without retraining, measured by passkey retrieval (the numbers of the long-context docs).

A tiny model learns passkey retrieval (lmlab/evals/passkey.py) at a short context, then is asked at 1x..8x that
length under each way of reaching past it:

1. data: passkey training documents from the evaluation's own generator (random keys, depths and prompt
   lengths up to 256 tokens), each prompt + its answer + filler up to 263 tokens + end-of-text, a byte-level BPE
   trained on them, and token shards whose packed windows of 264 tokens are exactly one document each;
2. training: `lmlab pretrain` with recipes/passkey-tiny.toml, once with RoPE and once with ALiBi
   (--set model.position="alibi"), max_seq_len 264;
3. evaluation at --lengths (prompt tokens): RoPE with no scaling, linear interpolation, static NTK-aware,
   dynamic NTK and YaRN (factor: length / trained length, "auto"; dynamic NTK with its usual fixed factor 2),
   a sliding window of the trained length, and attention sinks (StreamingLLM: 4 sinks + a window, positions
   kept inside the trained range); ALiBi with no change and with sinks.

    nice -n 10 python benchmarks/passkey.py --out runs/passkey

Runs are reused when the script is run again (--fresh redoes everything). Prints a markdown table of the mean
accuracy over depths per length, and per method the accuracy per length x depth; writes results.json.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from lmlab.atomic import atomic_file
from lmlab.data.shards import write_shards
from lmlab.evals.passkey import (
    FILLER,
    HEADER,
    NEEDLE,
    QUESTION,
    answer_text,
    min_length,
    passkey_prompt,
    passkey_sweep,
    random_key,
)
from lmlab.model import load
from lmlab.speedrun import DIGITS_PATTERN
from lmlab.tokenizer import Tokenizer, load_tokenizer
from lmlab.train.checkpoint import list_checkpoints

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "passkey-tiny.toml"
N_SINK = 4


def build_data(out: Path, n_docs: int, prompt_len: int, seed: int) -> int:
    """Tokenizer and shards of passkey documents in `out`; returns the document length in tokens.

    A document is a passkey prompt of a random length up to prompt_len (random key and depth), its answer, then
    filler up to a fixed length: every window of the packed shards is exactly one document, and the question
    and needle sit at ever different places, so the model cannot lean on one fixed layout."""
    rng = random.Random(seed)
    # every word the documents use, with keys of every digit
    sample = [HEADER + "".join(FILLER) + NEEDLE.format(key=random_key(rng)) + QUESTION for _ in range(64)]
    tokenizer = Tokenizer.train(sample, vocab_size=512, pattern=DIGITS_PATTERN, progress=False)
    tokenizer.save(out / "tokenizer", overwrite=True)
    filler = [i for _ in range(prompt_len) for s in FILLER for i in tokenizer.encode(s)][:prompt_len]
    answer_len = len(tokenizer.encode(answer_text("12345")))
    doc_len = prompt_len + answer_len + 1  # + the end-of-text separator
    docs = []
    for _ in range(n_docs):
        key = random_key(rng)
        prompt = passkey_prompt(tokenizer, rng.randint(min_length(tokenizer), prompt_len), rng.random(), key)
        ids = prompt.ids + tokenizer.encode(answer_text(key))
        ids += filler[:doc_len - 1 - len(ids)]
        text = tokenizer.decode(ids)
        if tokenizer.encode(text) != ids or len(ids) != doc_len - 1:  # the shards re-encode the text
            raise RuntimeError(f"a passkey document does not re-encode to its {doc_len - 1} tokens: {text[:80]!r}")
        docs.append(text)
    write_shards(docs, tokenizer, out / "shards", val_fraction=0.02, workers=1, overwrite=True, progress=False)
    return doc_len


def train(out: Path, data: Path, doc_len: int, positions: list[str], overrides: list[str]) -> dict[str, Path]:
    """`lmlab pretrain` of one model per position scheme, all at once (one CPU thread each); reuses finished runs."""
    procs = {}
    for position in positions:
        run = out / position
        if list_checkpoints(run):
            print(f"[train {position}] reusing {run}", flush=True)
            continue
        settings = [f"data.path={data / 'shards'}", f"data.tokenizer={data / 'tokenizer'}", f"train.out_dir={run}",
                    f"data.seq_len={doc_len}", f"model.max_seq_len={doc_len}",
                    f"model.position={json.dumps(position)}", *overrides]
        cmd = [sys.executable, "-m", "lmlab", "pretrain", "--recipe", str(RECIPE), "--overwrite", "--no-progress"]
        cmd += [arg for setting in settings for arg in ("--set", setting)]
        print(f"[train {position}] " + " ".join(cmd[1:]), flush=True)
        procs[position] = (subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                           time.perf_counter())
    for position, (proc, start) in procs.items():
        output = proc.communicate()[0]
        if proc.returncode:
            raise RuntimeError(f"training the {position} model failed:\n{output[-3000:]}")
        done = [line for line in output.splitlines() if line.startswith("done:")]
        print(f"[train {position}] {time.perf_counter() - start:.0f} s, " + (done[-1] if done else "?"), flush=True)
    return {position: list_checkpoints(out / position)[-1][1] for position in positions}


def methods(doc_len: int, prompt_len: int) -> dict[str, tuple[str, dict]]:
    """name -> (model, passkey_sweep settings)."""
    chunk = 16
    window = doc_len - N_SINK - chunk + 2  # the largest position written, n_sink + window + chunk - 2, < doc_len
    return {
        "RoPE, no scaling": ("rope", {}),
        "RoPE + linear interpolation": ("rope", {"rope_scaling": "linear:auto"}),
        "RoPE + NTK-aware": ("rope", {"rope_scaling": "ntk:auto"}),
        "RoPE + dynamic NTK (factor 2)": ("rope", {"rope_scaling": "dynamic:2"}),
        "RoPE + YaRN": ("rope", {"rope_scaling": "yarn:auto"}),
        f"RoPE + sliding window {prompt_len}": ("rope", {"sliding_window": prompt_len}),
        f"RoPE + {N_SINK} sinks + window {window}": ("rope", {"streaming": (N_SINK, window, chunk)}),
        "ALiBi": ("alibi", {}),
        f"ALiBi + {N_SINK} sinks + window {window}": ("alibi", {"streaming": (N_SINK, window, chunk)}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/passkey"))
    p.add_argument("--prompt-len", type=int, default=256, help="training prompt length (tokens)")
    p.add_argument("--docs", type=int, default=12000, help="training documents")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe setting for both models, e.g. train.steps=3000 (repeatable)")
    p.add_argument("--positions", default="rope,alibi", help="which models to train and evaluate")
    p.add_argument("--lengths", default="256,512,1024,2048", help="evaluation prompt lengths")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--keys", type=int, default=5, help="keys per length and depth")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for evaluation")
    p.add_argument("--only", default=None, help="evaluate only the methods whose name contains this")
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "data"
    meta = data / "doc_len.json"
    if meta.is_file():
        doc_len = json.loads(meta.read_text())["doc_len"]
    else:
        start = time.perf_counter()
        doc_len = build_data(data, args.docs, args.prompt_len, seed=0)
        meta.write_text(json.dumps({"doc_len": doc_len}))
        print(f"[data] {args.docs} documents of {doc_len} tokens in {time.perf_counter() - start:.0f} s", flush=True)
    checkpoints = train(args.out, data, doc_len, args.positions.split(","), args.set)
    models = {pos: load(ckpt).eval() for pos, ckpt in checkpoints.items()}
    tokenizer = load_tokenizer(data / "tokenizer")
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [float(x) for x in args.depths.split(",")]
    results = {}
    for name, (pos, settings) in methods(doc_len, args.prompt_len).items():
        if (args.only and args.only not in name) or pos not in models:
            continue
        start = time.perf_counter()
        r = passkey_sweep(models[pos], tokenizer, lengths, depths, args.keys, seed=1, progress=False, **settings)
        results[name] = r.to_dict()
        print(f"\n{name} ({time.perf_counter() - start:.0f} s)\n{r.table()}", flush=True)
    head = "| method | " + " | ".join(str(n) for n in lengths) + " |"
    print("\nmean accuracy over depths (%), prompt length in tokens; trained on "
          f"{args.prompt_len}-token prompts ({doc_len}-token sequences)\n")
    print(head)
    print("|" + "---|" * (len(lengths) + 1))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{100 * r['mean'][str(n)]:.0f}" for n in lengths) + " |")
    with atomic_file(args.out / "results.json", "w") as f:
        json.dump({"doc_len": doc_len, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
