"""`lmlab <stage> ...`: one subcommand per stage of the stack, and nothing else.

Each subcommand is a thin shell over the library: it parses arguments, calls one function of the
stage's module, and prints. This is the only module that knows every stage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


class UsageError(Exception):
    """A mistake in the command line: printed as `error: ...`, exit status 1."""


DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def _device(name: str) -> str:
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _dtype(name: str, device: str):
    import torch

    if name == "auto":  # bf16 where the hardware has it, float32 on CPU (exact and not slower)
        return torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, DTYPES[name])


def _tokenizer_from(directory: str):
    from lmlab.tokenizer import load_tokenizer

    if not Path(directory).is_dir():
        raise UsageError(f"{directory} is not a directory; give a tokenizer or checkpoint directory")
    tokenizer = load_tokenizer(directory)
    if tokenizer is None:
        raise UsageError(f"{directory} holds no tokenizer (tokenizer.json, tokenizer.model, ...); "
                         "train one with `lmlab tokenizer train`")
    return tokenizer


# --- generate ------------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    from lmlab.infer.generate import generate, stream
    from lmlab.infer.sampling import SamplingParams
    from lmlab.model import load
    from lmlab.tokenizer import load_tokenizer

    device = _device(args.device)
    model = load(args.model, device=device, dtype=_dtype(args.dtype, device)).eval()
    if args.adapter:
        from lmlab.tune.adapters import load_adapter

        if not Path(args.adapter).is_dir():
            raise UsageError(f"--adapter {args.adapter} is not a directory")
        load_adapter(model, args.adapter)
        model.eval()
    tokenizer = load_tokenizer(args.model)
    if tokenizer is not None and tokenizer.vocab_size > model.cfg.vocab_size:
        raise UsageError(
            f"the tokenizer in {args.model} has {tokenizer.vocab_size} tokens but the model's vocabulary has "
            f"{model.cfg.vocab_size}: they do not belong together; copy in the tokenizer the model was trained with"
        )
    if args.ids is not None:
        prompt = [int(t) for t in args.ids.replace(",", " ").split()]
        bad = [t for t in prompt if not 0 <= t < model.cfg.vocab_size]
        if bad:
            raise UsageError(f"--ids {bad} outside the vocabulary [0, {model.cfg.vocab_size})")
    elif tokenizer is None:
        raise UsageError(
            f"{args.model} has no tokenizer file (tokenizer.json); pass token ids with --ids "
            "or copy the tokenizer files into the checkpoint directory"
        )
    elif args.chat:
        prompt = tokenizer.render_chat([{"role": "user", "content": args.prompt}], add_generation_prompt=True)[0]
    else:
        prompt = tokenizer.encode(args.prompt, add_special_tokens=True)  # bos where the tokenizer adds one
    if not prompt:
        raise UsageError("the prompt is empty; give some text with --prompt or ids with --ids")
    stop_ids = list(args.stop_id or [])
    if tokenizer is not None and not args.ignore_eos:
        from lmlab.tokenizer.chat import end_of_turn_ids

        stop_ids += end_of_turn_ids(tokenizer) if args.chat else tokenizer.eos_ids
    try:
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
            stop=list(args.stop or []), stop_token_ids=stop_ids, seed=args.seed,
        )
        params.validate()
    except ValueError as e:
        raise UsageError(str(e)) from None
    decode = tokenizer.decode if tokenizer is not None else None
    if args.stop and decode is None:
        raise UsageError("--stop needs a tokenizer to decode text; use --stop-id with --ids")

    if not args.no_stream and decode is not None:
        if args.echo:
            print(args.prompt, end="", flush=True)
        for chunk in stream(model, prompt, params, decode=decode):
            print(chunk.text, end="", flush=True)
        print()
    else:
        (completion,) = generate(model, [prompt], params, decode=decode)
        if decode is None:
            print(" ".join(map(str, completion.token_ids)))
        else:
            print((args.prompt if args.echo else "") + completion.text)
    return 0


# --- convert -------------------------------------------------------------------------------

def cmd_convert(args: argparse.Namespace) -> int:
    from lmlab.model.checkpoint import load_checkpoint, save_checkpoint
    from lmlab.model.hub import load_hf, save_hf
    from lmlab.tokenizer import tokenizer_files

    if args.from_hf:
        import torch

        dtype = None if args.dtype == "auto" else getattr(torch, DTYPES[args.dtype])
        model = load_hf(args.from_hf, dtype=dtype)
        save_checkpoint(model, args.out, tokenizer_files=tokenizer_files(args.from_hf), overwrite=args.overwrite)
        src = args.from_hf
    else:
        model = load_checkpoint(args.to_hf)
        save_hf(model, args.out, overwrite=args.overwrite, extra_files=tokenizer_files(args.to_hf))
        src = args.to_hf
    n = sum(p.numel() for p in model.parameters())
    print(f"converted {src} -> {args.out} ({n:,} parameters)")
    return 0


# --- info ----------------------------------------------------------------------------------

def cmd_info(args: argparse.Namespace) -> int:
    from lmlab.model import read_any_config
    from lmlab.model.counting import cache_comparison, summary

    cfg = read_any_config(args.model)
    info = summary(cfg, seq_len=args.seq_len)
    compare = cache_comparison(cfg, seq_len=args.seq_len)
    if args.json:
        print(json.dumps({"summary": info, "cache_comparison": compare, "config": cfg.to_dict()}, indent=2))
        return 0
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value:,}" if isinstance(value, int) else f"{key:<{width}}  {value}")
    seq_len = info["seq_len"]
    print(f"\ncache of one sequence if every layer of this shape were ({seq_len} tokens, bf16 model, "
          "recurrent states fp32):")
    kind_w = max(len(row["kind"]) for row in compare)
    print(f"  {'kind':<{kind_w}}  {'bytes/token':>12}  {'state bytes':>12}  {f'bytes at {seq_len}':>16}")
    for row in compare:
        print(f"  {row['kind']:<{kind_w}}  {row['bytes_per_token']:>12,}  {row['state_bytes']:>12,}  "
              f"{row['bytes_at_seq_len']:>16,}")
    print("\nconfig:")
    for key, value in cfg.to_dict().items():
        print(f"  {key:<{width}}  {value}")
    return 0


# --- tokenizer -----------------------------------------------------------------------------
# `lmlab tokenizer train|encode|...`: parsers and commands for lmlab.tokenizer.


def _training_texts(paths: list[str], text_field: str, max_bytes: int | None) -> list[str]:
    """The documents of `paths`, cut so that at most `max_bytes` UTF-8 bytes are read in all."""
    from lmlab.data.readers import read_documents

    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise UsageError(f"--input: no such file(s): {', '.join(missing)}")
    texts, budget = [], max_bytes
    for text in read_documents(paths, text_fields=(text_field,)):
        if budget is not None:
            data = text.encode("utf-8")
            if len(data) >= budget:  # cut at a character boundary
                texts.append(data[:budget].decode("utf-8", errors="ignore"))
                break
            budget -= len(data)
        texts.append(text)
    if not any(t.strip() for t in texts):
        raise UsageError(f"--input {' '.join(paths)} holds no text to train on")
    return texts


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    import time

    from lmlab.tokenizer import DEFAULT_SPECIAL_TOKENS, Tokenizer

    if args.max_bytes is not None and args.max_bytes < 1:
        raise UsageError(f"--max-bytes must be positive, got {args.max_bytes}")
    texts = _training_texts(args.input, args.text_field, args.max_bytes)
    specials = args.special if args.special is not None else list(DEFAULT_SPECIAL_TOKENS)
    start = time.perf_counter()
    tokenizer = Tokenizer.train(texts, args.vocab_size, pattern=args.pattern, special_tokens=specials,
                                min_frequency=args.min_frequency, name=Path(args.out).name,
                                progress=not args.no_progress)
    seconds = time.perf_counter() - start
    tokenizer.save(args.out, overwrite=args.overwrite)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_tokens = sum(map(len, tokenizer.encode_batch(texts)))
    n_merges = len(tokenizer.merges or [])
    print(f"vocab size    {tokenizer.vocab_size:,} (256 bytes + {n_merges:,} merges + {len(specials)} special)")
    if 256 + n_merges + len(specials) < args.vocab_size:
        print(f"              stopped early: no pair occurs {args.min_frequency} times (--min-frequency)")
    print(f"training text {n_bytes:,} bytes -> {n_tokens:,} tokens ({n_bytes / max(n_tokens, 1):.2f} bytes/token)")
    print(f"time          {seconds:.1f} s")
    print(f"wrote {args.out}")
    return 0


def cmd_tokenizer_encode(args: argparse.Namespace) -> int:
    tokenizer = _tokenizer_from(args.tokenizer)
    if args.file is not None:
        if not Path(args.file).is_file():
            raise UsageError(f"--file {args.file} not found")
        text = Path(args.file).read_text(encoding="utf-8")
    else:
        text = args.text
    ids = tokenizer.encode(text, add_special_tokens=args.add_special_tokens,
                           allowed_special="all" if args.allow_special else ())
    if args.ids_only:
        print(" ".join(map(str, ids)))
        return 0
    for i in ids:
        print(f"{i:>8}  {tokenizer.token_bytes(i).decode('utf-8', errors='replace')!r}")
    n_bytes = len(text.encode("utf-8"))
    print(f"{len(ids):,} tokens for {n_bytes:,} bytes ({n_bytes / max(len(ids), 1):.2f} bytes/token)")
    return 0


def cmd_tokenizer_decode(args: argparse.Namespace) -> int:
    tokenizer = _tokenizer_from(args.tokenizer)
    try:
        ids = [int(t) for t in args.ids.replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"--ids must be integers separated by spaces or commas, got {args.ids!r}") from None
    print(tokenizer.decode(ids, skip_special_tokens=args.skip_special_tokens))
    return 0


def cmd_tokenizer_info(args: argparse.Namespace) -> int:
    tokenizer = _tokenizer_from(args.directory)
    kind = type(tokenizer).__name__
    if hasattr(tokenizer, "uses_tiktoken"):
        kind += " (byte-level BPE, " + ("tiktoken encoder)" if tokenizer.uses_tiktoken else "merge-list encoder)")
    specials = getattr(tokenizer, "special_tokens", {})
    rows = [("kind", kind), ("vocab size", f"{tokenizer.vocab_size:,}"), ("special tokens", f"{len(specials):,}")]
    for role in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{role}_id", None)
        rows.append((role, "-" if token_id is None else f"{tokenizer.id_to_token(token_id)} ({token_id})"))
    rows.append(("eos ids", " ".join(map(str, tokenizer.eos_ids)) or "-"))
    for attr in ("pattern", "normalization"):
        if getattr(tokenizer, attr, None):
            rows.append((attr, getattr(tokenizer, attr)))
    rows.append(("chat template", "yes" if getattr(tokenizer, "chat_template", None) else "no (lmlab's default)"))
    if getattr(tokenizer, "merge_list_problem", None):
        rows.append(("why merge-list", tokenizer.merge_list_problem))
    if args.sample is not None:
        if not Path(args.sample).is_file():
            raise UsageError(f"--sample {args.sample} not found")
        text = Path(args.sample).read_text(encoding="utf-8")
        n_tokens = len(tokenizer.encode(text))
        rows.append(("bytes/token", f"{len(text.encode('utf-8')) / max(n_tokens, 1):.3f} on {args.sample}"))
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    shown = sorted(specials.items(), key=lambda kv: kv[1])
    if shown:
        print("\nspecial tokens:")
        for text, token_id in shown[: args.max_specials]:
            print(f"  {token_id:>8}  {text}")
        if len(shown) > args.max_specials:
            print(f"  ... and {len(shown) - args.max_specials:,} more (--max-specials)")
    return 0


def cmd_tokenizer_chat(args: argparse.Namespace) -> int:
    from lmlab.tokenizer.chat import render_chat, render_chat_text

    tok = _tokenizer_from(args.tokenizer)

    def read_json(path: str, flag: str):
        try:
            return json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"{flag} {path}: {e}") from None

    messages = read_json(args.messages, "--messages")
    if isinstance(messages, dict) and "messages" in messages:  # an OpenAI-style request body
        messages = messages["messages"]
    tools = read_json(args.tools, "--tools") if args.tools else None
    template = Path(args.template).read_text(encoding="utf-8") if args.template else None
    options = dict(add_generation_prompt=args.add_generation_prompt, tools=tools, template=template)
    text = render_chat_text(tok, messages, **options)
    ids, mask = render_chat(tok, messages, **options)
    print(text)
    print(f"\n{len(ids)} tokens, {sum(mask)} in the loss mask")
    if not args.text_only:
        for i, m in zip(ids, mask, strict=True):
            print(f"{i:>8}  {m}  {tok.token_bytes(i).decode('utf-8', 'backslashreplace')!r}")
    return 0


def add_tokenizer_commands(tsub) -> None:
    """Register the `lmlab tokenizer ...` subcommands on `tsub` (an argparse subparsers object)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    t = tsub.add_parser(
        "train", formatter_class=fmt, help="train a byte-level BPE tokenizer on text files",
        description="Train a byte-level BPE tokenizer (Sennrich et al. 2016 on UTF-8 bytes, as GPT-2): text "
                    "is split into pre-tokens by a regex, then the most frequent adjacent pair is merged "
                    "repeatedly until --vocab-size tokens (256 bytes + merges + special tokens). Writes "
                    "tokenizer.json + tokenizer_config.json (loadable by transformers' AutoTokenizer) to --out, "
                    "atomically, and prints the vocabulary size, compression and time.",
    )
    t.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="training text: .txt or .jsonl files (.gz too) or directories of them")
    t.add_argument("--vocab-size", type=int, required=True, help="tokens in all, special tokens included")
    t.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    t.add_argument("--pattern", default="gpt4",
                   help="pre-tokenization regex: gpt2, gpt4 (cl100k-style) or a regular expression")
    t.add_argument("--special", nargs="*", metavar="TOKEN",
                   help="special tokens, appended after the merges (default: lmlab's <|bos|> <|eos|> <|pad|> "
                        "<|system|> <|user|> <|assistant|> <|tool|> <|end|>; --special with no token: none)")
    t.add_argument("--min-frequency", type=int, default=2, help="stop when the most frequent pair is rarer than this")
    t.add_argument("--max-bytes", type=int, default=None, help="read at most this many bytes of --input")
    t.add_argument("--text-field", default="text", help="the text field of .jsonl records")
    t.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_tokenizer_train)

    e = tsub.add_parser(
        "encode", formatter_class=fmt, help="text -> token ids",
        description="Encode text with a tokenizer directory (lmlab, Hugging Face tokenizer.json, sentencepiece "
                    "or tiktoken files, or a checkpoint holding them) and print each token with its id, or the "
                    "ids alone. Special-token text is plain text unless --allow-special.",
    )
    e.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer or checkpoint directory")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="text to encode")
    src.add_argument("--file", help="UTF-8 file to encode")
    e.add_argument("--ids-only", action="store_true", help="print only the ids, space-separated")
    e.add_argument("--allow-special", action="store_true", help="special-token text in the input becomes its id")
    e.add_argument("--add-special-tokens", action="store_true", help="add bos/eos as the tokenizer's template says")
    e.set_defaults(func=cmd_tokenizer_encode)

    d = tsub.add_parser("decode", formatter_class=fmt, help="token ids -> text",
                        description="Decode token ids with a tokenizer directory and print the text.")
    d.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer or checkpoint directory")
    d.add_argument("--ids", required=True, help="token ids, e.g. '1 2 3' or '1,2,3'")
    d.add_argument("--skip-special-tokens", action="store_true", help="leave special tokens out of the text")
    d.set_defaults(func=cmd_tokenizer_decode)

    i = tsub.add_parser("info", formatter_class=fmt, help="what a tokenizer is: kind, vocabulary, special tokens",
                        description="Describe a tokenizer directory: its kind and encoder, vocabulary size, special "
                                    "tokens and their roles, pre-tokenization pattern, and the compression "
                                    "(UTF-8 bytes per token) on --sample when given.")
    i.add_argument("directory", metavar="DIR", help="tokenizer or checkpoint directory")
    i.add_argument("--sample", metavar="FILE", help="UTF-8 text file to measure bytes per token on")
    i.add_argument("--max-specials", type=int, default=32, help="list at most this many special tokens")
    i.set_defaults(func=cmd_tokenizer_info)

    c = tsub.add_parser(
        "chat", formatter_class=fmt, help="render a conversation: text, token ids, loss mask",
        description="Render a conversation (a JSON list of OpenAI-style messages with role system / user / "
                    "assistant / tool and content, or a request body holding \"messages\") with the tokenizer's "
                    "chat template (lmlab's own when it has none), and print the text, then each token's id, "
                    "loss-mask bit (1 = trained: the assistant's turns and their end-of-turn token) and text.",
    )
    c.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer or checkpoint directory")
    c.add_argument("--messages", required=True, metavar="FILE", help="JSON file: the messages")
    c.add_argument("--tools", metavar="FILE", help="JSON file: a list of tool schemas shown to the model")
    c.add_argument("--template", metavar="FILE", help="a Jinja chat template to use instead of the tokenizer's")
    c.add_argument("--add-generation-prompt", action="store_true", help="end with the assistant's turn header")
    c.add_argument("--text-only", action="store_true", help="print the rendered text only")
    c.set_defaults(func=cmd_tokenizer_chat)


