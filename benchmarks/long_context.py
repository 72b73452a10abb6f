"""Long context: what each token mixer costs in memory and time as the context grows, on the CPU.

Four random models of the same width and depth (--d-model, --layers, --heads; float32; batch --batch)
that differ only in their token mixer:

    full      softmax attention over the whole prefix (the KV cache grows with the context)
    sliding   softmax attention over the last --window tokens (Mistral-style sliding window)
    linear    linear attention (Katharopoulos et al. 2020; lmlab/model/linear_attention.py): a fixed state
    mamba     Mamba selective state-space layers (lmlab/model/ssm.py; layer_types ["mamba"] * n, no MLP)

A model that cannot be built (e.g. a layer kind whose module is not there yet) is skipped with a note.
For each prompt length L of --lengths (default 256 .. 8192; --quick: 256, 1024, 4096):

(a) cache: bytes the cache holds for the sequences after a prefill of L tokens, summed from its tensors:
    the occupied key/value slots of softmax layers (B x L x 2 x n_kv_heads x head_dim x 4 bytes per layer;
    slots preallocated but not yet used are not counted; the JSON has the allocated bytes too) plus every
    recurrent state tensor. The sliding model's cache (--sliding-cache): lmlab's KVCache keeps every slot,
    so its buffer grows with L even though a query attends to at most --window keys, and a decode step
    masks all L of them; lmlab.model.cache.SinkCache (StreamingLLM's cache, here with no sink tokens: a
    buffer of the last --window tokens) keeps the window only, and takes the prompt --sink-chunk tokens per
    forward call (as generate(streaming=...) does). The default is SinkCache where lmlab has it.
(b) decode: seconds per generated token at context L: greedy decoding of --new-tokens tokens after the
    prefill (each step one forward over the B newest tokens, the output head and an argmax), the median step.
(c) prefill: seconds per prompt token of a prefill of L tokens (the forward that fills the cache and the
    logits of the last position, as `lmlab.infer.generate` runs it), the median of --repeats runs (fewer for
    long prompts: at most --repeat-tokens timed tokens per length, at least one run) after one untimed run;
    and its peak memory: the most bytes of tensors created during that forward that were alive
    at the same time (activations, attention scores and masks, temporaries, recurrent states), counted op by
    op with a TorchDispatchMode (`PeakTensorMemory`). Weights, inputs and the preallocated cache are not
    counted (the cache is (a)). What this does not see: scratch buffers that a fused kernel allocates inside
    itself (e.g. the blocks of SDPA's CPU flash kernel) and allocator overhead. It is exact and repeatable,
    which the process's resident set on a shared CPU machine is not (glibc keeps freed memory, other
    threads allocate), and on CPU there is no allocator statistic like CUDA's max_memory_allocated.

Timings are wall-clock by default; on a machine other jobs share, `--threads 1 --clock cpu` times in CPU
seconds of this process (see benchmarks/common.py). All four models run the same prompts.

    python benchmarks/long_context.py                          # 256 .. 8192, a few minutes
    nice -n 10 python benchmarks/long_context.py --threads 1 --clock cpu --json out.json  # on a shared machine
    python benchmarks/long_context.py --quick                  # 256, 1024, 4096
    python benchmarks/long_context.py --lengths 512 2048 --only full linear --json out.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import weakref
from pathlib import Path

import torch
from common import CLOCKS, add_clock_argument, timed, write_json  # benchmarks/common.py
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lmlab.model import ModelConfig, Transformer, build_model

MODELS = ("full", "sliding", "linear", "mamba")
DEFAULT_LENGTHS = (256, 512, 1024, 2048, 4096, 8192)
QUICK_LENGTHS = (256, 1024, 4096)
MiB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=MODELS, default=list(MODELS), help="which models to run")
    p.add_argument("--lengths", nargs="+", type=int, help=f"prompt lengths (default {DEFAULT_LENGTHS})")
    p.add_argument("--quick", action="store_true", help=f"prompt lengths {QUICK_LENGTHS}")
    g = p.add_argument_group("models (all four share these)")
    g.add_argument("--vocab", type=int, default=4096, help="vocabulary size")
    g.add_argument("--d-model", type=int, default=256, help="hidden size")
    g.add_argument("--layers", type=int, default=4, help="number of layers")
    g.add_argument("--heads", type=int, default=4, help="attention heads (full, sliding, linear)")
    g.add_argument("--kv-heads", type=int, default=4, help="key/value heads (full, sliding, linear)")
    g.add_argument("--d-ff", type=int, default=704, help="MLP hidden size (full, sliding, linear)")
    g.add_argument("--window", type=int, default=256, help="sliding window, tokens")
    p.add_argument("--batch", type=int, default=1, help="sequences per forward")
    p.add_argument("--new-tokens", type=int, default=8, help="decode steps timed per length (median reported)")
    p.add_argument("--repeats", type=int, default=3, help="timed prefills per length (median reported)")
    p.add_argument("--repeat-tokens", type=int, default=8192,
                   help="fewer repeats for long prompts: at most this many timed prompt tokens per length (>= 1 run)")
    p.add_argument("--sliding-cache", choices=("auto", "sink", "kv"), default="auto",
                   help="the sliding model's cache: sink (lmlab's SinkCache, bounded), kv (KVCache, grows), "
                        "auto (sink where lmlab has it)")
    p.add_argument("--sink-chunk", type=int, help="SinkCache: prompt tokens per call (default window // 4, as "
                                                  "generate(streaming=...))")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    add_clock_argument(p)
    p.add_argument("--seed", type=int, default=0, help="seed of weights and prompts")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--plot", default="docs/img/long_context.png", help="PNG of the four curves ('' for none)")
    args = p.parse_args(argv)
    args.lengths = sorted(set(args.lengths or (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS)))
    if min(args.lengths + [args.batch, args.new_tokens, args.repeats, args.repeat_tokens, args.threads, args.window,
                           args.layers, args.sink_chunk or 1]) < 1:
        p.error("lengths, --batch, --new-tokens, --repeats, --repeat-tokens, --threads, --window, --layers and "
                "--sink-chunk must be positive")
    if args.sliding_cache == "auto":
        args.sliding_cache = "sink" if sink_cache_class() is not None else "kv"
    elif args.sliding_cache == "sink" and sink_cache_class() is None:
        p.error("--sliding-cache sink: this lmlab has no lmlab.model.cache.SinkCache; use --sliding-cache kv")
    args.sink_chunk = args.sink_chunk or max(1, args.window // 4)
    if args.d_model % args.heads or args.heads % args.kv_heads:
        p.error(f"--d-model {args.d_model} must be divisible by --heads {args.heads}, "
                f"and --heads by --kv-heads {args.kv_heads}")
    return args


# --- models ----------------------------------------------------------------------------------------


def model_config(args: argparse.Namespace, kind: str) -> ModelConfig:
    n = args.layers
    mixer = {"full": {}, "sliding": dict(sliding_window=args.window, layer_types=["sliding"] * n),
             "linear": dict(layer_types=["linear"] * n), "mamba": dict(layer_types=["mamba"] * n)}[kind]
    return ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=n, n_heads=args.heads,
                       n_kv_heads=args.kv_heads, d_ff=args.d_ff, max_seq_len=max(args.lengths) + args.new_tokens,
                       **mixer)


def sink_cache_class():
    """lmlab's bounded cache for sliding-window layers (StreamingLLM's), where this lmlab has one."""
    from lmlab.model import cache

    return getattr(cache, "SinkCache", None)


def uses_sink_cache(args: argparse.Namespace, kind: str) -> bool:
    return kind == "sliding" and args.sliding_cache == "sink"


def new_cache(model: Transformer, args: argparse.Namespace, kind: str, length: int):
    """The cache `generate` would use. The sliding model with --sliding-cache sink: a SinkCache with no sink
    tokens, i.e. a buffer of the last --window tokens (exactly what the window attends to; RoPE is relative, so
    positions counted within the cache change nothing), taking --sink-chunk new tokens per call."""
    if uses_sink_cache(args, kind):
        return sink_cache_class()(model.cfg, args.batch, 0, args.window, torch.device("cpu"), torch.float32,
                                  chunk=args.sink_chunk)
    return model.new_cache(args.batch, length + args.new_tokens)


def cache_bytes(cache) -> tuple[int, int]:
    """(held, allocated): bytes of the occupied key/value slots plus the recurrent states, and of the whole
    key/value buffers (preallocated for every slot the cache may use) plus the states."""
    held = allocated = 0
    for buffers in (cache.k, cache.v):
        for t in buffers:
            if t is not None:
                allocated += t.numel() * t.element_size()
                held += t[:, :, :cache.length].numel() * t.element_size()
    states = sum(t.numel() * t.element_size() for state in cache.states if state for t in state.values())
    return held + states, allocated + states


# --- measuring ---------------------------------------------------------------------------------------


class PeakTensorMemory(TorchDispatchMode):
    """The peak bytes of tensor storages created inside the `with` block and alive at the same time.

    Every aten op's outputs pass through __torch_dispatch__; a storage that is not one of the op's inputs'
    (views and in-place writes alias an input) and not already counted is new: its bytes are added, and a
    weak reference subtracts them when it is freed. Tensors that existed before the block (weights, the
    cache) are never counted, nor is memory a kernel allocates inside itself."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._live: dict[int, weakref.ref] = {}  # data pointer -> weak reference to the storage

    def _freed(self, ptr: int, nbytes: int, ref: weakref.ref) -> None:
        if self._live.get(ptr) is ref:
            del self._live[ptr]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in inputs or ptr in self._live:
                continue
            self._live[ptr] = weakref.ref(storage, lambda ref, p=ptr, n=nbytes: self._freed(p, n, ref))
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out


