"""`lmlab <stage> ...`: one subcommand per stage of the stack, and nothing else.

Each subcommand is a thin shell over the library: it parses arguments, calls one function of the
stage's module, and prints. This is the only module that knows every stage.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path


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


# --- generate ------------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    from lmlab.infer.generate import generate, stream
    from lmlab.infer.sampling import SamplingParams
    from lmlab.model import load
    from lmlab.tokenizer import load_tokenizer

    device = _device(args.device)
    model = load(args.model, device=device, dtype=_dtype(args.dtype, device)).eval()
    tokenizer = load_tokenizer(args.model)
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
    else:
        prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise UsageError("the prompt is empty; give some text with --prompt or ids with --ids")
    stop_ids = list(args.stop_id or [])
    if tokenizer is not None and not args.ignore_eos:
        stop_ids += tokenizer.eos_ids
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
    from lmlab.model.counting import summary

    cfg = read_any_config(args.model)
    info = summary(cfg, seq_len=args.seq_len)
    if args.json:
        print(json.dumps({"summary": info, "config": cfg.to_dict()}, indent=2))
        return 0
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value:,}" if isinstance(value, int) else f"{key:<{width}}  {value}")
    print("\nconfig:")
    for key, value in cfg.to_dict().items():
        print(f"  {key:<{width}}  {value}")
    return 0


# --- tokenizer -----------------------------------------------------------------------------
# `lmlab tokenizer train|encode|...`: parsers and commands for lmlab.tokenizer.


def add_tokenizer_commands(tsub) -> None:
    """Register the `lmlab tokenizer ...` subcommands on `tsub` (an argparse subparsers object)."""


# --- data: prepare ---------------------------------------------------------------------------
# `lmlab data prepare`: cleaning, filtering, dedup, then token shards (lmlab.data.prepare).


def add_data_prepare_command(dsub) -> None:
    """Register `lmlab data prepare`."""


# --- data: sources, synthetic corpus, contamination ----------------------------------------------
# `lmlab data list|download|synth|contamination` (lmlab.data.sources, .synthetic, .contamination).


def add_data_registry_commands(dsub) -> None:
    """Register `lmlab data list`, `download`, `synth` and `contamination`."""


# --- data: token shards ----------------------------------------------------------------------
# `lmlab data tokenize|inspect` over token shards (lmlab.data.shards).


def add_data_shards_commands(dsub) -> None:
    """Register `lmlab data tokenize` (text files -> token shards) and `lmlab data inspect`."""


# --- the parser ----------------------------------------------------------------------------

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
                    "without embeddings, training FLOPs per token (6N + attention term at --seq-len), "
                    "KV-cache bytes per token, and the full model config. DIR may be an lmlab or a "
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
    return parser


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):  # `lmlab info DIR | head` ends quietly, as other tools do
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = build_parser().parse_args(argv)
    for attr in ("model", "from_hf", "to_hf"):
        path = getattr(args, attr, None)
        if path is not None and not Path(path).is_dir():
            print(f"error: {path} is not a directory", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