# --- data: prepare ---------------------------------------------------------------------------
# `lmlab data prepare`: cleaning, filtering, dedup, then token shards (lmlab.data.prepare).


def _prepare_config(args: argparse.Namespace):
    from lmlab.data.dedup import MinHashConfig
    from lmlab.data.filters import (
        BlocklistConfig,
        C4Config,
        LangIdConfig,
        NormalizeConfig,
        PIIConfig,
        QualityConfig,
    )
    from lmlab.data.prepare import PrepareConfig, apply_overrides

    if args.no_quality and (args.quality or args.c4):
        raise UsageError("--quality/--c4 tune the quality stage, which --no-quality switches off")
    if args.no_blocklist and args.blocklist:
        raise UsageError("--blocklist adds terms to the blocklist stage, which --no-blocklist switches off")
    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    quality = None
    if not args.no_quality:
        quality = apply_overrides(QualityConfig(c4=C4Config() if args.c4 else None), args.quality or [])
    near = None
    if not (args.no_dedup or args.no_near_dedup):
        near = MinHashConfig(threshold=args.near_dup_threshold, num_perm=args.num_perm, shingle=args.shingle,
                             ngram=args.ngram, verify=not args.no_verify)
    return PrepareConfig(
        normalize=None if args.no_normalize else NormalizeConfig(form=args.normalization),
        langid=None if args.no_langid else LangIdConfig(languages=tuple(args.languages),
                                                        min_probability=args.lang_threshold),
        quality=quality,
        blocklist=None if args.no_blocklist else BlocklistConfig(files=tuple(args.blocklist or ())),
        pii=None if args.no_pii else PIIConfig(),
        exact_dedup=not args.no_dedup,
        near_dedup=near,
        workers=args.workers,
    )


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from lmlab.data.prepare import Sources, format_summary, prepare

    config = _prepare_config(args)
    config.validate()  # bad thresholds fail before any file is opened
    tokenizer = _tokenizer_from(args.tokenizer) if args.tokenizer else None
    sources = Sources(args.source, split=args.split, text_fields=args.text_field or ["text"], split_on=args.split_on)
    report = prepare(sources, args.out, config, tokenizer, val_fraction=args.val_fraction,
                     shard_tokens=args.shard_tokens, seed=args.seed, keep_text=args.keep_text,
                     overwrite=args.overwrite, progress=not args.no_progress)
    print(format_summary(report))
    print(f"wrote {args.out} (report.json, report.md)")
    return 0


def add_data_prepare_command(dsub) -> None:
    """Register `lmlab data prepare`."""
    import os

    p = dsub.add_parser(
        "prepare", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="clean, filter and deduplicate a corpus, then write token shards",
        description="Turn raw text into a pretraining corpus. Stages, in order, each optional and each "
                    "reporting what it removed or changed: Unicode normalization and whitespace cleanup; "
                    "language identification (langdetect, seeded); Gopher quality and repetition rules "
                    "(Rae et al. 2021) with optional C4 rules (Raffel et al. 2020); a blocklist of words; "
                    "PII scrubbing (e-mails, phone numbers, IP addresses -> placeholders); exact dedup; "
                    "near-duplicate removal (MinHash LSH). Then, with --tokenizer, tokenization into "
                    "train/val token shards; without it the cleaned documents are written to "
                    "documents.jsonl. --out also receives report.json and report.md (counts per stage "
                    "and reason, with examples). Sources: .txt, .jsonl, .parquet files (.gz too), "
                    "directories of them, or dataset names from the registry. Written to a temporary "
                    "directory and renamed into place.",
    )
    p.add_argument("--source", nargs="+", required=True, metavar="NAME|PATH",
                   help="files, directories or registry dataset names")
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="tokenizer (or checkpoint) directory; without it, write documents.jsonl instead of shards")
    p.add_argument("--split", default="train", help="split of registry datasets")
    p.add_argument("--text-field", action="append", default=None,
                   help="JSON field / parquet column holding the text (repeat to join several; default: text)")
    p.add_argument("--split-on", default="file",
                   help=".txt files: one document per 'file', 'lines' or 'blank-lines', or a regex matching "
                        "separator lines (e.g. '<\\|endoftext\\|>')")
    g = p.add_argument_group("normalization")
    g.add_argument("--normalization", default="NFC", choices=["NFC", "NFKC", "none"], help="Unicode normal form")
    g.add_argument("--no-normalize", action="store_true", help="skip normalization and whitespace cleanup")
    g = p.add_argument_group("language identification")
    g.add_argument("--languages", nargs="+", default=["en"], metavar="CODE", help="languages to keep")
    g.add_argument("--lang-threshold", type=float, default=0.5, help="minimum probability of the top language")
    g.add_argument("--no-langid", action="store_true", help="skip language identification")
    g = p.add_argument_group("quality")
    g.add_argument("--quality", action="append", metavar="KEY=VALUE",
                   help="change a quality threshold (repeatable), e.g. min_words=20 or c4.min_sentences=3; "
                        "see docs/data.md for the keys")
    g.add_argument("--c4", action="store_true", help="also apply the C4 line and page rules")
    g.add_argument("--no-quality", action="store_true", help="skip the quality rules")
    g = p.add_argument_group("blocklist and PII")
    g.add_argument("--blocklist", action="append", metavar="FILE",
                   help="file of words or phrases to block, one per line (repeatable; added to the built-in list)")
    g.add_argument("--no-blocklist", action="store_true", help="skip the blocklist")
    g.add_argument("--no-pii", action="store_true", help="skip PII scrubbing")
    g = p.add_argument_group("deduplication")
    g.add_argument("--no-dedup", action="store_true", help="skip exact and near-duplicate removal")
    g.add_argument("--no-near-dedup", action="store_true", help="skip near-duplicate removal only")
    g.add_argument("--near-dup-threshold", type=float, default=0.8, help="Jaccard similarity of near-duplicates")
    g.add_argument("--num-perm", type=int, default=128, help="MinHash signature length")
    g.add_argument("--shingle", default="word", choices=["word", "char"], help="shingles of words or characters")
    g.add_argument("--ngram", type=int, default=5, help="shingle length")
    g.add_argument("--no-verify", action="store_true",
                   help="join every LSH candidate pair without checking its estimated Jaccard")
    g = p.add_argument_group("output")
    g.add_argument("--val-fraction", type=float, default=0.0005, help="expected share of documents in val")
    g.add_argument("--shard-tokens", type=int, default=None, help="tokens per shard at most (default: 2**24)")
    g.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    g.add_argument("--keep-text", action="store_true", help="with --tokenizer, also write documents.jsonl")
    g.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for cleaning and tokenizing")
    g.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_prepare)


# --- data: sources, synthetic corpus, contamination ----------------------------------------------
# `lmlab data list|download|synth|contamination` (lmlab.data.sources, .synthetic, .contamination).


def _dataset_status(source, home: Path) -> tuple[int, int]:
    """(files present, files registered) of a dataset in the cache."""
    root = home / source.name
    return sum((root / f.path).is_file() for f in source.files), len(source.files)


def cmd_data_list(args: argparse.Namespace) -> int:
    from lmlab.data.sources import SOURCES, data_home

    home = data_home()
    if args.json:
        out = []
        for s in SOURCES.values():
            present, total = _dataset_status(s, home)
            out.append({
                "name": s.name, "description": s.description, "license": s.license, "homepage": s.homepage,
                "schema": s.schema, "checksums": s.checksums, "splits": {k: list(v) for k, v in s.splits.items()},
                "files_present": present,
                "files": [{"path": f.path, "urls": list(f.urls), "sha256": f.sha256, "size": f.size,
                           "verified_by": f.verified_by} for f in s.files],
            })
        print(json.dumps({"cache": str(home), "datasets": out}, indent=2))
        return 0
    print(f"cache: {home} (set LMLAB_DATA to move it)\n")
    rows = [("name", "splits", "checked by", "local", "license")]
    for s in SOURCES.values():
        present, total = _dataset_status(s, home)
        local = "generated" if s.generate and present == total else f"{present}/{total} files"
        splits = ", ".join(k for k in s.splits if not k.startswith("eval-"))  # eval-<task>: one per task
        rows.append((s.name, splits if len(splits) <= 48 else splits[:45] + "...", s.checksums, local, s.license))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[4])
    if args.verbose:
        for s in SOURCES.values():
            print(f"\n{s.name}: {s.description}\n  homepage: {s.homepage}\n  records: {s.schema}")
    print("\n'size/format only': no published sha256, so those files are checked by size (when known) and "
          "format; `lmlab data download NAME` fetches a dataset.")
    return 0