@torch.no_grad()
def measure(model: Transformer, args: argparse.Namespace, kind: str, length: int) -> dict:
    """(a), (b) and (c) of the module docstring for one model at one prompt length."""
    ids = torch.randint(0, args.vocab, (args.batch, length), generator=torch.Generator().manual_seed(args.seed + 1))

    chunk = args.sink_chunk if uses_sink_cache(args, kind) else length

    def prefill(cache):
        # a bounded cache takes the prompt a chunk at a time; as generate(streaming=...) does, the first
        # chunk takes the remainder
        bounds = [0, *range(length % chunk or chunk, length + 1, chunk)]
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            h = model.hidden_states(ids[:, start:end], cache)
        return model.logits(h[:, -1]).argmax(-1)

    cache = new_cache(model, args, kind, length)
    with PeakTensorMemory() as memory:  # the untimed first run: memory, and the cache decoding continues
        tok = prefill(cache)
    prefill_times = []
    for _ in range(max(1, min(args.repeats, args.repeat_tokens // length))):
        fresh = new_cache(model, args, kind, length)  # allocating the cache is not part of the timing
        prefill_times += timed(lambda c=fresh: prefill(c), 1, args.clock)
    held, allocated = cache_bytes(cache)

    decode_times = []
    now = CLOCKS[args.clock]
    for _ in range(args.new_tokens):
        t = now()
        h = model.hidden_states(tok[:, None], cache)
        tok = model.logits(h[:, -1]).argmax(-1)
        decode_times.append(now() - t)
    attended = {"full": length, "sliding": min(length, args.window)}.get(kind)
    return {"model": kind, "length": length, "cache_bytes": held, "cache_allocated_bytes": allocated,
            "attended": attended, "cache_class": type(cache).__name__,
            "decode_s_per_token": statistics.median(decode_times) / args.batch,
            "prefill_s_per_token": statistics.median(prefill_times) / (args.batch * length),
            "prefill_peak_bytes": memory.peak, "decode_times": decode_times, "prefill_times": prefill_times}


# --- report --------------------------------------------------------------------------------------------


def print_tables(rows: list[dict], kinds: list[str], lengths: list[int]) -> None:
    at = {(r["model"], r["length"]): r for r in rows}
    metrics = [
        ("(a) cache held after the prompt, MiB", lambda r: f"{r['cache_bytes'] / MiB:.3f}"),
        ("(b) decode, ms per token", lambda r: f"{1e3 * r['decode_s_per_token']:.2f}"),
        ("(c) prefill, µs per token", lambda r: f"{1e6 * r['prefill_s_per_token']:.1f}"),
        ("(c) prefill peak tensor memory, MiB", lambda r: f"{r['prefill_peak_bytes'] / MiB:.1f}"),
    ]
    for title, fmt in metrics:
        print(f"\n{title}\n\n| L | " + " | ".join(kinds) + " |")
        print("|---:|" + "---:|" * len(kinds))
        for length in lengths:
            cells = [fmt(at[k, length]) if (k, length) in at else "-" for k in kinds]
            print(f"| {length} | " + " | ".join(cells) + " |")


def plot(rows: list[dict], kinds: list[str], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = [("cache_bytes", 1 / MiB, "(a) cache held after the prompt (MiB)"),
              ("decode_s_per_token", 1e3, "(b) decode (ms / token)"),
              ("prefill_s_per_token", 1e6, "(c) prefill (µs / token)"),
              ("prefill_peak_bytes", 1 / MiB, "(c) prefill peak tensor memory (MiB)")]
    styles = {"full": "o-", "sliding": "s--", "linear": "^-", "mamba": "D-"}  # full and sliding overlap in (a)
    plain = matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}")
    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), dpi=120)
    for ax, (key, scale, label) in zip(axes.flat, panels, strict=True):
        for kind in kinds:
            mine = [r for r in rows if r["model"] == kind]
            if mine:
                name = f"{kind} ({mine[0]['cache_class']})" if kind == "sliding" else kind
                ax.plot([r["length"] for r in mine], [r[key] * scale for r in mine], styles[kind], ms=4, lw=1.2,
                        label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("context length L (tokens)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes.flat[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    print(f"torch {torch.__version__}, {args.threads} threads, float32, batch {args.batch}, {args.clock} clock; "
          f"load average {load_before[0]:.2f} (1 min) on {os.cpu_count()} CPUs")
    print(f"models: vocab {args.vocab}, d_model {args.d_model}, {args.layers} layers, {args.heads} heads "
          f"({args.kv_heads} kv), d_ff {args.d_ff}, sliding window {args.window}; lengths {args.lengths}")
    rows, skipped, params = [], {}, {}
    kinds = [k for k in MODELS if k in args.only]
    for kind in kinds:
        torch.manual_seed(args.seed)
        try:
            model = build_model(model_config(args, kind)).eval()
            measure(model, args, kind, 16)  # warm-up: first-call costs (thread pools, lazy tables) out of the rows
        except Exception as e:  # noqa: BLE001 - a mixer still being written must not stop the other rows
            skipped[kind] = f"{type(e).__name__}: {e}"
            print(f"skipping {kind}: it cannot be built or run in this lmlab ({skipped[kind]})")
            continue
        params[kind] = sum(p.numel() for p in model.parameters())
        chunked = f", prompts fed {args.sink_chunk} tokens per call" if uses_sink_cache(args, kind) else ""
        print(f"{kind}: {params[kind] / 1e6:.2f}M parameters, cache {type(new_cache(model, args, kind, 16)).__name__}"
              f"{chunked}", flush=True)
        for length in args.lengths:
            rows.append(measure(model, args, kind, length))
            r = rows[-1]
            print(f"  L={length}: cache {r['cache_bytes'] / MiB:.3f} MiB, decode {1e3 * r['decode_s_per_token']:.2f} "
                  f"ms/token, prefill {1e6 * r['prefill_s_per_token']:.1f} µs/token, peak "
                  f"{r['prefill_peak_bytes'] / MiB:.1f} MiB", flush=True)
    kinds = [k for k in kinds if k not in skipped]
    print_tables(rows, kinds, args.lengths)
    if any(r["model"] == "sliding" and r["cache_class"] == "KVCache" for r in rows):
        print(f"\nsliding: lmlab's KVCache keeps all L slots, so its cache grows like full attention's although each "
              f"query attends to at most {args.window} keys, and a decode step still masks all L keys.")
    load_after = os.getloadavg()
    print(f"\nload average after: {load_after[0]:.2f} (1 min)")
    result = {"args": vars(args), "versions": {"torch": torch.__version__}, "parameters": params,
              "skipped": skipped, "load_average": [load_before, load_after], "rows": rows}
    if args.plot and rows:
        plot(rows, kinds, args.plot, f"{args.d_model} wide, {args.layers} layers, batch {args.batch}, float32, CPU, "
                                     f"{args.threads} thread{'s' if args.threads > 1 else ''} ({args.clock} clock)")
        print(f"plot: {args.plot}")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