def cmd_data_download(args: argparse.Namespace) -> int:
    from lmlab.data.sources import get_source, resolve, verify_dataset

    sources = [get_source(name) for name in args.names]  # every name checked before any download
    for source in sources:
        if args.split is not None:
            source.files_for(args.split)
    for source in sources:
        root = resolve(source.name, args.split, progress=not args.no_progress)
        report = [] if source.generate else verify_dataset(source.name, args.split)
        checks = sorted({status for _, status in report})
        print(f"{source.name}: {root}" + (f" ({len(report)} files: {', '.join(checks)})" if report else ""))
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    import time

    from lmlab.data.synthetic import SynthConfig, generate

    try:
        config = SynthConfig.from_size(args.size, seed=args.seed, n_docs=args.n_docs)
    except ValueError as e:
        raise UsageError(str(e)) from None
    start = time.perf_counter()
    manifest = generate(args.out, config, overwrite=args.overwrite, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    for rel, info in manifest["files"].items():
        print(f"{rel:<26} {info['records']:>8,} records  {info['bytes']:>12,} bytes")
    total = sum(info["bytes"] for info in manifest["files"].values())
    print(f"wrote {args.out} ({total / 1e6:.1f} MB, seed {config.seed}) in {seconds:.1f} s")
    return 0


def cmd_data_contamination(args: argparse.Namespace) -> int:
    from lmlab.data.contamination import check_contamination, format_reports

    if args.n < 1 or args.min_words < 1:
        raise UsageError("--n and --min-words must be at least 1")
    reports = check_contamination(args.train, args.eval, n=args.n, min_words=args.min_words,
                                  n_examples=args.examples, progress=not args.no_progress)
    if args.json:
        print(json.dumps([r.to_dict(with_overlap=args.per_item) for r in reports], indent=2))
    else:
        print(format_reports(reports))
    return 0


def add_data_registry_commands(dsub) -> None:
    """Register `lmlab data list`, `download`, `synth` and `contamination`."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = dsub.add_parser(
        "list", formatter_class=fmt, help="the registered datasets and what is in the local cache",
        description="List the dataset registry: each dataset's splits, how its files are verified (sha256, or "
                    "size and format where no checksum is published), how many of its files are in the cache "
                    "(LMLAB_DATA, default ~/.cache/lmlab), and its license.",
    )
    p.add_argument("--verbose", "-v", action="store_true", help="also print descriptions and record schemas")
    p.add_argument("--json", action="store_true", help="print everything (URLs, checksums, sizes) as JSON")
    p.set_defaults(func=cmd_data_list)

    p = dsub.add_parser(
        "download", formatter_class=fmt, help="download and verify registered datasets",
        description="Download datasets into the cache (LMLAB_DATA/<name>/...) with a progress bar. An "
                    "interrupted download resumes from its .part file; a file is renamed into place only once "
                    "its sha256 (or size and format) checks out. Files already present are verified, not "
                    "fetched again. Offline, the error names the URLs to fetch by hand and where to put them.",
    )
    p.add_argument("names", nargs="+", metavar="NAME", help="dataset names (see `lmlab data list`)")
    p.add_argument("--split", default=None, help="only the files of this split (default: every file)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_data_download)

    p = dsub.add_parser(
        "synth", formatter_class=fmt, help="generate the built-in synthetic corpus",
        description="Write the synthetic corpus, deterministically from --seed: grammar stories, arithmetic "
                    "with worked solutions, key-value lookup and copying (pretrain/*.txt and .jsonl), chat "
                    "instructions (sft/), preference pairs with a verifiable winner (preference/), held-out "
                    "evaluation sets (eval/<task>.jsonl) disjoint from everything else, and manifest.json "
                    "with counts and sha256s. Sizes: tiny (tests), small (~9 MB of pretraining text, a few "
                    "seconds), medium (~5x small). The directory is written atomically.",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    p.add_argument("--seed", type=int, default=0, help="the same seed always gives the same bytes")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--size", choices=["tiny", "small", "medium"], default="small", help="preset size")
    size.add_argument("--n-docs", type=int, default=None,
                      help="number of pretraining documents (the other counts follow in proportion)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_synth)

    p = dsub.add_parser(
        "contamination", formatter_class=fmt, help="n-gram overlap between a training corpus and benchmarks",
        description="Report, per benchmark, the items that share a word n-gram (default 13, as in GPT-3) with "
                    "the training data, after lowercasing and turning every non-alphanumeric character into a "
                    "space. Items shorter than n words are checked whole; items under --min-words are reported "
                    "as too short. --train takes .txt/.jsonl/.parquet files (optionally .gz), directories of "
                    "them, or registered datasets NAME[:SPLIT]; token shards are not supported (check the text "
                    "they were made from). --eval takes registered datasets NAME[:SPLIT] (default split: test, "
                    "else validation), synthetic-eval, or .jsonl files of {prompt, answer}.",
    )
    p.add_argument("--train", nargs="+", required=True, metavar="PATH_OR_NAME", help="training corpus")
    p.add_argument("--eval", nargs="+", required=True, metavar="NAME",
                   help="benchmarks, e.g. gsm8k:test mmlu hellaswag arc truthfulqa humaneval synthetic-eval")
    p.add_argument("--n", type=int, default=13, help="n-gram length in words")
    p.add_argument("--min-words", type=int, default=8, help="items shorter than this are not checked")
    p.add_argument("--examples", type=int, default=3, help="examples shown per benchmark")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    p.add_argument("--per-item", action="store_true", help="with --json: include every item's overlap fraction")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_contamination)


# --- data: token shards ----------------------------------------------------------------------
# `lmlab data tokenize|inspect` over token shards (lmlab.data.shards).


def cmd_data_tokenize(args: argparse.Namespace) -> int:
    from lmlab.data.readers import read_documents
    from lmlab.data.shards import write_shards

    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    docs = read_documents(args.input, text_fields=args.text_field or ["text"], split_on=args.split_on)
    tokenizer = _tokenizer_from(args.tokenizer)
    summary = write_shards(
        docs, tokenizer, args.out, val_fraction=args.val_fraction, shard_tokens=args.shard_tokens,
        workers=args.workers, seed=args.seed, overwrite=args.overwrite, progress=not args.no_progress,
        add_bos=args.bos, add_eos=not args.no_eos,
    )
    for split in ("train", "val"):
        s = summary["splits"][split]
        print(f"{split:<5}  {len(s['shards']):>5} shard(s)  {s['tokens']:>14,} tokens  {s['documents']:>11,} documents")
    print(f"wrote {args.out} ({summary['dtype']}, vocab_size {summary['vocab_size']:,})")
    return 0


def _separator_text(sep: dict) -> str:
    parts = [f"bos={sep['bos_id']} before" if sep.get("bos_id") is not None else "",
             f"eos={sep['eos_id']} after" if sep.get("eos_id") is not None else ""]
    return " and ".join(p for p in parts if p) + " each document"


def cmd_data_inspect(args: argparse.Namespace) -> int:
    from lmlab.data.shards import TokenShards

    shards = TokenShards(args.dir)
    if args.json:
        print(json.dumps(shards.meta, indent=2))
        return 0
    meta = shards.meta
    rows = {
        "format": f"{meta['format']} v{meta['format_version']}",
        "dtype": meta["dtype"],
        "vocab_size": f"{meta['vocab_size']:,}",
        "tokenizer": meta["tokenizer_fingerprint"],
        "separator": _separator_text(meta["separator"]),
        "val split": f"sha256(seed={meta['split']['seed']}, text) / 2^64 < {meta['split']['val_fraction']}",
    }
    for split in ("train", "val"):
        n_tok, n_doc = shards.num_tokens(split), shards.num_documents(split)
        mean = f", {n_tok / n_doc:,.1f} tokens/document" if n_doc else ""
        n_shards = len(shards.shards(split))
        rows[split] = f"{n_shards} shard{'s' * (n_shards != 1)}, {n_tok:,} tokens, {n_doc:,} documents{mean}"
    width = max(map(len, rows))
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")

    split = "train" if shards.num_tokens("train") else "val"
    sample = [int(t) for t in shards.tokens(split, 0)[:args.sample_tokens]] if shards.num_tokens(split) else []
    if args.tokenizer is None:
        print(f"\nfirst {len(sample)} token ids of {split} (pass --tokenizer DIR to decode them):")
        print(" ".join(map(str, sample)))
        return 0
    tokenizer = _tokenizer_from(args.tokenizer)
    shards.check_tokenizer(tokenizer)
    print(f"\nfirst {len(sample)} tokens of {split}, decoded:")
    print(tokenizer.decode(sample))
    return 0


def add_data_shards_commands(dsub) -> None:
    """Register `lmlab data tokenize` (text files -> token shards) and `lmlab data inspect`."""
    import os

    fmt = argparse.ArgumentDefaultsHelpFormatter
    t = dsub.add_parser(
        "tokenize", formatter_class=fmt, help="tokenize text files into train/val token shards",
        description="Tokenize documents with a pool of worker processes into token shards for "
                    "pretraining: raw little-endian uint16 arrays (uint32 for vocabularies over 65536 "
                    "ids) with an index of document starts, split into train and val by a hash of each "
                    "document's text (so the split is the same for any --workers). Each document is "
                    "followed by the tokenizer's eos (and/or preceded by bos with --bos). Input: .jsonl "
                    "(--text-field of each line), .parquet (--text-field column), or .txt (a document per "
                    "file, per line, per blank-line-separated paragraph or between separator lines: "
                    "--split-on), each possibly .gz; a directory stands for the files in it. Written to a "
                    "temporary directory and renamed into place.",
    )
    t.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help=".txt, .jsonl or .parquet files (.gz too), or directories of them")
    t.add_argument("--tokenizer", required=True, metavar="DIR", help="tokenizer (or checkpoint) directory")
    t.add_argument("--out", required=True, metavar="DIR", help="shard directory to write")
    t.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    t.add_argument("--val-fraction", type=float, default=0.0005, help="expected share of documents in val")
    t.add_argument("--shard-tokens", type=int, default=2**24, help="tokens per shard at most")
    t.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    t.add_argument("--text-field", action="append", default=None,
                   help="JSON field / parquet column holding the text (repeat to join several; default: text)")
    t.add_argument("--split-on", default="file",
                   help=".txt files: one document per 'file', 'lines' or 'blank-lines', or a regex "
                        "matching separator lines")
    t.add_argument("--bos", action="store_true", help="put bos before every document")
    t.add_argument("--no-eos", action="store_true", help="do not put eos after every document (needs --bos)")
    t.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_data_tokenize)

    i = dsub.add_parser(
        "inspect", formatter_class=fmt, help="summarize a token shard directory",
        description="Print what a token shard directory holds: format, token dtype, tokenizer vocab size "
                    "and fingerprint, document separator, the train/val rule, and per split the number "
                    "of shards, tokens and documents; then the first tokens of the train split, decoded "
                    "when --tokenizer is given (after checking it is the tokenizer the shards were "
                    "written with).",
    )
    i.add_argument("dir", metavar="DIR", help="token shard directory")
    i.add_argument("--tokenizer", metavar="DIR", default=None, help="tokenizer directory, to decode the sample")
    i.add_argument("--sample-tokens", type=int, default=64, help="how many tokens to show")
    i.add_argument("--json", action="store_true", help="print meta.json instead of a table")
    i.set_defaults(func=cmd_data_inspect)


# --- the parser ----------------------------------------------------------------------------

# --- pretrain --------------------------------------------------------------------------------

def _recipe(args: argparse.Namespace):
    from lmlab.train.config import load_recipe

    try:
        return load_recipe(args.recipe, args.set or [])
    except FileNotFoundError as e:
        raise UsageError(str(e)) from e


def cmd_pretrain(args: argparse.Namespace) -> int:
    from lmlab.train.pretrain import pretrain

    cfg = _recipe(args)
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    result = pretrain(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 speaks for all
        return 0
    if result.interrupted:
        print(f"interrupted at step {result.step}; checkpoint {result.checkpoint}. Continue with the same "
              "command and --resume.", file=sys.stderr)
        return 130
    val = result.eval.get("val_loss")
    print(f"done: {result.step} steps, {result.tokens:,} tokens"
          + (f", train loss {result.loss:.4f}" if result.loss is not None else " (nothing left to train)")
          + (f", val loss {val:.4f}" if val is not None else ""))
    print(f"checkpoint: {result.checkpoint}")
    print(f"try it: lmlab generate --model {result.checkpoint} --prompt 'Once upon a time'")
    return 0


def add_train_commands(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser(
        "pretrain", formatter_class=fmt, help="pretrain a model on token shards (one process or torchrun)",
        description="Pretrain a transformer by next-token prediction on token shards (`lmlab data tokenize`). "
                    "A recipe (TOML, see recipes/) sets the model, data, loop, optimizer, schedule and "
                    "distribution; --set section.field=value overrides any setting (e.g. --set train.lr=6e-4 "
                    "--set train.steps=2000). Writes checkpoints (keep-last-k), metrics.jsonl and loss.png to "
                    "train.out_dir. Ctrl-C or SIGTERM saves a checkpoint before exiting; --resume continues "
                    "exactly from the newest one. Several processes: torchrun --nproc_per_node=N -m lmlab "
                    "pretrain ... (see docs/distributed.md).",
    )
    p.add_argument("--recipe", required=True, help="TOML recipe, e.g. recipes/speedrun.toml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe setting, e.g. train.lr=6e-4 (repeatable; values are TOML)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run in train.out_dir first")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to metrics.jsonl)")
    p.set_defaults(func=cmd_pretrain)


# --- speedrun --------------------------------------------------------------------------------

def cmd_speedrun(args: argparse.Namespace) -> int:
    from lmlab.speedrun import SpeedrunConfig, default_recipe, speedrun

    recipe = Path(args.recipe) if args.recipe else default_recipe()
    if not recipe.is_file():
        raise UsageError(f"recipe {recipe} does not exist; pass --recipe recipes/speedrun.toml from the lmlab "
                         "source tree")
    if args.eval_problems < 1:
        raise UsageError(f"--eval-problems must be at least 1, got {args.eval_problems}")
    if args.vocab_size < 512:
        raise UsageError(f"--vocab-size {args.vocab_size} is too small: 256 byte tokens and the special tokens "
                         "leave almost no merges; use 512 or more")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} is a file; give a directory")
    sft_recipe = Path(args.sft_recipe) if args.sft_recipe else default_recipe("sft-speedrun.toml")
    if not sft_recipe.is_file():
        raise UsageError(f"--sft-recipe {sft_recipe} does not exist")
    if args.chat_problems < 1:
        raise UsageError(f"--chat-problems must be at least 1, got {args.chat_problems}")
    cfg = SpeedrunConfig(out=args.out, recipe=recipe, overrides=args.set or [], sft_recipe=sft_recipe,
                         sft_overrides=args.sft_set or [], corpus_size=args.corpus, vocab_size=args.vocab_size,
                         tokenizer_pattern=args.pattern, eval_problems=args.eval_problems,
                         chat_problems=args.chat_problems, fresh=args.fresh, progress=not args.no_progress)
    try:
        report = speedrun(cfg)
    except KeyboardInterrupt:  # outside pretraining (which stops cleanly by itself): nothing half-written stays
        print(f"\ninterrupted; finished stages are kept in {args.out}: run the same command to go on",
              file=sys.stderr)
        return 130
    return 130 if report.get("interrupted") else 0


def add_speedrun_command(sub) -> None:
    p = sub.add_parser(
        "speedrun", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="the main job: corpus, tokenizer, pretraining, SFT, evaluation and a report card, in minutes",
        description="From nothing to a trained small chat model and its report card, on a laptop CPU in about ten "
                    "minutes: generate the synthetic corpus, train a BPE tokenizer, write token shards, pretrain "
                    "a one-million-parameter model (recipes/speedrun.toml), fine-tune it on the synthetic chats "
                    "(recipes/sft-speedrun.toml), evaluate (validation loss; held-out arithmetic with and without "
                    "worked steps, lookups, copying, story questions; the same tasks as chats before and after "
                    "SFT; forgetting; samples) and write report.md, report.json and loss.png to --out. Stages whose "
                    "inputs are unchanged are reused on a rerun; Ctrl-C during training leaves a checkpoint that "
                    "the next run resumes. See docs/speedrun.md.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/speedrun"),
                   help="directory for every stage's output and the report")
    p.add_argument("--recipe", default=None, help="pretraining recipe (default: recipes/speedrun.toml)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a recipe setting, e.g. train.steps=1200 (repeatable; values are TOML)")
    p.add_argument("--sft-recipe", default=None, help="fine-tuning recipe (default: recipes/sft-speedrun.toml)")
    p.add_argument("--sft-set", action="append", metavar="KEY=VALUE",
                   help="override a fine-tuning recipe setting, e.g. data.epochs=2 (repeatable)")
    p.add_argument("--corpus", default="small", choices=["tiny", "small", "medium"], help="synthetic corpus size")
    p.add_argument("--vocab-size", type=int, default=2048, help="tokenizer vocabulary")
    p.add_argument("--pattern", default="digits", choices=["digits", "gpt4"],
                   help="tokenizer pre-tokenization: GPT-4's with single digits, or GPT-4's (up to 3 digits)")
    p.add_argument("--eval-problems", type=int, default=200, help="held-out problems per task (and arithmetic mode)")
    p.add_argument("--chat-problems", type=int, default=50,
                   help="held-out problems per task asked as chats, before and after SFT")
    p.add_argument("--fresh", action="store_true", help="delete --out and redo every stage")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_speedrun)


# --- scaling ---------------------------------------------------------------------------------

def _flops(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of FLOPs, e.g. 1e21") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"compute must be positive, got {text}")
    return value


def cmd_scaling_plan(args: argparse.Namespace) -> int:
    from lmlab.train.scaling import ScalingLaw, plan

    if args.law and args.tokens_per_param is not None:
        raise UsageError("--law and --tokens-per-param exclude each other: a fitted law sets tokens per parameter")
    law = ScalingLaw.load(args.law) if args.law else None
    result = plan(args.flops, law, args.tokens_per_param)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    rule = args.tokens_per_param if args.tokens_per_param is not None else 20
    source = f"the law in {args.law}" if law else f"the rule of {rule:g} tokens per parameter"
    print(f"compute      {result['flops']:.3e} FLOPs = 6 N D  ({source})")
    print(f"parameters   {result['params']:.3e}  (N, non-embedding)")
    print(f"tokens       {result['tokens']:.3e}  (D, {result['tokens_per_param']:.1f} per parameter)")
    if "loss" in result:
        print(f"loss         {result['loss']:.4f}  (predicted by the law)")
    shape = result["shape"]
    print(f"shape        d_model {shape['d_model']}, n_layers {shape['n_layers']}, n_heads {shape['n_heads']}, "
          f"d_ff {shape['d_ff']}  ({shape['params']:.3e} non-embedding parameters)")
    fitted = (law.fitted_on or {}) if law else {}
    if fitted:
        lo, hi = fitted["params"]
        if not lo / 3 <= result["params"] <= hi * 3:
            print(f"note: the law was fitted on N from {lo:.3g} to {hi:.3g}; this plan extrapolates beyond that",
                  file=sys.stderr)
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated whole numbers, e.g. 32,64,96; got {text!r}") from None
    if not values:
        raise UsageError(f"{flag} is empty")
    return values


def cmd_scaling_sweep(args: argparse.Namespace) -> int:
    from lmlab.train import scaling
    from lmlab.train.config import apply_overrides, read_recipe

    recipe = Path(args.recipe) if args.recipe else Path(__file__).resolve().parents[1] / "recipes/scaling-sweep.toml"
    if not recipe.is_file():
        raise UsageError(f"recipe {recipe} does not exist; pass --recipe recipes/scaling-sweep.toml from the lmlab "
                         "source tree")
    given_widths, given_steps = getattr(args, "widths", None), getattr(args, "steps", None)  # absent: default
    if args.quick and (given_widths or given_steps):
        raise UsageError("--quick sets the grid; leave out --widths and --steps, or drop --quick")
    widths = _int_list(given_widths, "--widths") if given_widths else (
        scaling.QUICK_WIDTHS if args.quick else scaling.DEFAULT_WIDTHS)
    steps = _int_list(given_steps, "--steps") if given_steps else (
        scaling.QUICK_STEPS if args.quick else scaling.DEFAULT_STEPS)
    base = apply_overrides(read_recipe(recipe), args.set or [])
    result = scaling.sweep(args.out, base, widths, steps, data=args.data, vocab_size=args.vocab_size,
                           overwrite=args.overwrite, progress=not args.no_progress)
    if result.interrupted:
        print(f"interrupted with {len(result.points)} runs of the grid finished; the same command resumes the sweep",
              file=sys.stderr)
        return 130
    print()
    print(scaling.summary_text(result), end="")
    print(f"wrote {args.out}/: sweep.jsonl, law.json, summary.txt, isoflop.png, fit.png")
    print(f"plan with it: lmlab scaling plan --flops 1e15 --law {Path(args.out) / 'law.json'}")
    return 0


def add_scaling_commands(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    s = sub.add_parser("scaling", help="compute-optimal model size and tokens; fit a scaling law by a sweep",
                       description="Scaling laws (Kaplan et al. 2020; Hoffmann et al. 2022): plan a run for a "
                                   "compute budget, or train a grid of tiny models and fit L(N, D) "
                                   "(docs/scaling.md).")
    ssub = s.add_subparsers(dest="scaling_command", metavar="<command>", required=True)
    p = ssub.add_parser("plan", formatter_class=fmt, help="compute-optimal parameters and tokens for C FLOPs",
                        description="The compute-optimal N (non-embedding parameters) and D (tokens) for a budget "
                                    "of C = 6ND FLOPs: from a fitted law (--law law.json, written by `lmlab "
                                    "scaling sweep`) by Hoffmann et al.'s closed form, which also predicts the "
                                    "loss, else by the rule of 20 tokens per parameter. Also suggests a model "
                                    "shape of about N parameters (d_model = 64 x n_layers, 64-dim heads).")
    p.add_argument("--flops", type=_flops, required=True, help="compute budget C in FLOPs, e.g. 1e21")
    p.add_argument("--law", help="law.json from `lmlab scaling sweep`")
    p.add_argument("--tokens-per-param", type=float, default=None,
                   help="tokens per parameter of the rule used without --law (default: 20, Hoffmann et al.)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_scaling_plan)
    w = ssub.add_parser("sweep", formatter_class=fmt, help="train a grid of tiny models and fit L(N, D)",
                        description="Train every (width, steps) pair of tiny models from a base recipe (width "
                                    "sets depth, heads and MLP), record (N, D, C = 6ND, final validation loss) in "
                                    "OUT/sweep.jsonl, fit L = E + A/N^alpha + B/D^beta by Chinchilla's approach 3 "
                                    "(Huber loss on log values, L-BFGS from a grid of starts), print the fit and "
                                    "the compute-optimal frontier, and write law.json, summary.txt, isoflop.png "
                                    "and fit.png. Rerunning skips finished runs and resumes an interrupted one. "
                                    "The default grid (5 widths x 4 lengths, 20 runs) takes 10 to 20 minutes on "
                                    "2 CPU cores (20 measured on busy ones); --quick (3 x 3) 2 to 3.")
    w.add_argument("--out", default="runs/scaling", help="directory for the data, the runs, the fit and the plots")
    w.add_argument("--data", default="synthetic", help="synthetic (the built-in corpus, made on the fly) or a "
                                                       "registry corpus such as tinyshakespeare (from $LMLAB_DATA)")
    # SUPPRESS: left out, the attribute is absent, so --quick can tell a given grid from the default
    w.add_argument("--widths", default=argparse.SUPPRESS,
                   help="comma-separated model widths d_model (default: 32,48,64,96,128)")
    w.add_argument("--steps", default=argparse.SUPPRESS,
                   help="comma-separated training lengths in steps (default: 50,100,200,400)")
    w.add_argument("--quick", action="store_true", help="a small grid: widths 32,48,64 x steps 25,50,100")
    w.add_argument("--vocab-size", type=int, default=512, help="vocabulary of the BPE trained on the corpus")
    w.add_argument("--recipe", default=None, help="base recipe (default: recipes/scaling-sweep.toml)")
    w.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a base-recipe setting (repeatable)")
    w.add_argument("--overwrite", action="store_true", help="delete OUT's runs and fit first (the data is kept)")
    w.add_argument("--no-progress", action="store_true", help="no progress bars")
    w.set_defaults(func=cmd_scaling_sweep)


def cmd_sft(args: argparse.Namespace) -> int:
    from lmlab.tune.sft import finetune, load_finetune_recipe

    try:
        cfg = load_finetune_recipe(args.recipe, args.set or [], model=args.model, data=args.data,
                                   adapter=args.adapter)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from e
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    main_rank = int(os.environ.get("RANK", "0")) == 0
    result = finetune(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                      log=print if main_rank else (lambda _: None))
    if not main_rank:
        return 0
    return _finetune_summary(cfg, result)


def _finetune_summary(cfg, result) -> int:
    """What `lmlab sft` and `lmlab distill` print at the end; the exit code (130 when interrupted)."""
    run = result.run
    if run.interrupted:
        print(f"interrupted at step {run.step}; checkpoint {run.checkpoint}. Continue with the same command and "
              "--resume.", file=sys.stderr)
        return 130
    val = run.eval.get("val_loss")
    print(f"done: {run.step} steps" + (f", train loss {run.loss:.4f}" if run.loss is not None else "")
          + (f", held-out loss {val:.4f}" if val is not None else ""))
    f = result.forgetting
    if "after" in f:
        print(f"forgetting: pretraining validation loss {f['before']:.4f} -> {f['after']:.4f} ({f['change']:+.4f})")
    else:
        print(f"forgetting: not measured ({f.get('skipped', 'interrupted')})")
    if cfg.adapter is not None:
        print(f"adapter: {run.checkpoint} (on {cfg.model.path}); merge it into a full checkpoint with "
              f"lmlab adapter merge --model {cfg.model.path} --adapter {run.checkpoint} --out DIR")
        print(f"try it: lmlab generate --model {cfg.model.path} --adapter {run.checkpoint} --chat --prompt 'Hello'")
    else:
        print(f"checkpoint: {run.checkpoint}")
        print(f"try it: lmlab generate --model {run.checkpoint} --chat --prompt 'Hello'")
    return 0


def add_sft_command(sub) -> None:
    """`lmlab sft`: supervised fine-tuning (lmlab/tune/sft.py)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser(
        "sft", formatter_class=fmt, help="supervised fine-tuning on chats or instructions (full, LoRA, QLoRA, ...)",
        description="Fine-tune a checkpoint (lmlab or Hugging Face) on conversations: a .jsonl of chats "
                    "({\"messages\": [...]}), an Alpaca/Dolly-style file (instruction/input/output), prompt/completion "
                    "pairs, or a dataset name (synthetic, alpaca, alpaca:sample, dolly). Chats are rendered with the "
                    "checkpoint's chat template, the loss is on the assistant's tokens only, and several "
                    "conversations are packed into each row with attention kept inside each one. Full fine-tuning "
                    "by default; --adapter trains a LoRA/DoRA/QLoRA/IA3/prefix adapter on the frozen base instead "
                    "(its settings in the recipe's [adapter] section). Reports the held-out loss and the pretraining "
                    "validation loss before and after (forgetting). A recipe (TOML: [model] [data] [adapter] [train] "
                    "[optim] [schedule] [distributed], see recipes/sft-*.toml) is optional; --set overrides any "
                    "setting. Ctrl-C saves a checkpoint; --resume continues exactly.",
    )
    p.add_argument("--model", help="the checkpoint to fine-tune (model.path)")
    p.add_argument("--data", help="conversations: a .jsonl/.json file or a dataset name[:split] (data.train)")
    p.add_argument("--adapter", choices=["lora", "rslora", "dora", "qlora", "ia3", "prefix"],
                   help="train an adapter instead of all weights (None: full fine-tuning)")
    _add_run_flags(p, "train.lr=1e-4 or adapter.r=16")
    p.set_defaults(func=cmd_sft)


def _adapter_dir(path: str) -> Path:
    from lmlab.tune.adapters import ADAPTER_CONFIG

    if not (Path(path) / ADAPTER_CONFIG).is_file():
        raise UsageError(f"--adapter {path} is not an adapter directory (no {ADAPTER_CONFIG}); give a directory "
                         "written by save_adapter / `lmlab sft`, or a PEFT adapter")
    return Path(path)


def _lora_onto(model, adapter: Path, doing: str):
    """Attach the LoRA adapter at `adapter` (lmlab's format or PEFT's) to `model`; refuse other methods first."""
    from lmlab.tune.adapters import read_adapter_config
    from lmlab.tune.lora import attach_adapter_dir, is_peft_adapter

    if not is_peft_adapter(adapter):
        cfg, _ = read_adapter_config(adapter)
        if cfg.method != "lora":
            raise UsageError(f"{adapter} is a {cfg.method} adapter; {doing} works on LoRA adapters only")
    return attach_adapter_dir(model, adapter)


def cmd_adapter_info(args: argparse.Namespace) -> int:
    from lmlab.tune.lora import adapter_summary

    info = adapter_summary(_adapter_dir(args.adapter))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value:,}" if isinstance(value, int) and not isinstance(value, bool)
              else f"{key:<{width}}  {value}")
    return 0


def cmd_adapter_merge(args: argparse.Namespace) -> int:
    from lmlab.model import load, save_checkpoint
    from lmlab.tokenizer import tokenizer_files
    from lmlab.tune.lora import merge_and_unload

    adapter = _adapter_dir(args.adapter)
    model = load(args.model)
    cfg = _lora_onto(model, adapter, "adapter merge")
    merge_and_unload(model)
    save_checkpoint(model, args.out, tokenizer_files=tokenizer_files(args.model), overwrite=args.overwrite,
                    metadata={"merged_adapter": {"base": str(args.model), "adapter": str(adapter),
                                                 "config": cfg.to_dict()}})
    n = sum(p.numel() for p in model.parameters())
    print(f"merged {adapter} into {args.model} -> {args.out} ({n:,} parameters)")
    return 0


def cmd_adapter_export_peft(args: argparse.Namespace) -> int:
    from lmlab.model import load
    from lmlab.tune.lora import export_peft, is_peft_adapter

    adapter = _adapter_dir(args.adapter)
    if is_peft_adapter(adapter):
        raise UsageError(f"{adapter} is a PEFT adapter already")
    model = load(args.model)
    cfg = _lora_onto(model, adapter, "export-peft")
    export_peft(model, args.out, cfg, base_model_name_or_path=args.base_name or str(args.model),
                overwrite=args.overwrite)
    print(f"wrote PEFT adapter {args.out} (load it with peft.PeftModel.from_pretrained(hf_model, {str(args.out)!r}))")
    return 0


def add_adapter_commands(sub) -> None:
    """`lmlab adapter ...`: inspect, merge and export adapters (lmlab/tune/lora.py)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    a = sub.add_parser(
        "adapter", help="inspect, merge and export fine-tuning adapters (LoRA, DoRA, QLoRA, IA3, prefix)",
        description="Adapters are the small trained part of a parameter-efficient fine-tune, saved apart from "
                    "the frozen base model (adapter_config.json + adapter_model.safetensors). Inspect one, merge a "
                    "LoRA adapter into its base to get a plain checkpoint, or export it in PEFT's format.",
    )
    asub = a.add_subparsers(dest="adapter_command", metavar="<command>", required=True)

    i = asub.add_parser(
        "info", formatter_class=fmt, help="method, rank, targets and parameter count of an adapter",
        description="Print what an adapter directory holds, from its config and the safetensors header (no "
                    "weights are read): the method (lora, dora, ia3, prefix), rank, alpha and scaling, target "
                    "layers, the number of trainable parameters and the base model it was trained on. Reads "
                    "lmlab adapters and PEFT LoRA adapters.",
    )
    i.add_argument("adapter", metavar="DIR", help="adapter directory")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(func=cmd_adapter_info)

    m = asub.add_parser(
        "merge", formatter_class=fmt, help="fold a LoRA adapter into its base and write a plain checkpoint",
        description="Load the base model (lmlab or Hugging Face checkpoint), attach the LoRA/DoRA adapter (lmlab "
                    "or PEFT format), fold it into the weights (W + s B A; DoRA: m (W + s B A) / ||W + s B A||) "
                    "and write an ordinary lmlab checkpoint with the base's tokenizer files: it generates exactly "
                    "as base + adapter did, with no adapter overhead. A QLoRA adapter is merged into the "
                    "dequantized 4-bit base it was trained against. Written atomically.",
    )
    m.add_argument("--model", required=True, help="base checkpoint directory (lmlab or Hugging Face)")
    m.add_argument("--adapter", required=True, help="adapter directory (lmlab or PEFT LoRA)")
    m.add_argument("--out", required=True, help="checkpoint directory to write")
    m.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    m.set_defaults(func=cmd_adapter_merge)

    e = asub.add_parser(
        "export-peft", formatter_class=fmt, help="write an lmlab LoRA adapter in PEFT's format",
        description="Write an lmlab LoRA/DoRA adapter as a PEFT adapter directory (adapter_config.json, "
                    "adapter_model.safetensors with PEFT's tensor names) that peft.PeftModel.from_pretrained loads "
                    "onto the Hugging Face version of the base (`lmlab convert --to-hf` makes one from an lmlab "
                    "checkpoint). Layers that Hugging Face stores fused (GPT-2's c_attn, Phi-3's qkv_proj) cannot "
                    "be exported and are refused.",
    )
    e.add_argument("--model", required=True, help="base checkpoint directory the adapter was trained on")
    e.add_argument("--adapter", required=True, help="lmlab adapter directory")
    e.add_argument("--out", required=True, help="PEFT adapter directory to write")
    e.add_argument("--base-name", default=None,
                   help="base_model_name_or_path recorded for PEFT (e.g. the hub id); default: --model")
    e.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    e.set_defaults(func=cmd_adapter_export_peft)


# --- distill ---------------------------------------------------------------------------------

TEACHER_DATA = "teacher_data.jsonl"  # sequence-level distillation: the teacher's answers, in OUT
TEACHER_DATA_INFO = "teacher_data.json"  # what they were generated from, so a rerun reuses only matching ones
HELD_OUT_DATA = "held_out.jsonl"  # the conversations kept out of the teacher's data, with their original answers


def _distill_config(args: argparse.Namespace):
    """The fine-tuning config of a distillation run: the recipe, --set, --out (train.out_dir, default
    runs/distill), the student as model.path and --data as data.train."""
    from lmlab.train.config import read_recipe
    from lmlab.tune.sft import resolve_finetune

    for flag, path in (("--teacher", args.teacher), ("--student", args.student)):
        if not Path(path).is_dir():
            raise UsageError(f"{flag} {path} is not a directory; give an lmlab or Hugging Face checkpoint directory")
    if args.recipe and not Path(args.recipe).is_file():
        raise UsageError(f"--recipe {args.recipe} does not exist")
    if not args.temperature > 0:
        raise UsageError(f"--temperature must be positive, got {args.temperature}")
    for flag, value in (("--alpha", args.alpha), ("--beta", args.beta)):
        if not 0 <= value <= 1:
            raise UsageError(f"{flag} must be in [0, 1], got {value}")
    if args.generate_only and args.mode != "sequence":
        raise UsageError("--generate-only writes the teacher's answers of --mode sequence; add --mode sequence")
    recipe = read_recipe(args.recipe) if args.recipe else {}
    train = recipe.setdefault("train", {})
    train.setdefault("out_dir", "runs/distill")
    if args.out:
        train["out_dir"] = str(args.out)
    return resolve_finetune(recipe, args.set or [], model=args.student, data=args.data, adapter=args.adapter)


def _token_level_objective(args: argparse.Namespace, cfg, log):
    """objective_factory for finetune: loads the teacher beside the student and distills its logits, after checking
    that the two share a vocabulary."""
    import torch

    from lmlab.model import load, read_any_config
    from lmlab.tokenizer import load_tokenizer
    from lmlab.tune.distill import distill_objective, same_vocabulary, shared_vocab_size

    student_tok, teacher_tok = load_tokenizer(args.student), load_tokenizer(args.teacher)
    if student_tok is None:
        raise UsageError(f"--student {args.student} has no tokenizer; fine-tuning renders chats with it")
    hint = "; --mode sequence distills through the teacher's text and needs no shared vocabulary"
    if teacher_tok is not None and not same_vocabulary(student_tok, teacher_tok):
        raise UsageError(f"the tokenizers of --teacher {args.teacher} and --student {args.student} differ: token-level "
                         f"distillation compares their next-token distributions id by id{hint}")
    try:
        shared_vocab_size(read_any_config(args.student).vocab_size, read_any_config(args.teacher).vocab_size,
                          student_tok.vocab_size)
    except ValueError as e:
        raise UsageError(f"{e}{hint}") from None
    template = getattr(student_tok, "chat_template", None)
    if teacher_tok is not None and getattr(teacher_tok, "chat_template", None) != template:
        log("note: teacher and student have different chat templates; the teacher reads the student's format")
    # under autocast the teacher's matrix multiplies run in the low precision anyway: keep its weights there too
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision, torch.float32)

    def factory(model):
        teacher = load(args.teacher, device=next(model.parameters()).device, dtype=dtype)
        beta = f", beta {args.beta:g}" if args.loss == "jsd" else ""
        log(f"teacher: {args.teacher} ({sum(p.numel() for p in teacher.parameters()):,} parameters); {args.loss}, "
            f"temperature {args.temperature:g}, alpha {args.alpha:g}{beta}")
        return distill_objective(teacher, args.loss, args.temperature, args.alpha, args.beta,
                                 vocab_size=student_tok.vocab_size)

    return factory


def _sequence_level_data(args: argparse.Namespace, cfg, log) -> None:
    """Write (or reuse) the teacher's answers to the training prompts in OUT and point cfg.data at them; the
    held-out conversations keep their original answers, so the held-out loss measures the real task."""
    from lmlab.atomic import atomic_file
    from lmlab.model import load
    from lmlab.tokenizer import load_tokenizer
    from lmlab.train.distributed import pick_device
    from lmlab.tune import chat_data
    from lmlab.tune.distill import teacher_generations

    out_dir = Path(cfg.train.out_dir)
    data_file, info_file, held_file = out_dir / TEACHER_DATA, out_dir / TEACHER_DATA_INFO, out_dir / HELD_OUT_DATA
    conversations = chat_data.load_conversations(cfg.data.train, system=cfg.data.system, limit=cfg.data.limit,
                                                 progress=not args.no_progress)
    validation = cfg.data.validation or chat_data.validation_spec(cfg.data.train)
    if not validation:  # held out of the data itself, before the teacher sees any of it
        conversations, held = chat_data.split_validation(conversations, cfg.data.val_fraction, cfg.train.seed)
        validation = str(held_file) if held else "none"
        text = "".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in held)
        if held and not (held_file.is_file() and held_file.read_text(encoding="utf-8") == text):
            with atomic_file(held_file, "w") as f:
                f.write(text)
    info = {"teacher": str(Path(args.teacher).resolve()), "data": cfg.data.train, "system": cfg.data.system,
            "limit": cfg.data.limit, "validation": validation, "val_fraction": cfg.data.val_fraction,
            "conversations": len(conversations), "max_new_tokens": args.max_new_tokens,
            "temperature": args.gen_temperature, "seed": cfg.train.seed}
    recorded = json.loads(info_file.read_text()) if info_file.is_file() else None
    fresh = recorded is not None and data_file.is_file() and {k: recorded.get(k) for k in info} == info
    if fresh and not args.overwrite:
        log(f"using the teacher's answers in {data_file} ({recorded['written']:,} conversations; --overwrite "
            "generates them again)")
    elif args.resume:
        raise UsageError(f"cannot resume: {data_file} is missing or was generated from other settings than this "
                         "command's; resume with the command that started the run")
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("the teacher answers in one process: run this command once without torchrun and with "
                         "--generate-only, then launch the training under torchrun")
    else:
        tokenizer = load_tokenizer(args.teacher)
        if tokenizer is None:
            raise UsageError(f"--teacher {args.teacher} has no tokenizer to render its prompts with")
        device = pick_device(cfg.train.device)
        teacher = load(args.teacher, device=device, dtype=_dtype("auto", str(device)))
        how = "greedy" if args.gen_temperature == 0 else f"temperature {args.gen_temperature:g}"
        log(f"teacher {args.teacher} answers {len(conversations):,} prompts ({how})")
        try:
            made = teacher_generations(teacher, tokenizer, conversations, data_file, args.max_new_tokens,
                                       args.gen_temperature, args.gen_batch_size, seed=cfg.train.seed,
                                       progress=not args.no_progress)
        except ValueError as e:  # bad sampling settings, a conversation without a prompt
            raise UsageError(str(e)) from None
        del teacher
        with atomic_file(info_file, "w") as f:  # written last: it vouches for a complete data file
            f.write(json.dumps({**info, "written": made.written, "truncated": made.truncated, "empty": made.empty,
                                "skipped": made.skipped}, indent=2) + "\n")
        log(f"wrote {data_file}: {made.written:,} conversations ({made.truncated} cut at --max-new-tokens, "
            f"{made.empty} empty answers, {made.skipped} prompts longer than the teacher's context left out)")
    cfg.data.train, cfg.data.validation, cfg.data.system, cfg.data.limit = str(data_file), validation, "", 0


def cmd_distill(args: argparse.Namespace) -> int:
    from lmlab.tune.sft import finetune

    try:
        cfg = _distill_config(args)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from e
    settings = {"mode": args.mode, "teacher": args.teacher, "loss": args.loss, "temperature": args.temperature,
                "alpha": args.alpha, "beta": args.beta}
    if args.print_config:
        print(json.dumps({"distill": settings, **cfg.to_dict()}, indent=2))
        return 0
    main_rank = int(os.environ.get("RANK", "0")) == 0
    log = print if main_rank else (lambda _: None)
    factory = None
    if args.mode == "sequence":
        _sequence_level_data(args, cfg, log)
        if args.generate_only:
            return 0
    else:
        factory = _token_level_objective(args, cfg, log)
    result = finetune(cfg, objective_factory=factory, resume=args.resume, overwrite=args.overwrite,
                      progress=not args.no_progress, desc="distill", log=log)
    if not main_rank:
        return 0
    return _finetune_summary(cfg, result)


def add_distill_command(sub) -> None:
    """`lmlab distill`: knowledge distillation (lmlab/tune/distill.py)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser(
        "distill", formatter_class=fmt, help="distill a teacher checkpoint into a smaller student",
        description="Knowledge distillation through the fine-tuning pipeline (same data, packing, adapters, "
                    "held-out loss and forgetting check as `lmlab sft`). --mode token (Hinton et al. 2015): the "
                    "student is trained on the conversations of --data with loss alpha * D(teacher || student) + "
                    "(1 - alpha) * cross-entropy on the data, D the temperature-scaled forward KL, reverse KL "
                    "(MiniLLM) or generalized JSD (GKD, --beta weighting the teacher) of the next-token "
                    "distributions at the assistant's tokens; the teacher runs beside the student, and both must "
                    "share a tokenizer. --mode sequence (Kim & Rush 2016): the teacher first answers every training "
                    "prompt (greedy by default), written to OUT/teacher_data.jsonl and reused on reruns, and the "
                    "student is fine-tuned on those answers; any tokenizers work. Either checkpoint may be lmlab's "
                    "or Hugging Face's. A fine-tuning recipe (see `lmlab sft`) is optional; --set overrides any "
                    "setting. Ctrl-C saves a checkpoint; --resume continues exactly.",
    )
    p.add_argument("--teacher", required=True, metavar="DIR", help="the teacher checkpoint")
    p.add_argument("--student", required=True, metavar="DIR", help="the student checkpoint to train (model.path)")
    p.add_argument("--data", help="conversations: a .jsonl/.json file or a dataset name[:split] (data.train)")
    p.add_argument("--mode", choices=["token", "sequence"], default="token",
                   help="token: match the teacher's next-token distributions; sequence: train on its answers")
    p.add_argument("--loss", choices=["forward_kl", "reverse_kl", "jsd"], default="forward_kl",
                   help="token mode: the divergence between teacher and student")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="token mode: both distributions are softened by it (the loss is scaled by its square)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="token mode: weight of distillation against the data's cross-entropy (1: pure distillation)")
    p.add_argument("--beta", type=float, default=0.5,
                   help="jsd: the teacher's weight in the mixture (0: forward KL, 1: reverse KL)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="sequence mode: longest answer of the teacher")
    p.add_argument("--gen-temperature", type=float, default=0.0,
                   help="sequence mode: sampling temperature of the teacher's answers (0: greedy)")
    p.add_argument("--gen-batch-size", type=int, default=8, help="sequence mode: prompts answered at once")
    p.add_argument("--generate-only", action="store_true",
                   help="sequence mode: write the teacher's answers and stop (before torchrun, or to inspect them)")
    p.add_argument("--adapter", choices=["lora", "rslora", "dora", "qlora", "ia3", "prefix"],
                   help="train an adapter on the frozen student instead of all its weights")
    p.add_argument("--recipe", help="fine-tuning TOML recipe (optional)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a setting, e.g. train.steps=200 (repeatable; values are TOML)")
    p.add_argument("--out", help="run directory: checkpoints, metrics and the teacher's data (train.out_dir; "
                                 "default: the recipe's, else runs/distill)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run directory")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: delete the run's checkpoints and generate the teacher's data again")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (metrics still go to metrics.jsonl)")
    p.set_defaults(func=cmd_distill)


def cmd_serve(args: argparse.Namespace) -> int:
    from lmlab.model import load

    try:
        from lmlab.infer.engine import Engine, EngineConfig
        from lmlab.infer.server import serve
    except ImportError as e:
        raise UsageError(f"{e}") from None
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535 (0: any free port), got {args.port}")
    if args.draft and args.speculative == "ngram":
        raise UsageError("--draft and --speculative ngram are two kinds of speculation; give one")
    if args.draft and not Path(args.draft).is_dir():
        raise UsageError(f"--draft {args.draft} is not a directory; give a checkpoint directory")
    if args.graceful_timeout is not None and args.graceful_timeout <= 0:
        raise UsageError(f"--graceful-timeout must be positive, got {args.graceful_timeout}")
    tokenizer = _tokenizer_from(args.model)
    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    model = load(args.model, device=device, dtype=dtype).eval()
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise UsageError(
            f"the tokenizer in {args.model} has {tokenizer.vocab_size} tokens but the model's vocabulary has "
            f"{model.cfg.vocab_size}: they do not belong together; copy in the tokenizer the model was trained with"
        )
    draft = None
    if args.draft:
        draft = load(args.draft, device=device, dtype=dtype).eval()
        draft_tokenizer = _tokenizer_from(args.draft)
        if draft_tokenizer.vocab_size != tokenizer.vocab_size or any(
                draft_tokenizer.token_bytes(i) != tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)):
            raise UsageError(f"--draft {args.draft} has a different tokenizer than --model {args.model}; a draft "
                             "model must share the target's tokenizer")
    config = EngineConfig(block_size=args.block_size, num_blocks=args.num_blocks, max_num_seqs=args.max_num_seqs,
                          max_batch_tokens=args.max_batch_tokens, prefix_caching=not args.no_prefix_caching,
                          speculative="draft" if draft is not None else args.speculative,
                          num_speculative_tokens=args.num_speculative_tokens)
    try:
        engine = Engine(model, tokenizer, config, draft=draft)
    except ValueError as e:
        raise UsageError(str(e)) from None
    name = args.served_model_name or Path(args.model).resolve().name
    api_key = args.api_key or os.environ.get("LMLAB_API_KEY") or None
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host} without an API key: anyone who reaches this port can use the "
              "model; set --api-key or LMLAB_API_KEY", file=sys.stderr)
    print(f"serving {name!r}: {model.cfg.max_seq_len}-token context, {engine.stats().blocks_total} KV blocks of "
          f"{config.block_size} tokens; the chat page is at /, the API under /v1", file=sys.stderr)
    serve(engine, model_name=name, host=args.host, port=args.port, api_key=api_key,
          max_request_bytes=args.max_request_bytes, graceful_timeout=args.graceful_timeout,
          log_level=args.log_level)
    return 0


def add_serve_command(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    s = sub.add_parser(
        "serve", formatter_class=fmt, help="serve a checkpoint over an OpenAI-compatible HTTP API",
        description="Serve a checkpoint over HTTP with the OpenAI API (/v1/models, /v1/completions, "
                    "/v1/chat/completions, streaming, tools, JSON mode), /health, /metrics (Prometheus) and a chat "
                    "page at /. Requests are batched continuously by the engine over a paged KV cache; --draft or "
                    "--speculative ngram adds speculative decoding. SIGTERM or Ctrl-C stops accepting connections, "
                    "finishes the requests in flight, then exits (a second Ctrl-C exits at once). "
                    "See docs/serving.md.",
    )
    s.add_argument("--model", required=True, help="checkpoint directory (lmlab or Hugging Face) with its tokenizer")
    s.add_argument("--served-model-name", default=None,
                   help="the name clients send as \"model\"; None: the checkpoint directory's name")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port, printed at start)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/*; None: the LMLAB_API_KEY environment "
                        "variable (which keeps the key out of the process list), and without it no auth")
    s.add_argument("--draft", metavar="DIR", default=None,
                   help="a smaller checkpoint with the same tokenizer that proposes tokens for the model to verify "
                        "(speculative decoding; the output distribution is unchanged)")
    s.add_argument("--speculative", choices=["ngram"], default=None,
                   help="model-free speculative decoding: propose tokens copied from earlier in the text")
    s.add_argument("--num-speculative-tokens", type=int, default=4, help="tokens proposed per step when speculating")
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto")
    s.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on GPU, float32 on CPU")
    s.add_argument("--max-num-seqs", type=int, default=32, help="requests generated at the same time (others wait)")
    s.add_argument("--max-batch-tokens", type=int, default=512,
                   help="tokens fed to the model in one step (decodes + prefill chunks); bounds step latency")
    s.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    s.add_argument("--num-blocks", type=int, default=None,
                   help="KV-cache blocks; None: room for --max-num-seqs full contexts, at most 2 GiB")
    s.add_argument("--no-prefix-caching", action="store_true",
                   help="do not share the KV blocks of prompts' common prefixes between requests")
    s.add_argument("--max-request-bytes", type=int, default=4 * 2**20, help="larger request bodies get 413")
    s.add_argument("--graceful-timeout", type=float, default=None,
                   help="on shutdown, wait at most this many seconds for requests in flight; None: until done")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (info logs every request)")
    s.set_defaults(func=cmd_serve)


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from lmlab.evals.harness import EvalConfig, evaluate, helm_table, markdown_table, write_results
    from lmlab.evals.lm import LM, bits_per_byte
    from lmlab.model import load

    if not args.tasks and not args.text:
        raise UsageError("nothing to evaluate: give --tasks (e.g. --tasks arc_easy,hellaswag) and/or --text FILE")
    config = EvalConfig(tasks=args.tasks.split(",") if args.tasks else ["arc_easy"], limit=args.limit,
                        shots=args.shots, seed=args.seed, samples=args.samples, temperature=args.temperature,
                        top_p=args.top_p, cot=args.cot, perturbations=_csv(args.perturb),
                        contamination=list(args.contamination or []), corpus_dir=args.synthetic_dir)
    for path in config.contamination:
        if not Path(path).exists():
            raise UsageError(f"--contamination {path} does not exist; give the training data (files or directories)")
    device = _device(args.device)
    model = load(args.model, device=device, dtype=_dtype(args.dtype, device))
    lm = LM(model, _tokenizer_from(args.model), name=Path(args.model).resolve().name, batch_size=args.batch_size,
            progress=True)
    record: dict = {}
    with torch.inference_mode():
        if args.tasks:
            record = evaluate(lm, config, model_path=str(args.model))
            print(markdown_table(record))
            print()
            print(helm_table(record))
        if args.text:
            texts = [Path(f).read_text(encoding="utf-8") for f in args.text]
            lls = lm.loglikelihood_rolling(texts)
            rows = []
            for f, text, ll in zip(args.text, texts, lls, strict=True):
                n_tokens, n_bytes = len(lm.tokenizer.encode(text)), len(text.encode())
                rows.append({"file": str(f), "tokens": n_tokens, "bytes": n_bytes, "loglikelihood": ll,
                             "perplexity": math.exp(-ll / n_tokens), "bits_per_byte": bits_per_byte(ll, n_bytes)})
                print(f"{f}: perplexity {rows[-1]['perplexity']:.3f} per token, "
                      f"{rows[-1]['bits_per_byte']:.4f} bits per byte ({n_tokens} tokens, {n_bytes} bytes)")
            record["perplexity"] = rows
    if args.samples > 1 and record.get("samples"):
        from lmlab.evals.testtime import LikelihoodVerifier, plot_scaling, scaling_curves

        verifier = None
        if args.verifier:
            judge = lm if args.verifier == "self" else LM.from_dir(args.verifier, device=device,
                                                                   batch_size=args.batch_size, progress=True)
            verifier = LikelihoodVerifier(judge)
        curves = scaling_curves(record, verifier)
        record["test_time_compute"] = curves
        for task, task_curves in curves.items():
            for name, points in task_curves.items():
                print(f"{task} {name}: " + ", ".join(f"k={k} {100 * a:.1f}%" for k, a in points))
        if args.plot and curves:
            plot_scaling(curves, args.plot)
            print(f"test-time compute plot: {args.plot}", file=sys.stderr)
    if args.out:
        path = write_results(record, args.out)
        print(f"results (config, metrics, every sample): {path}", file=sys.stderr)
    return 0


def _csv(value: str | None) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else []


# what `lmlab eval --help` lists (kept in step with lmlab.evals.tasks by tests/evals/test_tasks.py; not imported so
# that building the parser stays cheap)
EVAL_TASKS = ("mmlu, hellaswag, arc_easy, arc_challenge, truthfulqa_mc1, truthfulqa_mc2, gsm8k, humaneval, mbpp, "
              "synthetic_add, synthetic_sub, synthetic_mul, synthetic_kv, synthetic_copy, synthetic_story_qa")
EVAL_GROUPS = "arc, truthfulqa_mc, synthetic"


def add_eval_command(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    e = sub.add_parser(
        "eval", formatter_class=fmt, help="evaluate a checkpoint on benchmarks (MMLU, HellaSwag, ARC, GSM8K, ...)",
        description="Evaluate a checkpoint (lmlab or Hugging Face) on benchmarks read through the data registry: "
                    "multiple choice by log-likelihood (acc, and acc_norm per character, as lm-evaluation-harness "
                    "defines them), generation through the inference engine with answer extraction (GSM8K's "
                    "final number, HumanEval/MBPP unit tests in a sandbox). Prints a table of metrics with "
                    "standard errors and a HELM-style view (accuracy, calibration ECE, robustness under "
                    "--perturb, tokens/s, contamination by --contamination data); --out writes every sample. "
                    f"Tasks: {EVAL_TASKS}. Groups: {EVAL_GROUPS}. See docs/evaluation.md.",
    )
    e.add_argument("--model", required=True, help="checkpoint directory (lmlab or Hugging Face) with its tokenizer")
    e.add_argument("--tasks", default=None, help="comma-separated tasks or groups, e.g. mmlu,hellaswag,arc")
    e.add_argument("--limit", type=int, default=None, help="evaluate the first N documents of each task "
                   "(of each subject for MMLU); None: all")
    e.add_argument("--shots", type=int, default=None,
                   help="few-shot examples per prompt; None: each task's default (MMLU 5, GSM8K 8, MBPP 3, else 0)")
    e.add_argument("--seed", type=int, default=1234, help="seeds the choice of few-shot examples and sampling")
    e.add_argument("--cot", action=argparse.BooleanOptionalAction, default=None,
                   help="chain of thought in the examples and the answer; None: the task's default (on for GSM8K)")
    e.add_argument("--samples", type=int, default=1,
                   help="generations per document: with n > 1, maj@n (self-consistency) and pass@k are reported")
    e.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of generation (0: greedy)")
    e.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling for generation")
    e.add_argument("--perturb", default=None,
                   help="robustness: re-run each task with its questions perturbed (typos, lowercase, uppercase)")
    e.add_argument("--contamination", nargs="+", metavar="PATH", default=None,
                   help="the model's training data (text/jsonl/parquet files or directories): mark documents whose "
                        "13-grams occur in it and report accuracy on the clean rest")
    e.add_argument("--synthetic-dir", default=None,
                   help="the synthetic corpus (from `lmlab data synth`) the synthetic tasks read; None: the registry's")
    e.add_argument("--text", nargs="+", metavar="FILE", default=None,
                   help="also report perplexity and bits per byte of these text files")
    e.add_argument("--batch-size", type=int, default=16, help="rows per log-likelihood forward pass")
    e.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto")
    e.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on GPU, float32 on CPU")
    e.add_argument("--out", default=None, help="write the results JSON (configuration, metrics, every sample) here")
    e.add_argument("--plot", default=None,
                   help="with --samples > 1: write the accuracy-vs-samples plot (PNG) here: self-consistency maj@k, "
                        "best-of-k with --verifier, and pass@k")
    e.add_argument("--verifier", default=None, metavar="DIR",
                   help="best-of-k: rank the samples by this model's mean log-probability of each output ('self': "
                        "the evaluated model)")
    e.set_defaults(func=cmd_eval)


def _generator(spec: str, args: argparse.Namespace, what: str, model_name: str | None = None):
    """A model to generate with: a checkpoint directory (through the engine) or an OpenAI-compatible URL."""
    from lmlab.evals.lm import LM, OpenAIEndpoint

    if spec.startswith(("http://", "https://")):
        if not model_name:
            flag = "--model-name" if what == "--model" else f"{what}-model"
            raise UsageError(f"{what} {spec} is an endpoint: name the model it serves with {flag}")
        return OpenAIEndpoint(spec, model_name, api_key=args.api_key or os.environ.get("OPENAI_API_KEY"))
    if not Path(spec).is_dir():
        raise UsageError(f"{what} {spec} is neither a checkpoint directory nor an http(s):// endpoint URL")
    from lmlab.model import load

    device = _device(args.device)
    model = load(spec, device=device, dtype=_dtype(args.dtype, device))
    return LM(model, _tokenizer_from(spec), name=Path(spec).resolve().name, progress=True)


def _write_json(data: dict, path: str) -> None:
    from lmlab.atomic import atomic_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as f:
        json.dump(data, f, indent=1)
    print(f"every prompt, output and verdict: {path}", file=sys.stderr)


def cmd_judge(args: argparse.Namespace) -> int:
    from lmlab.evals import judge as J

    rubric = Path(args.rubric).read_text(encoding="utf-8") if args.rubric else J.DEFAULT_RUBRIC
    model = _generator(args.judge, args, "--judge", args.judge_model)
    if args.judge_command == "pairwise":
        report = J.compare(model, J.load_pairs(args.pairs), rubric=rubric, max_new_tokens=args.max_new_tokens)
    else:
        report = J.grade(model, J.load_answers(args.answers), rubric=rubric, max_new_tokens=args.max_new_tokens)
    print(report.to_markdown())
    if args.out:
        _write_json(report.to_dict(), args.out)
    return 0


def cmd_redteam(args: argparse.Namespace) -> int:
    from lmlab.evals import redteam as R

    goals = R.load_goals(args.goals) if args.goals else list(R.BUILTIN_GOALS)
    categories = _csv(args.categories) or list(R.ATTACK_CATEGORIES)
    target = _generator(args.model, args, "--model", args.model_name)
    attacks = R.templated_attacks(goals, categories, n_shots=args.shots, seed=args.seed)
    if args.attacker:
        attacker = _generator(args.attacker, args, "--attacker", args.attacker_model)
        attacks += R.generated_attacks(attacker, goals, categories, n_per_goal=args.generated, seed=args.seed)
    judge = _generator(args.judge, args, "--judge", args.judge_model) if args.judge else None
    report = R.run_redteam(target, attacks, judge=judge, max_new_tokens=args.max_new_tokens, seed=args.seed)
    print(report.to_markdown())
    if args.out:
        _write_json(report.to_dict(), args.out)
    return 0


def _endpoint_arguments(p, *names: str) -> None:
    for name in names:
        p.add_argument("--model-name" if name == "model" else f"--{name}-model", default=None,
                       help=f"with an endpoint URL as --{name}: the model name it serves")
    p.add_argument("--api-key", default=None, help="Bearer key for endpoint URLs; None: OPENAI_API_KEY if set")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto (checkpoint directories)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on GPU, float32 on CPU")


def add_judge_commands(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    j = sub.add_parser(
        "judge", help="LLM-as-judge: grade answers on a rubric or compare two answers",
        description="A judge model (a checkpoint directory, or any OpenAI-compatible endpoint URL such as "
                    "`lmlab serve` or a hosted model) grades answers 1-10 against a rubric (`grade`) or compares "
                    "two answers (`pairwise`, judged in both orders to cancel position bias; a win needs both "
                    "orders to agree). With reference labels, reports agreement and Cohen's kappa. "
                    "See docs/judge_redteam.md.")
    jsub = j.add_subparsers(dest="judge_command", metavar="<command>", required=True)
    for name, what in (("pairwise", "pairs"), ("grade", "answers")):
        p = jsub.add_parser(
            name, formatter_class=fmt,
            help="compare answer_a and answer_b per question" if name == "pairwise" else "rate one answer per question",
            description=("jsonl of {question, answer_a, answer_b[, label: A|B|tie][, reference]}: verdicts in both "
                         "orders, win/tie/loss rates, position consistency, agreement with labels"
                         if name == "pairwise" else
                         "jsonl of {question, answer[, reference]}: a 1-10 rating per answer and their mean"))
        p.add_argument(f"--{what}", required=True, metavar="FILE", help="the jsonl file to judge")
        p.add_argument("--judge", required=True, help="checkpoint directory or endpoint URL (http://host:port/v1)")
        p.add_argument("--rubric", default=None, metavar="FILE", help="rubric text; None: helpfulness, correctness, "
                       "harmlessness, concision")
        p.add_argument("--max-new-tokens", type=int, default=512, help="tokens the judge may write per verdict")
        p.add_argument("--out", default=None, help="write every prompt, judge output and verdict as JSON here")
        _endpoint_arguments(p, "judge")
        p.set_defaults(func=cmd_judge)

    r = sub.add_parser(
        "redteam", formatter_class=fmt, help="attack a model over six categories and report attack success rates",
        description="Send attacks to a model (checkpoint directory or endpoint URL): templated attacks over six "
                    "categories (direct, indirect, multi_step, encoding, persona, many_shot) for each goal, plus "
                    "attacks written by an --attacker model. Responses are classified by refusal rules, or by a "
                    "--judge model when given; prints the attack success rate per category. The built-in goals "
                    "are mild, standard test requests; give your own with --goals. See docs/judge_redteam.md.")
    r.add_argument("--model", required=True, help="the model under test: checkpoint directory or endpoint URL")
    r.add_argument("--goals", default=None, metavar="FILE",
                   help="one goal per line, or jsonl with goal[, category]; None: the built-in goals")
    r.add_argument("--categories", default=None, help="comma-separated attack categories; None: all six")
    r.add_argument("--shots", type=int, default=32, help="faux dialogue turns in many-shot attacks")
    r.add_argument("--attacker", default=None, help="a model that writes further attacks (directory or URL)")
    r.add_argument("--generated", type=int, default=1, help="attacks the attacker writes per goal and category")
    r.add_argument("--judge", default=None, help="a model that decides whether a response complied (directory or URL)")
    r.add_argument("--max-new-tokens", type=int, default=256, help="tokens the model may answer each attack with")
    r.add_argument("--seed", type=int, default=0, help="seeds template and shot choices")
    r.add_argument("--out", default=None, help="write every attack, response and decision as JSON here")
    _endpoint_arguments(r, "model", "attacker", "judge")
    r.set_defaults(func=cmd_redteam)


# --- alignment (lmlab/align/) -----------------------------------------------------------------
def _add_run_flags(p: argparse.ArgumentParser, example: str) -> None:
    """The flags every recipe-driven training stage shares (`lmlab sft`, `lmlab reward train`, `lmlab align ...`);
    `example` shows --set on settings of that stage."""
    p.add_argument("--recipe", help="TOML recipe (optional)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help=f"override a setting, e.g. {example} (repeatable; values are TOML)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run in train.out_dir first")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to metrics.jsonl)")


def _run_stage(args: argparse.Namespace, load: Callable[[], Any], run: Callable[..., Any]) -> Any | int:
    """What every training stage of `lmlab reward` / `lmlab align` does around its run: resolve the config
    (`load()`), print it with --print-config, run on every process (log lines from rank 0 only). Returns the run's
    result on rank 0, else the exit code to return (0 after --print-config or on another rank, 130 when
    interrupted, after saying how to resume)."""
    try:
        cfg = load()
    except FileNotFoundError as e:
        raise UsageError(str(e)) from e
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    main_rank = int(os.environ.get("RANK", "0")) == 0
    result = run(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                 log=print if main_rank else (lambda _: None))
    if not main_rank:
        return 0
    if result.run.interrupted:
        print(f"interrupted at step {result.run.step}; checkpoint {result.run.checkpoint}. Continue with the same "
              "command and --resume.", file=sys.stderr)
        return 130
    return result


def _align_summary(result: Any) -> int:
    """The held-out metrics before and after, and where the checkpoint and curves are."""
    for name, metrics in (("before", result.before), ("after", result.after)):
        shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
        print(f"held-out {name}: {json.dumps(shown)}")
    print(f"checkpoint: {result.run.checkpoint}; curves: {result.run.out_dir / 'align.png'}")
    print(f"try it: lmlab generate --model {result.run.checkpoint} --chat --prompt 'Hello'")
    return 0


def cmd_reward_train(args: argparse.Namespace) -> int:
    from lmlab.align.reward import load_reward_recipe, train_reward_model

    result = _run_stage(args, lambda: load_reward_recipe(args.recipe, args.set or [], model=args.model,
                                                         data=args.data), train_reward_model)
    if isinstance(result, int):
        return result
    run = result.run
    print(f"done: {run.step} steps" + (f", train loss {run.loss:.4f}" if run.loss is not None else ""))
    if result.after:
        print(f"held-out pairwise accuracy {result.before['accuracy']:.4f} -> {result.after['accuracy']:.4f} "
              f"({result.data['held_out_pairs']} pairs); held-out reward mean {result.after['reward_mean']:+.4f}, "
              f"std {result.after['reward_std']:.4f}")
    print(f"reward model: {run.checkpoint}")
    print(f"try it: lmlab reward score --model {run.checkpoint} --prompt 'Hello' --response 'Hi! How can I help?'")
    return 0


def cmd_reward_score(args: argparse.Namespace) -> int:
    import torch

    from lmlab.align.preference import load_pairs
    from lmlab.align.reward import load_reward_model, reward_metrics
    from lmlab.atomic import atomic_file

    if bool(args.prompt) != bool(args.response) or sum(map(bool, (args.prompt, args.data, args.chats))) != 1:
        raise UsageError("give one of: --data PAIRS, --chats FILE, or --prompt TEXT with one or more --response TEXT")
    model, tokenizer = load_reward_model(args.model, device=_device(args.device))
    rows: list[dict] = []
    if args.data:
        pairs = load_pairs(args.data, limit=args.limit)
        chats = [[*p.prompt, {"role": "assistant", "content": reply}]
                 for p in pairs for reply in (p.chosen, p.rejected)]
        rewards = model.score(tokenizer, chats, args.batch_size)
        chosen, rejected = torch.tensor(rewards[0::2]), torch.tensor(rewards[1::2])
        m = reward_metrics(chosen, rejected)
        print(f"{len(pairs)} pairs: pairwise accuracy {m['accuracy']:.4f}, Bradley-Terry loss {m['val_loss']:.4f}, "
              f"reward chosen {m['reward_chosen']:+.4f}, rejected {m['reward_rejected']:+.4f}, all "
              f"{m['reward_mean']:+.4f} +- {m['reward_std']:.4f}")
        rows = [{"chosen_reward": c, "rejected_reward": r} for c, r in zip(rewards[0::2], rewards[1::2], strict=True)]
    else:
        if args.chats:
            from lmlab.tune.chat_data import _read_file

            chats = [r.get("messages") for r in _read_file(Path(args.chats))][:args.limit or None]
            if not all(isinstance(c, list) for c in chats):
                raise UsageError(f"{args.chats}: every record needs \"messages\": a chat ending with the assistant "
                                 "reply to score")
        else:
            chats = [[{"role": "user", "content": args.prompt}, {"role": "assistant", "content": r}]
                     for r in args.response]
        rewards = model.score(tokenizer, chats, args.batch_size)
        rows = [{"reward": r} for r in rewards]
        if args.prompt:
            for reply, r in zip(args.response, rewards, strict=True):
                print(f"{r:+.4f}\t{reply}")
        else:
            t = torch.tensor(rewards, dtype=torch.float64)
            print(f"{len(rewards)} conversations: reward {float(t.mean()):+.4f} +- {float(t.std(correction=0)):.4f}")
    if args.out:
        with atomic_file(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        print(f"rewards: {args.out}")
    return 0


def add_reward_commands(sub) -> None:
    """`lmlab reward ...`: reward models (lmlab/align/reward.py)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    r = sub.add_parser("reward", help="train and use reward models (Bradley-Terry on preference pairs)",
                       description="Reward models: a scalar head on a transformer, read at the last token of a "
                                   "conversation, trained so that preferred replies score higher (lmlab/align/"
                                   "reward.py, docs/alignment.md).")
    rsub = r.add_subparsers(dest="reward_command", metavar="<command>", required=True)
    t = rsub.add_parser(
        "train", formatter_class=fmt, help="train a reward model on preference pairs",
        description="Train a reward model from a checkpoint (usually an SFT model): its final hidden state at the "
                    "last token of each reply goes through a new linear head, trained with the Bradley-Terry loss "
                    "(optionally with each pair's margin: --set loss.margin=true) on preference pairs: a .jsonl of "
                    "{prompt|messages, chosen, rejected[, margin]}, HH-RLHF transcripts, or a dataset name "
                    "(synthetic, hh-rlhf:test). Held-out pairwise accuracy, loss and reward mean/std are logged "
                    "before training and every train.eval_every steps; held-out pairs are the dataset's own "
                    "validation split, --set data.validation=FILE, or data.val_fraction of the data. A recipe "
                    "(TOML: [model] [data] [loss] [train] [optim] [schedule] [distributed], see "
                    "recipes/reward-speedrun.toml) is optional; --set overrides any setting. Writes checkpoints "
                    "(backbone + reward_head.safetensors), metrics.jsonl, reward.json and reward.png to "
                    "train.out_dir. Ctrl-C saves a checkpoint; --resume continues exactly.",
    )
    t.add_argument("--model", help="the backbone checkpoint, lmlab or Hugging Face (model.path)")
    t.add_argument("--data", help="preference pairs: a .jsonl/.json file or a dataset name[:split] (data.train)")
    _add_run_flags(t, "train.lr=1e-4 or data.seq_len=256")
    t.set_defaults(func=cmd_reward_train)

    s = rsub.add_parser(
        "score", formatter_class=fmt, help="score replies with a reward model",
        description="Score with a reward checkpoint (or a reward run directory: its newest checkpoint). --data "
                    "PAIRS scores both replies of every preference pair and prints the pairwise accuracy (ties "
                    "count half) and reward statistics; --chats FILE scores a .jsonl of {\"messages\": [...]} "
                    "chats, each ending with the assistant reply to score; --prompt with --response scores replies "
                    "to one user message. --out writes one JSON line of rewards per pair or chat.",
    )
    s.add_argument("--model", required=True, help="reward model checkpoint or run directory")
    s.add_argument("--data", help="preference pairs: a .jsonl/.json file or a dataset name[:split]")
    s.add_argument("--chats", help="a .jsonl/.json of {\"messages\": [...]} chats ending with an assistant reply")
    s.add_argument("--prompt", help="a user message")
    s.add_argument("--response", action="append", help="a reply to --prompt (repeatable)")
    s.add_argument("--limit", type=int, default=0, help="score at most this many pairs or chats (0: all)")
    s.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    s.add_argument("--out", help="write the rewards here as JSON lines")
    s.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto")
    s.set_defaults(func=cmd_reward_score)


def cmd_align_offline(args: argparse.Namespace) -> int:
    from lmlab.align.offline import align_offline, load_align_recipe

    result = _run_stage(args, lambda: load_align_recipe(args.recipe, args.set or [], method=args.align_command,
                                                        model=args.model, data=args.data, ref=args.ref,
                                                        adapter=args.adapter), align_offline)
    return result if isinstance(result, int) else _align_summary(result)


# `lmlab align <method>`: what each offline method is, for its --help
ALIGN_OFFLINE_HELP = {
    "dpo": ("Direct Preference Optimization (Rafailov et al. 2023)",
            "-log sigmoid(beta [(log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected)]); beta 0.1"),
    "ipo": ("Identity Preference Optimization (Azar et al. 2023)",
            "(h - 1/(2 beta))^2 on the length-averaged log-ratio gap h: a finite target, no overfitting to "
            "deterministic preferences"),
    "cdpo": ("conservative DPO (Mitchell 2023)", "DPO with label smoothing (align.label_smoothing, default 0.1): "
             "robust to flipped labels"),
    "kto": ("Kahneman-Tversky Optimization (Ethayarajh et al. 2024)",
            "unpaired data: {prompt, completion, label} records (pairs become a desirable and an undesirable one)"),
    "orpo": ("Odds Ratio Preference Optimization (Hong et al. 2024)",
             "no reference model: SFT loss on the chosen reply plus beta x the odds-ratio term"),
    "simpo": ("Simple Preference Optimization (Meng et al. 2024)",
              "no reference model: length-averaged log-probabilities as rewards, target margin align.gamma"),
}


def add_align_offline_commands(asub) -> None:
    """`lmlab align {dpo,ipo,cdpo,kto,orpo,simpo}`: offline preference optimization (lmlab/align/offline.py)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    for method, (title, what) in ALIGN_OFFLINE_HELP.items():
        p = asub.add_parser(
            method, formatter_class=fmt, help=f"{title}: {what.split(':')[0]}",
            description=f"{title}: {what}. Trains the policy (--model, usually an SFT checkpoint) on preference "
                        "data (--data: a .jsonl of {prompt, chosen, rejected} records, prompts as text or chats; "
                        "HH-RLHF transcripts; or a dataset name such as synthetic or hh-rlhf[:test]) through "
                        "lmlab's training loop. The reference model's log-probabilities are computed once before "
                        "training and cached in the run directory. Logs implicit rewards, reward accuracy, margins "
                        "and log-probabilities; evaluates held-out pairs before and during training (win rate: how "
                        "often the policy prefers the chosen reply) and writes alignment.json and align.png. A "
                        "recipe (TOML: [model] [data] [align] [adapter] [train] [optim] [schedule], see "
                        "recipes/dpo-speedrun.toml) is optional; --set overrides any setting.")
        p.add_argument("--model", help="the policy to align (model.path)")
        p.add_argument("--data", help="preference data: a .jsonl/.json file or a dataset name[:split] (data.train)")
        if method not in ("orpo", "simpo"):
            p.add_argument("--ref", help="the reference model (model.ref); default: the starting policy")
        p.add_argument("--adapter", choices=["lora", "rslora", "dora", "qlora", "ia3"],
                       help="train an adapter on the frozen policy instead of every weight")
        _add_run_flags(p, "align.beta=0.05 or train.lr=1e-6")
        p.set_defaults(func=cmd_align_offline, ref=None)


def cmd_align_online(args: argparse.Namespace) -> int:
    from lmlab.align.online import load_online_recipe, online_dpo

    def load():
        cfg = load_online_recipe(args.recipe, args.set or [], model=args.model, prompts=args.prompts,
                                 rewards=args.reward or [], judge=args.judge)
        cfg.judge.name = args.judge_model or cfg.judge.name
        return cfg

    result = _run_stage(args, load, online_dpo)
    return result if isinstance(result, int) else _align_summary(result)


def add_align_online_command(asub) -> None:
    """`lmlab align online-dpo`: online preference optimization (lmlab/align/online.py)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = asub.add_parser(
        "online-dpo", formatter_class=fmt, help="online DPO: the policy's own reply pairs, labeled each round",
        description="Online preference optimization (Guo et al. 2024; iterative DPO). Each round samples two replies "
                    "to each of rollout.prompts_per_rollout prompts with the current policy (through the inference "
                    "engine), labels every pair with --reward (a reward model rm:DIR or any reward function: the "
                    "higher reward is chosen, ties dropped) or --judge (an lmlab checkpoint or an OpenAI-compatible "
                    "URL, asked in both orders; inconsistent verdicts dropped), computes the reference model's "
                    "log-probabilities (the starting policy), and takes rollout.epochs passes of DPO (align.method: "
                    "dpo, ipo, cdpo, orpo, simpo) over the round's pairs. rollout.rollouts sets the number of rounds. "
                    "Logs the DPO metrics and the round's labeling statistics; evaluates the held-out win rate of the "
                    "policy's greedy replies against the starting policy's, judged by the same labeler. Recipe "
                    "sections: [model] [rollout] [reward] [judge] [align] [train] [optim] [schedule].")
    p.add_argument("--model", help="the policy to train, usually an SFT checkpoint (model.path)")
    p.add_argument("--prompts", help="training prompts: a .jsonl/.json file, a directory, or a dataset name "
                                     "(rollout.prompts)")
    p.add_argument("--reward", action="append", metavar="SPEC",
                   help="label pairs by this reward (repeatable, summed): rm:DIR, a built-in (number, synthetic, "
                        "format, ended, sentiment, length=N) or module:function / file.py:function")
    p.add_argument("--judge", help="label pairs by this judge instead: a checkpoint directory or an endpoint URL")
    p.add_argument("--judge-model", help="the endpoint's model name (URL judges)")
    _add_run_flags(p, "rollout.rollouts=10 or align.beta=0.05")
    p.set_defaults(func=cmd_align_online)


def cmd_align_rl(args: argparse.Namespace) -> int:
    """`lmlab align ppo` and `lmlab align grpo`."""
    from lmlab.align import grpo, ppo

    if args.align_command == "ppo":
        load, run_method, cli = ppo.load_ppo_recipe, ppo.ppo, {}
    else:
        load, run_method, cli = grpo.load_grpo_recipe, grpo.grpo, {"dr_grpo": args.dr_grpo}
    result = _run_stage(args, lambda: load(args.recipe, args.set or [], model=args.model, prompts=args.prompts,
                                           rewards=args.reward or [], **cli), run_method)
    return result if isinstance(result, int) else _align_summary(result)


ALIGN_RL_HELP = {
    "ppo": ("RLHF with PPO: a policy and a value head learn from rewards of the policy's own replies",
            "RLHF with Proximal Policy Optimization (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022). "
            "Each rollout samples a reply to each of rollout.prompts_per_rollout prompts with the current policy "
            "(through lmlab's inference engine), scores it (--reward), and turns the score into per-token rewards "
            "with a KL penalty to the reference policy (ppo.kl_coef x k1 or k3, Schulman 2020; an adaptive KL "
            "controller with ppo.adaptive_kl, Ziegler et al. eq. 2). A value head on the policy's trunk "
            "(ppo.value_model = head, or a separate trunk copy) gives GAE advantages and returns (Schulman et al. "
            "2016); rollout.epochs passes of minibatch steps train the clipped policy and value losses. Logs reward, "
            "KL, kl_coef, entropy, clip fraction, value loss, reply length; evaluates greedy replies to held-out "
            "prompts (eval_reward). Checkpoints hold the policy (readable by `lmlab generate`) and the value head "
            "in value.safetensors beside it."),
    "grpo": ("RL with verifiable rewards (GRPO, optionally Dr. GRPO): a group of replies per prompt as baseline",
             "Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath). Each rollout samples a group of "
             "grpo.num_generations replies to each prompt with the current policy, scores them (--reward: answer "
             "checkers such as number = the exact final number against the record's answer, synthetic = lmlab's "
             "synthetic-task verifier, format, or any reward), and gives every token of a reply its advantage "
             "against the group: (r - mean) / std. No value model; the clipped objective has a k3 KL penalty to the "
             "reference (grpo.beta). --dr-grpo applies the Dr. GRPO corrections (Liu et al. 2025): no division by "
             "the group's std and no per-reply length normalization. Logs reward, accuracy (the checker's mean over "
             "samples), KL, entropy, clip fraction, the share of groups with no signal; evaluates greedy held-out "
             "accuracy (eval_accuracy)."),
}


def add_align_rl_commands(asub) -> None:
    """`lmlab align {ppo,grpo}`: reinforcement learning from rewards (lmlab/align/ppo.py, grpo.py)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    for method, (title, what) in ALIGN_RL_HELP.items():
        p = asub.add_parser(
            method, formatter_class=fmt, help=title,
            description=f"{what} Prompts (--prompts): a .jsonl/.json of {{\"prompt\": ...}} records (the synthetic "
                        "eval files: prompt, answer, task), chats ({\"messages\": [...]}: the prompt is what precedes "
                        "the last assistant turn, whose text becomes the record's answer), GSM8K-style "
                        "{question, answer} records, a directory of such files, or a dataset name[:split]; every "
                        "other field of a record reaches the reward functions. Rewards (--reward, repeatable, "
                        "summed with reward.weights): number, synthetic, format, ended, sentiment, length=N, rm:DIR "
                        "(a reward model from `lmlab reward train`), module:function or file.py:function "
                        "(fn(prompts, completions, **columns) -> list[float], TRL's signature). Runs through "
                        "lmlab's training loop: one optimizer step per minibatch, checkpoints, exact --resume, "
                        "metrics.jsonl, rl.json (held-out before/after) and align.png. A recipe (TOML: [model] "
                        f"[rollout] [reward] [{method}] [train] [optim] [schedule], see "
                        f"recipes/{method}-speedrun.toml) is optional; --set overrides any setting.")
        p.add_argument("--model", help="the policy to train, usually an SFT checkpoint (model.path)")
        p.add_argument("--prompts", help="training prompts: a .jsonl/.json file, a directory, or a dataset name "
                                         "(rollout.prompts)")
        p.add_argument("--reward", action="append", metavar="SPEC",
                       help="a reward function (repeatable; reward.functions): number, synthetic, format, ended, "
                            "sentiment, length=N, rm:DIR, module:function, file.py:function")
        if method == "grpo":
            p.add_argument("--dr-grpo", action="store_true",
                           help="Dr. GRPO: grpo.scale_rewards = false and grpo.loss_agg = 'constant'")
        _add_run_flags(p, "train.lr=1e-5, rollout.max_new_tokens=128, "
                          f"{method}.{'kl_coef' if method == 'ppo' else 'beta'}=0.02")
        p.set_defaults(func=cmd_align_rl)


def _cai_inputs(args: argparse.Namespace):
    from lmlab.align.constitutional import Constitution, load_prompts

    if args.limit < 0:
        raise UsageError(f"--limit must be >= 0 (0: all prompts), got {args.limit}")
    return Constitution.load(args.constitution), load_prompts(args.prompts, limit=args.limit, subset=args.subset)


def _cai_report(summary: dict, errors: dict[str, str], n_new: int, out: str, what: str) -> int:
    print(json.dumps(summary, indent=1))
    print(f"{what}: {out}", file=sys.stderr)
    if errors:
        first = next(iter(errors.items()))
        print(f"warning: {len(errors)} prompt(s) failed and were not written (first: {first[0]}: {first[1]}); "
              "rerun the same command to retry them", file=sys.stderr)
        if n_new == 0:
            return 1
    return 0


def cmd_cai_critique_revise(args: argparse.Namespace) -> int:
    from lmlab.align.constitutional import CritiqueConfig, critique_revise

    constitution, prompts = _cai_inputs(args)
    config = CritiqueConfig(rounds=args.rounds, few_shot=args.few_shot, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size)
    model = _generator(args.model, args, "--model", args.model_name)
    if args.no_progress and hasattr(model, "progress"):
        model.progress = False
    result = critique_revise(model, prompts, constitution, config, out=args.out, overwrite=args.overwrite,
                             progress=not args.no_progress)
    return _cai_report(result.summary(), result.errors, result.n_new, args.out,
                       "fine-tuning chats (lmlab sft --data FILE)")


def cmd_cai_rlaif(args: argparse.Namespace) -> int:
    from lmlab.align.constitutional import RLAIFConfig, comparisons_path, rlaif

    constitution, prompts = _cai_inputs(args)
    if not args.model:
        missing = next((it.id for it in prompts if len(it.responses) < 2), None)
        if missing is not None:
            raise UsageError(f"prompt {missing} of {args.prompts} has fewer than two 'responses' and no --model was "
                             "given to sample them: pass --model (a checkpoint or endpoint URL)")
    config = RLAIFConfig(method=args.judge_method, temperature=args.temperature, top_p=args.top_p,
                         max_new_tokens=args.max_new_tokens, judge_max_new_tokens=args.judge_max_new_tokens,
                         min_margin=args.min_margin, keep_inconsistent=args.keep_inconsistent, seed=args.seed,
                         batch_size=args.batch_size)
    policy = _generator(args.model, args, "--model", args.model_name) if args.model else None
    if policy is not None and args.judge == args.model and args.judge_model == args.model_name:
        judge = policy  # one model in memory for both roles
    else:
        judge = _generator(args.judge, args, "--judge", args.judge_model)
    for model in (policy, judge):
        if args.no_progress and hasattr(model, "progress"):
            model.progress = False
    result = rlaif(judge, prompts, constitution, config, policy=policy, out=args.out, overwrite=args.overwrite,
                   progress=not args.no_progress)
    print(f"every comparison, kept or dropped: {comparisons_path(args.out)}", file=sys.stderr)
    return _cai_report(result.summary(), result.errors, result.n_new, args.out,
                       "preference pairs (reward model / DPO data)")


def add_cai_commands(sub) -> None:
    """`lmlab cai {critique-revise,rlaif}`: Constitutional AI (lmlab/align/constitutional.py)."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    c = sub.add_parser(
        "cai", help="Constitutional AI: critique-and-revise data and AI preference labels (RLAIF)",
        description="Constitutional AI (Bai et al. 2022): a constitution of written principles replaces human "
                    "labels. `critique-revise` makes supervised data: the model answers each prompt, then "
                    "critiques and rewrites its answer under sampled principles; the revised chats train with "
                    "`lmlab sft`. `rlaif` makes preference data: two responses per prompt are compared by an AI "
                    "judge under a sampled principle, in both orders to cancel position bias; the pairs train a "
                    "reward model or DPO (`lmlab align`). Models and judges are checkpoint directories or any "
                    "OpenAI-compatible endpoint URL (`lmlab serve`, a hosted model). See docs/alignment.md.")
    csub = c.add_subparsers(dest="cai_command", metavar="<command>", required=True)

    def common(p) -> None:
        p.add_argument("--prompts", required=True,
                       help="a .jsonl/.json file (messages, prompt, instruction, goal or question per record), a .txt "
                            "file (one prompt per line), 'redteam' (the built-in red-team goals) or a dataset name "
                            "such as hh-rlhf:test")
        p.add_argument("--subset", default=None,
                       help="keep the dataset records of this subset only (hh-rlhf: harmless-base, the red-team "
                            "prompts of the paper, or helpful-base)")
        p.add_argument("--limit", type=int, default=0, help="use the first N prompts (0: all)")
        p.add_argument("--constitution", default=None, metavar="FILE",
                       help="principles as TOML or JSON; None: lmlab/align/constitutions/default.toml")
        p.add_argument("--out", required=True, metavar="FILE", help="the jsonl file to write")
        p.add_argument("--overwrite", action="store_true",
                       help="start over; without it, a rerun skips the prompts already in --out (resume)")
        p.add_argument("--max-new-tokens", type=int, default=256, help="tokens per generated reply")
        p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling of generated replies")
        p.add_argument("--seed", type=int, default=0, help="seeds the principles drawn and every sample, per prompt")
        p.add_argument("--batch-size", type=int, default=32,
                       help="prompts generated together; each batch is appended to --out when done (a crash "
                            "loses at most the batch in flight)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = csub.add_parser(
        "critique-revise", formatter_class=fmt, help="answers revised under sampled principles (SFT data)",
        description="The supervised stage of Constitutional AI. For each prompt the model writes an answer; then, "
                    "for --rounds rounds, a principle is drawn from the constitution, the model is asked the "
                    "principle's critique request and writes a critique, then its revision request and rewrites "
                    "the answer. Writes one chat per prompt, the user's prompt and the final revision, with the "
                    "initial answer, critiques, revisions and principles alongside: train on it with "
                    "`lmlab sft --data FILE`. A small model mostly cannot follow the requests; point --model at a "
                    "capable endpoint to make useful data.")
    common(p)
    p.add_argument("--model", required=True, help="the model that answers, critiques and revises: checkpoint "
                   "directory or endpoint URL (http://host:port/v1)")
    p.add_argument("--rounds", type=int, default=1, help="critique-and-revision rounds per prompt")
    p.add_argument("--few-shot", type=int, default=0,
                   help="worked examples from the constitution shown first (for base models)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (0: greedy)")
    _endpoint_arguments(p, "model")
    p.set_defaults(func=cmd_cai_critique_revise)

    r = csub.add_parser(
        "rlaif", formatter_class=fmt, help="AI-judged preference pairs under sampled principles (RM/DPO data)",
        description="The RL stage of Constitutional AI (RLAIF). For each prompt, two responses are sampled from "
                    "--model (or read from the prompts file's 'responses'), a principle is drawn, and the --judge "
                    "is asked which response better satisfies it, once with each response shown first. The "
                    "preference is the average over both orders of the judge's probability for that response: "
                    "read from the option letters' log-probabilities (a checkpoint judge, or an endpoint that "
                    "returns top_logprobs, as `lmlab serve` does) or from a written [[A]]/[[B]] verdict. Ties "
                    "(a judge that always picks the first position gives one) are dropped, and so are pairs whose "
                    "two orders disagree unless --keep-inconsistent. Writes the pairs "
                    "(prompt, messages, chosen, rejected, preference, principle) that `lmlab reward` and "
                    "`lmlab align dpo` read, and every comparison to OUT.comparisons.jsonl.")
    common(r)
    r.add_argument("--model", default=None, help="the policy that writes the two responses: checkpoint directory or "
                   "endpoint URL; None: the prompts file gives them")
    r.add_argument("--judge", required=True, help="the judge: checkpoint directory or endpoint URL")
    r.add_argument("--judge-method", choices=["auto", "logprobs", "generate"], default="auto",
                   help="logprobs: probabilities of the option letters (the paper); generate: a written verdict; "
                        "auto: logprobs where the judge gives them, else generate")
    r.add_argument("--judge-max-new-tokens", type=int, default=256, help="tokens of a written verdict")
    r.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the two responses")
    r.add_argument("--min-margin", type=float, default=0.0,
                   help="drop pairs whose preference is within this of 0.5 (ties)")
    r.add_argument("--keep-inconsistent", action="store_true",
                   help="keep pairs whose two orders prefer different responses, with their soft preference (near "
                        "0.5); by default they are dropped, since their chosen/rejected label is mostly position bias")
    _endpoint_arguments(r, "model", "judge")
    r.set_defaults(func=cmd_cai_rlaif)


def add_align_commands(sub) -> None:
    """`lmlab align <method>`: every way lmlab aligns a policy, one subcommand per method."""
    a = sub.add_parser(
        "align", help="preference optimization and RL: DPO, IPO, cDPO, KTO, ORPO, SimPO, PPO, GRPO, online DPO",
        description="Align a fine-tuned checkpoint with preferences or rewards. Offline methods (dpo, ipo, cdpo, "
                    "kto, orpo, simpo) learn from a fixed set of preference pairs; ppo and grpo learn from rewards "
                    "of the policy's own samples (a reward model, a Python function, or answer checkers); "
                    "online-dpo labels fresh pairs of the policy's samples each round. Every method runs through "
                    "lmlab's one training loop (checkpoints, resume, metrics.jsonl, plots) and generates "
                    "through the inference engine. docs/alignment.md shows what each one does and measured.",
    )
    asub = a.add_subparsers(dest="align_command", metavar="<method>", required=True)
    add_align_offline_commands(asub)
    add_align_rl_commands(asub)
    add_align_online_command(asub)


# --- passkey -------------------------------------------------------------------------------

def cmd_passkey(args: argparse.Namespace) -> int:
    from lmlab.evals.passkey import parse_rope_scaling, passkey_sweep
    from lmlab.model import load

    lengths = _int_list(args.lengths, "--lengths")
    try:
        depths = [float(x) for x in args.depths.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--depths takes comma-separated fractions in [0, 1], e.g. 0,0.5,1; got {args.depths!r}") \
            from None
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if not depths or bad:
        raise UsageError(f"--depths takes fractions in [0, 1] (0: needle first, 1: last); got {args.depths!r}")
    if args.keys < 1:
        raise UsageError(f"--keys must be at least 1, got {args.keys}")
    for flag, value in (("--sliding-window", args.sliding_window), ("--prefill-chunk", args.prefill_chunk)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if args.sinks is not None and args.sinks < 0:
        raise UsageError(f"--sinks must be >= 0, got {args.sinks}")
    if args.sinks is not None and args.sliding_window is None:
        raise UsageError("--sinks N needs --sliding-window W: the cache keeps the N first tokens and the W most recent")
    if args.prefill_chunk is not None and args.sinks is None:
        raise UsageError("--prefill-chunk applies to the attention-sink cache; add --sinks N --sliding-window W")
    rope_scaling = None
    if args.rope_scaling:
        parse_rope_scaling(args.rope_scaling)  # a malformed spec fails here, before the model is read
        rope_scaling = args.rope_scaling
    streaming, sliding_window = None, args.sliding_window
    if args.sinks is not None:  # the window goes to the cache: a sliding-window mask would hide the sinks
        chunk = () if args.prefill_chunk is None else (args.prefill_chunk,)  # None: generate's default chunk
        streaming, sliding_window = (args.sinks, args.sliding_window, *chunk), None

    device = _device(args.device)
    model = load(args.model, device=device, dtype=_dtype(args.dtype, device)).eval()
    tokenizer = _tokenizer_from(args.model)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise UsageError(f"the tokenizer in {args.model} has {tokenizer.vocab_size} tokens but the model's vocabulary "
                         f"has {model.cfg.vocab_size}: they do not belong together")
    results = passkey_sweep(model, tokenizer, lengths, depths, args.keys, seed=args.seed, rope_scaling=rope_scaling,
                            sliding_window=sliding_window, streaming=streaming, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, progress=not args.no_progress)
    print(f"passkey accuracy (%) of {args.model}: {args.keys} keys per cell, prompt length in tokens "
          f"(max_seq_len {model.cfg.max_seq_len})")
    print(results.table())
    if args.out:
        from lmlab.atomic import atomic_file

        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(args.out, "w") as f:
            json.dump({"model": str(args.model), **results.to_dict()}, f, indent=1)
        print(f"results (settings, accuracy, every prompt's completion): {args.out}", file=sys.stderr)
    return 0


def add_passkey_command(sub) -> None:
    p = sub.add_parser(
        "passkey", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="passkey retrieval at increasing context lengths (long-context extension)",
        description="Passkey retrieval (Mohtashami & Jaggi 2023): a number hidden at a given depth in repeated filler "
                    "text, asked for at the end; the score is exact match of the digits the model writes (greedy). "
                    "Evaluates every --lengths x --depths cell with --keys seeded keys and prints the accuracy table. "
                    "Lengths past the model's max_seq_len are evaluated (extrapolation is the point), except with "
                    "learned position embeddings. --rope-scaling, --sliding-window and --sinks change the model's "
                    "context handling for this run only (context extension without retraining).",
    )
    p.add_argument("--model", required=True, help="checkpoint directory (lmlab or Hugging Face) with its tokenizer")
    p.add_argument("--lengths", default="256,512,1024,2048", help="prompt lengths in tokens, comma-separated")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                   help="where the needle goes, as fractions of the filler (0: first, 1: right before the question)")
    p.add_argument("--keys", type=int, default=5, help="prompts (random keys) per length and depth")
    p.add_argument("--seed", type=int, default=0, help="seeds the keys (the same keys at every length)")
    p.add_argument("--rope-scaling", default=None, metavar="KIND:FACTOR",
                   help="RoPE scaling for this run: linear, ntk, dynamic, yarn or llama3, with a factor or 'auto' "
                        "(per length: (length + 7) / max_seq_len, the positions up to the end of a 5-digit answer), "
                        "e.g. ntk:4 or yarn:auto; the original length is the model's max_seq_len")
    p.add_argument("--sliding-window", type=int, default=None, metavar="N",
                   help="attend only to the last N tokens (every full-attention layer slides); with --sinks, the "
                        "number of recent tokens the attention-sink cache keeps")
    p.add_argument("--sinks", type=int, default=None, metavar="N",
                   help="StreamingLLM: generate with a bounded cache of the first N tokens (attention sinks) and the "
                        "--sliding-window most recent, positions counted within the cache")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="C",
                   help="with --sinks: prompt tokens per forward call (default: window // 4); the cache holds "
                        "N + window - 1 + C slots")
    p.add_argument("--max-new-tokens", type=int, default=12, help="tokens generated per prompt (the key's digits)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on GPU, float32 on CPU")
    p.add_argument("--out", default=None, help="write the results JSON (settings, accuracy table, every completion)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_passkey)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmlab",
        description="lmlab: the modern LLM stack, end to end. One subcommand per stage; "
                    "`lmlab <command> --help` explains each.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    g = sub.add_parser(
        "generate", formatter_class=fmt, help="generate text from a checkpoint",
        description="Generate a continuation of a prompt with a KV cache. --model is an lmlab "
                    "checkpoint or a Hugging Face checkpoint directory (config.json + safetensors). "
                    "Temperature 0 is greedy; otherwise sampling with optional top-k, top-p, min-p "
                    "and repetition penalty, reproducible with --seed. Generation ends at "
                    "--max-new-tokens, an end-of-sequence token, a --stop string or a --stop-id.",
    )
    g.add_argument("--model", required=True, help="checkpoint directory (lmlab or Hugging Face)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (encoded with the checkpoint's tokenizer)")
    src.add_argument("--ids", help="prompt as token ids, e.g. '1 2 3' (for checkpoints without a tokenizer)")
    g.add_argument("--chat", action="store_true",
                   help="send --prompt as a user message through the chat template; stop at the end of the reply")
    g.add_argument("--adapter", help="an adapter directory (lmlab sft --adapter ...) to load onto --model")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus: keep the smallest set with this mass")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p times the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (CTRL)")
    g.add_argument("--stop", action="append", help="stop string (repeatable); not included in the output")
    g.add_argument("--stop-id", type=int, action="append", help="stop token id (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the tokenizer's end-of-sequence ids")
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    g.add_argument("--no-stream", action="store_true", help="print the whole answer at the end")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps or auto")
    g.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bf16 on GPU, float32 on CPU")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser(
        "convert", formatter_class=fmt, help="convert checkpoints between Hugging Face and lmlab",
        description="--from-hf DIR: read a Hugging Face checkpoint (GPT-2, Llama 2/3, Mistral, Qwen2, "
                    "Qwen3, Gemma, Gemma 2, Phi-3; config.json with one or many safetensors files) "
                    "and write an lmlab checkpoint (model.safetensors, config.json, tokenizer files). "
                    "--to-hf DIR: write an lmlab checkpoint back in Hugging Face format, loadable by "
                    "transformers. Output is written to a temporary directory and renamed into place.",
    )
    way = c.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", metavar="DIR", help="Hugging Face checkpoint directory to read")
    way.add_argument("--to-hf", metavar="DIR", help="lmlab checkpoint directory to export")
    c.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    c.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="--from-hf: store weights in this dtype (auto: as in the source)")
    c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    c.set_defaults(func=cmd_convert)

    i = sub.add_parser(
        "info", formatter_class=fmt, help="parameters, FLOPs and KV-cache size of a checkpoint",
        description="Print, from the config alone (no weights are read): parameter count with and "
                    "without embeddings (and the active count of a mixture of experts), training FLOPs "
                    "per token (6N + attention term at --seq-len), KV-cache bytes per token and "
                    "recurrent-state bytes per sequence, a table of what one sequence's cache would "
                    "cost if every layer of the model's shape were MHA, GQA, MQA, MLA, sliding window, "
                    "linear attention or an SSM, and the full model config. DIR may be an lmlab or a "
                    "Hugging Face checkpoint.",
    )
    i.add_argument("model", metavar="DIR", help="checkpoint directory (lmlab or Hugging Face)")
    i.add_argument("--seq-len", type=int, default=None,
                   help="context length for the attention FLOPs (default: max_seq_len)")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    i.set_defaults(func=cmd_info)

    t = sub.add_parser("tokenizer", help="train, inspect and use tokenizers",
                       description="Train a byte-level BPE tokenizer, encode and decode text, inspect a tokenizer.")
    add_tokenizer_commands(t.add_subparsers(dest="tokenizer_command", metavar="<command>", required=True))

    d = sub.add_parser("data", help="datasets, corpus preparation, token shards, the synthetic corpus",
                       description="Name or fetch datasets, clean and deduplicate a corpus, write token "
                                   "shards, generate the built-in synthetic corpus, check contamination.")
    dsub = d.add_subparsers(dest="data_command", metavar="<command>", required=True)
    add_data_registry_commands(dsub)
    add_data_prepare_command(dsub)
    add_data_shards_commands(dsub)
    add_train_commands(sub)
    add_speedrun_command(sub)
    add_scaling_commands(sub)
    add_sft_command(sub)
    add_adapter_commands(sub)
    add_distill_command(sub)
    add_serve_command(sub)
    add_eval_command(sub)
    add_judge_commands(sub)
    add_reward_commands(sub)
    add_align_commands(sub)
    add_cai_commands(sub)
    add_passkey_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):  # `lmlab info DIR | head` ends quietly, as other tools do
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = build_parser().parse_args(argv)
    for attr in ("model", "from_hf", "to_hf"):
        path = getattr(args, attr, None)
        if path is not None and not str(path).startswith(("http://", "https://")) and not Path(path).is_dir():
            print(f"error: {path} is not a directory", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
